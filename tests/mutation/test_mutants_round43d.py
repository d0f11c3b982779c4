"""Mutation-testing round 43d (sample_command, train_command): hand-written mutants of those modules were run against
their tests (test_sample_command, test_cli_inputs, test_cli_mutants, test_run_lock, test_launch, part of test_train);
each test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast: sample's
pipeline call is stubbed, and no run is trained."""

from types import SimpleNamespace

import pytest
import torch

from rlcm_fast.cli import build_parser, main
from rlcm_fast.path_checks import UsageError
from rlcm_fast.sample_command import MAX_IMAGES_PER_CALL, _check_sample_args, _sample_paths


# -- sample: the limits of its own options ---------------------------------------------------------------------

def sample_args(tmp_path, *options, prompts=("cat",)):
    """`sample`'s parsed command line, its images going to tmp_path/out."""
    argv = ["sample", "--device", "cpu", "--output-dir", str(tmp_path / "out"), *options]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("option, limit, past", [
    ("--batch-size", "10000", "10001"),
    ("--resolution", "8", "4"),
    ("--guidance-scale", "1", "0.999"),
    ("--guidance-scale", "1000", "1000.5"),
    ("--seed", "0", "-1"),
    ("--seed", str(2**63 - 1), str(2**63)),
])
def test_each_sample_limit_itself_passes_and_one_past_it_is_refused(tmp_path, option, limit, past):
    """Mutants: `batch_size <= MAX_IMAGES_PER_PROMPT` -> `<` (--batch-size 10000, which the error's "1..10000"
    allows, refused), `resolution < 8` -> `< 16` (the 8 px the error names as the least refused), `1.0 <=
    guidance_scale` -> `<` (guidance 1, unguided sampling, refused though "[1, 1000]" includes it) and `seed <
    2**63` -> `< 2**64` (a seed torch cannot take let through to the generator)."""
    _check_sample_args(sample_args(tmp_path, option, limit))
    with pytest.raises(UsageError, match=f"^{option} .* is invalid"):
        _check_sample_args(sample_args(tmp_path, option, past))


def test_a_call_of_exactly_the_image_limit_passes_and_one_image_more_is_refused(tmp_path):
    """Mutant: `prompts * num_images > MAX_IMAGES_PER_CALL` -> `>=`: 10 prompts of 10000 images, the 100000 the
    error says a call may write, were refused; 11 prompts of 9091 (100001) are refused either way."""
    assert MAX_IMAGES_PER_CALL == 100_000
    _check_sample_args(sample_args(tmp_path, "--num-images", "10000", prompts=[f"p{i}" for i in range(10)]))
    with pytest.raises(UsageError, match=r"^--num-images 9091 for 11 prompts is 100001 images; a call writes at "
                                         r"most 100000$"):
        _check_sample_args(sample_args(tmp_path, "--num-images", "9091", prompts=[f"p{i}" for i in range(11)]))


# -- sample: file names ----------------------------------------------------------------------------------------

def test_numbers_are_as_wide_as_the_largest_needs_and_no_wider(tmp_path):
    """Mutants: the prompt number's width from `len(prompts)` and the image number's from `num_images` rather than
    the largest number written (len - 1): 100 prompts or 100 images got three digits (000..099), against the
    documented names and those an earlier call of the same size wrote (its refusal to overwrite looks for them)."""
    names = [path.name for path in _sample_paths(tmp_path, [f"p{i}" for i in range(100)], 100)]
    assert names[:2] == ["00-p0-00.png", "00-p0-01.png"] and names[-1] == "99-p99-99.png"
    names = [path.name for path in _sample_paths(tmp_path, [f"p{i}" for i in range(101)], 101)]
    assert names[0] == "000-p0-000.png" and names[-1] == "100-p100-100.png"
    assert [path.name for path in _sample_paths(tmp_path, ["a"], 1)] == ["00-a-00.png"]


# -- sample: stubbed pipeline ----------------------------------------------------------------------------------

