import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.rewards import (AsyncReward, RewardError, check_reward_name, checked_rewards, make_reward,
                               parse_reward_spec, to_uint8_images)
from rlcm_fast.rewards.base import RewardTerm
from rlcm_fast.rewards.jpeg import JpegSizeReward, nvjpeg_unavailable_reason


def natural_looking_images(n=3, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    smooth = torch.stack([xs, ys, (xs + ys) / 2])
    return torch.stack([(smooth * (i + 1) / n + 0.1 * torch.rand(3, size, size, generator=g)).clamp(0, 1) for i in range(n)])


def test_jpeg_size_equals_pillow_byte_count_at_quality_95():
    images = natural_looking_images()
    expected = []
    for pixels in to_uint8_images(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    np.testing.assert_array_equal(make_reward("jpeg_incompressibility")(images, ["p"] * 3), expected)


def test_compressibility_is_minus_incompressibility():
    images = natural_looking_images(4, seed=1)
    plus = make_reward("jpeg_incompressibility", threads=2)(images, [""] * 4)
    minus = make_reward("jpeg_compressibility", threads=1)(images, [""] * 4)
    np.testing.assert_array_equal(minus, -plus)
    assert (plus > 0).all()


def test_uint8_conversion_rounds_and_clamps():
    images = torch.tensor([-0.5, 0.0, 0.6 / 255, 0.2, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8_images(images)[0, 0, :, 0].tolist() == [0, 0, 1, 51, 255, 255]


def test_custom_reward_by_module_and_function():
    fn = make_reward("numpy:ones_like")
    assert fn.fn is np.ones_like  # called on a copy of the images (test_a_user_reward_that_edits_...)


@pytest.mark.parametrize("name, message", [
    ("aesthetics", "reward 'aesthetics' is unknown (did you mean 'aesthetic'?); allowed: jpeg_compressibility"),
    ("jpeg-compressibility", "reward 'jpeg-compressibility' is unknown (did you mean 'jpeg_compressibility'?)"),
    ("myrew.bright", "reward 'myrew.bright' is unknown (did you mean 'myrew:bright'?); allowed:"),
    ("pick", "reward 'pick' is unknown; allowed:"),  # no name is that close
    ("aesthetic:", "reward 'aesthetic:' has weight ''; a weight must be a finite number"),
    ("jpeg_compressibility:x", "reward 'jpeg_compressibility:x' has weight 'x'"),
    ("jpeg_compressibility:inf", "reward 'jpeg_compressibility:inf' has weight 'inf'"),
    # A traceback from the logged reward statistics (OverflowError), at the first update.
    ("jpeg_compressibility:1e300", "reward 'jpeg_compressibility:1e300' has weight '1e300'; a weight must be a "
                                   "finite number within float32's range (|x| <= 3.403e+38)"),
    ("pkg.mod:fn:nan", "reward 'pkg.mod:fn:nan' has weight 'nan'"),
    ("beauty:2", "reward 'beauty:2' is unknown"),
    ("jpeg_compressibility,", "reward 'jpeg_compressibility,' has an empty entry"),
    ("", "reward '' is empty"),
    ("no_such_module_xyz:fn", "cannot be imported"),
    ("numpy:no_such_function_xyz", "cannot be imported"),
    ("numpy:pi", "reward 'numpy:pi' is not callable"),
    (":fn", "reward ':fn' is unknown"),
])
def test_bad_reward_names(name, message):
    with pytest.raises(RewardError, match=re.escape(message)):
        make_reward(name)


def test_a_reward_module_in_the_working_folder_but_not_on_the_path_says_how_to_import_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".", str(tmp_path))])
    (tmp_path / "myrew_not_on_path.py").write_text("def bright(images, prompts):\n    return images.mean((1, 2, 3))\n")
    (tmp_path / "rewpkg_not_on_path").mkdir()
    (tmp_path / "rewpkg_not_on_path" / "__init__.py").write_text("")
    for spec, top in (("myrew_not_on_path:bright", "myrew_not_on_path"),
                      ("rewpkg_not_on_path.sub:f", "rewpkg_not_on_path")):
        with pytest.raises(RewardError) as error:
            make_reward(spec)
        assert str(error.value) == (f"reward {spec!r} cannot be imported: No module named {top!r}; {top!r} is in the "
                                    "current folder, which is not searched: run with PYTHONPATH=. (or install it)")
    with pytest.raises(RewardError) as error:  # nothing of that name here: where Python looks
        make_reward("absent_reward_module:f")
    assert str(error.value) == ("reward 'absent_reward_module:f' cannot be imported: No module named "
                                "'absent_reward_module'; a module of yours is found when installed or when its folder "
                                "is on PYTHONPATH")
    with pytest.raises(RewardError) as error:  # the module found, its function not: no hint
        make_reward("rlcm_fast.rewards.base:absent_function")
    assert str(error.value).endswith("has no attribute 'absent_function'")
    with pytest.raises(RewardError) as error:  # `rlcm-fast train --reward __main__:fn`: the console script's __main__
        make_reward("__main__:absent_function")
    assert str(error.value) == (
        "reward '__main__:absent_function' cannot be imported: module '__main__' has no attribute 'absent_function'; "
        "'__main__:' names a function of the running script or notebook, for a Trainer made there: on the command "
        "line, put the function in a module of yours and name it 'module:function'")


def test_checked_rewards_rejects_wrong_length_and_non_finite_values():
    np.testing.assert_array_equal(checked_rewards("r", [1, 2], 2), [1.0, 2.0])
    with pytest.raises(RewardError, match=r"reward 'r' returned shape \(3,\), expected \(2,\)"):
        checked_rewards("r", [1, 2, 3], 2)
    with pytest.raises(RewardError, match="non-finite values \\(nan at index 1\\)"):
        checked_rewards("r", torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(RewardError, match="^reward 'r' returned an integer beyond float64's range, expected 2 floats$"):
        checked_rewards("r", [1, 10 ** 400], 2)  # OverflowError traceback before


@pytest.mark.parametrize("values, message", [
    # Each would cast to float (and was scored so): a reward returning them has a bug the cast hides.
    (["0.5", "1"], "returned strings, expected 2 floats"),
    ("0.5", "returned a str, expected 2 floats"),  # a shape-() array once
    ([True, False], "returned booleans, expected 2 floats"),
    ([0.5, True], "returned booleans, expected 2 floats"),  # numpy reads these two as floats
    ((torch.tensor(0.5), torch.tensor(True)), "returned booleans, expected 2 floats"),
    (np.array([1, 2], dtype="M8[s]"), "returned dates, expected 2 floats"),
    (torch.tensor([True, False]), "returned booleans, expected 2 floats"),
    ([1 + 2j, 3], "returned complex numbers, expected 2 floats"),
    ([0.5, None], "returned None at index 1, expected 2 floats"),  # numpy's nan, "non-finite", before
    ([{"a": 1}, 2], "returned list, expected 2 floats"),
    # A finite float64 beyond float32: its range, not the inf a float32 cast made of it ("non-finite" before).
    (torch.tensor([0.0, 1e300], dtype=torch.float64),
     r"returned values beyond float32's range \(1e\+300 at index 1; \|x\| <= 3.403e\+38\)"),
])
def test_checked_rewards_refuses_what_is_no_number(values, message):
    with pytest.raises(RewardError, match="^reward 'r' " + message):
        checked_rewards("r", values, 2)


def test_checked_rewards_takes_numbers_of_any_dtype_as_float64():
    for values in ([1, 2], (1, 2.5), np.array([1, 2], dtype=np.uint8), torch.tensor([1.0, 2.5], dtype=torch.bfloat16),
                   [torch.tensor(1.0, requires_grad=True), torch.tensor(2)]):
        checked = checked_rewards("r", values, 2)
        assert checked.dtype == np.float64 and checked[0] == 1.0


USER_REWARDS = """
import numpy as np
import torch

def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))

def prompt_length(images, prompts, scale=1.0):
    return [scale * len(p) for p in prompts]

def one_argument(images):
    return [0.0] * len(images)

def three_required(images, prompts, extra):
    return [0.0] * len(images)

def too_few(images, prompts):
    return [0.0] * (len(prompts) - 1)

def infinite(images, prompts):
    return torch.full((len(prompts),), float("inf"))

def huge(images, prompts):
    return [1e200] * len(prompts)

def strings(images, prompts):
    return ["high"] * len(prompts)

def scaled_in_place(images, prompts):
    images *= 255  # a user's conversion to pixel values, on the tensor it was handed
    prompts.clear()
    return images.mean(dim=(1, 2, 3))
"""


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_mod.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards_mod"


def test_reward_grammar_reads_weights_only_after_the_last_colon():
    builtins = ("aesthetic", "jpeg_compressibility")
    assert parse_reward_spec("aesthetic", builtins) == [RewardTerm("aesthetic", 1.0)]
    assert parse_reward_spec("aesthetic:1.0, jpeg_compressibility:0.1", builtins) == [
        RewardTerm("aesthetic", 1.0), RewardTerm("jpeg_compressibility", 0.1)]
    assert parse_reward_spec("pkg.mod:fn", builtins) == [RewardTerm("pkg.mod:fn", 1.0)]
    assert parse_reward_spec("pkg.mod:fn:-2e-1", builtins) == [RewardTerm("pkg.mod:fn", -0.2)]
    assert parse_reward_spec("aesthetic : 2", builtins) == [RewardTerm("aesthetic", 2.0)]


def test_weighted_sum_of_builtin_and_user_rewards(user_rewards):
    images = natural_looking_images(3, seed=2)
    prompts = ["a cat", "an owl", "a dog riding a bike"]
    size = make_reward("jpeg_incompressibility", threads=1)(images, prompts)
    bright = images.mean(dim=(1, 2, 3)).double().numpy()
    total = make_reward(f"jpeg_incompressibility:0.5,{user_rewards}:brightness:-2,{user_rewards}:prompt_length",
                        threads=1)(images, prompts)
    np.testing.assert_allclose(total, 0.5 * size - 2 * bright + [5, 6, 19], rtol=1e-6)


def test_user_reward_gets_images_and_prompts(user_rewards):
    fn = make_reward(f"{user_rewards}:brightness")
    images = natural_looking_images(2)
    out = checked_rewards("b", fn(images, ["x", "y"]), 2)
    np.testing.assert_allclose(out, images.mean(dim=(1, 2, 3)).numpy(), rtol=1e-6)


def test_a_user_reward_that_edits_its_images_in_place_changes_nothing_else(user_rewards):
    images = natural_looking_images(2)
    kept, prompts = images.clone(), ["a cat", "an owl"]
    alone = make_reward(f"{user_rewards}:brightness")(images, prompts)
    total = make_reward(f"{user_rewards}:scaled_in_place,{user_rewards}:brightness")(images, prompts)
    np.testing.assert_allclose(total, 255 * alone + alone, rtol=1e-5)  # the second term saw the images unchanged
    assert torch.equal(images, kept) and prompts == ["a cat", "an owl"]  # the caller's (the sample grid's) too


@pytest.mark.parametrize("function, message", [
    ("one_argument", r"has signature \(images\); it must accept two arguments \(images, prompts\)"),
    ("three_required", r"has signature \(images, prompts, extra\)"),
])
def test_wrong_arity_is_refused_before_any_call(user_rewards, function, message):
    with pytest.raises(RewardError, match=f"reward '{user_rewards}:{function}' " + message):
        make_reward(f"{user_rewards}:{function}")


@pytest.mark.parametrize("function, message", [
    ("too_few", r"returned shape \(2,\), expected \(3,\)"),
    ("infinite", r"returned non-finite values \(inf at index 0\)"),
    ("huge", r"returned values beyond float32's range \(1e\+200 at index 0; \|x\| <= 3.403e\+38\)"),
    ("strings", "returned strings, expected 3 floats"),
])
def test_bad_outputs_name_the_reward(user_rewards, function, message):
    name = f"{user_rewards}:{function}"
    future = AsyncReward(name, make_reward(name)).submit(natural_looking_images(3), ["a", "b", "c"])
    with pytest.raises(RewardError, match=f"reward '{name}' " + message):
        future.result()
    # Inside a weighted sum the failing term is the one named.
    total = f"jpeg_compressibility:0.1,{name}:2"
    with pytest.raises(RewardError, match=f"reward '{name}' " + message):
        make_reward(total)(natural_looking_images(3), ["a", "b", "c"])


def test_jpeg_backends_share_one_interface():
    images = natural_looking_images(2, seed=4)
    pillow = JpegSizeReward(1.0, backend="pillow", threads=1)(images, ["", ""])
    auto = JpegSizeReward(1.0, backend="auto", threads=2)(images, ["", ""])
    np.testing.assert_array_equal(pillow, auto)  # CPU images: auto is Pillow
    with pytest.raises(RewardError, match="jpeg_backend 'gpu' is invalid; allowed: auto, nvjpeg, torchvision, pillow"):
        JpegSizeReward(1.0, backend="gpu")
    with pytest.raises(RewardError, match="nvjpeg_colour 'rgb' is invalid; allowed: nvjpeg, libjpeg"):
        JpegSizeReward(1.0, backend="auto", nvjpeg_colour="rgb")
    # Made in code, these failed only at the first call (Pillow's "Invalid quality setting", the thread pool).
    for quality in (0, 101, "95", 95.0):
        with pytest.raises(RewardError, match=f"jpeg quality {quality!r} is invalid: it must be an int in 1..100"):
            make_reward("jpeg_compressibility", jpeg_quality=quality)
    with pytest.raises(RewardError, match="reward threads -1 is invalid: it must be an int >= 0"):
        make_reward("jpeg_compressibility", threads=-1)
    assert make_reward("jpeg_compressibility", jpeg_quality=np.int64(1))(images, ["", ""]).shape == (2,)


def test_torchvision_backend_without_torchvision_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)
    with pytest.raises(RewardError, match=r"^jpeg_backend 'torchvision' needs torchvision, which cannot be imported "
                                          r"\(.*\); install it or use jpeg_backend auto, pillow or exact \(or nvjpeg, "
                                          r"for CUDA images\)$"):
        make_reward("jpeg_compressibility", jpeg_backend="torchvision")


@pytest.mark.skipif(nvjpeg_unavailable_reason() is None, reason="nvJPEG is available here")
def test_nvjpeg_backend_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(RewardError, match=r"^jpeg_backend 'nvjpeg' cannot run: .*; use jpeg_backend auto, pillow or "
                                          r"exact \(or torchvision, where it is installed\)$"):
        make_reward("jpeg_compressibility", jpeg_backend="nvjpeg")


def test_unknown_reward_option_is_refused():
    with pytest.raises(RewardError, match=r"unknown reward options \['aesthetic_modle'\]"):
        make_reward("jpeg_compressibility", aesthetic_modle="x")


def test_config_accepts_the_paper_rewards_and_checks_reward_options():
    assert resolve_config("aesthetic").reward == "aesthetic"
    assert resolve_config("alignment").reward == "alignment"
    cfg = resolve_config(overrides={"reward": "aesthetic:1.0,jpeg_compressibility:0.1", "jpeg_backend": "pillow"})
    assert cfg.jpeg_backend == "pillow"
    check_reward_name("clipscore,pickscore:0.5")


@pytest.mark.parametrize("overrides, message", [
    ({"jpeg_backend": "turbo"}, "jpeg_backend 'turbo' is invalid; allowed: auto, nvjpeg, torchvision, pillow"),
    ({"nvjpeg_colour": "rgb"}, "nvjpeg_colour 'rgb' is invalid; allowed: nvjpeg, libjpeg"),
    ({"reward_server": "localhost:8060"}, "reward_server 'localhost:8060' is invalid (the scheme must be http or https): "
                                          "expected http://host:port"),
    ({"reward_timeout": 0}, "reward_timeout=0.0 is invalid"),
    ({"aesthetic_model": " "}, "aesthetic_model=' ' is invalid"),
    ({"reward": "aesthetic:1,beauty:2"}, "reward 'beauty:2' is unknown"),
])
def test_bad_reward_config_values(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(overrides=overrides)


@pytest.mark.parametrize("url, shown", [
    ("http://alice:S3cret@127.0.0.1:8060", "http://127.0.0.1:8060"),
    ("https://alice:S3c@ret@reward.example/prefix", "https://reward.example/prefix"),  # an unescaped '@' too
    ("alice:S3cret@127.0.0.1:8060", "127.0.0.1:8060"),  # no scheme
    ("http://token@127.0.0.1:8060", "http://127.0.0.1:8060"),
])
def test_a_reward_server_url_with_credentials_is_refused_without_echoing_them(url, shown):
    # They were never sent as auth (the client looked up "alice:S3cret@127.0.0.1" as the host) and were written
    # into config.yaml, every checkpoint and the error line.
    with pytest.raises(ConfigError) as error:
        resolve_config(overrides={"reward_server": url})
    assert str(error.value) == (f"reward_server {shown!r} (user info removed) is invalid (a user:password@ is "
                                "never sent, and would be written into config.yaml and checkpoints): "
                                "expected http://host:port")
    assert resolve_config(overrides={"reward_server": "http://127.0.0.1:8060/a@b"}).reward_server.endswith("/a@b")
    with pytest.raises(RewardError) as error:  # a client built in code, without a config
        make_reward("alignment", reward_server=url)
    assert str(error.value) == (f"reward_server {shown!r} is invalid (a user:password@ is never sent, and would be "
                                "written into config.yaml and checkpoints): expected http://host:port")


def test_training_runs_on_a_weighted_sum_with_a_user_reward(tmp_path, user_rewards):
    from rlcm_fast.cli import main
    from tiny_reward_models import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")  # the config's model id reaches the aesthetic reward
    run_dir = tmp_path / "run"
    reward = f"jpeg_compressibility:1.0,aesthetic:0.1,{user_rewards}:brightness:0.5"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--set", "epochs=1",
                 "--set", "batches_per_epoch=1", "--set", "sample_batch_size=8", "--set", "train_batch_size=8",
                 "--set", f"reward={reward}", "--set", "jpeg_backend=pillow", "--set", f"aesthetic_model={clip}"]) == 0
    epoch = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "epoch"]
    assert len(epoch) == 1 and np.isfinite(epoch[0]["reward_mean"])
    assert "jpeg_backend: pillow" in (run_dir / "config.yaml").read_text()


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is None, reason="torchvision not installed")
def test_torchvision_backend_sizes_track_pillow():
    images = natural_looking_images(4, size=128, seed=6)
    tv = make_reward("jpeg_incompressibility", jpeg_backend="torchvision")(images, [""] * 4)
    pil = make_reward("jpeg_incompressibility", jpeg_backend="pillow")(images, [""] * 4)
    assert (np.abs(tv - pil) / pil).max() < 0.03



