"""Mutation-testing round 46d (cuda_graphs; the CUDA-graph parts of policy_model and sampler): hand-written mutants
of CapturedCall, CaptureError, the cast-cache handling, GraphedTrainingUNet, the trainer's train_cuda_graph switch
and the sampler's sample_cuda_graph fallback were run against their tests (test_cuda_graphs, test_training_graphs,
part of test_mutants_round41b); each test here kills one that survived (named in its docstring). All are CPU-only,
seeded and fast: torch.cuda's streams and graph capture are faked (a fake capture records the "kernels" the
function launches and a replay runs them, as a CUDA graph does), and no run is trained."""

import contextlib
import copy

import pytest
import torch

from rlcm_fast import policy_model as policy_model_module
from rlcm_fast import sampler as sampler_module
from rlcm_fast.config import resolve_config
from rlcm_fast.cuda_graphs import WARMUP_CALLS, CaptureError, CapturedCall, GraphedTrainingUNet
from rlcm_fast.models import load_pipeline
from rlcm_fast.sampler import LCMSampler
from test_cuda_graphs import FakeStream

PROMPTS = ["a cat", "a dog"]


# -- CapturedCall on faked streams and graphs --------------------------------------------------------------------

class FakeGraph:
    """A CUDA graph: the kernels launched while it was captured, run again at each replay."""

    def __init__(self):
        self.kernels = []

    def replay(self):
        for kernel in self.kernels:
            kernel()


class FakeCuda:
    """torch.cuda's streams and capture: `capturing` is the graph being captured (None outside a capture); a
    failed capture's exit raises the generic error and leaves the thread's stream as it was (as the real one)."""

    def __init__(self):
        self.capturing, self.streams_set, self.modes = None, [], []

    def current_stream(self, device=None):
        return FakeStream(f"stream of {device}")

    def set_stream(self, stream):
        self.streams_set.append(stream.name)

    @contextlib.contextmanager
    def graph(self, cuda_graph, capture_error_mode="global"):
        self.modes.append(capture_error_mode)
        self.capturing = cuda_graph
        try:
            yield
        except Exception:
            raise RuntimeError("operation failed due to a previous error during capture")
        finally:
            self.capturing = None


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    for name in ("current_stream", "set_stream", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    return fake


def doubling(cuda: FakeCuda, calls: list):
    """fn(x) = (2 x,) as a CUDA graph sees it: run at once outside a capture; inside one, only launched (recorded
    into the graph, its output buffer left unwritten until a replay)."""
    def fn(x):
        calls.append(x)
        if cuda.capturing is None:
            return (x * 2,)
        out = torch.full_like(x, float("nan"))
        cuda.capturing.kernels.append(lambda: out.copy_(x * 2))
        return (out,)
    return fn


def test_each_replay_computes_on_that_calls_inputs_and_leaves_the_callers_tensors_alone(cuda):
    """Mutants: the inputs not copied into the captured ones (`static.copy_(given)` dropped, or copied the other
    way), no replay after the capture (its outputs are unwritten buffers), the captured inputs the caller's own
    tensors (`detach()` without `clone()`, or the caller's list kept): a second call of a sampler got the first
    call's images, or NaN, or overwrote the latents the caller passed the first time."""
    calls = []
    call = CapturedCall(doubling(cuda, calls), torch.device("cuda"))
    x1, x2 = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -3.0])
    (first,) = call(x1)
    assert first.tolist() == [2.0, 4.0]
    (second,) = call(x2)
    assert second.tolist() == [10.0, -6.0]
    assert x1.tolist() == [1.0, 2.0] and x2.tolist() == [5.0, -3.0]  # the caller's inputs untouched
    assert len(calls) == WARMUP_CALLS + 1  # warm-ups and the capture; replays call nothing


def test_another_dtype_or_shape_or_none_position_is_captured_again(cuda):
    """Mutants: the signature without the dtype, without the shape, or without the None placeholders: a graph
    captured for one input signature was replayed for another (float64 inputs computed in float32, a larger batch
    copied into a smaller buffer, a missing input taken for a present one)."""
    def add(a, b):
        total = (a if a is not None else 0) + (b if b is not None else 0) * 10
        if cuda.capturing is None:
            return (total,)
        out = torch.full_like(total, float("nan"))
        cuda.capturing.kernels.append(lambda: out.copy_((a if a is not None else 0) + (b if b is not None else 0) * 10))
        return (out,)

    call = CapturedCall(add, torch.device("cuda"))
    (out,) = call(torch.ones(2), None)
    assert out.tolist() == [1.0, 1.0]
    (out,) = call(torch.ones(2, dtype=torch.float64) / 3, None)
    assert out.dtype == torch.float64 and out.tolist() == [1 / 3, 1 / 3]
    (out,) = call(torch.ones(3), None)
    assert out.tolist() == [1.0, 1.0, 1.0]
    (out,) = call(None, torch.ones(2))
    assert out.tolist() == [10.0, 10.0]
    assert len(call._graphs) == 4


