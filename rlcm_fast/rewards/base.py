"""What every reward shares: the error type, output checks, user rewards, the name grammar, the async runner.

A reward is a callable (images, prompts) -> N floats, images a float tensor N x 3 x H x W in [0, 1] on
the training device. Reward names (config key `reward`):

    spec      := term ("," term)*
    term      := reward [":" weight]
    reward    := builtin name | module.path:function

A term's weight is the text after its LAST colon when the text before it is a builtin name or itself a
`module:function`; that text must then be a finite float. So `aesthetic:1.0` is aesthetic
weighted 1.0, `pkg.mod:fn` is a user reward (weight 1), `pkg.mod:fn:0.5` is that reward weighted 0.5.
Several terms make a weighted sum.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import re
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..config_checks import FLOAT32_MAX  # weights and values: a weight of 1e300 overflowed the logged statistics
from ..faults import one_line

RewardFn = Callable[[torch.Tensor, Sequence[str]], object]


def looks_like_path(value: str) -> bool:
    """A local path, not a hub id: a hub id (owner/name) has at most one '/', starts with neither '.' nor '/', and
    is ASCII letters, digits, '-', '_' and '.' (so "models/my vlm" is a folder, not a malformed id)."""
    return (value.startswith((".", "/", os.sep)) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)
            or not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?", value))


def missing_model_folder(value: str) -> str | None:
    """Why a model option that names a local path cannot be loaded from it ("no such folder", "not a folder"),
    or None (a hub id, or a folder): said before loading, since the hub's repo-id rules would be the error."""
    if not looks_like_path(value) or Path(value).is_dir():
        return None
    return "not a folder" if Path(value).exists() else "no such folder"


class RewardError(ValueError):
    """A reward that cannot be built or returned unusable values; one line naming it."""


def check_reward_inputs(images, prompts) -> None:
    """RewardError, one line, for inputs no reward can score. Every reward takes a float tensor N x 3 x H x W
    (N, H, W >= 1) with values in [0, 1], and one prompt per image. The range is not checked (that would wait for the
    GPU): uint8 pixels, 0..255, would be scored as floats, so an integer dtype is refused."""
    if not isinstance(images, torch.Tensor):
        raise RewardError(f"images of type {type(images).__name__} given; rewards take a torch.Tensor N x 3 x H x W "
                          "of floats in [0, 1]")
    if not images.is_floating_point():
        raise RewardError(f"images of dtype {images.dtype} given; rewards take floats in [0, 1] (uint8 pixels: "
                          "divide by 255)")
    if images.dim() != 4 or images.shape[1] != 3 or 0 in (images.shape[0], *images.shape[2:]):
        raise RewardError(f"images of shape {tuple(images.shape)} given; rewards take N x 3 x H x W, N, H, W >= 1")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise RewardError(f"prompts of type {type(prompts).__name__} given; rewards take a sequence of str, one "
                          "per image")
    if len(prompts) != len(images):
        raise RewardError(f"{len(images)} images and {len(prompts)} prompts given: a reward takes one prompt per "
                          "image")


# numpy's kinds of values that are no reward although they would cast to float: True, 1+2j (its imaginary part
# dropped), "0.5" and b"0.5"; a reward returning them has a bug the cast would hide.
NOT_REWARD_KINDS = {"b": "booleans", "c": "complex numbers", "U": "strings", "S": "bytes", "V": "structured values",
                    "M": "dates", "m": "time spans"}


def _is_bool(value) -> bool:
    """True/False of Python, numpy (np.True_, or np.asarray(score > t)'s 0-d array) or a one-element torch bool:
    numpy reads [0.5, True] as two floats."""
    return (isinstance(value, (bool, np.bool_)) or (isinstance(value, np.ndarray) and value.dtype == np.bool_)
            or (torch.is_tensor(value) and value.dtype == torch.bool))


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """A reward tensor on the CPU without grad, floats widened to float64 (numpy has no bfloat16, and a float32
    cast would turn a float64 1e300 into inf, to be misreported as non-finite)."""
    tensor = tensor.detach().cpu()
    return tensor.to(torch.float64) if tensor.is_floating_point() else tensor