@pytest.mark.gpu
@pytest.mark.skipif(__import__("importlib").util.find_spec("torchvision") is None or not torch.cuda.is_available(),
                    reason="needs torchvision and a CUDA GPU")
def test_torchvision_backend_on_cuda_reads_finished_pixels_and_encodes_4_4_4():
    """torchvision's CUDA encoder runs on a stream of its own that does not wait for the caller's; the
    backend must still read the rounded pixels only once they are written. Its 4:4:4 chroma makes its
    sizes larger than Pillow's 4:2:0 ones."""
    images = natural_looking_images(8, size=256, seed=7).cuda()
    reward = make_reward("jpeg_incompressibility", jpeg_backend="torchvision")
    settled = reward(images, [""] * 8)
    # The caching allocator hands the freed uint8 block back: fill it with zeros, then keep the current
    # stream busy, so an encoder that does not wait would see zeros instead of the rounded images.
    torch.zeros((8, 3, 256, 256), dtype=torch.uint8, device="cuda")
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy / 64
    np.testing.assert_array_equal(reward(images, [""] * 8), settled)
    assert (settled > make_reward("jpeg_incompressibility", jpeg_backend="pillow")(images, [""] * 8)).all()

def test_auto_jpeg_backend_falls_back_to_pillow_when_nvjpeg_fails_to_start(monkeypatch):
    """The extension may be built where libnvjpeg cannot load; `auto` must then warn and use Pillow for
    CUDA images instead of failing the run. (No GPU needed: nvJPEG's start is made to fail.)"""
    from rlcm_fast.rewards import jpeg

    def failing_start(self, device):
        raise RewardError("jpeg_backend 'nvjpeg' failed to start (libnvjpeg.so): cannot open shared object file")

    monkeypatch.setattr(jpeg, "nvjpeg_unavailable_reason", lambda: None)
    monkeypatch.setattr(jpeg.NvJpeg, "_encoder", failing_start)
    reward = JpegSizeReward(1.0, backend="auto", threads=1)
    with pytest.warns(UserWarning, match=r"nvJPEG unavailable \(jpeg_backend 'nvjpeg' failed to start"):
        encoder = reward._auto_cuda_encoder(torch.device("cuda", 0))
    assert encoder is reward.pillow()


