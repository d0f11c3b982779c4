"""Bad command-line input to `sample`, `serve-reward` and `--reward` is one line on stderr and exit 2, refused
before any model is loaded where it can be (tiny model, CPU, a second or two each)."""

import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast.cli import main
from rlcm_fast.config import ConfigError
from rlcm_fast.path_checks import NAME_MAX, UsageError, check_name_lengths
from rlcm_fast.rewards.base import looks_like_path
from rlcm_fast.rewards import RewardError, checked_rewards

SAMPLE = ["sample", "--prompt", "cat", "--device", "cpu"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("rlcm-fast: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0].removeprefix("rlcm-fast: error: ")


@pytest.mark.parametrize("args, message", [
    (["--horizon", "0"], "--horizon 0 is invalid: it must be >= 1"),
    (["--horizon", "-3"], "--horizon -3 is invalid: it must be >= 1"),
    (["--resolution", "0"], "--resolution 0 is invalid: it must be a multiple of 8, at least 8"),
    (["--resolution", "-8"], "--resolution -8 is invalid: it must be a multiple of 8, at least 8"),
    (["--resolution", "30"], "--resolution 30 is invalid: it must be a multiple of 8, at least 8"),
    (["--guidance-scale", "0"], "--guidance-scale 0.0 is invalid: it must be in [1, 1000] (w = guidance_scale - 1)"),
    (["--guidance-scale", "nan"], "--guidance-scale nan is invalid: it must be in [1, 1000] (w = guidance_scale - 1)"),
    (["--guidance-scale", "inf"], "--guidance-scale inf is invalid: it must be in [1, 1000] (w = guidance_scale - 1)"),
    # An all-black image, written with exit 0: the guidance embedding overflowed float32 into NaN.
    (["--guidance-scale", "1e36"], "--guidance-scale 1e+36 is invalid: it must be in [1, 1000] "
                                   "(w = guidance_scale - 1)"),
    (["--algo", "dpo"], "--algo 'dpo' is invalid; allowed: rlcm, ddpo"),
    (["--seed", "-1"], "--seed -1 is invalid: it must be in 0..2**63-1"),
    (["--seed", str(2**64)], f"--seed {2**64} is invalid: it must be in 0..2**63-1"),
    (["--num-images", "0"], "--num-images 0 is invalid: it must be in 1..10000 (images per prompt)"),
    # listed 1e8 paths for minutes, then a MemoryError traceback
    (["--num-images", "100000000"], "--num-images 100000000 is invalid: it must be in 1..10000 (images per prompt)"),
])
def test_sample_refuses_bad_values_before_loading_a_model(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("rlcm_fast.models.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    assert main([*SAMPLE, "--output-dir", str(out), *args]) == 2
    assert one_line_error(capsys) == message
    assert not out.exists()


def test_sample_horizon_above_the_models_original_steps_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*SAMPLE, "--output-dir", str(out), "--horizon", "100"]) == 2
    assert one_line_error(capsys) == "--horizon 100 is invalid: it must be in 1..50 (original_inference_steps)"
    assert not out.exists()


def test_sample_refuses_a_scheduler_with_fewer_timesteps_than_its_original_steps(tmp_path, capsys, monkeypatch):
    """A model whose scheduler has num_train_timesteps=10 cannot draw 50 original steps from them: diffusers'
    LCMScheduler raised it as a traceback at the first image."""
    from diffusers import LCMScheduler

    import rlcm_fast.models

    load_pipeline = rlcm_fast.models.load_pipeline
    train_steps = 10

    def with_train_steps(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, num_train_timesteps=train_steps)
        return pipe

    monkeypatch.setattr("rlcm_fast.models.load_pipeline", with_train_steps)
    out = tmp_path / "out"
    assert main([*SAMPLE, "--output-dir", str(out), "--horizon", "4"]) == 2
    assert one_line_error(capsys) == ("model 'tiny' cannot sample the scheduler's original_inference_steps=50: its "
                                      "scheduler has num_train_timesteps=10")
    assert not out.exists()
    train_steps = 50  # as many timesteps as original steps: diffusers' pipeline samples it, and so does sample
    assert main([*SAMPLE, "--output-dir", str(out), "--horizon", "4", "--num-images", "1"]) == 0
    assert len(list(out.glob("*.png"))) == 1


def test_sample_draws_the_timesteps_of_the_runs_original_inference_steps(tmp_path, capsys, monkeypatch):
    """A run trained with original_inference_steps=20 samples from 20, not the scheduler's 50."""
    from diffusers import LatentConsistencyModelPipeline
    from safetensors.torch import save_file

    (tmp_path / "checkpoint-1").mkdir()
    save_file({}, tmp_path / "checkpoint-1" / "pytorch_lora_weights.safetensors")  # its loading is stubbed below
    monkeypatch.setattr("rlcm_fast.checkpoint.resolve_checkpoint", lambda path, what, warn: tmp_path / "checkpoint-1")
    monkeypatch.setattr("rlcm_fast.checkpoint.saved_config", lambda checkpoint: {"original_inference_steps": 20})
    monkeypatch.setattr(LatentConsistencyModelPipeline, "load_lora_weights", lambda self, path, **kwargs: None)
    assert main([*SAMPLE, "--lora", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--horizon", "21"]) == 2
    assert one_line_error(capsys) == "--horizon 21 is invalid: it must be in 1..20 (original_inference_steps)"
    seen = []
    call = LatentConsistencyModelPipeline.__call__
    monkeypatch.setattr(LatentConsistencyModelPipeline, "__call__",
                        lambda self, **kw: seen.append(kw["original_inference_steps"]) or call(self, **kw))
    assert main([*SAMPLE, "--lora", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--horizon", "2",
                 "--resolution", "16"]) == 0
    assert seen == [20]


def test_sample_horizon_above_ddims_train_timesteps_is_one_line(tmp_path, capsys, monkeypatch):
    """A DDPO run's LoRA samples with DDIM: its limit is num_train_timesteps, less one for SD's steps_offset=1
    (checked before the LoRA loads; 1000 was an IndexError from the pipeline)."""
    monkeypatch.setattr("rlcm_fast.checkpoint.resolve_checkpoint", lambda path, what, warn: tmp_path / "checkpoint-1")
    monkeypatch.setattr("rlcm_fast.checkpoint.saved_config", lambda checkpoint: {"method": "ddpo", "model": "tiny-sd"})
    out = tmp_path / "out"
    assert main([*SAMPLE, "--lora", str(tmp_path), "--output-dir", str(out), "--horizon", "1000"]) == 2
    assert one_line_error(capsys) == ("--horizon 1000 is invalid: its first DDIM timestep would be 1000, past the "
                                      "scheduler's 0..999 (steps_offset=1); 999 steps fit")
    assert not out.exists()


def test_sample_given_horizon_and_resolution_are_used(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*SAMPLE, "--output-dir", str(out), "--horizon", "1", "--resolution", "16"]) == 0
    images = sorted(out.iterdir())
    assert [p.name for p in images] == ["00-cat-00.png"]
    assert Image.open(images[0]).size == (16, 16)


def test_sample_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rlcm_fast.models.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*SAMPLE, "--output-dir", str(afile)]) == 2
    assert one_line_error(capsys) == f"--output-dir {str(afile)!r} is invalid: it is an existing file, not a folder"
    assert afile.read_text() == "x"


def test_sample_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*SAMPLE, "--output-dir", str(afile / "sub")]) == 2
    assert one_line_error(capsys) == f"--output-dir {str(afile / 'sub')!r} cannot be created: Not a directory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", "--prompt", "cat", "--device", "cuda", "--output-dir", str(out)]) == 2
    assert one_line_error(capsys) == "--device cuda: CUDA is not available on this machine; use --device cpu or auto"
    assert not out.exists()


