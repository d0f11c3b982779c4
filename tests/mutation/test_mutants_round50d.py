"""Mutation-testing round 50d (hub, cuda_graphs): hand-written mutants of rlcm_fast/hub.py and rlcm_fast/cuda_graphs.py
(the second round of each, after rounds 48a and 46d) were run against their tests (test_hub, test_models' hub tests,
test_cuda_graphs, test_training_graphs, rounds 48a and 46d); each test here kills one that survived (named in its
docstring). Every hub.py mutant was caught by those tests but PROBE_TIMEOUT_S 5 -> 0.5, which only a timed test
could see, so every test here is of cuda_graphs. All are CPU-only, seeded and fast: torch.cuda's streams, graph
capture and make_graphed_callables are stand-ins (a fake capture records the "kernels" the function launches and a
replay runs them); nothing is trained."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rlcm_fast.cuda_graphs import WARMUP_CALLS, CaptureError, CapturedCall, GraphedTrainingUNet
from test_cuda_graphs import FakeCudaStreams


# -- cuda_graphs: what is refused off CUDA -------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["meta", "mps"])
@pytest.mark.parametrize("kind", [CapturedCall, GraphedTrainingUNet])
def test_any_device_but_cuda_is_refused_by_name(kind, device):
    """Mutants: `device.type != "cuda"` -> `device.type == "cpu"` in CapturedCall and in GraphedTrainingUNet: a sampler
    or trainer on an Apple GPU ("mps") or the meta device was let through, and failed later inside torch.cuda with a
    traceback about a missing CUDA driver instead of one line naming the device."""
    with pytest.raises(ValueError, match=f"^CUDA graphs need a CUDA device, got {device}$"):
        kind(lambda *args: args, torch.device(device))


# -- CapturedCall: streams and the warm-up, on faked torch.cuda ------------------------------------------------------

class Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


class Graph:
    """A CUDA graph: the kernels launched while it was captured, run again at each replay."""

    def __init__(self):
        self.kernels = []

    def replay(self):
        for kernel in self.kernels:
            kernel()


class RecordingCuda(FakeCudaStreams):
    """torch.cuda's streams and capture (the current stream as test_cuda_graphs' stand-in keeps it), recording what
    runs where: `log` lists the streams' waits, the side stream's device and each call of the function with the
    stream it ran on; `capturing` is the graph being captured (None outside a capture). Its capture, unlike that
    stand-in's, restores the stream in any case, and fails with a long message."""

    def __init__(self):
        self.log, self.capturing = [], None
        self.current = Stream("caller", self.log)

    def make_stream(self, device=None):
        self.log.append(f"side stream on {device}")
        return Stream("side", self.log)

    @contextlib.contextmanager
    def graph(self, cuda_graph, capture_error_mode="global"):
        previous, self.current, self.capturing = self.current, Stream("capture", self.log), cuda_graph
        try:
            yield
        except Exception:
            raise RuntimeError("operation failed due to a previous error during capture " + "detail " * 100)
        finally:
            self.current, self.capturing = previous, None