def test_warm_up_and_capture_run_under_the_callers_autocast_without_its_cast_cache(cuda):
    """Mutants: the warm-up, or the capture, run under the caller's autocast with its cast cache on: the capture
    then casts the weights from the cache (stale after an optimizer step), and dynamo, which guards on the cache
    flag, compiles the function again inside the capture. The CPU's autocast stands in for CUDA's."""
    seen = []

    def fn(x):
        seen.append((torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled()))
        return (x + 1,)

    call = CapturedCall(fn, torch.device("cuda"))
    call.device = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call(torch.zeros(2))
        assert torch.is_autocast_cache_enabled()  # the caller's cache is on again after the capture
    assert seen == [(torch.bfloat16, False)] * (WARMUP_CALLS + 1)


def test_an_interrupt_during_capture_stays_an_interrupt_and_the_streams_are_restored(cuda):
    """Mutants: `except BaseException` -> `except RuntimeError` (a Ctrl-C during the capture left the thread on the
    capture stream) and the re-raise of non-RuntimeErrors dropped (a Ctrl-C became a CaptureError: the sampler
    warned and went on sampling without graphs instead of stopping)."""
    def interrupted(x):
        if cuda.capturing is not None:
            raise KeyboardInterrupt
        return (x,)

    call = CapturedCall(interrupted, torch.device("cuda"))
    with pytest.raises(KeyboardInterrupt):
        call(torch.zeros(2))
    assert cuda.streams_set == ["stream of cuda", "stream of None"]


def test_a_failed_capture_restores_the_device_stream_first_and_keeps_a_short_message_and_its_chain(cuda):
    """Mutants: the streams restored in the other order (the current device's stream set first, the graph's device's
    last: on a multi-GPU host the thread was left on the graph's device), the cause's text cut at 3000 characters
    rather than 300 (a CUDA error's full dump in a one-line warning), and `from error` -> `from None` (the
    generic error that ended the capture lost from the traceback)."""
    def synchronising(x):
        if cuda.capturing is not None:
            raise RuntimeError("not permitted " * 100)
        return (x,)

    call = CapturedCall(synchronising, torch.device("cuda"))
    with pytest.raises(CaptureError) as failure:
        call(torch.zeros(2))
    assert cuda.streams_set == ["stream of cuda", "stream of None"] and cuda.modes == ["thread_local"]
    cause = ("not permitted " * 100)[:300]
    assert str(failure.value) == (f"CUDA-graph capture failed (RuntimeError: {cause}...; then RuntimeError: "
                                  "operation failed due to a previous error during capture)")
    assert isinstance(failure.value.__cause__, RuntimeError)
    assert str(failure.value.__cause__) == "operation failed due to a previous error during capture"


# -- GraphedTrainingUNet -------------------------------------------------------------------------------------------

def recording_unet(calls):
    def unet(sample, timestep, encoder_hidden_states=None, timestep_cond=None, return_dict=True):
        calls.append({"timestep_cond": timestep_cond, "return_dict": return_dict})
        out = sample * 2 + (0 if timestep_cond is None else timestep_cond.sum())
        return {"sample": out} if return_dict else (out,)
    return unet


def test_a_return_dict_call_or_one_without_grad_runs_the_unet_with_its_own_arguments(monkeypatch):
    """Mutants: `return_dict` dropped from the eager path's test (a return_dict=True call with grad was captured and
    handed back a tuple where the UNet's output object was asked for), the eager call's return_dict forced to
    False, and its timestep_cond dropped (the guidance embedding lost: another prediction without a word)."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda *a, **k: pytest.fail("captured"))
    calls = []
    graphed = GraphedTrainingUNet(recording_unet(calls), torch.device("cuda"))
    x, cond = torch.ones(2, requires_grad=True), torch.full((2, 3), 0.5)
    out = graphed(x, torch.zeros(2), encoder_hidden_states=torch.zeros(2, 1), timestep_cond=cond, return_dict=True)
    assert out["sample"].tolist() == [5.0, 5.0] and calls[-1]["return_dict"] is True
    with torch.no_grad():
        (out,) = graphed(x, torch.zeros(2), encoder_hidden_states=torch.zeros(2, 1), timestep_cond=cond)
    assert out.tolist() == [5.0, 5.0] and calls[-1]["timestep_cond"] is cond
    assert graphed.signatures() == {"graphed": 0, "not_graphed": 0}


def test_a_non_tensor_timestep_runs_the_unet_itself(monkeypatch):
    """Mutant: `not all(isinstance(t, Tensor))` -> `not any(...)`: a call with an int timestep (which diffusers'
    UNet takes) went to the capture and failed with an AttributeError instead of running the UNet."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda *a, **k: pytest.fail("captured"))
    calls = []
    graphed = GraphedTrainingUNet(recording_unet(calls), torch.device("cuda"))
    (out,) = graphed(torch.ones(2, requires_grad=True), 5, encoder_hidden_states=torch.zeros(2, 1))
    assert out.tolist() == [2.0, 2.0] and len(calls) == 1