def test_sample_unknown_device_is_one_line(tmp_path, capsys):
    assert main(["sample", "--prompt", "cat", "--device", "tpu", "--output-dir", str(tmp_path / "out")]) == 2
    assert one_line_error(capsys) == "--device 'tpu' is invalid; allowed: auto, cpu, cuda"


def test_sample_missing_lora_names_the_lora_option(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main([*SAMPLE, "--lora", str(missing), "--output-dir", str(tmp_path / "out")]) == 2
    assert one_line_error(capsys) == f"--lora {str(missing)!r} does not exist"
    assert main([*SAMPLE, "--lora", str(tmp_path / "checkpoint-3"), "--output-dir", str(tmp_path / "out")]) == 2
    assert one_line_error(capsys) == (f"--lora {str(tmp_path / 'checkpoint-3')!r} does not exist (a train running in "
                                      "its run folder keeps only the newest keep_checkpoints, and may have removed it: "
                                      "name the run folder to take its newest)")
    assert main([*SAMPLE, "--lora", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    assert one_line_error(capsys) == (f"--lora {str(tmp_path)!r} is neither a checkpoint-N folder nor a run folder "
                                      "holding one")


def test_train_missing_resume_path_keeps_its_wording(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main(["train", "--device", "cpu", "--resume", str(missing)]) == 2
    assert one_line_error(capsys) == f"resume path {str(missing)!r} does not exist"


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "--port 99999 is invalid: it must be in 0..65535"),
    (["--port", "-1"], "--port -1 is invalid: it must be in 0..65535"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 is invalid: it must be >= 1"),
    (["--vlm", "/nonexistent"], "--vlm '/nonexistent' is invalid: no such folder (a hub id or a local model folder)"),
    (["--vlm", "./no/such/model"],
     "--vlm './no/such/model' is invalid: no such folder (a hub id or a local model folder)"),
    (["--scorer", "/nonexistent"],
     "--scorer '/nonexistent' is invalid: no such folder (a hub id or a local model folder)"),
])
def test_serve_reward_bad_values_name_only_the_bad_option(capsys, monkeypatch, args, message):
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer",
                        lambda *a, **k: pytest.fail("the models were loaded"))
    assert main(["serve-reward", "--device", "cpu", *args]) == 2
    assert one_line_error(capsys) == message


def test_serve_reward_vlm_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer",
                        lambda *a, **k: pytest.fail("the models were loaded"))
    afile = tmp_path / "model.bin"
    afile.write_text("x")
    assert main(["serve-reward", "--device", "cpu", "--vlm", str(afile)]) == 2
    assert one_line_error(capsys) == f"--vlm {str(afile)!r} is invalid: not a folder (a hub id or a local model folder)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_reward_device_cuda_without_cuda_is_one_line(capsys):
    assert main(["serve-reward", "--device", "cuda:0"]) == 2
    assert one_line_error(capsys) == "--device cuda:0: CUDA is not available on this machine; use --device cpu or auto"


