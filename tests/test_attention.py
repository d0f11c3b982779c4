"""attention_backend: the cuDNN-first processor changes only SDPA's backend priority, for its own call, also
under torch.compile; each backend is refused in one line where it cannot run. On a GPU: cuDNN's kernel
really runs, and its outputs, gradients and sampled images agree with the default's within bf16 tolerance."""

import logging

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlcm_fast import FastLCMSampler
from rlcm_fast.attention import CudnnFirstAttnProcessor, check_attention_backend, set_attention_backend
from rlcm_fast.models import load_pipeline

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs a GPU")


def attention_layer(dim: int, heads: int, processor, device="cpu", dtype=torch.float32, cross_dim=None):
    torch.manual_seed(0)
    layer = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, cross_attention_dim=cross_dim,
                      processor=processor)
    return layer.to(device, dtype)


def priority() -> list[int]:
    return list(torch._C._get_sdp_priority_order())


def test_cudnn_first_processor_sets_the_priority_for_its_call_only(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append((priority(), torch.backends.cuda.flash_sdp_enabled())) or sdpa(*a, **k))
    before = priority()
    x = torch.randn(2, 24, 32)
    ours = attention_layer(32, 4, CudnnFirstAttnProcessor())(x)
    assert priority() == before  # restored on the way out
    assert before[0] != int(SDPBackend.CUDNN_ATTENTION)  # else the test could not tell
    (order, flash_enabled), = seen
    assert order[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert flash_enabled  # the others stay enabled, as fallbacks for shapes cuDNN does not take
    theirs = attention_layer(32, 4, AttnProcessor2_0())(x)
    assert torch.equal(ours, theirs)  # on the CPU SDPA has no cuDNN kernel: same computation


def test_cudnn_first_processor_compiles_without_a_graph_break():
    layer = attention_layer(32, 4, CudnnFirstAttnProcessor(), cross_dim=16)
    x, context = torch.randn(2, 24, 32), torch.randn(2, 7, 16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    torch.testing.assert_close(compiled(x, context), layer(x, context), atol=1e-6, rtol=0)


def test_set_attention_backend_puts_every_unet_and_vae_layer_on_it():
    pipe = load_pipeline("tiny")
    processors = lambda: {type(p) for m in (pipe.unet, pipe.vae) for p in m.attn_processors.values()}  # noqa: E731
    assert processors() == {AttnProcessor2_0}
    set_attention_backend(pipe, "cudnn")
    assert processors() == {CudnnFirstAttnProcessor}
    set_attention_backend(pipe, "sdpa")
    assert processors() == {AttnProcessor2_0}


def test_the_cudnn_processor_takes_what_diffusers_passes_by_name():
    """With *args, **kwargs as its only parameters, diffusers dropped the VAE's `temb` and warned at each decode."""
    pipe = load_pipeline("tiny")
    set_attention_backend(pipe, "cudnn")
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with torch.no_grad():
            pipe.vae.decode(torch.randn(1, 4, 4, 4))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [message for message in said if "not expected by" in message]


def test_set_attention_backend_refuses_an_unknown_name_in_one_line():
    """It put every layer on SDPA for any name (a typo of cudnn ran the default without a word)."""
    pipe = load_pipeline("tiny")
    with pytest.raises(ValueError, match="attention_backend 'cuDNN' is invalid; allowed: sdpa, cudnn, xformers"):
        set_attention_backend(pipe, "cuDNN")
    with pytest.raises(TypeError, match=r"^pipe is a str; set_attention_backend takes a diffusers pipeline \(its unet "
                                         r"and vae\)$"):
        set_attention_backend("pipe", "sdpa")  # an AttributeError from inside


@pytest.mark.parametrize("backend, device, message", [
    ("flash", "cpu", "attention_backend 'flash' is invalid; allowed: sdpa, cudnn, xformers"),
    ("cudnn", "cpu", "attention_backend=cudnn needs a CUDA device, not cpu; use attention_backend=sdpa"),
])
def test_a_backend_that_cannot_run_is_refused_in_one_line(backend, device, message):
    with pytest.raises(ValueError, match=message) as info:
        check_attention_backend(backend, torch.device(device))
    assert "\n" not in str(info.value)


def test_cudnn_attention_is_refused_without_cudnn(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: False)
    with pytest.raises(ValueError, match="attention_backend=cudnn needs cuDNN, which this PyTorch build does not have"):
        check_attention_backend("cudnn", torch.device("cuda"))


# Every SDPA kernel but cuDNN's. The tests run under it: PyTorch's own choice may be cuDNN already (torch 2.11 on
# the H200 chose it for the UNet's shapes, 2026-12-04), and the `cudnn` processor must put cuDNN first anyway.
NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CUDNN_OP = "aten::_scaled_dot_product_cudnn_attention"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens, dim, cross_dim", [(1024, 320, None), (1024, 320, 768), (256, 640, None)])
def test_cudnn_attention_on_a_gpu_runs_cudnn_where_the_caller_excluded_it_and_agrees(tokens, dim, cross_dim):
    """The sd15 UNet's head widths (40 and 80: 8 heads), self- and cross-attention, forward and backward,
    against diffusers' processor on another kernel. (That the processor overrides a caller's exclusion of
    cuDNN is what this shows; that it puts cuDNN first where SDPA would choose another is not testable
    where SDPA prefers cuDNN already.)"""
    x = torch.randn(2, tokens, dim, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(2, 77, cross_dim, device="cuda", dtype=torch.bfloat16) if cross_dim else None
    results = {}
    for name, processor in (("default", AttnProcessor2_0()), ("cudnn", CudnnFirstAttnProcessor())):
        layer = attention_layer(dim, 8, processor, "cuda", torch.bfloat16, cross_dim)
        inputs = x.clone().requires_grad_()
        with sdpa_kernel(NOT_CUDNN), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = layer(inputs, context)
            out.float().square().mean().backward()
        ops = {event.name for event in prof.events()}
        results[name] = out.float(), inputs.grad.float(), ops
    assert CUDNN_OP in results["cudnn"][2]
    assert CUDNN_OP not in results["default"][2]
    for ours, theirs in zip(results["cudnn"][:2], results["default"][:2]):
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() < 0.02 * scale  # bf16: 8 bits of mantissa, differently summed


@pytest.mark.gpu
@needs_gpu
def test_compiled_unet_on_a_gpu_calls_cudnn_attention():
    """The priority is set inside the processor, so torch.compile must have traced it: under a caller's
    priority without cuDNN, the compiled code (no CUDA graph, so that the profiler sees its ops) calls cuDNN's
    attention, and the default's does not."""
    pipe = load_pipeline("tiny", "cuda", torch.bfloat16)
    ops = {}
    for backend in ("sdpa", "cudnn"):
        set_attention_backend(pipe, backend)
        torch._dynamo.reset()
        with sdpa_kernel(NOT_CUDNN):
            fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, compile=True, cuda_graph=False)
            fast(["a cat", "a dog"])  # compile
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                fast(["a cat", "a dog"])
        ops[backend] = {event.name for event in profile.events()}
    assert CUDNN_OP in ops["cudnn"]
    assert CUDNN_OP not in ops["sdpa"]


@pytest.mark.gpu
@needs_gpu
def test_fast_sampler_with_cudnn_attention_on_a_gpu_gives_the_defaults_images():
    """Eager UNet calls captured as one CUDA graph (the trainer's sample_cuda_graph, the graphed_calls_of_7
    rows' sampling), bf16: cuDNN's attention must be capturable. (Compiled: the test above.)"""
    pipe = load_pipeline("tiny", "cuda", torch.bfloat16)
    prompts, images = ["a cat", "a dog"], {}
    for backend in ("sdpa", "cudnn"):
        set_attention_backend(pipe, backend)
        fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=4, compile=False, cuda_graph=True)
        images[backend] = fast(prompts, generator=torch.Generator("cuda").manual_seed(0)).images.float()
    assert (images["cudnn"] - images["sdpa"]).abs().max().item() < 0.05  # check_claims' BF16_PIXEL_TOLERANCE


@pytest.mark.skipif(__import__("importlib").util.find_spec("xformers") is not None, reason="xformers is installed")
def test_set_attention_backend_xformers_without_xformers_is_one_line():
    with pytest.raises(ValueError, match=r"^attention_backend=xformers needs the xformers package, which is not "
                                         r"installed \(pip install xformers, or use attention_backend=sdpa\)$"):
        set_attention_backend(load_pipeline("tiny"), "xformers")
