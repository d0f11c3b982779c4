"""Mutation-testing round 44b (cli, launch, run_lock; and train_command's `checked=` left from round 43d): hand-written
mutants of those modules were run against their tests (test_cli_mutants, test_cli_inputs, test_edges_found_by_mutation,
test_mutants_round43d, test_launch, test_run_lock, test_train's interrupt messages; and test_switches,
test_alignment_server, test_sample_command or test_damaged_checkpoints where those hold a module's only test); each
test here kills one that survived (named in its docstring). All are CPU-only and fast: checkpoints and launched
processes are stand-ins, and no model is trained or loaded."""

import pytest

from rlcm_fast.cli import build_parser, main


def train_args(*argv):
    return build_parser().parse_args(["train", "--device", "cpu", *argv])


# -- train_command: --resume auto with --config, the checkpoint's copy of the prompts ------------------------------

def test_resume_auto_with_a_config_file_reads_a_moved_prompts_file_from_the_checkpoints_copy(tmp_path, monkeypatch):
    """Mutant (round 43d): `checked=resume_from is None` -> `True` in --resume auto's resolve_config: the command line's
    config was validated before the checkpoint's copy of the prompts file was put in, so `--resume auto --config
    run.yaml` of a run whose prompts file had since been moved was refused ("prompts file ... does not exist") where a
    plain --resume of the same run reads the copy the checkpoint keeps for exactly this."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.train_command import _plan_run

    prompts = tmp_path / "my_prompts.txt"
    prompts.write_text("a cat\na dog\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"prompts: {prompts}\nepochs: 3\n")
    saved = resolve_config(config_file=config).to_dict()  # what the run's checkpoint holds
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "prompts.txt").write_text("a cat\na dog\n")
    prompts.unlink()  # moved away since the run started
    monkeypatch.setattr("rlcm_fast.checkpoint.find_resumable", lambda run_dir: (checkpoint, []))
    monkeypatch.setattr("rlcm_fast.checkpoint.read_training_state", lambda path: {"config": saved, "epoch": 1})
    monkeypatch.setattr("rlcm_fast.checkpoint.prompts_copy",
                        lambda path, key="prompts": path / "prompts.txt" if key == "prompts" else None)
    cfg, run_dir, resume_from = _plan_run(train_args("--resume", "auto", "--output-dir", str(run), "--config",
                                                     str(config)))
    assert (run_dir, resume_from) == (run, checkpoint)
    assert (cfg.prompts, cfg.epochs) == (str(prompts), 3)  # config.yaml still names the run's own file


# -- cli ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank, said", [("0", True), ("2", False), ("3", False)])
def test_only_rank_0_says_how_to_continue_after_an_interrupt(rank, said, capsys, monkeypatch):
    """Mutant: is_main_process's `RANK == "0"` -> `RANK != "1"`: in a run of three or more processes each rank from 2
    up took itself for the main one, so one Ctrl-C printed the resume advice (and every warning) several times."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def interrupted(args, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr("rlcm_fast.train_command.run_train", interrupted)
    assert main(["train", "--set", "epochs=2"]) == 130
    assert capsys.readouterr().err == ("rlcm-fast: interrupted; run the same command again: rlcm-fast train --set "
                                       "epochs=2\n" if said else "")


def test_every_numeric_default_is_the_one_its_help_names():
    """Mutant: sample's `--batch-size` default 8 -> 4: `--help` still said 8, and since the seed and the batch size
    together fix the images, a user repeating a documented sample got other images. Each option whose help names a
    number as its default must parse to that number when not given."""
    import re

    parser = build_parser()
    checked = []
    for name, command in parser.commands.items():
        for action in command._actions:
            said = re.search(r"default: (\d+)[;),]", action.help or "")
            if said and action.type is int:
                checked.append((name, action.dest))
                assert action.default == int(said.group(1)), (name, action.option_strings)
    assert ("sample", "batch_size") in checked and ("serve-reward", "port") in checked