@pytest.mark.parametrize("value, is_path", [
    ("llava-hf/llava-1.5-7b-hf", False), ("roberta-large", False), ("/models/llava", True), ("./llava", True),
    ("../models/llava", True), ("models/llava/v1", True),
    # Never a hub id (its characters): the hub's repo-id rules were the error for a folder that is not there.
    ("models/nope é", True), ("my vlm", True), ("models/", True), ("Salesforce/blip2-opt-2.7b", False),
])
def test_only_path_like_model_values_are_checked_as_folders(value, is_path):
    assert looks_like_path(value) == is_path


def test_reward_spec_with_an_empty_entry_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--reward", "jpeg_compressibility,"]) == 2
    assert one_line_error(capsys) == ("reward 'jpeg_compressibility,' has an empty entry; terms are separated by "
                                      "single commas, with none at either end")
    assert not run_dir.exists()


def test_a_reward_returning_none_says_so():
    with pytest.raises(RewardError) as caught:
        checked_rewards("my_rewards:nothing", None, 16)
    assert str(caught.value) == "reward 'my_rewards:nothing' returned None, expected 16 floats"
    assert checked_rewards("ok", np.zeros(2), 2).shape == (2,)



def last_line_printed_by(probe: str) -> str:
    """The last line a fresh interpreter prints running `probe` (what it imported is its own, not this process's)."""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_help_imports_no_heavy_library():
    # `rlcm-fast --help` took 7 s when the config imported torch, diffusers and peft for a few names.
    probe = ("import sys\nfrom rlcm_fast.cli import main\n"
             "for args in (['--help'], ['train', '--help'], ['sample', '--help']):\n"
             "    assert main(args) == 0\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    assert last_line_printed_by(probe) == "[]"


def test_the_sampler_api_is_listed_yet_loaded_only_on_use():
    """dir() and `from rlcm_fast import *` missed FastLCMSampler, which is imported on first use."""
    probe = ("import sys, rlcm_fast\nloaded = 'diffusers' in sys.modules\n"
             "listed = {'__version__', 'FastLCMSampler', 'FastSamplerOutput'} <= set(dir(rlcm_fast))\n"
             "names = {}\nexec('from rlcm_fast import *', names)\n"
             "print(loaded, listed, sorted(k for k in names if not k.startswith('__')))")
    assert last_line_printed_by(probe) == "False True ['FastLCMSampler', 'FastSamplerOutput']"


def test_version_is_the_installed_distributions(capsys):
    import importlib.metadata

    import rlcm_fast

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"rlcm-fast {importlib.metadata.version('rlcm-fast')}\n"
    assert rlcm_fast.__version__ == importlib.metadata.version("rlcm-fast")  # pyproject.toml's, written twice


@pytest.mark.parametrize("reward, server, overrides, refused", [
    ("alignment", "http://198.51.100.7:8060", {}, True),
    ("jpeg_compressibility:1,alignment:0.5", "https://scores.example.org:443", {}, True),
    ("alignment", "http://198.51.100.7:8060", {"reward_server": "http://198.51.100.7:8060"}, False),
    ("alignment", "http://127.0.0.1:8060", {}, False),
    ("alignment", "http://localhost:8060", {}, False),
    ("alignment", "http://[::1]:8060", {}, False),
    ("jpeg_compressibility", "http://198.51.100.7:8060", {}, False),
])
def test_a_resumed_checkpoint_sends_images_off_this_machine_only_to_a_server_the_command_line_names(
        tmp_path, reward, server, overrides, refused):
    """A run folder from elsewhere could name any host as its reward server; its prompts and images would go there."""
    from rlcm_fast.resume import check_what_the_checkpoint_alone_starts

    check = lambda: check_what_the_checkpoint_alone_starts(  # noqa: E731
        tmp_path / "checkpoint-1", {"reward": reward, "reward_server": server}, overrides)
    if not refused:
        check()
        return
    with pytest.raises(ConfigError) as error:
        check()
    assert str(error.value) == (f"checkpoint '{tmp_path / 'checkpoint-1'}' sends its images and prompts to reward "
                                f"server '{server}': add --set reward_server={server} to send them there")


def test_the_printed_resume_command_repeats_what_a_resume_takes_only_from_its_command_line():
    from rlcm_fast.resume import resume_options
    from rlcm_fast.config import TrainConfig

    cfg = TrainConfig(reward="my_rewards:bright,alignment:0.5", reward_server="http://198.51.100.7:8060")
    assert resume_options(cfg) == (" --reward my_rewards:bright,alignment:0.5 "
                                     "--set reward_server=http://198.51.100.7:8060")
    assert resume_options(TrainConfig(reward="alignment")) == ""  # the server on this machine


LONG = "é" * 128  # 256 bytes in UTF-8: one over a file system's limit per name, in 128 characters


@pytest.mark.parametrize("args", [
    ["train", "--device", "cpu", "--output-dir", f"new/{LONG}/run"],
    ["train", "--device", "cpu", "--output-dir", LONG],
    ["train", "--device", "cpu", "--resume", "auto", "--output-dir", f"new/{LONG}"],
    ["train", "--device", "cpu", "--resume", LONG],
    ["train", "--device", "cpu", "--prompts", LONG],
    [*SAMPLE, "--lora", LONG],
    [*SAMPLE, "--output-dir", f"new/{LONG}/images"],
])
def test_a_name_over_the_file_systems_limit_is_one_line_and_makes_no_folder(args, tmp_path, monkeypatch, capsys):
    """Each was an OSError traceback (ENAMETOOLONG), and a run folder's mkdir(parents=True) left `new/` behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rlcm_fast.models.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(args) == 2
    assert LONG[:60] in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_name_that_is_not_utf8_is_refused_before_it_is_made(tmp_path, capsys):
    """TensorBoard's writer raised UnicodeEncodeError (a traceback) after config.yaml and .lock were written."""
    run_dir = tmp_path / os.fsdecode(b"run\xff")
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir)]) == 2
    assert one_line_error(capsys) == (f"output dir '{tmp_path}/run\\xff' is not a UTF-8 name, and TensorBoard's "
                                      "writer takes only UTF-8: pick another name")
    assert list(tmp_path.iterdir()) == []


