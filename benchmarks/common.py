"""What every benchmark records beside its figures: the machine, the versions, the commit, and where
the JSON goes: benchmarks/results/<name>-<device>.json by default, or <out_dir>/<name>.json when a
benchmark is given --out-dir (run_all.py uses benchmarks/results/<device>/); and the argparse types every
script checks its command line with. Light to import: the scripts parse their arguments before torch loads
(seconds), so that --help and a bad flag answer at once; the functions here that need torch import it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
try:  # the installed package, with its compiled rlcm_fast._C, when there is one
    import rlcm_fast  # noqa: F401
except ImportError:  # a source checkout works without installing (the C++ step only if built in place)
    sys.path.insert(0, str(REPO_ROOT))
    import types

    import rlcm_fast

    # kernels/ as rlcm_fast.kernels, where the wheel puts it (pyproject.toml's wheel.packages): a namespace
    # package of that one folder.
    kernels = types.ModuleType("rlcm_fast.kernels")
    kernels.__path__ = [str(REPO_ROOT / "kernels")]
    sys.modules["rlcm_fast.kernels"] = rlcm_fast.kernels = kernels


def synchronize(device: "torch.device") -> None:
    """Wait for the device's queued work (a CUDA GPU's; a CPU has none): a timer read after it times the work."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def description(doc: str) -> str:
    """A script's --help description: its docstring's first paragraph as one line (its first line alone
    stops mid-sentence where the paragraph wraps)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def int_list(minimum: int = 1, what: str = "integers", maximum: int | None = None, empty: bool = False):
    """An argparse type: comma-separated integers, each >= `minimum` (and <= `maximum` when given), or with
    `empty` an empty string for none; anything else is refused in one line that calls them `what`."""
    def parse(text: str) -> tuple[int, ...]:
        if empty and not text:
            return ()
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < minimum or (maximum is not None and max(values) > maximum):
            allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what} {allowed}")
        refuse_repeats(text, values)
        return values
    return parse


def name_list(allowed, what: str):
    """An argparse type: comma-separated names, each one of `allowed` (called `what` in the error), at least one,
    none repeated; anything else is refused in one line that lists the allowed names."""
    allowed = list(allowed)

    def parse(text: str) -> list[str]:
        names = text.split(",")
        if unknown := [name for name in names if name not in allowed]:
            shown = ", ".join(name or "'' (an empty name)" for name in dict.fromkeys(unknown))
            raise argparse.ArgumentTypeError(f"{text!r}: unknown {what}: {shown}; allowed: {', '.join(allowed)}")
        refuse_repeats(text, names)
        return names
    return parse


def refuse_repeats(text: str, values) -> None:
    """A value given twice would be measured twice, its rows or stage run again: refused."""
    if repeated := [str(value) for value, count in Counter(values).items() if count > 1]:
        raise argparse.ArgumentTypeError(f"{text!r} repeats {', '.join(repeated)}: name each once")


def positive_int(text: str) -> int:
    """An argparse type: one integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def output_folder(text: str) -> Path:
    """An argparse type for --out-dir: a folder, or a new one in a folder that exists, where this process may
    write. Checked before the run: a benchmark writes its JSON after its first measured row, minutes in, and
    a path that names a file, or a mistyped parent (made silently before), cost the run or hid its results."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    parent = path if path.is_dir() else path.absolute().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: its parent folder {str(parent)!r} does not exist "
                                         "(make it first, or give a folder that exists)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: folder {str(parent)!r} is not writable here")
    return path


def refuse_missing_cuda(parser: argparse.ArgumentParser, device: str) -> None:
    """--device cuda on a machine without CUDA: one line, not torch's traceback from deep inside the run."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device here (torch {torch.__version__}); use --device cpu")


def git_commit() -> str | None:
    """HEAD's hash, with "-dirty" when tracked files differ from it (the figures are then not of HEAD).

    $RLCM_FAST_COMMIT, when set, is taken as it is: a copy of the tree without .git (or a machine
    without git) cannot tell its commit, so whoever copied it says which."""
    if os.environ.get("RLCM_FAST_COMMIT"):
        return os.environ["RLCM_FAST_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True)
    except OSError:  # no git on this machine
        return None
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()


def environment() -> dict:
    """The fields every result file starts with (a benchmark that records its own start time replaces
    `time_utc`, the time these were read)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def results_path(name: str, suffix: str = ".json", out_dir: str | Path | None = None) -> Path:
    if out_dir is not None:
        return Path(out_dir) / f"{name}{suffix}"
    return RESULTS_DIR / f"{name}-{device_slug()}{suffix}"


def release_memory(device: torch.device) -> None:
    """Free what the last measured row left: collect reference cycles (a FastLCMSampler and its captured
    graph form one), then give PyTorch's cached GPU memory back, so the next row's captures and peak
    memory start from its own allocations."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_result(name: str, result: dict, out_dir: str | Path | None = None, complete: bool = True) -> Path:
    """Write `result` with `"complete": complete`. Benchmarks write after every row with complete=False,
    then once more at the end, so a run killed by a time limit keeps the rows it measured; the file is
    replaced atomically, so it is never half-written."""
    path = results_path(name, out_dir=out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps({**result, "complete": complete}, indent=2) + "\n")
    os.replace(staging, path)
    return path


def matmul_rate(device: torch.device) -> dict:
    """The device's measured dense matmul rate, every benchmark's MFU denominator: bf16 8192^3 products on a
    GPU, the median over 300 ms of back-to-back calls (the clocks the benchmarks themselves run at, not a
    single boosted call), fp32 1024^3 on a CPU, the median of 5 calls."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if device.type == "cuda":
        from triton.testing import do_bench

        seconds = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median") * 1e-3
    else:
        a @ b
        times = []
        for _ in range(5):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
    return {"flops_per_s": 2 * n**3 / seconds, "dtype": str(dtype).removeprefix("torch."), "size": n}