def stubbed_pipeline(monkeypatch) -> list[dict]:
    """The LCM pipeline's call recorded, returning zero latents of 16 px images."""
    from diffusers import LatentConsistencyModelPipeline

    calls = []

    def call(self, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(images=torch.zeros(len(kwargs["prompt"]), 4, 8, 8))

    monkeypatch.setattr(LatentConsistencyModelPipeline, "__call__", call)
    return calls


def test_a_runs_own_horizon_past_its_original_steps_is_named_as_the_runs(tmp_path, capsys, monkeypatch):
    """Mutant: `"the run's" if checkpoint else "the default"` swapped: a LoRA's run horizon that its
    original_inference_steps cannot take was blamed on "the default", sending the user to the wrong setting."""
    monkeypatch.setattr("rlcm_fast.checkpoint.resolve_checkpoint", lambda path, what, warn: tmp_path / "checkpoint-1")
    monkeypatch.setattr("rlcm_fast.checkpoint.saved_config",
                        lambda checkpoint: {"original_inference_steps": 2, "horizon": 3})
    calls = stubbed_pipeline(monkeypatch)
    out = tmp_path / "out"
    assert main(["sample", "--device", "cpu", "--prompt", "cat", "--lora", str(tmp_path), "--output-dir",
                 str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlcm-fast: error: ")]
    assert lines == ["rlcm-fast: error: horizon=3 (the run's; set --horizon) is invalid: it must be in 1..2 "
                     "(original_inference_steps)"]
    assert calls == [] and not out.exists()


def test_sample_warns_when_its_rewards_server_does_not_answer(tmp_path, capsys, monkeypatch):
    """Mutant: silent_reward_server's warning dropped in _sample_reward: `sample --reward alignment` with no server
    up sampled every image first, then retried the scoring for a minute without a word of why."""
    monkeypatch.setattr("rlcm_fast.rewards.silent_reward_server",
                        lambda spec, server: f"reward server {server} does not answer")
    monkeypatch.setattr("rlcm_fast.rewards.make_reward",
                        lambda spec, quality, threads, **options: lambda images, prompts: torch.ones(len(prompts)))
    stubbed_pipeline(monkeypatch)
    assert main(["sample", "--device", "cpu", "--resolution", "16", "--horizon", "1", "--prompt", "cat",
                 "--reward", "alignment", "--output-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if line.startswith("rlcm-fast: warning: reward server ")]
    assert len(warned) == 1 and warned[0].endswith(" does not answer")
    assert err[-1] == "rlcm-fast: alignment: mean 1, std 0 over 1 image"


# -- train: the run folder and checkpoint, planned before any model loads --------------------------------------

def train_args(*argv):
    return build_parser().parse_args(["train", "--device", "cpu", *argv])


@pytest.fixture
def stand_in_checkpoint(tmp_path, monkeypatch):
    """RUN/checkpoint-1 as `--resume` finds it, its config the defaults (no file is read): its run folder holds it,
    and a newer intact checkpoint-2 when `newer` is set."""
    from rlcm_fast import train_command
    from rlcm_fast.config import TrainConfig

    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    stand_in = SimpleNamespace(checkpoint=run / "checkpoint-1", newer=None)
    monkeypatch.setattr("rlcm_fast.checkpoint.resolve_checkpoint", lambda path, what="", warn=None: stand_in.checkpoint)
    monkeypatch.setattr(train_command, "resumed_config", lambda checkpoint, overrides, fresh=None, warn=None:
                        TrainConfig(**overrides))
    monkeypatch.setattr(train_command, "newer_intact_checkpoint", lambda checkpoint: stand_in.newer)
    return stand_in


def test_a_resume_into_a_new_folder_is_planned_there_even_from_an_older_checkpoint(tmp_path, stand_in_checkpoint):
    """Mutants: --output-dir dropped from a --resume's run folder (the resume wrote into the old run's folder), any
    other folder than the run's refused (not only one holding another run), and the refusal of an older
    checkpoint than the run's newest made in any folder, not only its own (a branch into a new folder, which the
    error itself suggests, was refused)."""
    from rlcm_fast.train_command import _plan_run

    stand_in_checkpoint.newer = stand_in_checkpoint.checkpoint.parent / "checkpoint-2"
    branch = tmp_path / "branch"
    cfg, run_dir, resume_from = _plan_run(train_args("--resume", str(tmp_path / "run"), "--output-dir", str(branch)))
    assert (run_dir, resume_from, cfg.output_dir) == (branch, stand_in_checkpoint.checkpoint, str(branch))
    with pytest.raises(UsageError, match=r"^checkpoint-1 is older than this run's intact checkpoint-2: "):
        _plan_run(train_args("--resume", str(tmp_path / "run")))


def test_a_resume_refuses_a_config_file_as_it_refuses_task_and_model(tmp_path, stand_in_checkpoint):
    """Mutant: `--config` dropped from the options a --resume refuses: the file was read by no one, so its keys
    were silently not applied to the resumed run."""
    from rlcm_fast.train_command import _plan_run

    config = tmp_path / "more.yaml"
    config.write_text("epochs: 9\n")
    with pytest.raises(UsageError, match=r"^--resume takes the run's own config; change keys with --set"):
        _plan_run(train_args("--resume", str(tmp_path / "run"), "--config", str(config)))


def test_a_config_files_output_dir_is_the_run_folder(tmp_path, monkeypatch):
    """Mutant: the config file's output_dir passed over for a folder named by the time: a run's config.yaml given
    back with --config was not refused as a run, and the new run went elsewhere than its config said."""
    from rlcm_fast.train_command import _plan_run

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'mine'}\nepochs: 2\n")
    cfg, run_dir, resume_from = _plan_run(train_args("--config", str(config)))
    assert (run_dir, cfg.output_dir, resume_from) == (tmp_path / "mine", str(tmp_path / "mine"), None)
    assert not (tmp_path / "runs").exists()


def test_resume_auto_over_only_damaged_checkpoints_says_the_run_starts_over(tmp_path, capsys, monkeypatch):
    """Mutant: `resume_from is None` -> `is not None` in --resume auto's warnings: with every checkpoint damaged
    it said "taking an older checkpoint" though the run started over from nothing."""
    from rlcm_fast.train_command import _plan_run

    reason = f"checkpoint {str(tmp_path / 'checkpoint-1')!r} is damaged: no LoRA file"
    monkeypatch.setattr("rlcm_fast.checkpoint.find_resumable", lambda run_dir: (None, [reason]))
    cfg, run_dir, resume_from = _plan_run(train_args("--resume", "auto", "--output-dir", str(tmp_path)))
    assert resume_from is None and run_dir == tmp_path
    assert capsys.readouterr().err.splitlines() == [
        f"rlcm-fast: warning: {reason}; no intact checkpoint is left, so the run starts over"]


def test_a_checkpoint_with_all_its_epochs_has_nothing_to_train(tmp_path, capsys, monkeypatch):
    """Mutant: `done < epochs` -> `<=`: a resume of a finished run (done == epochs) loaded the model and trained
    on past its epochs instead of saying how to raise them."""
    from rlcm_fast.config import TrainConfig
    from rlcm_fast.train_command import _nothing_to_train

    monkeypatch.setattr("rlcm_fast.checkpoint.read_training_state", lambda checkpoint: {"epoch": 3})
    checkpoint = tmp_path / "checkpoint-3"
    assert not _nothing_to_train(TrainConfig(epochs=4), checkpoint)
    assert capsys.readouterr().err == ""
    assert _nothing_to_train(TrainConfig(epochs=3), checkpoint)
    assert capsys.readouterr().err == ("rlcm-fast: checkpoint-3 has trained 3 epoch(s), and epochs=3: nothing to "
                                       "train; --set epochs=N with N > 3 trains on\n")


def test_processes_the_launcher_started_do_not_warn_again(monkeypatch):
    """Mutant: the launcher's environment mark dropped from _warns: each of --num-processes' processes repeated
    the warnings its launcher had printed once."""
    from rlcm_fast.launch import LAUNCHED_HERE
    from rlcm_fast.train_command import _warns

    monkeypatch.delenv(LAUNCHED_HERE, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert _warns()
    monkeypatch.setenv(LAUNCHED_HERE, "1")
    assert not _warns()


def test_num_processes_zero_is_refused_not_a_run_of_no_process(tmp_path, capsys, monkeypatch):
    """Mutant: `num_processes < 1` -> `< 0`: `--num-processes 0` passed the checks and launched no process,
    ending with exit 0 as if a run had trained."""
    from rlcm_fast import launch

    monkeypatch.setattr(launch, "launch_local", lambda processes, argv: pytest.fail("processes were launched"))
    out = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--num-processes", "0", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == "rlcm-fast: error: --num-processes 0 is invalid: it must be >= 1\n"
    assert not out.exists()


def test_num_processes_inside_another_launcher_is_refused(tmp_path, capsys, monkeypatch):
    """Mutant: the WORLD_SIZE check dropped: under torchrun each of its processes launched --num-processes more,
    all on one run folder."""
    from rlcm_fast import launch

    monkeypatch.setattr(launch, "launch_local", lambda processes, argv: pytest.fail("processes were launched"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--device", "cpu", "--num-processes", "2", "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("rlcm-fast: error: --num-processes cannot be used inside a launcher "
                                       "(accelerate launch, torchrun)\n")


def test_a_launch_resuming_a_finished_run_starts_no_process(tmp_path, capsys, monkeypatch, stand_in_checkpoint):
    """Mutant: _launch's nothing-to-train check dropped: `--resume RUN --num-processes 2` of a run with all its
    epochs started two processes that each loaded the model only to say so."""
    from rlcm_fast import launch

    monkeypatch.setattr(launch, "launch_local", lambda processes, argv: pytest.fail("processes were launched"))
    monkeypatch.setattr(launch, "usable_cpu_cores", lambda: 4)
    monkeypatch.setattr("rlcm_fast.checkpoint.read_training_state", lambda checkpoint: {"epoch": 2})
    assert main(["train", "--device", "cpu", "--num-processes", "2", "--resume", str(tmp_path / "run"), "--set",
                 "epochs=2"]) == 0
    assert capsys.readouterr().err == ("rlcm-fast: checkpoint-1 has trained 2 epoch(s), and epochs=2: nothing to "
                                       "train; --set epochs=N with N > 2 trains on\n")


@pytest.mark.parametrize("device, message", [
    ("auto", "--num-processes 2 is invalid: this machine has 1 GPU(s); one process per GPU"),
    ("cpu", "--num-processes 2 is invalid: this run may use 1 CPU core(s); at most one process per core on the CPU"),
])
def test_num_processes_is_counted_against_the_gpus_only_when_the_run_uses_them(device, message, tmp_path, capsys,
                                                                               monkeypatch):
    """Mutants: `> device_count()` -> `> device_count() + 1` (two processes on one GPU let through) and the
    `device != "cpu"` dropped from `cuda` (a --device cpu run on a GPU machine counted against its GPUs, not its
    cores). The machine is stubbed: one GPU, one core."""
    from rlcm_fast import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if device == "auto" else 2)
    monkeypatch.setattr(launch, "usable_cpu_cores", lambda: 1)
    monkeypatch.setattr(launch, "launch_local", lambda processes, argv: pytest.fail("processes were launched"))
    assert main(["train", "--device", device, "--num-processes", "2", "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"rlcm-fast: error: {message}\n"


@pytest.mark.parametrize("processes", [1, 2])
def test_the_resume_command_after_a_stop_names_num_processes_only_for_several(processes, tmp_path, capsys,
                                                                              monkeypatch):
    """Mutant: `processes > 1` -> `>= 1` in the printed resume command: a one-process run was told to resume with
    `--num-processes 1`. The trainer is a stand-in that stops at once."""
    from rlcm_fast.config import TrainConfig
    from rlcm_fast.train_command import _train

    class Stopped:
        def __init__(self, cfg, run_dir, resume_from, progress_bars):
            self.cfg, self.is_main, self.global_step = cfg, True, 3
            self.stopped_at = run_dir / "checkpoint-0-update-3"
            self.stop = SimpleNamespace(received="SIGTERM")
            self.accelerator = SimpleNamespace(num_processes=processes)

        def train(self):
            return []

    monkeypatch.setattr("rlcm_fast.trainer.Trainer", Stopped)
    run = tmp_path / "run"
    assert _train(TrainConfig(), run, None) == 0
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.startswith(f"rlcm-fast: stopped by SIGTERM after step 3; wrote {run / 'checkpoint-0-update-3'}. ")
    assert ("--num-processes" in said) == (processes > 1)


def test_a_single_process_resume_checks_the_process_count_unless_under_a_launcher(tmp_path, monkeypatch,
                                                                                  stand_in_checkpoint):
    """Mutant: `not os.environ.get("WORLD_SIZE")` inverted in run_train: a mid-epoch checkpoint of two processes
    resumed in one was not refused before the model loaded (and under a launcher it was checked per process)."""
    from rlcm_fast import train_command

    checked = []
    monkeypatch.setattr("rlcm_fast.checkpoint.read_training_state", lambda checkpoint: {"epoch": 0})
    monkeypatch.setattr("rlcm_fast.epoch_samples.check_process_count",
                        lambda checkpoint, state, processes: checked.append(processes))
    monkeypatch.setattr(train_command, "_train", lambda cfg, run_dir, resume_from: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--device", "cpu", "--resume", str(tmp_path / "run")]) == 0
    assert checked == [1]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "--device", "cpu", "--resume", str(tmp_path / "run")]) == 0
    assert checked == [1]