@pytest.fixture
def cuda(monkeypatch) -> RecordingCuda:
    fake = RecordingCuda()
    for name in ("current_stream", "set_stream", "stream", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "Stream", fake.make_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    return fake


def test_the_warm_up_runs_twice_on_a_side_stream_of_the_calls_device_ordered_with_the_callers(cuda):
    """Mutants: the side stream made on the current device rather than the call's (`torch.cuda.Stream()`: on a host
    with several GPUs the warm-up of a sampler on cuda:1 ran on cuda:0's stream), either wait between the caller's
    stream and the side stream dropped (the warm-up read inputs the caller had not finished writing, or the capture
    began before the warm-up ended), the warm-up run on the caller's stream (compilation and autotuning then run on
    the stream a capture must find idle, against torch.cuda.graphs' documentation), and WARMUP_CALLS 2 -> 1 (the
    first call compiles and autotunes; only the second runs as a replay will, so a single warm-up captured a call
    that was not yet in its steady state)."""
    def fn(x):
        cuda.log.append(f"call on {cuda.current.name}")
        return (x + 1,)

    call = CapturedCall(fn, torch.device("cuda:1"))
    call(torch.zeros(2))
    call(torch.zeros(2))  # replayed: nothing runs, nothing waits
    assert WARMUP_CALLS >= 2
    assert cuda.log == (["side stream on cuda:1", "side waits for caller"] + ["call on side"] * WARMUP_CALLS
                        + ["caller waits for side", "call on capture"])


def test_a_replay_reads_every_input_of_its_call(cuda):
    """Mutant: only the first input copied into the captured ones before a replay (`zip(static_inputs, inputs[:1])`):
    a sampler's second batch, with new latents but also new prompt embeddings and noises, was sampled with the
    first batch's prompts and noises (images of the wrong prompts, with the log-probs of other actions)."""
    def weighted_sum(a, b, c):
        out = torch.full_like(a, float("nan"))
        if cuda.capturing is None:
            return (out.copy_(a + 10 * b + 100 * c),)
        cuda.capturing.kernels.append(lambda: out.copy_(a + 10 * b + 100 * c))
        return (out,)

    call = CapturedCall(weighted_sum, torch.device("cuda"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        a, b, c = (torch.randn(2, generator=generator) for _ in range(3))
        (out,) = call(a, b, c)
        torch.testing.assert_close(out, a + 10 * b + 100 * c)
    assert len(call._graphs) == 1


def test_the_generic_error_that_ends_a_failed_capture_is_cut_at_300_characters_too(cuda):
    """Mutant: the second one_line of CaptureError's message (the error that ended the capture) cut at 3000
    characters rather than 300: torch's generic capture error comes with lines of CUDA advice
    (CUDA_LAUNCH_BLOCKING, TORCH_USE_CUDA_DSA), and the sampler's one-line warning grew to a screenful."""
    def synchronising(x):
        if cuda.current.name == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        return (x,)

    with pytest.raises(CaptureError) as failure:
        CapturedCall(synchronising, torch.device("cuda"))(torch.zeros(2))
    ended = ("operation failed due to a previous error during capture " + "detail " * 100).strip()[:300]
    assert str(failure.value) == ("CUDA-graph capture failed (RuntimeError: operation not permitted when stream is "
                                  f"capturing; then RuntimeError: {ended}...)")


# -- GraphedTrainingUNet: the sample inputs given to make_graphed_callables --------------------------------------

def test_the_graphs_static_inputs_are_copies_and_the_callers_tensors_are_left_alone(monkeypatch):
    """Mutant: make_graphed_callables given the caller's own tensors (`detach()` without `clone()`): its sample
    arguments become the graphs' static inputs, into which every later call copies its own inputs, so the second
    training call overwrote the latents and embeddings of the first, which the trainer still holds (a minibatch's
    states, reused by its next policy step). The stand-in keeps make_graphed_callables' contract."""
    given = []

    def make_graphed_callables(module, sample_args, num_warmup_iters):
        given.append(sample_args)

        def replay(*inputs):
            for static, new in zip(sample_args, inputs):
                static.copy_(new)
            return module(*sample_args)
        return replay

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    weight = torch.nn.Parameter(torch.tensor(3.0))
    graphed = GraphedTrainingUNet(lambda x, t, encoder_hidden_states=None, timestep_cond=None, return_dict=False:
                                  (x * weight + encoder_hidden_states.sum(),), torch.device("cuda"))
    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(2, generator=generator), torch.zeros(2), torch.randn(2, 1, generator=generator)]
    second = [torch.randn(2, generator=generator), torch.zeros(2), torch.randn(2, 1, generator=generator)]
    kept = [t.clone() for t in first]
    (out1,) = graphed(first[0], first[1], encoder_hidden_states=first[2])
    (out2,) = graphed(second[0], second[1], encoder_hidden_states=second[2])
    for tensor, before in zip(first, kept):
        assert torch.equal(tensor, before)
    torch.testing.assert_close(out2, second[0] * 3 + second[2].sum())
    assert len(given) == 1  # one signature, captured once