def test_a_nan_pixel_makes_the_jpeg_reward_nan_not_a_black_image_s_size():
    """NaN became 0 in uint8: an all-NaN decode scored as a black image, a very compressible one."""
    from rlcm_fast.rewards import JpegSizeReward, checked_rewards

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[1, 0, 3, 4] = float("nan")
    rewards = JpegSizeReward(-1.0, backend="pillow")(images, ["a", "b", "c"])
    assert np.isnan(rewards[1]) and np.isfinite(rewards[[0, 2]]).all()
    with pytest.raises(RewardError, match=r"reward 'jpeg_compressibility' returned non-finite values \(nan at index 1\)"):
        checked_rewards("jpeg_compressibility", rewards, 3)


def failing_term(images, prompts):
    raise KeyError("boom")


def test_a_weighted_sum_names_the_term_that_raised():
    reward = make_reward(f"jpeg_compressibility:0.5,{__name__}:failing_term:2")
    with pytest.raises(RewardError, match=rf"reward term '{__name__}:failing_term' raised KeyError: 'boom'"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_a_list_of_tensors_that_require_grad_is_read_as_rewards():
    from rlcm_fast.rewards import checked_rewards

    values = [torch.tensor(1.5, requires_grad=True), torch.tensor(-2.0, requires_grad=True)]
    assert checked_rewards("mine", values, 2).tolist() == [1.5, -2.0]  # was a RuntimeError from numpy()


def test_the_reward_options_defaults_are_the_config_s():
    """make_reward's defaults (for callers without a config) and TrainConfig's are written in two places, since
    the config must import no torch; they must not drift apart."""
    from rlcm_fast.config import TrainConfig
    from rlcm_fast.rewards import DEFAULT_OPTIONS

    assert {key: getattr(TrainConfig(), key) for key in DEFAULT_OPTIONS} == DEFAULT_OPTIONS


def test_a_name_repeated_in_a_sum_is_built_once(monkeypatch):
    from rlcm_fast import rewards

    builds = []
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "jpeg_compressibility",
                        lambda options: builds.append(1) or JpegSizeReward(-1.0, backend="pillow"))
    reward = make_reward("jpeg_compressibility:0.5,jpeg_compressibility:0.5")
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert len(builds) == 1
    np.testing.assert_allclose(reward(images, ["a", "b"]), JpegSizeReward(-1.0, backend="pillow")(images, ["a", "b"]))


