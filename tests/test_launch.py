"""`--num-processes`'s launcher: a process that fails or is killed first sets the exit code and stops the
others after the grace period (it used to wait on rank 0 forever when rank 1 died first), and what every
process would refuse is refused once, before any starts."""

import os
import signal
import sys
import threading
import time

import pytest

from rlcm_fast import launch
from rlcm_fast.cli import main

# A stand-in for `python -m rlcm_fast`: each process does what its rank's line says.
STUB = """
import os, signal, sys, time
action = sys.argv[1:][int(os.environ["RANK"])]
if action == "wait":
    time.sleep(60)
elif action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(action))
"""


def run_stub(monkeypatch, *actions: str) -> tuple[int, float]:
    monkeypatch.setattr(launch, "FAILURE_GRACE_SECONDS", 1.0)
    started = time.monotonic()
    code = launch.launch_local(len(actions), list(actions), command=[sys.executable, "-c", STUB])
    return code, time.monotonic() - started


def test_a_later_rank_failing_first_stops_the_others_after_the_grace(monkeypatch):
    code, seconds = run_stub(monkeypatch, "wait", "3")
    assert code == 3 and seconds < 20  # rank 0 would have waited 60 s


def test_the_first_failure_sets_the_exit_code_not_the_lowest_rank(monkeypatch):
    code, _ = run_stub(monkeypatch, "wait", "2", "wait")
    assert code == 2


def test_a_process_killed_from_outside_is_named_in_one_line(monkeypatch, capsys):
    code, seconds = run_stub(monkeypatch, "wait", "kill")
    assert code == 128 + signal.SIGKILL and seconds < 20
    assert capsys.readouterr().err.strip().splitlines() == [
        "rlcm-fast: error: process 1 of 2 was killed by SIGKILL (the kernel's out-of-memory killer, or kill -9); the "
        "others were stopped, and the checkpoints written before are intact"]


def test_all_succeeding_is_zero(monkeypatch):
    assert run_stub(monkeypatch, "0", "0") == (0, pytest.approx(0, abs=20))


