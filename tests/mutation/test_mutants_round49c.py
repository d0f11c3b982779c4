"""Mutation-testing round 49c (launch, run_lock; a second round over them after round 44b and test_cli_mutants):
hand-written mutants of rlcm_fast/launch.py and rlcm_fast/run_lock.py were run against their tests (test_launch,
test_run_lock, test_cli_mutants, test_mutants_round44b, test_mutants_round43d, test_edges_found_by_mutation, the start
checks of test_switches and test_train, and test_cli_inputs' launch and run-folder cases); each test here kills one
that survived (named in its docstring). All are CPU-only and fast: the launched processes are small stand-ins, no
model is built, and start_accelerator is stopped where it would build the Accelerator."""

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from rlcm_fast import launch
from rlcm_fast.run_lock import LOCK_FILE, RunFolderInUse, RunFolderUnusable, hold_run_folder

# -- run_lock -----------------------------------------------------------------------------------------------------


@pytest.fixture
def lock_held_elsewhere(tmp_path):
    """RUN/.lock flocked from an open file of this process's own, as another train's would be; yields the run folder
    and a function that puts `data` (bytes) in the lock file as that holder's own."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def write(data: bytes):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    try:
        yield run_dir, write
    finally:
        os.close(fd)


def refusal(run_dir) -> str:
    with pytest.raises(RunFolderInUse) as refused, hold_run_folder(run_dir):
        pytest.fail("the folder was held twice")
    return str(refused.value)


def test_a_holder_with_a_seven_digit_process_id_is_named_in_full(lock_held_elsewhere):
    """Mutant: `os.pread(fd, 32, 0)` -> `os.pread(fd, 6, 0)` in _in_use_elsewhere: a holder whose pid has more digits
    than were read (Linux gives pids up to 4194304 where pid_max is raised, as on many 64-bit distributions) was named
    by its first digits, "process 419430", another process the user might wait for or kill."""
    run_dir, write = lock_held_elsewhere
    write(b"4194304\n")
    assert refusal(run_dir) == (f"output dir '{run_dir}' is in use by another rlcm-fast train (process 4194304): "
                                "wait for it to end, or give another --output-dir")


def test_a_lock_file_holding_bytes_that_are_not_utf8_is_still_a_one_line_refusal(lock_held_elsewhere):
    """Mutant: `decode(errors="replace")` -> `decode()` in _in_use_elsewhere: a lock file whose first bytes are not
    UTF-8 (left by some other program, or damaged) turned the refusal of a second train into a UnicodeDecodeError
    traceback instead of the one line that says the folder is in use."""
    run_dir, write = lock_held_elsewhere
    write(b"\xff\xfe1234\n")
    assert refusal(run_dir) == (f"output dir '{run_dir}' is in use by another rlcm-fast train: wait for it to end, "
                                "or give another --output-dir")


def test_a_folder_a_trainer_has_joined_gets_the_trainers_advice(tmp_path):
    """Mutant: the advice's `"Trainer" in holders` -> `holders == {"Trainer"}`: a second Trainer on a folder that the
    command line's hold and its own Trainer share was told only "let it end", though that Trainer (one made in a
    notebook, say) holds the folder until its train() ends or it is deleted."""
    run_dir = tmp_path / "run"
    with hold_run_folder(run_dir), hold_run_folder(run_dir, holder="Trainer", joins="rlcm-fast train"):
        with pytest.raises(RunFolderInUse) as refused, hold_run_folder(run_dir, holder="Trainer"):
            pytest.fail("the folder was held twice")
    assert str(refused.value) == (f"run folder '{run_dir}' is in use by another Trainer and rlcm-fast train in this "
                                  f"process (process {os.getpid()}): let its train() end or del it, or give another "
                                  "run folder")


@pytest.mark.parametrize("inside", [False, True])
def test_a_run_folder_that_is_a_file_is_named_as_the_file_in_the_way(tmp_path, inside):
    """Mutant: `where = path if run_dir.is_dir() else run_dir` -> `where = path`: a run folder that could not be made
    (a file of that name, or a file where a parent folder should be) was reported as ".../run/.lock: File exists",
    naming a lock file that does not exist instead of the file in the way."""
    (tmp_path / "file").write_text("")
    run_dir = tmp_path / "file" / "run" if inside else tmp_path / "file"
    why = "Not a directory" if inside else "File exists"
    with pytest.raises(RunFolderUnusable) as refused, hold_run_folder(run_dir, holder="Trainer"):
        pytest.fail("an unusable folder was held")
    assert str(refused.value) == f"run folder '{run_dir}' cannot be used: '{run_dir}': {why}"
    assert (tmp_path / "file").read_text() == ""


def test_a_trainers_run_folder_holding_a_nul_is_refused_by_the_folders_own_check(tmp_path):
    """Mutant: refuse_if_in_use's `except ValueError: return` around realpath narrowed (to TypeError): a Trainer given a
    run folder with a NUL in its name (a path no file system takes) stopped on realpath's bare "embedded null byte"
    ValueError from the in-use probe, before the run folder's own check could say which folder and why."""
    from rlcm_fast.config import ConfigError, resolve_config
    from rlcm_fast.trainer import Trainer

    run_dir = tmp_path / "run\0name"
    with pytest.raises(ConfigError) as refused:
        Trainer(resolve_config(overrides={"epochs": 1}), run_dir)
    assert str(refused.value) == f"run folder {str(run_dir)!r} is invalid: a path cannot hold a NUL character"
    assert list(tmp_path.iterdir()) == []