def test_rewards_of_the_wrong_shape_are_refused_and_bf16_tensors_accepted():
    with pytest.raises(RewardError, match=r"returned shape \(2, 1\), expected \(2,\)"):
        checked_rewards("mine", np.ones((2, 1)), 2)
    assert checked_rewards("mine", torch.tensor([1.0, 2.5], dtype=torch.bfloat16), 2).tolist() == [1.0, 2.5]


def test_jpeg_quality_is_the_quality_pillow_encodes_at():
    images = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for quality in (50, 95):
        expected = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
            expected.append(len(buffer.getvalue()) / 1000)
        reward = make_reward("jpeg_incompressibility", jpeg_quality=quality, jpeg_backend="pillow")
        assert np.asarray(reward(images, ["", ""])).tolist() == pytest.approx(expected, abs=0)


def test_half_precision_images_round_to_the_uint8_levels_of_their_float32_values():
    from rlcm_fast.rewards.jpeg import to_uint8

    images = torch.linspace(0, 1, 3 * 20001).reshape(1, 3, 1, 20001).half()
    assert torch.equal(to_uint8(images), to_uint8(images.float()))


def test_jpeg_quality_and_threads_take_their_bounds_and_refuse_bools():
    """True is an Integral equal to 1, and 100 is Pillow's best quality (found by mutation testing)."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for quality in (1, 100):
        assert make_reward("jpeg_compressibility", jpeg_quality=quality)(images, ["a", "b"]).shape == (2,)
    with pytest.raises(RewardError, match="jpeg quality True is invalid: it must be an int in 1..100"):
        JpegSizeReward(1.0, quality=True)
    with pytest.raises(RewardError, match=r"reward threads True is invalid: it must be an int >= 0 \(0: one per core\)"):
        JpegSizeReward(1.0, threads=True)
    assert JpegSizeReward(1.0, threads=0).threads == 0  # 0: one per core, accepted


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_pillow_threads_0_are_one_per_core_this_process_may_use(monkeypatch):
    """A container limited to one core (its affinity) got a pool of one thread per core of the machine."""
    from rlcm_fast.rewards.jpeg import PillowJpeg

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert PillowJpeg(quality=95, threads=0).pool._max_workers == 1
    assert PillowJpeg(quality=95, threads=3).pool._max_workers == 3


@pytest.mark.skipif(not hasattr(__import__("os"), "memfd_create"), reason="no memfd on this platform")
@pytest.mark.parametrize("threads", [1, 2])
def test_pillow_sizes_from_a_reused_file_are_those_of_a_fresh_buffer(threads, monkeypatch):
    """Several threads encode into a memory-backed file each (Pillow holds the GIL writing into io.BytesIO), rewound
    for every image: a small image after a large one must not count the large one's leftover bytes."""
    import io
    import os

    from PIL import Image

    from rlcm_fast.rewards.jpeg import PillowJpeg, jpeg_size_kb

    generator = torch.Generator().manual_seed(0)
    noisy, flat = torch.rand(1, 3, 96, 96, generator=generator), torch.full((1, 3, 96, 96), 0.5)
    images = torch.cat([noisy, flat] * 4)  # large files, then small ones, in each thread's turn

    def fresh(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        return buffer.tell() / 1000

    pixels = to_uint8_images(images)
    expected = [fresh(p) for p in pixels]
    assert expected[0] > 5 * expected[1]
    with os.fdopen(os.memfd_create("test"), "w+b", buffering=0) as file:
        assert [jpeg_size_kb(p, 95, file) for p in pixels] == expected
    made = []
    memfd_create = os.memfd_create
    monkeypatch.setattr(os, "memfd_create", lambda name: made.append(name) or memfd_create(name))
    assert PillowJpeg(quality=95, threads=threads).sizes_kb(images).tolist() == expected
    assert 1 <= len(made) <= 2 if threads == 2 else made == []  # a file per pool thread; one thread: BytesIO


def test_a_refused_memfd_leaves_pillow_on_in_memory_buffers(monkeypatch):
    """memfd_create may exist and fail (ENOSYS or EPERM in a sandbox); the reward goes on with BytesIO."""
    import os

    from rlcm_fast.rewards.jpeg import PillowJpeg

    def refuse(name):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refuse, raising=False)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sizes = PillowJpeg(quality=95, threads=2).sizes_kb(images)
    assert sizes.tolist() == PillowJpeg(quality=95, threads=1).sizes_kb(images).tolist() and (sizes > 0).all()