def test_a_broken_collective_on_a_surviving_process_is_one_line(monkeypatch, capsys):
    """Seen on the process left when another was killed: gloo's multi-line 'Connection closed by peer'."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def broken(args, argv):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2753. This is "
                           "typically caused by a remote worker crashing.\nGLHF!")

    monkeypatch.setattr("rlcm_fast.train_command.run_train", broken)
    assert main(["train"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "rlcm-fast: error: process 1 stopped: another process of the run ended first (its message, or the "
        "launcher's, says why); the checkpoints written before are intact"]


@pytest.mark.parametrize("args, message", [
    (["--num-processes", "100000"], "--num-processes 100000 is invalid: this run may use {cores} CPU core(s); at "
                                    "most one process per core on the CPU"),
    (["--num-processes", "3"], "--num-processes 3 is invalid: this run may use {cores} CPU core(s); at "
                               "most one process per core on the CPU"),
    (["--num-processes", "2", "--resume", "/nonexistent/run"],
     "resume path '/nonexistent/run' does not exist"),
    (["--num-processes", "2", "--set", "horizon=1"], "horizon=1 is invalid: multi-step sampling needs horizon >= 2"),
])
def test_what_every_process_would_refuse_is_refused_once_before_any_starts(monkeypatch, capsys, args, message):
    monkeypatch.setattr(launch, "launch_local", lambda *a, **k: pytest.fail("processes were started"))
    monkeypatch.setattr(launch, "usable_cpu_cores", lambda: 2)
    assert main(["train", "--device", "cpu", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "rlcm-fast: error: " + message.format(cores=2)]
    monkeypatch.undo()
    assert launch.usable_cpu_cores() >= 1


def test_the_launched_processes_get_the_checked_run_folder(monkeypatch, tmp_path):
    started = {}
    monkeypatch.setattr(launch, "launch_local", lambda n, argv: started.update(n=n, argv=argv) or 0)
    monkeypatch.setattr(launch, "usable_cpu_cores", lambda: 2)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--device", "cpu", "--num-processes", "2", "--set", "epochs=1"]) == 0
    argv = started["argv"]
    assert started["n"] == 2 and "--num-processes" not in argv
    run_dir = argv[argv.index("--output-dir") + 1]  # the default folder is named by the time: chosen once, here
    assert run_dir.startswith("runs/compressibility-") and not (tmp_path / run_dir).exists()


def test_the_launched_processes_do_not_get_num_processes_in_either_form():
    assert launch.without_option(["train", "--num-processes", "2", "--seed", "3"], "--num-processes") == [
        "train", "--seed", "3"]
    assert launch.without_option(["train", "--num-processes=2", "--seed", "3"], "--num-processes") == [
        "train", "--seed", "3"]
    assert launch.without_option(["train", "--num-processes-x=1"], "--num-processes") == ["train", "--num-processes-x=1"]


@pytest.mark.parametrize("abbreviated", [["--num-proc", "2"], ["--num-processes", "2", "--out", "run"]])
def test_an_abbreviated_option_is_refused_not_passed_on(abbreviated, capsys):
    """argparse took `--num-proc 2` for --num-processes, and the launched processes, which strip only the full
    spelling, each tried to launch again; no option is abbreviated now."""
    assert main(["train", "--device", "cpu", *abbreviated]) == 2
    assert f"rlcm-fast train: error: unrecognized arguments: {' '.join(abbreviated[-2:])}" in capsys.readouterr().err


THREADS = "import os, sys; sys.exit(0 if os.environ['OMP_NUM_THREADS'] == sys.argv[1] else 3)"


def test_launched_processes_share_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    """Two processes on 4 cores: 2 threads each (4 each would oversubscribe); a user's OMP_NUM_THREADS is kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch, "usable_cpu_cores", lambda: 4)
    assert launch.launch_local(2, ["2"], command=[sys.executable, "-c", THREADS]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch.launch_local(2, ["3"], command=[sys.executable, "-c", THREADS]) == 0


def test_a_users_signal_forwarded_to_the_processes_is_not_reported_as_a_kill(capsys):
    """SIGTERM (or Ctrl-C) to the launcher is passed on; the processes ending of it are the user's doing: no
    "killed from outside" line, and the exit code of the signal."""
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code = launch.launch_local(1, [], command=[sys.executable, "-c", "import time; time.sleep(30)"])
    finally:
        timer.cancel()
    assert code == 128 + signal.SIGTERM
    assert "was killed by" not in capsys.readouterr().err


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_a_signal_while_the_processes_start_reaches_every_one_started_and_no_more_start(monkeypatch, capsys,
                                                                                        signalled_rank):
    """The launcher used to install its forwarding after starting them all: a signal in between ended the launcher
    and left the processes to die with it."""
    started, popen = [], launch.subprocess.Popen

    def start(args, env, **kwargs):
        rank = int(env["RANK"])
        if rank == signalled_rank:  # while this one starts, before it is among the launcher's processes
            os.kill(os.getpid(), signal.SIGTERM)
        started.append(rank)
        return popen(args, env=env, **kwargs)

    monkeypatch.setattr(launch.subprocess, "Popen", start)
    begun = time.monotonic()
    code = launch.launch_local(3, [], command=[sys.executable, "-c", "import time; time.sleep(30)"])
    assert code == 128 + signal.SIGTERM and time.monotonic() - begun < 20  # not the 30 s sleep: they got it
    assert started == list(range(signalled_rank + 1))
    assert "was killed by" not in capsys.readouterr().err


@pytest.mark.parametrize("device, precision", [("cuda", "no"), ("cpu", "bf16")])
def test_an_accelerator_on_another_device_or_precision_than_asked_is_an_error(monkeypatch, device, precision):
    """accelerate keeps one device and precision per process; forget_other_accelerator_state resets it through
    accelerate's private reset. Should that stop working, the Trainer must not go on elsewhere than asked."""
    import accelerate
    import torch

    from rlcm_fast import tiny_presets
    from rlcm_fast.config import resolve_config

    class StaleState:  # what a shared state left by an earlier Trainer would give
        def __init__(self, cpu, mixed_precision):
            self.device, self.mixed_precision = torch.device(device), precision

    monkeypatch.setattr(accelerate, "Accelerator", StaleState)
    monkeypatch.setattr(launch, "forget_other_accelerator_state", lambda cpu, mixed_precision: None)
    monkeypatch.setattr(tiny_presets, "prepare_preset_cache", lambda model, method: None)  # no model is built
    with pytest.raises(RuntimeError, match=rf"^accelerate gave an Accelerator on {device} with mixed_precision="
                                           rf"'{precision}'; asked for cpu with 'no' \(an earlier Trainer"):
        launch.start_accelerator(resolve_config(overrides={"device": "cpu", "mixed_precision": "no"}))


# Each launched process checks the environment it was given: exit 0 when it is torchrun's, else 3.
TORCHRUN_ENV = """
import os, sys
env = os.environ
rank = env["RANK"]
sys.exit(0 if (rank == env["LOCAL_RANK"] and rank in ("0", "1") and env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
               and env["GROUP_RANK"] == "0" and env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"].isdigit()
               and env["RLCM_FAST_LAUNCHED"] == "1" and os.getsid(0) == os.getpid()) else 3)
"""


def test_launched_processes_get_torchruns_environment_and_their_own_session(monkeypatch):
    """accelerate reads RANK, WORLD_SIZE and MASTER_*; RLCM_FAST_LAUNCHED keeps the processes from warning again; a
    session of their own keeps a terminal's Ctrl-C from reaching them besides the one the launcher forwards."""
    monkeypatch.setattr(launch, "FAILURE_GRACE_SECONDS", 1.0)
    assert launch.launch_local(2, [], command=[sys.executable, "-c", TORCHRUN_ENV]) == 0


def test_the_launchers_signal_handlers_are_put_back_when_it_returns():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert launch.launch_local(1, [], command=[sys.executable, "-c", "pass"]) == 0
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


def test_the_others_may_finish_within_the_grace_after_one_fails(monkeypatch, tmp_path):
    """After a failure the others may be writing a checkpoint: they are killed only once the grace is over."""
    finish = ("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(1)\n"
              f"open({str(tmp_path / 'finished')!r}, 'w').close()")
    monkeypatch.setattr(launch, "FAILURE_GRACE_SECONDS", 30.0)
    started = time.monotonic()
    assert launch.launch_local(2, [], command=[sys.executable, "-c", finish]) == 3
    assert (tmp_path / "finished").exists() and time.monotonic() - started < 20


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (40, "signal 40")])
def test_a_process_killed_by_another_signal_is_named_without_the_oom_hint(capsys, signum, name):
    """Only SIGKILL gets the out-of-memory hint; a real-time signal has no name in Python's signal.Signals."""
    command = [sys.executable, "-c", f"import os; os.kill(os.getpid(), {signum})"]
    assert launch.launch_local(1, [], command=command) == 128 + signum
    assert capsys.readouterr().err.strip().splitlines() == [
        f"rlcm-fast: error: process 0 of 1 was killed by {name}; the others were stopped, and the checkpoints "
        "written before are intact"]


