"""One train per run folder (run_lock.py): a second train is refused in one line before any model loads, a
killed holder blocks nothing, and a folder written between a run's checks and its lock is refused."""

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rlcm_fast import run_lock, train_command
from rlcm_fast.cli import main
from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.launch import LAUNCHED_HERE
from rlcm_fast.run_lock import LOCK_FILE, RunFolderInUse, RunFolderUnusable, hold_run_folder, refuse_if_in_use
from rlcm_fast.trainer import Trainer

ARGS = ["--device", "cpu", "--set", "batches_per_epoch=1", "--set", "sample_batch_size=4", "--set", "train_batch_size=4",
        "--set", "epochs=1"]

HOLDER = """
import sys, time
from rlcm_fast.run_lock import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def held_by_another_process(run_dir: Path):
    """run_dir's lock held by another process for the block (its pid yielded), then that process killed: no cleanup
    runs, the kernel drops the lock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def lock_is_free(run_dir: Path) -> bool:
    """Whether a flock of RUN/.lock succeeds now (from a new open file: as another train would try it)."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rlcm-fast: error")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_a_second_train_is_refused_while_the_first_holds_the_folder_and_runs_once_it_is_killed(
        tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    with held_by_another_process(run_dir) as pid, monkeypatch.context() as patch:
        patch.setattr(Trainer, "__init__", lambda *args: pytest.fail("the model was loaded"))
        assert main(["train", *ARGS, "--output-dir", str(run_dir)]) == 2
        assert error_line(capsys) == (f"rlcm-fast: error: output dir '{run_dir}' is in use by another rlcm-fast "
                                      f"train (process {pid}): wait for it to end, or give another --output-dir")
        assert main(["train", *ARGS, "--output-dir", str(run_dir), "--resume", "auto"]) == 2
        assert "is in use by another rlcm-fast train" in error_line(capsys)
        assert os.listdir(run_dir) == [LOCK_FILE]
    assert main(["train", *ARGS, "--output-dir", str(run_dir)]) == 0
    assert (run_dir / "checkpoint-1").is_dir() and (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_run_still_going_is_reported_as_in_use_not_as_a_run_to_resume(tmp_path, capsys, monkeypatch):
    """A new run into a folder whose run is still going was told to resume it, and that resume was then refused."""
    run_dir = tmp_path / "run"
    assert main(["train", *ARGS, "--output-dir", str(run_dir)]) == 0
    capsys.readouterr()
    with held_by_another_process(run_dir) as pid, monkeypatch.context() as patch:
        patch.setattr(Trainer, "_build", lambda *args: pytest.fail("the model was loaded"))
        assert main(["train", *ARGS, "--output-dir", str(run_dir)]) == 2
        assert error_line(capsys) == (f"rlcm-fast: error: output dir '{run_dir}' is in use by another rlcm-fast "
                                      f"train (process {pid}): wait for it to end, or give another --output-dir")
        with pytest.raises(RunFolderInUse) as error:
            Trainer(resolve_config(None, None, None, {"epochs": 1}), run_dir)
        assert str(error.value) == (f"run folder '{run_dir}' is in use by another rlcm-fast train (process {pid}): "
                                    "wait for it to end, or give another run folder")
    # Once it has ended, the folder's run is the one to resume again.
    assert main(["train", *ARGS, "--output-dir", str(run_dir)]) == 2
    assert "already holds a run; resume it with --resume" in error_line(capsys)
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(resolve_config(None, None, None, {"epochs": 1}), run_dir)


def test_a_second_trainer_on_a_folder_this_process_holds_is_told_it_is_in_use_not_to_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *ARGS, "--output-dir", str(run_dir)]) == 0
    cfg = resolve_config(None, None, None, {"epochs": 2})
    first = Trainer(cfg, run_dir, resume_from=run_dir)  # not trained: it holds the folder until deleted
    with pytest.raises(RunFolderInUse) as error:
        Trainer(cfg, run_dir)
    assert str(error.value) == (f"run folder '{run_dir}' is in use by another Trainer in this process (process "
                                f"{os.getpid()}): let its train() end or del it, or give another run folder")
    del first
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, run_dir)


def test_a_start_in_the_instant_of_another_s_probe_is_no_conflict(tmp_path):
    """refuse_if_in_use's shared flock, held for an instant, must not refuse a start that locks at that instant."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("")
    probe = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.03, os.close, (probe,)).start()  # released after 30 ms, as a slow probe's would be
    with hold_run_folder(run_dir):
        assert not lock_is_free(run_dir)


