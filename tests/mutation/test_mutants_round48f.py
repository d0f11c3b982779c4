"""Mutation-testing round 48f (cli, train_command, sample_command): a second round of hand-written mutants of those
modules was run against their tests (test_cli_inputs, test_sample_command, test_home_paths, test_run_lock,
test_launch, parts of test_train, test_faults, test_damaged_checkpoints and test_alignment_server, and the earlier
rounds' test_cli_mutants, test_mutants_round43d and test_mutants_round44b); each test here kills one that survived
(named in its docstring). All are CPU-only, seeded and fast: no model is loaded and no run is trained (the trainer
and the pipeline are stand-ins)."""

import contextlib

import pytest

from rlcm_fast.cli import build_parser, main
from rlcm_fast.path_checks import UsageError
from test_mutants_round43d import stubbed_pipeline


def train_args(*argv):
    return build_parser().parse_args(["train", "--device", "cpu", *argv])


# -- train: the run folder planned before any model loads ------------------------------------------------------

def test_resume_auto_into_a_folder_without_checkpoints_takes_the_config_file(tmp_path):
    """Mutant: `--config` dropped from the options `--resume auto` resolves a fresh config from: with no checkpoint
    yet (the run's first start, which --resume auto's help says starts there), the config file was read by no one
    and the run started from the defaults, not with the epochs and LoRA rank the file names."""
    from rlcm_fast.train_command import _plan_run

    config = tmp_path / "run.yaml"
    config.write_text("epochs: 7\nlora_rank: 2\n")
    run = tmp_path / "run"
    cfg, run_dir, resume_from = _plan_run(train_args("--resume", "auto", "--output-dir", str(run),
                                                     "--config", str(config)))
    assert (run_dir, resume_from, cfg.output_dir) == (run, None, str(run))
    assert (cfg.epochs, cfg.lora_rank) == (7, 2)


def test_another_ranks_probe_folder_is_no_change_of_the_run_folder(tmp_path, monkeypatch):
    """Mutant: check_run_dir's probe folders no longer left out of the run folder's state: a probe made for an
    instant by another rank of the same run (checking it can make a folder) between this rank's check and its lock
    made the start fail with "changed while this run was starting" though nothing of the run's had changed."""
    from rlcm_fast import run_lock
    from rlcm_fast.path_checks import PROBE_PREFIX
    from rlcm_fast.train_command import _run_folder_held

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    monkeypatch.setattr(run_lock, "holds_run_folders_here", lambda: True)

    def lock_writing(name):
        @contextlib.contextmanager
        def hold(folder):
            (folder / name).mkdir()  # made between the plan's look at the folder and the lock
            yield

        return hold

    entered = []
    monkeypatch.setattr(run_lock, "hold_run_folder", lock_writing(f"{PROBE_PREFIX}1234"))
    with _run_folder_held(run):
        entered.append(True)
    assert entered == [True]
    monkeypatch.setattr(run_lock, "hold_run_folder", lock_writing("checkpoint-1"))
    with pytest.raises(UsageError, match=r"changed while this run was starting \(another rlcm-fast train wrote it\)"):
        with _run_folder_held(run):
            pytest.fail("the block ran in a folder another train wrote")


# -- train: what it says ---------------------------------------------------------------------------------------