@pytest.mark.parametrize("fault", ["TrainingFault", "CheckpointWriteError"])
def test_a_run_stopped_on_a_fault_exits_1_not_2(fault, capsys, monkeypatch):
    """Mutant: main's exit code for a fault 1 -> 2: a run that stopped on a fault (a NaN loss, a full disk while
    writing a checkpoint) exited as a usage error, so a script or scheduler retrying on faults but not on bad
    command lines gave up on a run that a resume continues."""
    from rlcm_fast.checkpoint import CheckpointWriteError
    from rlcm_fast.faults import TrainingFault

    error = {"TrainingFault": TrainingFault, "CheckpointWriteError": CheckpointWriteError}[fault]("the loss is NaN")

    def stopped(args, argv):
        raise error

    monkeypatch.setattr("rlcm_fast.train_command.run_train", stopped)
    assert main(["train"]) == 1
    assert capsys.readouterr().err == "rlcm-fast: error: the loss is NaN\n"


# -- run_lock -----------------------------------------------------------------------------------------------------

@pytest.fixture
def lock_held_elsewhere(tmp_path):
    """RUN/.lock (with `text` in it) flocked from an open file of this process's own, as another train's would be;
    yields a function that writes the file's text."""
    import fcntl
    import os

    from rlcm_fast.run_lock import LOCK_FILE

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield run_dir, lambda text: os.pwrite(fd, text.encode(), 0)
    finally:
        os.close(fd)


def test_a_holder_that_has_not_written_its_pid_yet_is_not_named_as_an_empty_process(lock_held_elsewhere):
    """Mutant: `if pid.isdigit()` dropped in _in_use_elsewhere: a train refused in the instant after the other one
    locked and before it wrote its pid (or by a lock file holding no pid) said "in use by another rlcm-fast train
    (process ): ...", naming no process while seeming to."""
    from rlcm_fast.run_lock import RunFolderInUse, hold_run_folder

    run_dir, write = lock_held_elsewhere
    with pytest.raises(RunFolderInUse) as refused, hold_run_folder(run_dir):
        pytest.fail("the folder was held twice")
    assert str(refused.value) == (f"output dir '{run_dir}' is in use by another rlcm-fast train: wait for it to end, "
                                  "or give another --output-dir")
    write("12345\n")
    with pytest.raises(RunFolderInUse, match=r"^output dir '.*' is in use by another rlcm-fast train \(process 12345\)"
                                             r": wait for it to end, or give another --output-dir$"):
        with hold_run_folder(run_dir):
            pytest.fail("the folder was held twice")


def test_the_lock_file_names_only_its_holder_after_a_killed_holder_with_a_longer_pid(tmp_path):
    """Mutant: `os.ftruncate(fd, 0)` dropped before the holder writes its pid: over a killed run's lock file holding
    a longer pid the file read "<pid>\\n<the old pid's tail>", so a second train's refusal named no process (or a
    wrong one) and the user could not tell which run to wait for."""
    import os

    from rlcm_fast.run_lock import LOCK_FILE, hold_run_folder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("epochs: 1\n")  # a run was here: the lock file stays after the hold
    (run_dir / LOCK_FILE).write_text("9" * 30 + "\n")  # what a holder killed with SIGKILL left
    with hold_run_folder(run_dir):
        assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"


# -- launch -------------------------------------------------------------------------------------------------------

class PastTheChecks(Exception):
    """Raised where start_accelerator is done refusing settings and starts building the Accelerator."""


@pytest.mark.parametrize("scope", ["unet", "blocks"])
def test_aot_eager_on_the_cpu_is_not_refused_with_a_torch_whose_inductor_gradients_are_wrong(scope, monkeypatch):
    """Mutant: `compile_backend == "inductor"` dropped from start_accelerator's refusal: compile_unet with
    compile_backend=aot_eager on the CPU was refused with torch 2.13, though it generates no code and the refusal's
    own message tells the user to switch to it."""
    import torch

    from rlcm_fast import launch
    from rlcm_fast.config import resolve_config

    def past_the_checks(*args, **kwargs):
        raise PastTheChecks

    monkeypatch.setattr(launch, "forget_other_accelerator_state", past_the_checks)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    cfg = resolve_config(overrides={"device": "cpu", "compile_unet": True, "compile_scope": scope,
                                    "compile_backend": "aot_eager"})
    with pytest.raises(PastTheChecks):
        launch.start_accelerator(cfg)


