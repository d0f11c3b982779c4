"""Mutation-testing round 43c (rewards/base, rewards/__init__, rewards/jpeg, rewards/jpeg_colour,
rewards/jpeg_exact): hand-written mutants of those modules were run against their tests; each test here kills one
that survived (named in its docstring). All are CPU-only, seeded and fast: no model is loaded, and the JPEG backends
that need CUDA are not built."""

import re
import threading
import warnings

import numpy as np
import pytest
import torch

from rlcm_fast.rewards import AsyncReward, RewardError, check_reward_name, make_reward
from rlcm_fast.rewards import jpeg_exact
from rlcm_fast.rewards.base import check_reward_inputs
from rlcm_fast.rewards.jpeg import JpegSizeReward, jpeg_size_kb, libnvjpeg_major, to_uint8
from rlcm_fast.rewards.jpeg_colour import libjpeg_ycbcr420
from rlcm_fast.rewards.jpeg_exact import jpeg_sizes


# -- rewards/base --------------------------------------------------------------------------------------------------

def test_more_prompts_than_images_are_refused_as_well_as_fewer():
    """Mutant: `len(prompts) != len(images)` as `<`. A caller that sliced its images but not its prompts would have
    the prompts past the batch dropped, and a prompt-aligned reward score image i against another image's prompt."""
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for prompts in (["a"], ["a", "b", "c"]):
        with pytest.raises(RewardError, match=f"2 images and {len(prompts)} prompts given"):
            check_reward_inputs(images, prompts)
    with pytest.raises(RewardError, match="2 images and 3 prompts given"):
        make_reward("jpeg_compressibility", jpeg_backend="pillow", threads=1)(images, ["a", "b", "c"])