def test_under_a_locale_that_is_not_utf8_a_non_ascii_run_folder_says_which_locale_to_use(tmp_path):
    """Under LC_ALL=C without UTF-8 mode, Python escapes the UTF-8 bytes of `runé`: the folder's name is right,
    the locale is not."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "rlcm_fast", "train", "--device", "cpu", "--output-dir", "runé"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == (
        "rlcm-fast: error: output dir 'runé' is UTF-8, but this locale reads file names as ascii, and TensorBoard's "
        "writer takes only UTF-8: run under a UTF-8 locale (or with PYTHONUTF8=1)"), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_under_a_latin1_locale_a_utf8_run_folder_name_is_refused_not_made_under_other_bytes(monkeypatch):
    """Latin-1 reads the bytes of `runé` as `runÃ©` (no escapes), which TensorBoard would write as other bytes."""
    from rlcm_fast.path_checks import UsageError, check_utf8_name

    monkeypatch.setattr("rlcm_fast.path_checks.os.fsencode", lambda text: text.encode("latin-1"))
    monkeypatch.setattr("rlcm_fast.path_checks.sys.getfilesystemencoding", lambda: "iso8859-1")
    check_utf8_name("run", "output dir", "why")  # ASCII: the same bytes either way
    with pytest.raises(UsageError, match="^output dir 'runé' is UTF-8, but this locale reads file names as "
                                         "iso8859-1, and why: run under a UTF-8 locale"):
        check_utf8_name("runé".encode().decode("latin-1"), "output dir", "why")


def test_a_sample_prompt_is_read_as_utf8_whatever_the_locale(capsys, monkeypatch):
    from rlcm_fast.sample_command import _prompt_text

    assert _prompt_text(os.fsdecode("a é cat".encode())) == "a é cat"
    assert _prompt_text("a \udcc3\udca9 cat") == "a é cat"  # how LC_ALL=C gives the UTF-8 of `a é cat`
    with monkeypatch.context() as latin1:  # a Latin-1 terminal's é is the byte 0xE9, which its locale decoded
        latin1.setattr("rlcm_fast.sample_command.os.fsencode", lambda text: text.encode("latin-1"))
        assert _prompt_text("a \xe9 cat") == "a é cat"
    # Bytes that are not UTF-8 were a TypeError traceback from the tokenizer.
    assert main([*SAMPLE[:1], "--prompt", os.fsdecode(b"a \xff cat"), *SAMPLE[3:]]) == 2
    assert one_line_error(capsys) == "--prompt 'a \\xff cat' is not UTF-8 text: give the prompt in UTF-8"


def test_a_name_of_exactly_name_max_bytes_is_allowed():
    """255 bytes is the limit that ext4, xfs, btrfs and tmpfs take, not over it."""
    assert NAME_MAX == 255
    check_name_lengths(Path("new") / ("é" * 127 + "x"), "output dir")  # 255 bytes: no error
    with pytest.raises(UsageError):
        check_name_lengths(Path("new") / ("é" * 127 + "xy"), "output dir")  # 256 bytes


def test_a_name_over_the_limit_is_shown_cut_at_60_characters(tmp_path, monkeypatch, capsys):
    """The whole line: the path, the name cut at 60 characters, its size and the limit."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--device", "cpu", "--output-dir", f"new/{LONG}/run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlcm-fast: error: output dir 'new/{LONG}/run' cannot be created: its name '{'é' * 60}'... is 256 bytes, "
        "and a file system takes at most 255 per file or folder name")