def eager_graphs(captured: list):
    """make_graphed_callables that hands the module back as it is, recording its sample inputs and the autocast
    cache's state."""
    def make_graphed_callables(module, sample_args, num_warmup_iters):
        captured.append((tuple(t.shape for t in sample_args), torch.is_autocast_cache_enabled()))
        return module
    return make_graphed_callables


def test_what_make_graphed_callables_refuses_with_an_assertion_warns_and_runs_eagerly(monkeypatch):
    """Mutant: `except (RuntimeError, AssertionError)` -> `except RuntimeError`: make_graphed_callables refuses
    some inputs with an assert (e.g. a cast cache left on); the training step then died with a bare
    AssertionError instead of warning and training without the graphs."""
    def refuse(*args, **kwargs):
        raise AssertionError("make_graphed_callables does not support the autocast caching")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", refuse)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    calls = []
    graphed = GraphedTrainingUNet(recording_unet(calls), torch.device("cuda"))
    with pytest.warns(UserWarning, match=r"^training calls of \(2,\) could not be captured as CUDA graphs "
                                         r"\(AssertionError: make_graphed_callables does not support the autocast "
                                         r"caching\); they run without them$"):
        (out,) = graphed(torch.ones(2, requires_grad=True), torch.zeros(2), encoder_hidden_states=torch.zeros(2, 1))
    assert out.tolist() == [2.0, 2.0]
    assert graphed.signatures() == {"graphed": 0, "not_graphed": 1}