def test_a_user_module_whose_own_import_fails_gets_no_hint_about_finding_the_users_module(tmp_path, monkeypatch):
    """Mutant: `_module_here_hint` without `exc.name == top`. The user's module is found and imports, but it imports
    a package that is not installed: the hint must not say the user's module is in the current folder and unsearched
    (nor that a module of theirs needs PYTHONPATH); the error is the missing dependency's name, alone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "round43c_reward_mod.py").write_text("import round43c_absent_dependency\n\n"
                                                    "def score(images, prompts):\n    return [0.0] * len(prompts)\n")
    with pytest.raises(RewardError) as error:
        make_reward("round43c_reward_mod:score")
    assert str(error.value) == ("reward 'round43c_reward_mod:score' cannot be imported: No module named "
                                "'round43c_absent_dependency'")


def test_a_hyphenated_misspelling_of_a_jpeg_reward_gets_the_did_you_mean_hint():
    """Mutant: _did_you_mean matching the name as written, without reading '-' as '_'. "jpeg-compressable" (a
    command-line habit plus a misspelling) is too far from every builtin with its hyphen, close once it is an
    underscore: without the hint the user gets only the list of names."""
    with pytest.raises(RewardError, match=r"reward 'jpeg-compressable' is unknown \(did you mean "
                                          r"'jpeg_compressibility'\?\)"):
        check_reward_name("jpeg-compressable")


def test_a_reward_that_raises_a_base_exception_still_cancels_the_batches_behind_it():
    """Mutant: AsyncReward._score cancelling only on Exception. A reward interrupted by SystemExit (sys.exit in a
    user's reward, a server client's KeyboardInterrupt) ends the run, but the batches queued behind it would still be
    scored, one after another, long after the error (the wait at exit the class exists to prevent)."""
    started, release, calls = threading.Event(), threading.Event(), []

    def reward(images, prompts):
        calls.append(len(prompts))
        started.set()
        release.wait(10)
        raise SystemExit(3)

    runner = AsyncReward("exits", reward)
    try:
        first = runner.submit(torch.zeros(1, 3, 8, 8), ["a"])
        assert started.wait(10)
        second = runner.submit(torch.zeros(2, 3, 8, 8), ["a", "b"])  # queued behind the running batch
        release.set()
        with pytest.raises(SystemExit):
            first.result(10)
        with pytest.raises(RewardError, match="'exits': batch not scored, as an earlier batch failed"):
            second.result(10)
        assert calls == [1]
    finally:
        release.set()
        runner.close()


def test_images_without_pixels_are_refused_as_the_callers_input_not_blamed_on_a_term():
    """A source bug this round found, mended with it. Images of shape (1, 3, 0, 4) passed check_reward_inputs; the
    pillow JPEG reward then raised Pillow's bare ValueError ("cannot write empty image"), and a weighted sum said
    "reward term 'jpeg_compressibility' raised ValueError: ...": the term blamed for the caller's input, which
    WeightedSum checks first precisely so that no term is. Now a RewardError naming the shape, as for N == 0."""
    images = torch.rand(1, 3, 0, 4)
    with pytest.raises(RewardError, match=r"images of shape \(1, 3, 0, 4\) given"):
        check_reward_inputs(images, ["a"])
    with pytest.raises(RewardError, match=r"images of shape \(1, 3, 0, 4\) given"):
        make_reward("jpeg_compressibility,jpeg_incompressibility:2", jpeg_backend="pillow", threads=1)(images, ["a"])


def test_a_numpy_boolean_in_any_wrapping_is_refused_as_booleans():
    """A source bug this round found, mended with it. checked_rewards refuses booleans because a cast to float hides
    the bug (a reward returning `score > t`). [0.5, np.bool_(True)] was refused, but [0.5, np.array(True)] (what
    np.asarray(score > t) gives) and np.array([0.5, True], dtype=object) came back as [0.5, 1.0], a reward of 1."""
    from rlcm_fast.rewards import checked_rewards

    for values in ([0.5, np.array(True)], np.array([0.5, True], dtype=object)):
        with pytest.raises(RewardError, match="returned booleans, expected 2 floats"):
            checked_rewards("r", values, 2)


# -- rewards/__init__ ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_both_jpeg_rewards_take_the_backend_and_nvjpeg_colour_they_are_given(name):
    """Mutants: BUILTIN_REWARDS passing "auto" for jpeg_incompressibility's backend, or "nvjpeg" for
    jpeg_compressibility's nvjpeg_colour, instead of the options. A run that asked for the exact backend, or for
    libjpeg's colour conversion, would silently measure with another encoder (sizes not comparable across runs), and
    a misspelt colour would be accepted."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reward = make_reward(name, jpeg_backend="exact", nvjpeg_colour="libjpeg")
    assert (reward.backend, reward.nvjpeg_colour) == ("exact", "libjpeg")
    with pytest.warns(UserWarning, match="jpeg_backend 'exact' on CPU images"):
        exact = reward(images, ["a", "b"])
    pillow = make_reward(name, jpeg_backend="pillow", threads=1)(images, ["a", "b"])
    assert exact.tolist() == pillow.tolist()
    with pytest.raises(RewardError, match="nvjpeg_colour 'libjpg' is invalid"):
        make_reward(name, jpeg_backend="pillow", nvjpeg_colour="libjpg")


def test_the_alignment_reward_takes_the_configured_server_and_timeout():
    """Mutant: BUILTIN_REWARDS["alignment"] built without o["reward_timeout"]. `reward_timeout` would be accepted and
    ignored: each attempt would wait the default 120 s, where a user had set a shorter bound (or a longer one, for
    a slow VLM, and get timeouts they had configured away). Nothing is contacted on construction."""
    client = make_reward("alignment", reward_server="http://127.0.0.1:9/", reward_timeout=7.5)
    assert (client.url, client.timeout) == ("http://127.0.0.1:9", 7.5)


# -- rewards/jpeg --------------------------------------------------------------------------------------------------

def test_an_infinite_pixel_makes_the_jpeg_reward_nan_not_a_white_image_s_size():
    """Mutant: the broken-image mask as `isnan` instead of `~isfinite`. An overflowed decode (+inf, -inf) would be
    clamped to 255 or 0 and scored as a flat, very compressible image: a fault rewarded, not reported."""
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    images[1, 2, 5, 6], images[3, 0, 0, 0] = float("inf"), float("-inf")
    rewards = JpegSizeReward(-1.0, backend="pillow", threads=1)(images, ["a"] * 4)
    assert np.isnan(rewards[[1, 3]]).all() and np.isfinite(rewards[[0, 2]]).all()