def test_a_trainers_run_folder_holding_a_lone_surrogate_is_refused_by_the_folders_own_check(tmp_path):
    """Found with the mutant above: refuse_if_in_use lets a name no path can have (a NUL, a lone surrogate) pass so
    that "the run folder's own checks say what is wrong", but for a lone surrogate (a str a Trainer may be given,
    from a decode gone wrong; argv's undecodable bytes are escaped surrogates, which encode) those checks stopped on a
    bare UnicodeEncodeError ("'utf-8' codec can't encode character '\\ud800'") naming no folder, not a ConfigError
    (mended in path_checks.check_run_dir)."""
    from rlcm_fast.config import ConfigError, resolve_config
    from rlcm_fast.trainer import Trainer

    run_dir = f"{tmp_path}/run\ud800name"
    with pytest.raises(ConfigError) as refused:
        Trainer(resolve_config(overrides={"epochs": 1}), run_dir)
    assert str(refused.value) == (f"run folder {run_dir!r} is invalid: '\\ud800' is a lone surrogate, which no file "
                                  "name can hold")
    assert list(tmp_path.iterdir()) == []


# -- launch: start_accelerator ------------------------------------------------------------------------------------

class PastTheChecks(Exception):
    """Raised where start_accelerator is done refusing settings and starts building the Accelerator."""


def test_the_attention_backend_is_checked_for_the_device_the_run_uses(monkeypatch):
    """Mutant: check_attention_backend given the CPU whatever the device: a CUDA run (device=cuda, or auto on a CUDA
    machine) had its attention backend checked as if it ran on the CPU, so a backend that needs CUDA (cudnn) was
    refused on the very machine it runs on."""
    import torch

    from rlcm_fast import attention
    from rlcm_fast.config import resolve_config

    checked = []

    def past_the_checks(*args, **kwargs):
        raise PastTheChecks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "check_attention_backend", lambda backend, device: checked.append(device))
    monkeypatch.setattr(launch, "forget_other_accelerator_state", past_the_checks)
    for device, expected in (("cuda", "cuda"), ("auto", "cuda"), ("cpu", "cpu")):
        with pytest.raises(PastTheChecks):
            launch.start_accelerator(resolve_config(overrides={"device": device}))
        assert checked.pop().type == expected, device


# -- launch: launch_local -----------------------------------------------------------------------------------------

def test_a_process_exiting_with_1_sets_the_exit_code_and_stops_the_others(monkeypatch, capsys):
    """Mutants: `code > 0` -> `code > 1` (exit code 1, what a run stopped by a fault or an error exits with, was taken
    for a kill: "process 1 of 2 was killed by signal -1" and exit 127) and the first failure's `code not in (None,
    0)` -> `(None, 0, 1)` (an exit 1 was no failure: the others, waiting on the failed one in a collective, were never
    stopped)."""
    monkeypatch.setattr(launch, "FAILURE_GRACE_SECONDS", 1.0)
    stub = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(1)\ntime.sleep(60)"
    started = time.monotonic()
    assert launch.launch_local(2, [], command=[sys.executable, "-c", stub]) == 1
    assert time.monotonic() - started < 20
    assert capsys.readouterr().err == ""  # the process said why itself


