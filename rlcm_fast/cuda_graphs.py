"""CUDA graphs: a function of tensors run as one graph, captured at its first call and replayed after that
(`CapturedCall`, the sampling loop), and the training UNet's forward and backward (`GraphedTrainingUNet`).

CapturedCall is written by hand because torch.compile's own CUDA graphs ("reduce-overhead") capture what
is compiled, and compiling a whole H-step sampling loop unrolls it (compile time grows with H;
fast_sampler.py has the figures). Here the loop is plain Python around a compiled UNet call, and this
captures all of it. The training graphs are torch.cuda.make_graphed_callables', around the UNet.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch

from .faults import one_line

WARMUP_CALLS = 2  # before a capture: the first call compiles and autotunes, the second runs as replays will


class CaptureError(RuntimeError):
    """The function could not be captured (it synchronises with the host, draws random numbers on the
    host, or calls something CUDA graphs do not allow)."""


def without_cast_cache(device_type: str):
    """A context that turns autocast's cast cache off where autocast is on (same dtype), else changes nothing.

    Under a caller's autocast, its cast cache would hand the capture the warm-up's casts of the weights
    (stale after an update, freed when the region ends), so warm-up and capture must run without it. Where
    autocast is off, nothing may change: dynamo guards on the autocast state, cache flag included, and a
    function compiled here would otherwise be compiled again when called outside a capture."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class CapturedCall:
    """`fn(*inputs)` (tensors, or None) through a CUDA graph, one graph per input signature (shapes,
    dtypes, which are None, and the caller's autocast state, which a replay cannot change). At the first
    call of a signature, fn runs WARMUP_CALLS times on a side stream and is then captured; each call
    copies its inputs into the captured ones and replays.

    fn must not synchronise with the host or draw random numbers; it reads tensors that are not inputs
    (weights) at replay, so in-place updates to them are seen, but replacing them is not. The outputs are
    the graph's own buffers: the next call of the same signature overwrites them, so copy what you keep.
    """

    def __init__(self, fn: Callable, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn = fn
        self.device = device
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, object]] = {}

    @staticmethod
    def signature(inputs: Sequence[torch.Tensor | None], device_type: str) -> tuple:
        """What a captured graph is valid for: its inputs' shapes and dtypes, and whether and to what dtype
        autocast cast inside it (a graph replays the precision it was captured in)."""
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        return (autocast, *(None if t is None else (tuple(t.shape), t.dtype) for t in inputs))

    def __call__(self, *inputs: torch.Tensor | None):
        key = self.signature(inputs, self.device.type)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static_inputs, static_outputs = self._graphs[key]
        for static, given in zip(static_inputs, inputs):
            if static is not None:
                static.copy_(given)
        graph.replay()
        return static_outputs

    def _capture(self, inputs):
        static_inputs = [None if t is None else t.detach().clone() for t in inputs]
        device_type = self.device.type
        # The device's stream, then the current device's (a failed capture restores them in this order, as
        # torch.cuda.stream does).
        callers_streams = [torch.cuda.current_stream(self.device), torch.cuda.current_stream()]
        # Compilation, Triton's JIT and cuDNN's algorithm search must not run under capture: warm up on a
        # side stream first, as torch.cuda.graphs' documentation asks.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(callers_streams[0])
        with torch.cuda.stream(side), without_cast_cache(device_type):
            for _ in range(WARMUP_CALLS):
                self.fn(*static_inputs)
        callers_streams[0].wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a reward worker thread may call CUDA while this one captures ("global" fails both).
            with without_cast_cache(device_type), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_outputs = self.fn(*static_inputs)
        except BaseException as error:
            # torch.cuda.graph ends the capture before it restores the stream: when ending it raises, this
            # thread is left on the capture stream, unordered with the work of the caller's stream.
            for stream in callers_streams:
                torch.cuda.set_stream(stream)
            if not isinstance(error, RuntimeError):
                raise
            # Ending a failed capture raises a generic error; what failed it is the exception it ended on.
            cause = error.__context__
            reasons = [one_line(cause, limit=300)] if isinstance(cause, Exception) else []
            reasons.append(one_line(error, limit=300))
            raise CaptureError(f"CUDA-graph capture failed ({'; then '.join(reasons)})") from error
        return graph, static_inputs, static_outputs