def test_the_major_of_a_fully_versioned_libnvjpeg_is_its_first_number():
    """Mutant: libnvjpeg_major reading the last dotted number of the suffix. A wheel or folder with
    libnvjpeg.so.12.3.1 would read as major 1, never match torch's CUDA major, and the library of another major
    (one the driver may not serve) could be loaded instead."""
    assert [libnvjpeg_major(name) for name in ("/x/libnvjpeg.so.13", "libnvjpeg.so.12.3.1", "libnvjpeg.so.12.0",
                                               "libnvjpeg.so", "libnvjpeg.so.x")] == [13, 12, 12, None, None]


def test_the_auto_backend_sends_cpu_images_to_pillow_without_a_word_about_nvjpeg():
    """Mutant: encoder_for treating every image under `auto` as a CUDA image. On a machine without CUDA each
    CPU run would warn "nvJPEG unavailable (CUDA is not available); CUDA images go to Pillow": a warning about
    images it never had, for the default backend."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = JpegSizeReward(1.0, threads=1)(images, ["a", "b"])
    assert auto.tolist() == JpegSizeReward(1.0, threads=1, backend="pillow")(images, ["a", "b"]).tolist()


# -- rewards/jpeg_colour -------------------------------------------------------------------------------------------

def test_libjpeg_planes_are_contiguous_for_nvjpeg_to_read_by_pointer():
    """Mutant: the Y plane returned as the view ycbcr[:, 0] without .contiguous(). nvJPEG is handed its data_ptr()
    with a pitch of the width, so a strided view (the Y of each image followed by its Cb and Cr) would encode the
    wrong pixels for every image past the first: sizes silently wrong, with no error."""
    pixels = torch.randint(0, 256, (2, 3, 10, 14), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y, cb, cr = libjpeg_ycbcr420(pixels)
    assert all(plane.is_contiguous() for plane in (y, cb, cr))
    assert (y.shape, cb.shape, cr.shape) == ((2, 10, 14), (2, 5, 7), (2, 5, 7))


# -- rewards/jpeg_exact --------------------------------------------------------------------------------------------

def test_an_image_larger_than_a_chunk_is_encoded_alone(monkeypatch):
    """Mutant: per_chunk without max(1, ...). An image of more pixels than a chunk (4M pixels, 2048 x 2048 and
    up) made the chunk size 0, and torch's split refused it: the exact backend failed on large images."""
    monkeypatch.setattr(jpeg_exact, "_PIXELS_PER_CHUNK", 100)
    pixels = to_uint8(torch.rand(3, 3, 12, 20, generator=torch.Generator().manual_seed(2)))
    expected = [round(jpeg_size_kb(image, 90) * 1000) for image in pixels.permute(0, 2, 3, 1).numpy()]
    assert jpeg_sizes(pixels, 90).tolist() == expected


def test_pillow_threads_0_are_as_many_as_the_cores_this_process_may_use(monkeypatch):
    """Mutant: `threads or usable_cpu_cores()` as `threads or 1`. The default reward_threads 0 would encode every
    image on one thread: the reward, on the critical path beside sampling, several times slower on a many-core host.
    (The existing test's affinity of one core cannot tell the two apart.)"""
    from rlcm_fast.rewards.jpeg import PillowJpeg

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert PillowJpeg(quality=95, threads=0).pool._max_workers == 3


def test_the_exact_backend_warns_once_about_cpu_images_not_at_every_batch():
    """Mutant: ExactJpeg not recording that it warned. A run on the CPU with jpeg_backend exact would repeat the
    same slowness warning for every batch of every epoch (the "once" of README's "warns once")."""
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    reward = JpegSizeReward(1.0, backend="exact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            reward(images, ["a"])
    assert [str(w.message)[:40] for w in caught] == ["jpeg_backend 'exact' on CPU images gives"]


@pytest.mark.parametrize("name", ["pkg..mod:fn", "pkg.mod.:fn", ".pkg:fn"])
def test_a_module_path_with_an_empty_part_is_not_a_reward_name(name):
    """Found beside this round: the grammar took `pkg..mod:fn` and `pkg.mod.:fn`, which only failed later, at
    import. A module path is dot-separated names, each non-empty."""
    from rlcm_fast.rewards import check_reward_name

    with pytest.raises(RewardError, match=f"^reward '{re.escape(name)}' is unknown"):
        check_reward_name(name)
    check_reward_name("pkg.mod:fn")