def test_usable_cpu_cores_are_this_processs_affinity_not_the_machines_count(monkeypatch):
    """A container limited to 3 of 64 cores: --num-processes and OMP_NUM_THREADS count 3."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert launch.usable_cpu_cores() == 3


def test_an_earlier_accelerator_state_of_another_device_or_precision_is_forgotten(monkeypatch):
    """Only in one process, and only when it differs: a Trainer of the same device and precision keeps it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, is_initialized

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # An earlier test in this process may have left a state of another precision (a bf16 Trainer on the CPU), which
    # the first Accelerator below would refuse: start from none.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for cpu, precision in ((True, "no"), (True, "bf16"), (False, "no")):
        Accelerator(cpu=True, mixed_precision="no")
        launch.forget_other_accelerator_state(cpu, precision)
        kept = (cpu, precision) == (True, "no")
        assert is_initialized() is kept and bool(GradientState._shared_state) is kept, (cpu, precision)
    Accelerator(cpu=True, mixed_precision="no")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under several processes the state is the process group's
    launch.forget_other_accelerator_state(True, "bf16")
    assert is_initialized()


def test_device_auto_on_a_machine_without_cuda_is_the_cpu_in_full_precision(monkeypatch):
    import torch

    from rlcm_fast import tiny_presets
    from rlcm_fast.config import resolve_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tiny_presets, "prepare_preset_cache", lambda model, method: None)  # no model is built
    accelerator, precision = launch.start_accelerator(resolve_config(overrides={"device": "auto"}))
    assert (accelerator.device.type, accelerator.mixed_precision, precision) == ("cpu", "no", "no")


def test_a_cuda_graph_of_training_is_refused_under_several_processes(monkeypatch):
    """DDP's gradient hooks are not captured in the graph: refused, not trained with ungathered gradients."""
    import accelerate
    import torch

    from rlcm_fast import attention, tiny_presets
    from rlcm_fast.config import ConfigError, resolve_config

    class TwoProcesses:
        def __init__(self, cpu, mixed_precision):
            self.device, self.mixed_precision, self.num_processes = torch.device("cuda"), mixed_precision, 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate, "Accelerator", TwoProcesses)
    monkeypatch.setattr(attention, "check_attention_backend", lambda backend, device: None)
    monkeypatch.setattr(launch, "forget_other_accelerator_state", lambda cpu, mixed_precision: None)
    monkeypatch.setattr(tiny_presets, "prepare_preset_cache", lambda model, method: None)
    cfg = resolve_config(overrides={"device": "cuda", "train_cuda_graph": True, "gradient_checkpointing": False})
    with pytest.raises(ConfigError, match=r"^train_cuda_graph=true runs in one process, not 2: DDP's gradient hooks "
                                          r"are not captured; set it to false$"):
        launch.start_accelerator(cfg)