def test_a_resumed_runs_first_line_names_the_checkpoint_it_starts_from(tmp_path, capsys, monkeypatch):
    """Mutant: ` from checkpoint-N` dropped from the run's first line: a resume (--resume auto above all, which
    chooses the checkpoint itself) said nothing of where it started, reading like a fresh run's start."""
    from rlcm_fast.config import TrainConfig
    from rlcm_fast.train_command import _train

    class Done:
        def __init__(self, cfg, run_dir, resume_from, progress_bars):
            self.cfg, self.is_main, self.stopped_at, self.logger = cfg, True, None, None

        def train(self):
            return []

    monkeypatch.setattr("rlcm_fast.trainer.Trainer", Done)
    monkeypatch.setattr("rlcm_fast.run_logging.summarize", lambda records, evals: "no epochs")
    run = tmp_path / "run"
    cfg = TrainConfig(model="tiny", reward="jpeg_compressibility", resolution=64, horizon=4)
    assert _train(cfg, run, run / "checkpoint-2") == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        f"rlcm-fast: training tiny on jpeg_compressibility (64 px, 4 steps) from checkpoint-2 -> {run}")
    assert _train(cfg, run, None) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        f"rlcm-fast: training tiny on jpeg_compressibility (64 px, 4 steps) -> {run}")


def test_an_interrupted_run_with_a_remote_reward_server_says_to_resume_with_it(tmp_path, capsys, monkeypatch):
    """Mutant: run_train no longer keeps the run's resume options for main's interrupt message: a run scored by
    a reward server on another machine, interrupted (a second Ctrl-C) after a checkpoint, was told to resume with
    `--resume auto` alone, which scores against the server on this machine (or none)."""
    from rlcm_fast import train_command
    from rlcm_fast.path_checks import shell_path

    def interrupted(cfg, run_dir, resume_from):
        (run_dir / "checkpoint-1").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "_train", interrupted)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run), "--reward", "alignment",
                 "--set", "reward_server=http://198.51.100.7:8060"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "rlcm-fast: interrupted; continue from the newest checkpoint with: rlcm-fast train --resume auto "
        f"--output-dir {shell_path(run)} --set reward_server=http://198.51.100.7:8060")


# -- sample: its own options -----------------------------------------------------------------------------------

def sample_args(tmp_path, *options, prompts=("cat",)):
    """`sample`'s parsed command line, its images going to tmp_path/out."""
    argv = ["sample", "--device", "cpu", "--output-dir", str(tmp_path / "out"), *options]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("resolution", ["12", "20", "36"])
def test_a_resolution_that_is_a_multiple_of_4_but_not_of_8_is_refused(tmp_path, resolution):
    """Mutant: `resolution % 8` -> `% 4`: --resolution 12 passed the check its error names ("a multiple of 8") and
    went on to load the model, whose VAE (a factor of 8) cannot make a 12 px image."""
    from rlcm_fast.sample_command import _check_sample_args

    _check_sample_args(sample_args(tmp_path, "--resolution", "16"))
    with pytest.raises(UsageError, match=rf"^--resolution {resolution} is invalid: it must be a multiple of 8, "
                                         r"at least 8$"):
        _check_sample_args(sample_args(tmp_path, "--resolution", resolution))


def test_a_horizon_past_the_schedulers_train_timesteps_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    """Mutant: the horizon's limit taken from original_inference_steps alone, not also the scheduler's
    num_train_timesteps: a run whose original_inference_steps (1200) exceed the model's 1000 timesteps let
    --horizon 1100 through to the pipeline, which cannot draw that many distinct timesteps. (Since 762eb8c
    such a run is refused for any horizon, naming both numbers: see test_cli_inputs.)"""
    monkeypatch.setattr("rlcm_fast.checkpoint.resolve_checkpoint", lambda path, what, warn: tmp_path / "checkpoint-1")
    monkeypatch.setattr("rlcm_fast.checkpoint.saved_config", lambda checkpoint: {"original_inference_steps": 1200})
    calls = stubbed_pipeline(monkeypatch)
    out = tmp_path / "out"
    assert main(["sample", "--device", "cpu", "--prompt", "cat", "--lora", str(tmp_path), "--horizon", "1100",
                 "--output-dir", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlcm-fast: error: ")]
    assert len(lines) == 1
    assert lines[0] == ("rlcm-fast: error: model 'tiny' cannot sample the run's original_inference_steps=1200: its "
                        "scheduler has num_train_timesteps=1000")
    assert calls == [] and not out.exists()