def checked_rewards(name: str, values, count: int) -> np.ndarray:
    """The reward's output as float64, or a RewardError naming the reward and what is wrong."""
    if values is None:  # np.asarray(None, float) is a shape-() nan, which would be reported as a shape
        raise RewardError(f"reward {name!r} returned None, expected {count} floats")
    if isinstance(values, (str, bytes)):  # one str is a shape-() array
        raise RewardError(f"reward {name!r} returned a {type(values).__name__}, expected {count} floats")
    returned = f"reward {name!r} returned {type(values).__name__}, expected {count} floats"
    # A list, or numpy's object array (which a cast to float would take too), holding a boolean.
    if isinstance(values, (list, tuple)) or (isinstance(values, np.ndarray) and values.dtype == object):
        if any(_is_bool(value) for value in (values.flat if isinstance(values, np.ndarray) else values)):
            raise RewardError(f"reward {name!r} returned booleans, expected {count} floats")
    try:
        if isinstance(values, (list, tuple)):  # e.g. a list of 0-d tensors, some requiring grad
            values = [_on_host(v) if torch.is_tensor(v) else v for v in values]
        array = np.asarray(_on_host(values) if torch.is_tensor(values) else values)
    except (TypeError, ValueError, RuntimeError):  # ragged lists, objects numpy cannot read
        raise RewardError(returned) from None
    if array.dtype.kind in NOT_REWARD_KINDS:
        raise RewardError(f"reward {name!r} returned {NOT_REWARD_KINDS[array.dtype.kind]}, expected {count} floats")
    nones = [index for index, value in enumerate(array.flat) if value is None] if array.dtype == object else []
    if nones:  # numpy would cast None to nan, reported as a non-finite value
        raise RewardError(f"reward {name!r} returned None at index {nones[0]}, expected {count} floats")
    try:
        array = array.astype(np.float64)
    except OverflowError:  # an integer a float cannot hold (a reward server's JSON can carry any)
        raise RewardError(f"reward {name!r} returned an integer beyond float64's range, expected {count} floats") \
            from None
    except (TypeError, ValueError):  # an object array holding a dict, say
        raise RewardError(returned) from None
    if array.shape != (count,):
        raise RewardError(f"reward {name!r} returned shape {array.shape}, expected ({count},)")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise RewardError(f"reward {name!r} returned non-finite values ({array[bad[0]]} at index {bad[0]})")
    bad = np.flatnonzero(np.abs(array) > FLOAT32_MAX)
    if bad.size:
        raise RewardError(f"reward {name!r} returned values beyond float32's range ({array[bad[0]]} at index "
                          f"{bad[0]}; |x| <= {FLOAT32_MAX:.4g})")
    return array


def _module_here_hint(module_name: str, exc: Exception) -> str:
    """How Python finds a module that it did not: where it is a file or package in the working folder (the console
    script does not put that on sys.path, as `python script.py` would its own folder), PYTHONPATH=.; where the
    module is nowhere here, the two ways for a module in another folder."""
    top = module_name.split(".")[0]
    missing = isinstance(exc, ModuleNotFoundError) and exc.name == top
    if missing and (Path(f"{top}.py").is_file() or Path(top, "__init__.py").is_file()):
        return f"; {top!r} is in the current folder, which is not searched: run with PYTHONPATH=. (or install it)"
    if missing:
        return "; a module of yours is found when installed or when its folder is on PYTHONPATH"
    if module_name == "__main__" and isinstance(exc, AttributeError):  # `rlcm-fast train --reward __main__:fn`
        return ("; '__main__:' names a function of the running script or notebook, for a Trainer made there: on the "
                "command line, put the function in a module of yours and name it 'module:function'")
    return ""


def import_user_reward(spec: str) -> RewardFn:
    """`module.path:function`, checked up front to be callable as fn(images, prompts)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward {spec!r} is invalid: expected module.path:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"reward {spec!r} cannot be imported: {exc}{_module_here_hint(module_name, exc)}") from None
    except (Exception, SystemExit) as exc:  # the user's module failed while it ran (a SyntaxError, sys.exit())
        raise RewardError(f"reward {spec!r} cannot be imported: its module raised {one_line(exc, limit=300)}") from None
    if not callable(fn):
        raise RewardError(f"reward {spec!r} is not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no inspectable signature: checked at the first call
        return UserReward(fn)
    try:
        signature.bind(None, None)
    except TypeError:
        raise RewardError(
            f"reward {spec!r} has signature {signature}; it must accept two arguments (images, prompts)"
        ) from None
    return UserReward(fn)


class UserReward:
    """A user's reward function, handed its own copy of the images and prompts: the trainer keeps the same
    tensor for the sample grid and a weighted sum hands it to every term, so an in-place edit (`images *= 255`)
    would otherwise change what they see. The copy is one batch of pixels (28 MB at 4 x 768 px)."""

    def __init__(self, fn: RewardFn):
        self.fn = fn

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]):
        return self.fn(images.clone(), list(prompts))


@dataclass(frozen=True)
class RewardTerm:
    name: str
    weight: float


USER_REWARD = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # module.path:function


def _is_weight(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and abs(float(text)) <= FLOAT32_MAX
    except ValueError:
        return False


def _did_you_mean(name: str, builtin_names: Sequence[str]) -> str:
    """A likely intended name: a builtin a typo away ('aesthetics'), or module:function written with a dot."""
    close = difflib.get_close_matches(name.replace("-", "_"), builtin_names, n=1, cutoff=0.8)
    if close:
        return f" (did you mean {close[0]!r}?)"
    module, dot, function = name.rpartition(".")
    if dot and USER_REWARD.fullmatch(f"{module}:{function}"):
        return f" (did you mean '{module}:{function}'?)"
    return ""


def parse_reward_spec(spec: str, builtin_names: Sequence[str]) -> list[RewardTerm]:
    """The terms of a reward name (grammar in the module docstring); RewardError on anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward {spec!r} is empty; allowed: {', '.join(builtin_names)}, or module:function")
    terms = []
    for raw in spec.split(","):
        term = raw.strip()
        if not term:
            raise RewardError(f"reward {spec!r} has an empty entry; terms are separated by single commas, with "
                              "none at either end")
        head, sep, tail = term.rpartition(":")
        if sep and (head.strip() in builtin_names or ":" in head):
            if not _is_weight(tail):
                raise RewardError(f"reward {term!r} has weight {tail!r}; a weight must be a finite number within "
                                  f"float32's range (|x| <= {FLOAT32_MAX:.4g})")
            name, weight = head.strip(), float(tail)
        else:
            name, weight = term, 1.0
        if name not in builtin_names and not USER_REWARD.fullmatch(name):
            raise RewardError(
                f"reward {name!r} is unknown{_did_you_mean(name, builtin_names)}; allowed: {', '.join(builtin_names)}, "
                "or module:function, optionally weighted as name:weight and summed with commas"
            )
        terms.append(RewardTerm(name, weight))
    return terms


