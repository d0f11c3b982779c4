"""How errors reach the user: one-line messages of errors (`one_line`, `shown`), a model that cannot be
loaded (`ModelLoadError`, bad input: exit 2), and the faults a long run survives or reports cleanly (exit 1):
stop signals, non-finite steps, running out of memory.

The trainer asks these helpers at each optimizer step; under several processes every decision that
changes control flow (stop, skip a step) is agreed through one small all-reduce, so no process leaves
a collective that the others still wait in.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import threading

import torch


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception as one line for a message: its type, then its text with whitespace collapsed and cut
    at `limit` characters, with "..." where it was cut (library errors often span many lines)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text if len(text) <= limit else text[:limit] + '...'}"


def _hub_unreachable(error: BaseException) -> bool:
    """Whether a from_pretrained failed only because its hub id is not cached here and the hub was not asked or
    did not answer: somewhere in the exception's chain, the hub client's "not cached" or a connection failure."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, socket.gaierror)) or \
                type(error).__name__ in ("ConnectError", "ConnectTimeout"):  # httpx's, whose module name varies
            return True
        error = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else error.__context__
    return False


def hub_unreachable_reason(error: BaseException) -> str | None:
    """For a hub id that is not cached here while the hub cannot be asked, that in a few words (the libraries
    say it in several sentences and a URL); None for any other failure."""
    if not _hub_unreachable(error):
        return None
    from huggingface_hub import constants  # what the hub client itself read from the environment at import

    why = ("offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE) keeps the hub from being asked"
           if constants.HF_HUB_OFFLINE else "the hub cannot be reached")
    return f"not in this machine's hub cache, and {why}: download the model once where there is a network, or " \
           "give a local folder"


def load_failure(error: BaseException, limit: int = 400) -> str:
    """Why a model, tokenizer or config could not be loaded, as one line (`one_line` but for the hub's case)."""
    return hub_unreachable_reason(error) or one_line(error, limit)


def first_line(error: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message (library errors often span many lines); `empty` (default: the
    exception's type name) when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else (empty or type(error).__name__)


def shown(value, limit: int = 60) -> str:
    """A value for a message: its repr, cut short at `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_finite_number(value) -> bool:
    """An int or float (not a bool) that is finite as a float: a JSON integer of 400 digits made math.isfinite
    raise OverflowError (a tampered checkpoint's traceback)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


class ModelLoadError(ValueError):
    """A model or adapter argument that names nothing loadable."""


class TrainingFault(RuntimeError):
    """The run stopped on a fault it cannot go past (one line; the CLI exits 1)."""


class StopTraining(Exception):
    """Unwinds the epoch loop so that the trainer checkpoints the position `updates_done` into the epoch.

    `fault` is None for a requested stop (a signal), else the message of the fault that stopped the run.
    """

    def __init__(self, updates_done: int, fault: str | None = None):
        super().__init__(fault or "stop requested")
        self.updates_done = updates_done
        self.fault = fault


def agree(accelerator, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all processes (a single all-reduce; free with one process)."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64, device=accelerator.device)
    return [bool(v) for v in accelerator.reduce(values, reduction="sum").tolist()]


def processes_where(accelerator, flag: bool) -> list[int]:
    """The indices of the processes whose `flag` is true (a single all-gather; free with one process)."""
    if accelerator.num_processes == 1:
        return [0] if flag else []
    flags = accelerator.gather(torch.tensor([int(bool(flag))], dtype=torch.int64, device=accelerator.device))
    return [process for process, value in enumerate(flags.tolist()) if value]


def left_to_the_main_process(error: BaseException, quiet: bool = True) -> BaseException:
    """Marks (when `quiet`) an error that the main process reports for the whole run: a process other than
    the main one exits with it without printing a copy of the same line (cli reads the mark)."""
    if quiet:
        error.reported_by_main_process = True
    return error


def reported_by_main_process(error: BaseException | str) -> bool:
    return getattr(error, "reported_by_main_process", False)


class StopSignals:
    """While installed, SIGTERM and SIGINT only ask the run to stop at its next safe point (after the
    current optimizer step); a SIGINT after either of them interrupts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self.announce:
            print(f"rlcm-fast: {self.received} received; stopping after the current optimizer step "
                  "to write a checkpoint (SIGINT again stops at once)", file=sys.stderr, flush=True)


class NonFiniteSteps:
    """Counts optimizer steps skipped for a non-finite loss, gradient or logged value: in total and in a row.

    A skip that `is_fault=False` marks (an fp16 loss-scale overflow, which the loss scaler answers by
    halving its scale) is counted in the total but neither adds to nor resets the run of faults in a row.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    def record(self, finite: bool, is_fault: bool = True) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1 if is_fault else 0

    @property
    def exceeded(self) -> bool:
        return self.in_a_row > self.limit

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = int(state.get("total", 0)), int(state.get("in_a_row", 0))


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU's out-of-memory error, or the CPU allocator's (a RuntimeError naming DefaultCPUAllocator) or
    Python's MemoryError."""
    return (isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
            or (isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)))


# What gloo and NCCL say when the process at the other end of a collective is gone.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker")


def is_lost_peer(exc: BaseException) -> bool:
    """Under several processes: a collective failed because another process of the run ended (it failed
    and said why itself, or was killed) or stopped answering."""
    world_size = os.environ.get("WORLD_SIZE", "1").strip()  # an unset or garbled one: one process
    if not world_size.isdigit() or int(world_size) <= 1 or not isinstance(exc, RuntimeError):
        return False
    dist_error = getattr(torch.distributed, "DistError", None)  # torch >= 2.1: timeouts, lost connections
    return (dist_error is not None and isinstance(exc, dist_error)) or any(text in str(exc) for text in PEER_GONE)


def out_of_memory_message(cfg, phase: str, processes: int, memory: str = "GPU") -> str:
    """One line: what was running, the sizes in use, and every setting that lowers memory."""
    return (
        f"out of {memory} memory while {phase} (per process: sample_batch_size={cfg.sample_batch_size}, "
        f"train_batch_size={cfg.train_batch_size}, sample_batches_per_call={cfg.sample_batches_per_call}, "
        f"train_rows_per_call={cfg.train_rows_per_call}, resolution={cfg.resolution}, horizon={cfg.horizon}, "
        f"gradient_checkpointing={str(cfg.gradient_checkpointing).lower()}; {processes} process(es)). "
        "To use less memory: narrower UNet calls, --set sample_batches_per_call=1 (sampling) and "
        "train_rows_per_call=0 (training), the same results; lower sample_batch_size (sampling), lower "
        "train_batch_size and raise gradient_accumulation_steps to keep the samples per update (training), "
        "--set gradient_checkpointing=true (training), or lower resolution; the last checkpoint is intact, "
        "resume it with --resume RUN_DIR (batch-size changes need an epoch checkpoint, checkpoint-N)"
    )


def out_of_memory_fault(exc: BaseException, cfg, phase: str, processes: int) -> TrainingFault | None:
    """The one-line fault for `exc` raised while `phase` ran, if it is an out-of-memory error; else None."""
    if not is_out_of_memory(exc):
        return None
    memory = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) else "CPU"
    return TrainingFault(out_of_memory_message(cfg, phase, processes, memory))