def test_a_folder_written_between_the_checks_and_the_lock_is_refused(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    real_hold = run_lock.hold_run_folder

    def another_train_writes_before_the_lock(folder):
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("")
        return real_hold(folder)

    monkeypatch.setattr(run_lock, "hold_run_folder", another_train_writes_before_the_lock)
    monkeypatch.setattr(Trainer, "__init__", lambda *args: pytest.fail("the model was loaded"))
    assert main(["train", *ARGS, "--output-dir", str(run_dir)]) == 2
    assert error_line(capsys) == (f"rlcm-fast: error: output dir '{run_dir}' changed while this run was starting "
                                  "(another rlcm-fast train wrote it): run the command again")
    assert sorted(os.listdir(run_dir)) == [LOCK_FILE, "metrics.jsonl"]


def test_a_folder_made_for_the_lock_and_left_empty_is_removed_with_its_new_parents(tmp_path):
    run_dir = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(ValueError, match="refused after loading"), hold_run_folder(run_dir):
        assert (run_dir / LOCK_FILE).is_file()
        raise ValueError("refused after loading")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that was there stays, and so does what a run wrote
    with hold_run_folder(tmp_path / "kept"):
        pass
    with hold_run_folder(tmp_path / "written"):
        (tmp_path / "written" / "config.yaml").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "written"]
    assert list((tmp_path / "kept").iterdir()) == []
    assert sorted(os.listdir(tmp_path / "written")) == [LOCK_FILE, "config.yaml"]


def test_a_run_folder_removed_during_the_run_leaves_the_runs_own_error_standing(tmp_path):
    """The tidy-up's listdir raised FileNotFoundError, which hid the error the run ended with."""
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="the run's own error"), hold_run_folder(run_dir):
        shutil.rmtree(run_dir)
        raise ValueError("the run's own error")
    with hold_run_folder(run_dir):  # and an ordinary end: nothing raised
        shutil.rmtree(run_dir)
    assert list(tmp_path.iterdir()) == []


def test_the_same_folder_is_refused_to_a_second_holder_in_one_process(tmp_path):
    with hold_run_folder(tmp_path / "run"):
        with pytest.raises(RunFolderInUse, match=f"process {os.getpid()}"), hold_run_folder(tmp_path / "run"):
            pass
    with hold_run_folder(tmp_path / "run"):  # released
        pass


def test_a_lock_file_its_last_holder_removed_is_not_taken(tmp_path, monkeypatch):
    """The file was opened while its holder still had it, then unlinked by that holder (which left nothing): a lock
    on it would guard nothing, so a new file is made and locked."""
    run_dir = tmp_path / "run"
    real_flock, opened = fcntl.flock, []

    def flock_as_the_holder_leaves(fd, operation):
        if not opened:
            opened.append(os.fstat(fd).st_ino)
            os.unlink(run_dir / LOCK_FILE)
        return real_flock(fd, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", flock_as_the_holder_leaves)
    with hold_run_folder(run_dir):
        assert len(opened) == 1 and (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderInUse), hold_run_folder(run_dir):  # the file on disk is the one held
            pass


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, capsys, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with hold_run_folder(tmp_path / "run"):
        (tmp_path / "run" / "config.yaml").write_text("")
    assert "could not lock" in capsys.readouterr().err and (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / LOCK_FILE).is_file()
    refuse_if_in_use(tmp_path / "run")  # the next start's probe of the lock file left behind: no OSError either


def test_only_the_launcher_or_rank_0_holds_the_folder(tmp_path, monkeypatch):
    for env in ({"RLCM_FAST_LAUNCHED": "1"}, {"RANK": "1"}):
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            with train_command._run_folder_held(tmp_path / "run"):
                assert not (tmp_path / "run").exists()
    with train_command._run_folder_held(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).is_file()
    assert not Path(tmp_path / "run").exists()


def test_a_run_folder_the_lock_cannot_be_made_in_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "__init__", lambda *args: pytest.fail("the model was loaded"))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    assert main(["train", *ARGS, "--output-dir", str(tmp_path / "run")]) == 2
    assert error_line(capsys) == (f"rlcm-fast: error: output dir '{tmp_path / 'run'}' cannot be used: "
                                  f"'{tmp_path / 'run' / LOCK_FILE}': Is a directory")
    # A dangling link is refused before the lock (path_checks): mkdir through it said only "File exists".
    assert main(["train", *ARGS, "--output-dir", str(tmp_path / "dangling")]) == 2
    assert error_line(capsys) == (f"rlcm-fast: error: output dir '{tmp_path / 'dangling'}' cannot be created: it is "
                                  f"a symbolic link to '{tmp_path / 'nowhere'}', which does not exist")