def test_each_input_signature_is_captured_once_without_the_cast_cache(monkeypatch):
    """Mutants: the signature of the sample alone (a call with other text embeddings replayed a graph captured for
    another shape of them), `timestep_cond` always among the inputs (a UNet without a guidance embedding, SD1.5 +
    LCM-LoRA, was never captured), and the cast cache left on around make_graphed_callables (which refuses it)."""
    captured = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", eager_graphs(captured))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    calls = []
    graphed = GraphedTrainingUNet(recording_unet(calls), torch.device("cuda"))
    graphed.device = torch.device("cpu")  # the CPU's autocast stands in for CUDA's
    x = torch.ones(2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for embeds in (torch.zeros(2, 1), torch.zeros(2, 4), torch.zeros(2, 1)):
            (out,) = graphed(x, torch.zeros(2), encoder_hidden_states=embeds)
            assert out.tolist() == [2.0, 2.0]
        assert torch.is_autocast_cache_enabled()
    assert captured == [(((2,), (2,), (2, 1)), False), (((2,), (2,), (2, 4)), False)]
    assert graphed.signatures() == {"graphed": 2, "not_graphed": 0}
    assert all(call["timestep_cond"] is None for call in calls)


# -- train_cuda_graph in build_policy_model, on a device that says "cuda" ---------------------------------------

class CudaAccelerator:
    """An accelerator whose device is CUDA, for build_policy_model's choices only (the pipeline loads on the CPU)."""

    device = torch.device("cuda")

    def prepare(self, module):
        return module

    def unwrap_model(self, module, keep_fp32_wrapper=True):
        return module


@pytest.mark.parametrize("switch", [True, False])
def test_train_cuda_graph_on_cuda_graphs_the_bare_unet_and_keeps_its_gradients_allocated(monkeypatch, switch):
    """Mutants: train_cuda_graph ignored on CUDA (never graphed, or always graphed whatever the config says: a run
    that asked for eager training got graphs), its GraphedTrainingUNet dropped, and keeps_gradients_allocated False
    (the trainer then sets the gradients to None between updates and the graphs' backward sums them wrongly:
    test_training_graphs shows the wrong sum)."""
    real_load = policy_model_module.load_pipeline
    monkeypatch.setattr(policy_model_module, "load_pipeline",
                        lambda model, device, dtype, **kwargs: real_load(model, "cpu", dtype, **kwargs))
    monkeypatch.setattr(policy_model_module, "fused_step_missing", lambda device: None)
    cfg = resolve_config(overrides={"device": "cuda", "train_cuda_graph": switch, "grid_every": 0})
    policy = policy_model_module.build_policy_model(cfg, CudaAccelerator(), "no")
    if switch:
        assert isinstance(policy.train_unet, GraphedTrainingUNet) and policy.train_unet.unet is policy.pipe.unet
        assert policy.train_unet.device == torch.device("cuda")
    else:
        assert policy.train_unet is policy.ddp_unet is policy.pipe.unet
    assert policy.grads_stay_allocated == switch


# -- the sampler's captured rollouts --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


class CountingCapture:
    """Stands in for CapturedCall on the CPU: runs fn; records each one made and the device it was made for."""

    made: list = []

    def __init__(self, fn, device):
        self.fn = fn
        CountingCapture.made.append(device)

    def __call__(self, *inputs):
        return self.fn(*inputs)


def test_one_capture_per_unet_on_the_samplers_device_kept_across_calls(pipe, monkeypatch):
    """Mutants: a new CapturedCall at every sample() (each call captured the H-step loop again: warm-ups and a
    capture per batch, a graph's memory per call), a sampler that keeps only its last UNet's capture (alternating
    between the policy and another UNet captured again each time), and the capture made for torch.device("cuda")
    rather than the UNet's device (cuda:1 in a run on the second GPU)."""
    monkeypatch.setattr(sampler_module, "CapturedCall", CountingCapture)
    CountingCapture.made = []
    other = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(0.5)
    sampler, plain = LCMSampler(pipe, horizon=2, resolution=32), LCMSampler(pipe, horizon=2, resolution=32)
    sampler.cuda_graph = True
    for unet in (pipe.unet, other, pipe.unet):
        got = sampler.sample(unet, PROMPTS[:1], torch.Generator().manual_seed(0), decode=False)
    want = plain.sample(other, PROMPTS[:1], torch.Generator().manual_seed(0), decode=False)
    assert not torch.equal(got.states, want.states)  # the last call sampled with its own UNet, not the other
    torch.testing.assert_close(sampler.sample(other, PROMPTS[:1], torch.Generator().manual_seed(0),
                                              decode=False).states, want.states, atol=0, rtol=0)
    assert CountingCapture.made == [sampler.device, sampler.device]


def test_a_one_step_horizon_samples_through_the_graph(pipe, monkeypatch):
    """Mutant: the stacked noises without their empty case: with horizon=1 (no trained action, no noise) the graphed
    sampler failed in torch.stack([]) where the plain loop samples."""
    monkeypatch.setattr(sampler_module, "CapturedCall", CountingCapture)
    sampler = LCMSampler(pipe, horizon=1, resolution=32)
    sampler.cuda_graph = True
    got = sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(0), decode=False)
    want = LCMSampler(pipe, horizon=1, resolution=32).sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(0),
                                                             decode=False)
    assert got.log_probs.shape == (2, 0) and got.states.shape[1] == 1
    torch.testing.assert_close(got.denoised, want.denoised, atol=0, rtol=0)


def test_an_error_at_replay_that_is_no_capture_failure_is_raised_and_keeps_the_graphs(pipe, monkeypatch):
    """Mutant: `except CaptureError` -> `except RuntimeError`: an out-of-memory at a replay was taken for a failed
    capture: sampling warned, turned the graphs off for the rest of the run and retried eagerly."""
    class OutOfMemory:
        def __init__(self, fn, device):
            pass

        def __call__(self, *inputs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sampler_module, "CapturedCall", OutOfMemory)
    sampler = LCMSampler(pipe, horizon=2, resolution=32)
    sampler.cuda_graph = True
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(0), decode=False)
    assert sampler.cuda_graph


def test_policy_sampler_passes_sample_cuda_graph_on(pipe, monkeypatch):
    """Mutant: policy_sampler builds the LCM sampler with cuda_graph=False: sample_cuda_graph=true did nothing on a
    GPU (the sampler only keeps it on a CUDA device, so this looks at what it is given)."""
    given = []
    monkeypatch.setattr(sampler_module, "LCMSampler", lambda *args, **kwargs: given.append(kwargs) or "sampler")
    for switch in (True, False):
        cfg = resolve_config(overrides={"sample_cuda_graph": switch, "grid_every": 0})
        assert sampler_module.policy_sampler(pipe, cfg) == "sampler"
    assert [kwargs["cuda_graph"] for kwargs in given] == [True, False]