class WeightedSum:
    """sum_i w_i r_i(images, prompts); each term is checked (and named) on its own."""

    def __init__(self, parts: list[tuple[RewardTerm, RewardFn]]):
        self.parts = parts

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        check_reward_inputs(images, prompts)  # before any term: a term would be blamed for the caller's inputs
        total = np.zeros(len(prompts))
        for term, fn in self.parts:
            try:
                values = fn(images, prompts)
            except RewardError:
                raise
            except Exception as exc:  # named by its term, not by the whole sum
                raise RewardError(f"reward term {term.name!r} raised {one_line(exc, 200)}") from None
            total += term.weight * checked_rewards(term.name, values, len(prompts))
        return total


class AsyncReward:
    """Scores batches on a background thread so that rewards overlap with the next sampling round.

    A failed batch ends the run (collect_rewards raises it), so it cancels the batches queued behind it, as
    close() and the program's exit do: Python joins the worker thread at exit, which would otherwise first score
    every queued batch (with the reward server down, a retried minute each, long after the error line)."""

    def __init__(self, name: str, fn: RewardFn):
        self.name = name
        self.fn = fn
        self.cancelled = threading.Event()
        self.worker = ThreadPoolExecutor(max_workers=1)
        _OPEN_REWARDS.add(self)

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> Future:
        if not self.cancelled.is_set():
            try:
                return self.worker.submit(self._score, images, list(prompts))
            except RuntimeError:  # closed meanwhile: the executor takes no more work
                pass
        future = Future()
        future.set_exception(self._not_scored())
        return future

    def _score(self, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        if self.cancelled.is_set():
            raise self._not_scored()
        _worker_state.cancelled = self.cancelled  # what reward_cancelled() reads on this thread
        try:
            return checked_rewards(self.name, self.fn(images, prompts), len(prompts))
        except BaseException:
            self.cancelled.set()  # before this future is done: no batch behind it starts
            raise
        finally:
            _worker_state.cancelled = None

    def _not_scored(self) -> RewardError:
        return RewardError(f"reward {self.name!r}: batch not scored, as an earlier batch failed or the run stopped")

    def close(self) -> None:
        """Cancel the queued batches and wake a reward waiting in reward_cancelled(); the one running finishes
        its current attempt. Later submits fail at once."""
        self.cancelled.set()
        self.worker.shutdown(wait=False, cancel_futures=True)


_worker_state = threading.local()
_OPEN_REWARDS: "weakref.WeakSet[AsyncReward]" = weakref.WeakSet()


def reward_cancelled(wait: float = 0.0) -> bool:
    """Whether the AsyncReward running this call was closed or had a batch fail, after waiting up to `wait`
    seconds (returning as soon as that happens): a reward's retry loop stops there instead of retrying a batch
    no one will read. Outside an AsyncReward's worker it sleeps `wait` and returns False."""
    cancelled = getattr(_worker_state, "cancelled", None)
    if cancelled is None:
        time.sleep(wait)
        return False
    return cancelled.wait(wait)


def _close_open_rewards() -> None:
    for reward in list(_OPEN_REWARDS):
        reward.close()


# At exit Python joins the executor's thread (concurrent.futures registers that hook when ThreadPoolExecutor is
# imported, above) after it has run every queued batch. Hooks run last registered first, so this one cancels
# them before; atexit.register would run only after the join. CPython's own hook, hence the guard.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_close_open_rewards)