def test_a_too_long_path_from_a_later_check_is_its_repr_cut_at_120_characters(tmp_path, monkeypatch, capsys):
    """An ENAMETOOLONG from a path's first use names the path quoted and cut at 120 characters."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--device", "cpu", "--resume", LONG]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlcm-fast: error: '{'é' * 116}... is too long: a file system takes at most 255 bytes per file or folder "
        "name (and Linux 4096 for a whole path)")


@pytest.mark.parametrize("command, abbreviated, meant", [
    (["sample", "--prompt", "cat", "--device", "cpu"], ["--out", "x"], "--output-dir"),
    (["serve-reward", "--device", "cpu", "--port", "0"], ["--ho", "127.0.0.1"], "--host"),
])
def test_an_abbreviated_option_of_sample_or_serve_reward_is_refused(command, abbreviated, meant, tmp_path,
                                                                     monkeypatch, capsys):
    """Each subparser refuses abbreviations: `--out` is not --output-dir, nor `--ho` --host."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rlcm_fast.models.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer",
                        lambda *a, **k: pytest.fail("the models were loaded"))
    assert main([*command, *abbreviated]) == 2
    err = capsys.readouterr().err
    # Told with the command's own usage and name, as argparse tells a bad value of one of its options.
    assert err.startswith(f"usage: rlcm-fast {command[0]} [-h]")
    assert err.strip().splitlines()[-1] == (f"rlcm-fast {command[0]}: error: unrecognized arguments: "
                                            f"{' '.join(abbreviated)} (did you mean {meant}?)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, unknown, hint", [
    (["train"], ["--prompt", "a cat"], " (--prompt is an option of `rlcm-fast sample`; did you mean --prompts?)"),
    (["train"], ["--learning-rate", "1e-4"], " (a config key is set with --set learning_rate=VALUE)"),
    (["train"], ["--num_epochs=3"], " (a config key is set with --set epochs=VALUE)"),  # ddpo-pytorch's name
    (["train"], ["--sed", "3"], " (did you mean --seed?)"),
    (["train"], ["--algorithm", "ddpo"], " (did you mean --algo?)"),  # not `--set algorithm=`, which is ppo|rebel
    (["train"], ["--epoch", "3"], " (a config key is set with --set epochs=VALUE)"),  # a config key's near spelling
    (["serve-reward"], ["--model", "x"], " (--model is an option of `rlcm-fast train` and `rlcm-fast sample`)"),
    (["sample", "--prompt", "a"], ["--num-image", "2"], " (did you mean --num-images?)"),
    (["sample", "--prompt", "a"], ["--epochs", "2"], ""),  # a config key of train's, and no option of sample
    (["train"], ["--lr", "3"], ""),  # nothing close: no guess (difflib's best at its default 0.6 was --algo)
    (["train"], ["--help-me"], ""),  # --help is never the guess
    (["sample", "--prompt", "a"], ["--resume", "run"], " (--resume is an option of `rlcm-fast train`)"),
    # Not also `--set lcm_lora=`: that key loads an LCM-LoRA into the base model (difflib's ratio 0.67 < 0.8).
    (["train"], ["--lora", "run"], " (--lora is an option of `rlcm-fast sample`)"),
])
def test_an_unknown_option_says_what_was_meant(command, unknown, hint, capsys):
    """`train --prompt` said only "unrecognized arguments"; the option may be another command's, a config key, or
    a typo of one of this command's."""
    assert main([*command, *unknown]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlcm-fast {command[0]}: error: unrecognized arguments: {' '.join(unknown)}{hint}")


@pytest.mark.parametrize("argv, hint", [
    (["--seed=1", "train"], " (--seed is an option of `rlcm-fast train`: give it after the command)"),
    (["--port=8061", "serve-reward"], " (--port is an option of `rlcm-fast serve-reward`: give it after the command)"),
])
def test_a_commands_option_before_the_command_is_told_to_go_after_it(argv, hint, capsys):
    """It was hinted at as another command's option (sample's --seed), and as a typo of itself."""
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlcm-fast {argv[-1]}: error: unrecognized arguments: {' '.join(argv[:-1])}{hint}")


def test_a_blank_host_is_refused_like_an_empty_one(monkeypatch, capsys):
    """`--host ' '` is no address either; it went on to the socket."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.AlignmentScorer",
                        lambda *a, **k: pytest.fail("the models were loaded"))
    assert main(["serve-reward", "--host", " ", "--port", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlcm-fast: error: --host ' ' is invalid: give an address (127.0.0.1 for this machine, 0.0.0.0 or :: for "
        "every interface)")


def test_a_parent_folder_that_cannot_be_entered_is_refused(tmp_path, monkeypatch):
    """Writable but not searchable (no x bit): no folder can be made in it."""
    from rlcm_fast.path_checks import check_run_dir

    monkeypatch.setattr("rlcm_fast.path_checks.os.access",
                        lambda path, mode: not (Path(path) == tmp_path and mode & os.X_OK))
    with pytest.raises(UsageError, match="is not writable"):
        check_run_dir(tmp_path / "run")


def test_every_option_with_a_default_names_it_in_its_help():
    """`--help` is where a user looks for defaults (serve-reward's --port and --max-new-tokens, sample's
    --num-images and train's --device did not say theirs)."""
    import argparse

    from rlcm_fast.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    # Without a default of their own: the task's reward and prompts, files and paths the user names, --set's list,
    # sample's prompts (one of the two is needed) and scoring (none unless asked for).
    no_default = {("train", "--reward"), ("train", "--prompts"), ("train", "--config"), ("train", "--set"),
                  ("train", "--resume"), ("sample", "--lora"), ("sample", "--reward"), ("sample", "--prompt"),
                  ("sample", "--prompts")}
    silent = [(name, action.option_strings[-1]) for name, command in commands.choices.items()
              for action in command._actions
              if action.option_strings and action.nargs != 0 and not action.required
              and "default" not in (action.help or "") and (name, action.option_strings[-1]) not in no_default]
    assert silent == []


def test_sample_num_images_of_exactly_the_limit_is_allowed(tmp_path):
    """1..10000 images per prompt: the limit itself passes sample's checks, one more is refused."""
    from rlcm_fast.cli import build_parser
    from rlcm_fast.sample_command import MAX_IMAGES_PER_PROMPT, _check_sample_args

    assert MAX_IMAGES_PER_PROMPT == 10_000
    def parse(count: str):
        return build_parser().parse_args(["sample", "--prompt", "cat", "--device", "cpu", "--output-dir",
                                          str(tmp_path / "out"), "--num-images", count])

    _check_sample_args(parse("10000"))
    with pytest.raises(UsageError, match=r"^--num-images 10001 is invalid: it must be in 1\.\.10000 \(images per "
                                         r"prompt\)$"):
        _check_sample_args(parse("10001"))


def test_sample_refusing_to_overwrite_one_image_names_it_alone(tmp_path):
    """One file in the way is named alone, not as '... and 0 more'."""
    from rlcm_fast.cli import build_parser
    from rlcm_fast.sample_command import _check_sample_args

    out = tmp_path / "out"
    out.mkdir()
    (out / "00-cat-00.png").write_bytes(b"earlier")
    args = build_parser().parse_args(["sample", "--prompt", "cat", "--device", "cpu", "--output-dir", str(out),
                                      "--num-images", "2"])
    with pytest.raises(UsageError) as error:
        _check_sample_args(args)
    assert str(error.value) == (f"--output-dir {str(out)!r} already holds 00-cat-00.png, which this call would "
                                "overwrite; pick another --output-dir or remove it")


def test_an_error_line_starts_on_a_line_of_its_own_over_a_progress_bar(capsys):
    """An exception in the middle of an epoch leaves its tqdm bar mid-line: the bar is closed (cleared) before
    the error is written, which on a terminal would otherwise follow the bar's text on the same line."""
    from tqdm.auto import tqdm

    from rlcm_fast.cli import _error

    bar = tqdm(total=10, desc="epoch 1 sampling", leave=False)  # writes to sys.stderr, as the trainer's bars do
    bar.update(3)
    _error(ValueError("bad value"))
    err = capsys.readouterr().err
    assert "epoch 1 sampling" in err  # the bar was drawn
    # What a terminal shows of the last line: the text after its last carriage return.
    assert err.endswith("\n") and err[:-1].split("\n")[-1].split("\r")[-1] == "rlcm-fast: error: bad value"
    assert bar not in getattr(tqdm, "_instances", ())


def test_the_package_warnings_alone_are_said_in_the_commands_form_and_only_within_it(capsys):
    import warnings

    import rlcm_fast
    from rlcm_fast.cli import package_warnings_as_lines

    inside = os.path.join(os.path.dirname(rlcm_fast.__file__), "rewards", "jpeg.py")
    with warnings.catch_warnings(record=True) as shown_as_before:
        warnings.simplefilter("always")
        before = warnings.showwarning
        with package_warnings_as_lines():
            warnings.warn_explicit("the package's", UserWarning, inside, 1)
            warnings.warn_explicit("a library's", UserWarning, "/elsewhere/diffusers/models.py", 7)
            warnings.warn_explicit("a deprecation", DeprecationWarning, inside, 2)
        assert warnings.showwarning is before
        warnings.warn_explicit("after the block", UserWarning, inside, 3)
    assert capsys.readouterr().err == "rlcm-fast: warning: the package's\n"
    assert [(str(w.message), w.filename, w.lineno) for w in shown_as_before] == [
        ("a library's", "/elsewhere/diffusers/models.py", 7), ("a deprecation", inside, 2), ("after the block", inside, 3)]
