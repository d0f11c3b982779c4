"""One `rlcm-fast train` per run folder: an exclusive lock on RUN/.lock, held for the whole run.

Two trains in one folder (a second start by mistake, or two runs started in the same second under the
default name) mixed their checkpoints, metrics and config.yaml without a word, and each one's sweep of a
dead writer's leftovers deleted the other's half-written checkpoint. flock is released by the kernel when
its holder exits, killed or not, so the lock of a crashed run never blocks its resume. No library offers a
folder lock that is released on SIGKILL and reports its holder, hence these few lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
# The run folders this process holds (their real paths) and by whom: "rlcm-fast train" (the command line) or
# "Trainer" (one made in code). The command line's own Trainer joins the command line's hold: a second flock of
# the file from this process would be refused like another process's.
_HELD: dict[str, set[str]] = {}


class RunFolderUnusable(Exception):
    """The run folder or its lock file cannot be made (a usage error: the CLI exits 2)."""


class RunFolderInUse(RunFolderUnusable):
    """Another process holds the run folder."""


def holds_run_folders_here() -> bool:
    """Whether this process takes its run folder's lock: yes, unless `--num-processes` started it (its
    launcher holds the lock) or it is not rank 0 under another launcher (rank 0 holds it for the run)."""
    from .launch import LAUNCHED_HERE

    return not os.environ.get(LAUNCHED_HERE) and os.environ.get("RANK", "0") == "0"


def held_in_this_process(run_dir: Path) -> bool:
    return os.path.realpath(run_dir) in _HELD


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, holder: str = "rlcm-fast train", joins: str | None = None):
    """Create `run_dir` if needed and hold its lock until the block ends; RunFolderInUse if another process
    holds it, or another holder in this process, unless that is `joins` alone (then this shares its hold). A
    folder this made and nothing was written into is removed again at the end, so a run refused after
    loading leaves no folder behind."""
    run_dir, held = Path(run_dir), _HELD  # the registry as it is now: the end of the hold updates that one
    what, other = _folder_words(holder)
    key = os.path.realpath(run_dir)
    holders = held.get(key)
    if holders is not None:
        if holders != {joins}:
            raise RunFolderInUse(_in_use_here(run_dir, holders, what, other))
        holders.add(holder)
        try:
            yield
        finally:
            holders.discard(holder)
        return
    fd, created = _lock(run_dir, what, other)
    held[key] = {holder}
    try:
        yield
    finally:
        held.pop(key, None)
        try:
            if fd is not None and _only_the_lock_in(run_dir):
                os.unlink(run_dir / LOCK_FILE)  # a waiting opener of this file sees it unlinked and retries
                for folder in reversed(created):
                    with contextlib.suppress(OSError):
                        folder.rmdir()
        finally:
            if fd is not None:
                os.close(fd)


def refuse_if_in_use(run_dir: Path, holder: str = "rlcm-fast train", joins: str | None = None) -> None:
    """RunFolderInUse where `hold_run_folder(run_dir, holder, joins)` would refuse now, taking nothing: for a
    refusal that would otherwise come first and mislead (a new run into a folder that holds one is told to resume
    it, and that resume is then refused because the run is still going). Another process's hold is seen with a
    shared flock, tried and dropped at once; none is tried where the launcher holds the folder for this process.
    A name no path can have (a NUL, a lone surrogate) passes: the run folder's own checks say what is wrong."""
    try:
        holders = _HELD.get(os.path.realpath(run_dir))
    except ValueError:
        return
    if holders is not None:
        if holders != {joins}:
            raise RunFolderInUse(_in_use_here(run_dir, holders, *_folder_words(holder)))
        return
    if not holds_run_folders_here():
        return
    try:  # O_NONBLOCK: a FIFO named .lock would wait for a writer
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):  # no lock file (never held), or unreadable: the hold itself says what is wrong
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderInUse(_in_use_elsewhere(run_dir, fd, *_folder_words(holder))) from None
    except OSError:  # a file system without locks
        pass
    finally:
        os.close(fd)  # and with it the shared lock


def _folder_words(holder: str) -> tuple[str, str]:
    """How messages name the folder and its alternative: as the holder's caller named it, an option or a Trainer's
    argument."""
    return ("run folder", "another run folder") if holder == "Trainer" else ("output dir", "another --output-dir")


def _in_use_here(run_dir: Path, holders: set[str], what: str, other: str) -> str:
    # A Trainer holds its folder until its train() ends, or until it is deleted (a notebook's last one is still
    # referenced by its variable).
    advice = "let its train() end or del it" if "Trainer" in holders else "let it end"
    return (f"{what} {str(run_dir)!r} is in use by another {' and '.join(sorted(holders))} in this process "
            f"(process {os.getpid()}): {advice}, or give {other}")


def _in_use_elsewhere(run_dir: Path, fd: int, what: str, other: str) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()  # what the holder wrote into the lock file
    by = f" (process {pid})" if pid.isdigit() else ""
    return f"{what} {str(run_dir)!r} is in use by another rlcm-fast train{by}: wait for it to end, or give {other}"


def _exclusive_flock(fd: int, tries: int = 5, wait_s: float = 0.02) -> None:
    """flock(LOCK_EX), not waiting for a run that holds it, but retried a few times: refuse_if_in_use's shared
    flock is held for an instant (a network round trip on NFS), and a start at that instant is no conflict."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(wait_s)


def _only_the_lock_in(run_dir: Path) -> bool:
    try:
        return os.listdir(run_dir) == [LOCK_FILE]
    except OSError:  # removed (or made unreadable) during the run: nothing to tidy, and the run's own error stands
        return False


def _lock(run_dir: Path, what: str, other: str) -> tuple[int | None, list[Path]]:
    path = run_dir / LOCK_FILE
    while True:
        created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()][::-1]
        try:  # e.g. a dangling symbolic link as the run folder, or a folder named .lock in it
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            where = path if run_dir.is_dir() else run_dir
            raise RunFolderUnusable(f"{what} {str(run_dir)!r} cannot be used: {str(where)!r}: "
                                    f"{exc.strerror or exc}") from None
        try:
            _exclusive_flock(fd)
        except BlockingIOError:
            message = _in_use_elsewhere(run_dir, fd, what, other)
            os.close(fd)
            raise RunFolderInUse(message) from None
        except OSError as exc:  # a file system without locks: run as before, unguarded
            os.close(fd)
            print(f"rlcm-fast: warning: could not lock {str(path)!r} ({exc.strerror or exc}); nothing stops another "
                  "train from writing this run folder at the same time", file=sys.stderr)
            return None, []
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not a file that its last holder removed
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for the message of a train refused while this one runs
    return fd, created