@pytest.mark.parametrize("images, prompts, message", [
    (lambda: torch.rand(2, 3, 1, 16, 16), ["a", "b"], r"images of shape \(2, 3, 1, 16, 16\) given; rewards take N x 3"),
    (lambda: torch.rand(3, 16, 16), ["a", "b", "c"], r"images of shape \(3, 16, 16\) given"),
    # bytes are a Sequence of ints, as long as the batch here
    (lambda: torch.rand(2, 3, 16, 16), b"ab", "prompts of type bytes given; rewards take a sequence of str"),
], ids=["five_dims", "one_unbatched_image", "bytes_prompts"])
def test_jpeg_reward_refuses_other_shapes_and_bytes_prompts(images, prompts, message):
    with pytest.raises(RewardError, match=message):
        make_reward("jpeg_compressibility")(images(), prompts)


def test_a_weighted_sum_checks_the_inputs_before_a_user_term_sees_them():
    """Built-in terms check for themselves, but a user's term that takes anything would score uint8 pixels."""
    from rlcm_fast.rewards.base import WeightedSum

    lenient = WeightedSum([(RewardTerm("mine:score", 1.0), lambda images, prompts: np.zeros(len(prompts)))])
    with pytest.raises(RewardError, match=r"^images of dtype torch.uint8 given"):
        lenient((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), ["a", "b"])


@pytest.mark.parametrize("prompts, kind", [({"a cat"}, "set"), ((p for p in ["a cat"]), "generator")])
def test_prompts_that_are_not_a_sequence_are_refused_in_one_line(prompts, kind):
    """A set (which prompt is whose image?) or a generator (len() raised TypeError)."""
    from rlcm_fast.rewards.base import check_reward_inputs

    with pytest.raises(RewardError, match=f"^prompts of type {kind} given; rewards take a sequence of str"):
        check_reward_inputs(torch.rand(1, 3, 8, 8), prompts)


def test_to_uint8_refuses_an_image_of_four_channels():  # the exported helper checks on its own, not only via rewards
    from rlcm_fast.rewards.jpeg import to_uint8
    with pytest.raises(RewardError, match="N x 3 x H x W"):
        to_uint8(torch.rand(1, 4, 8, 8))