def test_a_trainers_refusals_name_its_run_folder_not_the_command_lines_option(tmp_path):
    """A Trainer has no --output-dir: its messages say "run folder", as its argument does."""
    (tmp_path / "unusable" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(RunFolderUnusable) as error, hold_run_folder(tmp_path / "unusable", holder="Trainer"):
        pass
    assert str(error.value) == (f"run folder '{tmp_path / 'unusable'}' cannot be used: "
                                f"'{tmp_path / 'unusable' / LOCK_FILE}': Is a directory")
    run_dir = tmp_path / "held"
    with held_by_another_process(run_dir) as pid:
        with pytest.raises(RunFolderInUse) as error, hold_run_folder(run_dir, holder="Trainer"):
            pass
    assert str(error.value) == (f"run folder '{run_dir}' is in use by another rlcm-fast train (process {pid}): "
                                "wait for it to end, or give another run folder")


def test_a_hold_in_this_process_is_shared_only_by_the_holder_that_joins_it(tmp_path):
    """The command line's Trainer joins the command line's hold; a second Trainer, or a Trainer's hold joined by
    anything, is refused. The joiner's end leaves the folder held, the outer one's releases it."""
    run_dir = tmp_path / "run"
    with hold_run_folder(run_dir):
        with hold_run_folder(run_dir, holder="Trainer", joins="rlcm-fast train"):
            with pytest.raises(RunFolderInUse, match="in use by another Trainer and rlcm-fast train in this process"):
                with hold_run_folder(run_dir, holder="Trainer", joins="rlcm-fast train"):
                    pass
        assert not lock_is_free(run_dir)
    assert not run_dir.exists()  # released by the outer hold, which removes the folder it made and left empty
    with hold_run_folder(run_dir, holder="Trainer", joins="rlcm-fast train"):
        with pytest.raises(RunFolderInUse, match="in use by another Trainer in this process"), hold_run_folder(run_dir):
            pass


def test_a_joiner_may_join_again_after_it_ends_and_through_another_spelling_of_the_folder(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "run", target_is_directory=True)
    with hold_run_folder(tmp_path / "run"):
        for folder in (tmp_path / "link", tmp_path / "run" / ".." / "run"):  # the same folder: the same hold
            with hold_run_folder(folder, holder="Trainer", joins="rlcm-fast train"):
                pass


@contextlib.contextmanager
def locked_here(run_dir: Path, operation: int):
    """flock(`operation`) of RUN/.lock from an open file of this process's own, as another process's would be."""
    run_dir.mkdir(exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_a_launched_process_does_not_probe_the_lock_its_launcher_holds(tmp_path, monkeypatch):
    """--num-processes holds the folder in the launcher; its workers, probing it, refused their own run."""
    run_dir = tmp_path / "run"
    with locked_here(run_dir, fcntl.LOCK_EX):
        with pytest.raises(RunFolderInUse):
            refuse_if_in_use(run_dir)
        monkeypatch.setenv(LAUNCHED_HERE, "1")
        refuse_if_in_use(run_dir)


def test_another_starts_probe_holding_a_shared_lock_is_no_refusal(tmp_path):
    """Two starts probing at once each see the other's shared flock: neither holds the folder."""
    with locked_here(tmp_path / "run", fcntl.LOCK_SH):
        refuse_if_in_use(tmp_path / "run")


def test_a_fifo_named_lock_does_not_hang_the_start(tmp_path):
    """Opening a FIFO for reading waits for a writer: the probe opens with O_NONBLOCK."""
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / LOCK_FILE)

    def start():
        with contextlib.suppress(RunFolderUnusable):  # whatever it says of such a file, it must say it at once
            refuse_if_in_use(tmp_path / "run")

    probe = threading.Thread(target=start, daemon=True)
    probe.start()
    probe.join(5)
    try:
        assert not probe.is_alive()
    finally:
        if probe.is_alive():  # a writer lets the waiting open return
            with contextlib.suppress(OSError):
                os.close(os.open(tmp_path / "run" / LOCK_FILE, os.O_WRONLY | os.O_NONBLOCK))


def test_the_in_process_refusal_of_the_command_lines_hold_says_let_it_end(tmp_path):
    """"let its train() end or del it" is a Trainer's advice; the command line's run is only let end."""
    run_dir = tmp_path / "run"
    with hold_run_folder(run_dir), pytest.raises(RunFolderInUse) as error:
        refuse_if_in_use(run_dir)
    assert str(error.value) == (f"output dir '{run_dir}' is in use by another rlcm-fast train in this process "
                                f"(process {os.getpid()}): let it end, or give another --output-dir")


def test_a_refused_hold_leaks_no_file_descriptor(tmp_path):
    run_dir = tmp_path / "run"

    def lock_file_descriptors() -> int:  # only the lock file's: another thread's fds may come and go meanwhile
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}") == str(run_dir / LOCK_FILE)
        return count

    with locked_here(run_dir, fcntl.LOCK_EX):
        before = lock_file_descriptors()
        for _ in range(3):
            with pytest.raises(RunFolderInUse), hold_run_folder(run_dir):
                pass
        assert lock_file_descriptors() == before == 1
