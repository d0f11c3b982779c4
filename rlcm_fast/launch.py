"""`rlcm-fast train --num-processes N`: N processes on this machine, set up as torchrun would.

Each child runs `python -m rlcm_fast ...` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT,
which accelerate (and torch.distributed) read: one GPU per process on CUDA, gloo on CPUs. The children
get their own session, so a Ctrl-C reaches them once, through this parent: SIGINT and SIGTERM are
forwarded, and each child then finishes its optimizer step and joins the checkpoint the run writes.

Also each training process's own start: `start_accelerator`. Imports no torch at module level (tests'
conftest reads the core count from here before torch starts).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

# After one process fails, how long the others get to finish (they may be writing a checkpoint).
FAILURE_GRACE_SECONDS = 60.0
# Set in the processes launch_local starts: the launcher has checked the command line and said what it warns.
LAUNCHED_HERE = "RLCM_FAST_LAUNCHED"


# Measured with benchmarks/compiled_gradients.py (benchmarks/README.md): with torch 2.13.0 inductor's CPU code
# gives wrong LoRA gradients while its forward is right: of the whole tiny UNet (some all zero), and of
# sd15-lcm's transformer blocks (compile_scope=blocks). With 2.14.1 and 2.15.0 both models' gradients are
# right in both scopes. Releases before 2.13, and 2.14.0, were not measured, so they are refused too.
FIRST_TORCH_WITH_RIGHT_CPU_INDUCTOR_GRADIENTS = "2.14.1"


def cpu_inductor_gradients_are_wrong(version: str | None = None) -> bool:
    """Whether this torch (or `version`) may get the UNet's LoRA gradients wrong under inductor on the CPU: any
    release older than FIRST_TORCH_WITH_RIGHT_CPU_INDUCTOR_GRADIENTS, or a version that cannot be read."""
    import torch
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(torch.__version__ if version is None else version)) < Version(
            FIRST_TORCH_WITH_RIGHT_CPU_INDUCTOR_GRADIENTS)
    except InvalidVersion:
        return True


def forget_other_accelerator_state(cpu: bool, mixed_precision: str) -> None:
    """Let one process build Trainers of different devices or precisions in turn (benchmarks, tests).

    accelerate keeps one device and mixed precision per process (AcceleratorState is shared by every
    Accelerator): after a CPU run, a CUDA bf16 Accelerator raises, and a CUDA one of the same precision
    silently stays on the CPU. When the earlier state differs, forget it (through accelerate's private
    reset, the one its own tests use). Only in a single process: under several, the state belongs to
    the process group, and every Trainer there is built the same way."""
    from accelerate.state import AcceleratorState, GradientState, is_initialized

    if not is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    earlier = AcceleratorState()
    if (earlier.device.type == "cpu") != cpu or earlier.mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def start_accelerator(cfg):
    """The Accelerator a training process runs with, for the config's device and mixed precision, and that
    precision ("no", "bf16" or "fp16"), after refusing (ConfigError) the settings this machine cannot run."""
    import torch
    from accelerate import Accelerator

    from .attention import check_attention_backend
    from .config import ConfigError
    from .tiny_presets import prepare_preset_cache

    if cfg.device == "cuda" and not torch.cuda.is_available():  # accelerate would quietly run on the CPU
        raise ConfigError(f"device=cuda, but this machine has no usable CUDA device (torch {torch.__version__}); "
                          "use device=cpu or auto")
    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "no" if use_cpu else "bf16"
    if precision == "fp16" and use_cpu:  # the CPU's autocast fails in the UNet with fp16
        raise ConfigError("mixed_precision=fp16 needs a CUDA device; on the CPU use bf16 or no")
    # compile_scope=sampling compiles no gradient (the forward matched eager's: compiled_gradients.py).
    if (cfg.compile_unet and cfg.compile_scope != "sampling" and cfg.compile_backend == "inductor" and use_cpu
            and cpu_inductor_gradients_are_wrong()):
        raise ConfigError(f"compile_unet=true with compile_backend='inductor' on the CPU is refused with torch "
                          f"{torch.__version__}: inductor's CPU LoRA gradients were measured wrong with torch 2.13 "
                          f"and right from {FIRST_TORCH_WITH_RIGHT_CPU_INDUCTOR_GRADIENTS} (older releases are "
                          f"untested); upgrade torch to {FIRST_TORCH_WITH_RIGHT_CPU_INDUCTOR_GRADIENTS} or newer, "
                          "or use compile_backend=aot_eager or compile_unet=false")
    try:
        check_attention_backend(cfg.attention_backend, torch.device("cpu" if use_cpu else "cuda"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    forget_other_accelerator_state(use_cpu, precision)
    prepare_preset_cache(cfg.model, cfg.method)  # before the process group: only rank 0 could write it after
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision)
    # The reset above is accelerate's private one: should a release stop honouring it, fail here rather than
    # train on another device or precision than asked.
    if (accelerator.device.type == "cpu") != use_cpu or accelerator.mixed_precision != precision:
        raise RuntimeError(f"accelerate gave an Accelerator on {accelerator.device} with mixed_precision="
                           f"{accelerator.mixed_precision!r}; asked for {'cpu' if use_cpu else 'cuda'} with "
                           f"{precision!r} (an earlier Trainer of this process set accelerate's shared state)")
    if cfg.train_cuda_graph and not use_cpu and accelerator.num_processes > 1:
        raise ConfigError(f"train_cuda_graph=true runs in one process, not {accelerator.num_processes}: "
                          "DDP's gradient hooks are not captured; set it to false")
    return accelerator, precision


def without_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The signals the launcher passes on to its processes (a user's Ctrl-C or kill).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _die_with_parent() -> None:
    """Linux: a child gets SIGKILL when this launcher dies, so a killed launcher leaves no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def usable_cpu_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's limit), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def launch_local(num_processes: int, argv: list[str], command: list[str] | None = None) -> int:
    """Run `python -m rlcm_fast <argv>` (or `command`) in `num_processes` processes. Returns 0, or the exit
    code of the process that failed first; the others get FAILURE_GRACE_SECONDS to finish, then are killed."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(num_processes), "LOCAL_WORLD_SIZE": str(num_processes), "GROUP_RANK": "0",
           LAUNCHED_HERE: "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpu_cores() // num_processes)))
    command = command or [sys.executable, "-m", "rlcm_fast"]
    children: list[subprocess.Popen] = []
    forwarded = []  # the signals received, in order
    delivered = set()  # (index in forwarded, child pid): each signal reaches each child once

    def deliver():
        for index, signum in enumerate(list(forwarded)):
            for child in list(children):
                if (index, child.pid) not in delivered:
                    delivered.add((index, child.pid))  # before sending: a handler run in between skips it
                    if child.poll() is None:
                        child.send_signal(signum)

    def forward(signum, frame):
        forwarded.append(signum)
        deliver()

    # The handlers before the first child starts; each child, once in `children`, gets the signals that came
    # before (one may come while Popen runs, before the child is in the list), and none start after one.
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    first_failure = None  # (rank, exit code) of the first process seen to fail
    try:
        for rank in range(num_processes):
            if forwarded:
                break
            children.append(subprocess.Popen([*command, *argv], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                             start_new_session=True, preexec_fn=_die_with_parent))
            deliver()
        deadline = None
        while True:
            codes = [child.poll() for child in children]  # every child each time: any() would stop at a live one
            if first_failure is None:
                first_failure = next(((rank, code) for rank, code in enumerate(codes) if code not in (None, 0)), None)
                if first_failure is not None:
                    deadline = time.monotonic() + FAILURE_GRACE_SECONDS
            if all(code is not None for code in codes):
                break
            if deadline is not None and time.monotonic() > deadline:  # the rest wait on the failed one forever
                for child in children:
                    if child.poll() is None:
                        child.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if first_failure is None:  # every process started ended well, or a signal came before the rest started
        return 128 + forwarded[0] if len(children) < num_processes else 0
    rank, code = first_failure
    if code > 0:  # the process said why itself
        return code
    if not forwarded:  # killed from outside (a signal of ours is the user's, forwarded): nothing else says so
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (the kernel's out-of-memory killer, or kill -9)" if code == -signal.SIGKILL else ""
        print(f"rlcm-fast: error: process {rank} of {num_processes} was killed by {name}{why}; the others were "
              "stopped, and the checkpoints written before are intact", file=sys.stderr)
    return 128 - code  # killed by signal N: 128 + N, as a shell reports it