IGNORES_SIGTERM = """
import os, signal, sys, time
if os.environ["RANK"] == "1":
    sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a trainer that catches it to checkpoint, stuck in a collective
time.sleep(60)
"""


def test_a_process_that_catches_sigterm_is_still_stopped_after_the_grace(monkeypatch):
    """Mutant: `child.kill()` -> `child.terminate()` after the grace: a training process catches SIGTERM (to finish
    its step and checkpoint) and, stuck waiting on the process that failed, never gets there, so the launcher waited
    on it for ever instead of ending with the failure's exit code."""
    monkeypatch.setattr(launch, "FAILURE_GRACE_SECONDS", 1.0)
    started = time.monotonic()
    assert launch.launch_local(2, [], command=[sys.executable, "-c", IGNORES_SIGTERM]) == 3
    assert time.monotonic() - started < 20


def test_launches_one_after_another_get_their_own_master_port(tmp_path):
    """Mutant: _free_port returning a fixed port (29500, torchrun's default): two runs started on one machine (two
    users, or two sweeps) met on the same MASTER_PORT, and the second's process group failed to bind it or joined
    the first's. Each launch asks the system for a free port, so three launches do not all get the same one."""
    stub = f"import os; open(os.path.join({str(tmp_path)!r}, os.environ['MASTER_PORT']), 'w').close()"
    for _ in range(3):
        assert launch.launch_local(1, [], command=[sys.executable, "-c", stub]) == 0
    ports = [int(name) for name in os.listdir(tmp_path)]
    assert len(ports) > 1 and all(0 < port < 65536 for port in ports)


ENDS_WELL_ON_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # a process that stops cleanly when asked
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked from its start: see the test
time.sleep(60)
"""


def test_a_signal_before_every_process_started_is_the_exit_code_though_those_started_end_well(monkeypatch):
    """Mutant: `return 128 + forwarded[0] if len(children) < num_processes else 0` -> `return 0`: a Ctrl-C (or kill)
    that came while the processes were starting, so that the rest were never started, ended the launcher with exit
    code 0 when the processes it had started stopped cleanly: a script or scheduler took a run that never ran for one
    that finished."""
    popen, started = launch.subprocess.Popen, []

    def start(args, env, preexec_fn, **kwargs):
        def blocked():  # SIGTERM held back until the process's handler is in place (a signal mask survives exec)
            preexec_fn()
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

        if env["RANK"] == "1":  # the user's signal comes while rank 1 starts: rank 2 must not start
            os.kill(os.getpid(), signal.SIGTERM)
        started.append(env["RANK"])
        return popen(args, env=env, preexec_fn=blocked, **kwargs)

    monkeypatch.setattr(launch.subprocess, "Popen", start)
    assert launch.launch_local(3, [], command=[sys.executable, "-c", ENDS_WELL_ON_SIGTERM]) == 128 + signal.SIGTERM
    assert started == ["0", "1"]


LAUNCHER = """
import sys
from rlcm_fast import launch
launch.launch_local(1, [], command=[sys.executable, "-c", sys.argv[1]])
"""
WRITES_PID = """
import os, sys, time
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_processes_die_with_a_launcher_killed_by_sigkill(tmp_path):
    """Mutant: `preexec_fn=_die_with_parent` dropped: a launcher killed with SIGKILL (the out-of-memory killer, a
    scheduler's hard stop) left its training processes running as orphans, holding the GPUs and the run's port."""
    pid_file = tmp_path / "pid"
    child_code = WRITES_PID.replace("sys.argv[1]", repr(str(pid_file)))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, child_code])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        child = int(pid_file.read_text())
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_without_sched_getaffinity_or_a_core_count_one_core_is_counted(monkeypatch):
    """Mutant: `os.cpu_count() or 1` -> `os.cpu_count()` in usable_cpu_cores: where the platform has no affinity
    (macOS) and cannot count its cores, the count was None, and `--num-processes` and OMP_NUM_THREADS failed on it
    with a TypeError instead of counting one core."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert launch.usable_cpu_cores() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert launch.usable_cpu_cores() == 6