THREADS = "import os, sys; sys.exit(0 if os.environ['OMP_NUM_THREADS'] == sys.argv[1] else 3)"


def test_more_processes_than_cores_get_one_thread_each_not_zero(monkeypatch):
    """Mutant: `max(1, cores // processes)` -> `cores // processes`: on a machine with more GPUs than usable cores
    (8 GPUs in a 4-core container) each process got OMP_NUM_THREADS=0, an invalid setting the libraries warn about
    and replace with all the machine's cores: the oversubscription the variable is set to prevent."""
    import sys

    from rlcm_fast import launch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch, "usable_cpu_cores", lambda: 1)
    assert launch.launch_local(2, ["1"], command=[sys.executable, "-c", THREADS]) == 0


def test_with_the_default_grace_the_others_finish_a_second_of_work_after_one_fails(tmp_path):
    """Mutant: FAILURE_GRACE_SECONDS 60 -> 0 (the tests of the grace set their own): after one process failed the
    others were killed at once, in the middle of the checkpoint they may have been writing. With the default grace
    a process that needs one more second to finish gets it."""
    import sys
    import time

    from rlcm_fast import launch

    finish = ("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(1)\n"
              f"open({str(tmp_path / 'finished')!r}, 'w').close()")
    started = time.monotonic()
    assert launch.launch_local(2, [], command=[sys.executable, "-c", finish]) == 3
    assert (tmp_path / "finished").exists() and time.monotonic() - started < 20


def test_a_run_folder_made_unreadable_during_the_run_leaves_the_runs_own_error_standing(tmp_path, monkeypatch):
    """Mutant: the tidy-up's `except OSError` narrowed to FileNotFoundError: a run folder made unreadable while the
    run went on (a chmod, a lost mount) turned the end of the hold into a PermissionError traceback that hid the
    error the run itself ended with (and made an ordinary end fail). (As root a chmod does not stop listdir, so the
    file system's refusal is stubbed.)"""
    import os

    from rlcm_fast import run_lock
    from rlcm_fast.run_lock import hold_run_folder

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="^the run's own error$"), hold_run_folder(run_dir):
        monkeypatch.setattr(run_lock.os, "listdir", unreadable)
        raise ValueError("the run's own error")
    monkeypatch.undo()
    with hold_run_folder(run_dir):  # an ordinary end: nothing raised
        monkeypatch.setattr(run_lock.os, "listdir", unreadable)
    monkeypatch.undo()
    assert os.listdir(run_dir) == [run_lock.LOCK_FILE]  # nothing was tidied where nothing could be listed


COUNTS_SIGTERM = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
folder = sys.argv[1]
open(os.path.join(folder, "ready-" + os.environ["RANK"]), "w").close()
end = time.monotonic() + 2
while time.monotonic() < end:
    time.sleep(0.05)
open(os.path.join(folder, "got-" + os.environ["RANK"]), "w").write(str(len(got)))
"""


def test_a_signal_during_the_start_reaches_the_processes_already_started_once(tmp_path, monkeypatch):
    """Mutant: `delivered.add(...)` dropped in launch_local's deliver: a SIGTERM (or Ctrl-C) that came while a later
    process was starting was sent again to every process already started, once more for each start; a trainer takes
    a second Ctrl-C as "stop now, without the checkpoint", so one Ctrl-C lost the checkpoint it asked for."""
    import os
    import signal
    import sys
    import time

    from rlcm_fast import launch

    popen = launch.subprocess.Popen

    def start(args, env, **kwargs):
        if env["RANK"] == "1":  # rank 0 is ready for signals; the user's comes while rank 1 starts
            deadline = time.monotonic() + 20
            while not (tmp_path / "ready-0").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)
        return popen(args, env=env, **kwargs)

    monkeypatch.setattr(launch.subprocess, "Popen", start)
    launch.launch_local(2, [str(tmp_path)], command=[sys.executable, "-c", COUNTS_SIGTERM])
    assert (tmp_path / "got-0").read_text() == "1"