class _UNetPrediction(torch.nn.Module):
    """The UNet's prediction as tensors in, one tensor out: what torch.cuda.make_graphed_callables takes. Its
    parameters are the UNet's, so the captured backward gives the LoRA weights their gradients."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *timestep_cond):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         timestep_cond=timestep_cond[0] if timestep_cond else None, return_dict=False)[0]


class GraphedTrainingUNet:
    """The UNet as the trainer's training calls use it (`unet(x, t, encoder_hidden_states=..., timestep_cond=...,
    return_dict=False)`), its forward and its backward each replayed from a CUDA graph: one pair per input
    signature (the rows of a call), captured by torch.cuda.make_graphed_callables at its first call.

    The host then launches two graphs per call instead of a few thousand kernels (the eager training call
    looked host-bound on the H200: benchmarks/README.md). Only what autograd differentiates is captured: the policy
    step's log-prob, the loss and the optimizer stay outside.

    The gradients must already be allocated (zeros) when the first backward runs, and zeroed in place, not
    set to None, between updates (`keeps_gradients_allocated`): the captured backward hands autograd its own
    static buffers, and a parameter whose .grad is None takes such a buffer as its .grad, so the next
    backward of the update would overwrite what it holds (tests/test_training_graphs.py shows the wrong sum).
    Calls without grad or with a non-tensor input, and signatures that cannot be captured (a warning says
    why), run the UNet as it is.
    """

    keeps_gradients_allocated = True

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.unet, self.device = unet, device
        self._graphed: dict[tuple, Callable] = {}
        # The signatures whose capture failed. Not told apart by type: make_graphed_callables hands a module
        # back as the same object, its forward replaced, so a captured call is a _UNetPrediction too.
        self._not_graphed: set[tuple] = set()

    def __call__(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, return_dict=False):
        inputs = (sample, timestep, encoder_hidden_states) + (() if timestep_cond is None else (timestep_cond,))
        if return_dict or not torch.is_grad_enabled() or not all(isinstance(t, torch.Tensor) for t in inputs):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             timestep_cond=timestep_cond, return_dict=return_dict)
        key = CapturedCall.signature(inputs, self.device.type)
        if key not in self._graphed:  # a signature that cannot be captured runs the UNet itself from then on
            graphed = self._capture(inputs)
            if graphed is None:
                self._not_graphed.add(key)
                graphed = _UNetPrediction(self.unet)
            self._graphed[key] = graphed
        return (self._graphed[key](*inputs),)

    def signatures(self) -> dict[str, int]:
        """How many input signatures replay CUDA graphs ("graphed"), and how many run the UNet itself because
        their capture failed ("not_graphed"): a benchmark records it, a test asserts it."""
        return {"graphed": len(self._graphed) - len(self._not_graphed), "not_graphed": len(self._not_graphed)}

    def _capture(self, inputs) -> Callable | None:
        callers_streams = [torch.cuda.current_stream(self.device), torch.cuda.current_stream()]
        # make_graphed_callables refuses autocast's cast cache (stale casts of the weights would be captured).
        with without_cast_cache(self.device.type):
            try:
                return torch.cuda.make_graphed_callables(
                    _UNetPrediction(self.unet), tuple(t.detach().clone() for t in inputs), num_warmup_iters=WARMUP_CALLS)
            except (RuntimeError, AssertionError) as error:  # what make_graphed_callables raises on what it refuses
                for stream in callers_streams:  # a failed capture can leave this thread on its stream (CapturedCall)
                    torch.cuda.set_stream(stream)
                warnings.warn(f"training calls of {tuple(inputs[0].shape)} could not be captured as CUDA graphs "
                              f"({one_line(error, limit=300)}); they run without them")
                return None
