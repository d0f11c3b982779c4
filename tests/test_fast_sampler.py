"""The drop-in fast sampler gives the pipeline's images (tiny model, CPU; eager and compiled)."""

import os

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from rlcm_fast import FastLCMSampler
from rlcm_fast.models import load_pipeline
from rlcm_fast.sampler import LCMSampler
from scheduler_swap import scheduler_swapped

PROMPTS = ["a cat", "great white shark, white shark, man-eater"]
BF16_PIXEL_TOLERANCE = 0.05  # of the [0, 1] range, as benchmarks/check_claims.py judges the sd15 sampler


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def pipeline_images(pipe, prompts, steps, seed, guidance=None):
    """The pipeline's images; with its own default guidance scale unless `guidance` is given."""
    guided = {} if guidance is None else {"guidance_scale": guidance}
    return pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt",
                **guided).images


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_fast_sampler_equals_the_pipeline(pipe, steps, prediction_type):
    with scheduler_swapped(pipe, LCMScheduler, prediction_type=prediction_type):
        fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=steps, guidance_scale=6.0)
        ours = fast(PROMPTS, generator=torch.Generator().manual_seed(3)).images
        theirs = pipeline_images(pipe, PROMPTS, steps, seed=3, guidance=6.0)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_fast_sampler_trajectory_matches_the_training_sampler(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=4, guidance_scale=8.0)  # the trainer's
    out = fast(PROMPTS, generator=torch.Generator().manual_seed(5), return_trajectory=True)
    reference = LCMSampler(pipe, horizon=4, resolution=32).sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.trajectory.states, reference.states, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.trajectory.log_probs, reference.log_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.images, reference.images, atol=1e-6, rtol=0)
    assert fast(PROMPTS).trajectory is None


# Inductor compiles the tiny UNet on a CPU in about a minute (61 s measured on 2 cores), too slow for
# every CI run: RLCM_FAST_SLOW_TESTS=1 runs it.
@pytest.mark.skipif(not os.environ.get("RLCM_FAST_SLOW_TESTS"), reason="slow: set RLCM_FAST_SLOW_TESTS=1")
def test_fast_sampler_compiled_on_cpu_equals_the_pipeline(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, compile=True)
    ours = fast(PROMPTS, generator=torch.Generator().manual_seed(7)).images
    theirs = pipeline_images(pipe, PROMPTS, 2, seed=7)
    assert (ours - theirs).abs().max().item() < 1e-4  # inductor reorders float32 arithmetic


@pytest.mark.parametrize("steps", [1, 4])
def test_fast_sampler_compiles_one_unet_call_and_the_decode_whatever_the_horizon(pipe, monkeypatch, steps):
    """Not the unrolled loop, whose compile time grows with H. torch.compile is recorded and skipped here,
    so the test runs in seconds; the slow test above and the GPU tests below run the real thing."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=steps, compile=True)
    assert compiled == [pipe.unet, fast.sampler.decode]
    ours = fast(PROMPTS, generator=torch.Generator().manual_seed(7), return_trajectory=True)
    torch.testing.assert_close(ours.images, pipeline_images(pipe, PROMPTS, steps, seed=7), atol=1e-5, rtol=0)
    assert ours.trajectory.states.shape[:2] == (2, steps)
    assert len(compiled) == 2  # calls compile nothing more


def test_fast_sampler_cuda_graph_needs_a_cuda_pipeline(pipe):
    assert not FastLCMSampler(pipe, batch_size=2, num_inference_steps=2).cuda_graph
    with pytest.raises(ValueError, match="cuda_graph=True needs the pipeline on a CUDA device; its UNet is on cpu"):
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, cuda_graph=True)


def test_fast_sampler_cuda_graph_refuses_accelerates_autocast_wrapper():
    """accelerate's prepare() with mixed precision wraps the forward in an autocast made with the cast cache on:
    inside a capture it would cache the weights' casts (test_cuda_graphs.py shows the stale casts)."""
    from accelerate import Accelerator

    from rlcm_fast.launch import forget_other_accelerator_state

    pipe = load_pipeline("tiny")
    forget_other_accelerator_state(True, "bf16")
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    accelerator.prepare(pipe.unet)
    with pytest.raises(ValueError, match="pass accelerator.unwrap_model\\(unet, keep_fp32_wrapper=False\\) first"):
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, cuda_graph=True)
    accelerator.unwrap_model(pipe.unet, keep_fp32_wrapper=False)
    with pytest.raises(ValueError, match="needs the pipeline on a CUDA device"):  # the wrapper is gone
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, cuda_graph=True)


def test_fast_sampler_refuses_other_shapes(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="3 prompts given; this sampler was built for batch_size=2"):
        fast(["a", "b", "c"])
    with pytest.raises(ValueError, match="latents of shape"):
        fast(PROMPTS, latents=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="num_inference_steps=0 is invalid"):
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=0)
    with pytest.raises(ValueError, match="only square"):
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, height=32, width=64)


def test_fast_sampler_takes_latents_of_the_pipelines_dtype_and_refuses_others(pipe):
    """Latents of another dtype would be captured as a second graph; diffusers' pipeline fails on them (its
    guidance embedding takes their dtype), so the sampler refuses them."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2)
    latents = torch.randn(fast.shape, generator=torch.Generator().manual_seed(2))
    ours = fast(PROMPTS, generator=torch.Generator().manual_seed(9), latents=latents).images
    theirs = pipe(PROMPTS, num_inference_steps=2, latents=latents, output_type="pt",
                  generator=torch.Generator().manual_seed(9)).images
    assert (ours - theirs).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="latents of dtype torch.float64 given; this sampler samples torch.float32"):
        fast(PROMPTS, latents=latents.double())


def test_a_bf16_pipelines_images_come_as_float32_close_to_the_pipelines():
    """README's promise: float32 images whatever the pipeline's dtype (the pipeline's own are bf16 here)."""
    pipe = load_pipeline("tiny", "cpu", torch.bfloat16)
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=4, compile=False, cuda_graph=False)
    ours = fast(PROMPTS, generator=torch.Generator().manual_seed(0)).images
    theirs = pipe(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    assert (ours - theirs.float()).abs().max().item() < BF16_PIXEL_TOLERANCE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [True, False])
def test_fast_sampler_cuda_graph_equals_the_pipeline_in_bf16(compile):
    pipe = load_pipeline("tiny", "cuda", torch.bfloat16)
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=4, compile=compile)
    assert fast.cuda_graph and fast.compiled == compile
    outputs = []
    for seed in (0, 1):  # the first call captures the graph, the second replays it with new inputs
        out = fast(PROMPTS[::-1] if seed else PROMPTS, generator=torch.Generator("cuda").manual_seed(seed),
                   return_trajectory=True)
        theirs = pipe(PROMPTS[::-1] if seed else PROMPTS, num_inference_steps=4,
                      generator=torch.Generator("cuda").manual_seed(seed), output_type="pt").images
        difference = (out.images.float() - theirs.float()).abs()
        # bf16: every UNet call rounds, and the first step's D = (x - sigma eps) / alpha multiplies that
        # by sigma/alpha ~ 14. Measured on an H200: largest 0.020 (eager) and 0.0215 (compiled) of [0, 1].
        assert difference.max().item() < BF16_PIXEL_TOLERANCE and difference.mean().item() < 0.01
        outputs.append((out.images.clone(), out))
    for kept, out in outputs:  # what a call returned is its own, not the graph's reused buffers
        assert torch.equal(kept, out.images)
    assert not torch.equal(outputs[0][1].trajectory.states, outputs[1][1].trajectory.states)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fast_sampler_cuda_graph_sees_in_place_weight_updates_under_autocast():
    """The graph reads the weights at replay; under autocast its captured casts must be of the current
    weights, not of the warm-up's (autocast's cast cache is off during capture)."""
    pipe = load_pipeline("tiny", "cuda", torch.float32)  # fp32 weights, cast to bf16 by autocast below
    # Autocast caches only the casts of fp32 leaf tensors that require grad (a trained LoRA's weights), and
    # load_pipeline freezes every weight: without this the cache would never be used, on or off.
    bias = pipe.unet.conv_out.bias
    bias.requires_grad_(True)
    assert bias.dtype == torch.float32 and bias.is_leaf
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=4, compile=False)

    def both(seed):
        generator = torch.Generator("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours = fast(PROMPTS, generator=generator.manual_seed(seed)).images
            theirs = pipe(PROMPTS, num_inference_steps=4, generator=generator.manual_seed(seed),
                          output_type="pt").images
        return ours.float(), theirs.float()

    before, _ = both(0)
    with torch.no_grad():
        bias.add_(0.5)  # an in-place update, as an optimizer step makes
    ours, theirs = both(0)
    assert (ours - theirs).abs().max().item() < 2e-2
    assert (ours - before).abs().max().item() > 0.05


def test_fast_sampler_sizes_are_the_pipelines(pipe):
    """One side given: the other is the native size, as in the pipeline. The sampler made a square of the given
    side (64 x 64 where pipe(width=64) gives 32 x 64); now that is refused, and the native side is taken."""
    for size in ({"height": 64, "width": 64}, {"height": 32}, {"width": 32}, {}):
        fast = FastLCMSampler(pipe, batch_size=1, num_inference_steps=1, **size)
        side = size.get("height", size.get("width", 32))  # 32: the tiny UNet's 16 latents times its VAE's 2
        assert fast.shape == (1, 4, side // 2, side // 2)
        ours = fast("a cat", generator=torch.Generator().manual_seed(0)).images
        theirs = pipe("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt",
                      **size).images
        assert ours.shape == theirs.shape == (1, 3, side, side) and (ours - theirs).abs().max().item() < 1e-5
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe, batch_size=1, num_inference_steps=1, width=64)
    assert str(caught.value) == ("width=64 alone would make a 32-by-64 image (the other side is the UNet's native "
                                 "32 px, as in the pipeline); only square images are supported: give height=64 and "
                                 "width=64")


@pytest.mark.parametrize("size, message", [
    ({"height": 30}, "height=30 is invalid: it must be a multiple of 8, at least 8"),
    ({"width": 36}, "width=36 is invalid: it must be a multiple of 8, at least 8"),
    ({"height": 0}, "height=0 is invalid: it must be a multiple of 8, at least 8"),
    ({"height": -8, "width": -8}, "height=-8 is invalid: it must be a multiple of 8, at least 8"),
])
def test_fast_sampler_refuses_sizes_the_pipeline_refuses(pipe, size, message):
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe, batch_size=1, num_inference_steps=1, **size)
    assert str(caught.value) == message


@pytest.mark.parametrize("prompt, shown", [(None, "None"), (3, "3"), (["a cat", None], "['a cat', None]")])
def test_fast_sampler_refuses_a_prompt_that_is_not_text(pipe, prompt, shown):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1)
    with pytest.raises(ValueError) as caught:
        fast(prompt)
    assert str(caught.value) == f"prompt={shown} is invalid: it must be a str or a sequence of str (or give prompt_embeds)"


class ClampingLCMScheduler(LCMScheduler):
    """A subclass that steps otherwise: it was accepted, and the sampler stepped as LCMScheduler does."""

    def step(self, *args, **kwargs):
        output = super().step(*args, **kwargs)
        output.denoised.clamp_(-0.1, 0.1)
        return output


@pytest.mark.parametrize("scheduler_class", [TCDScheduler, EulerDiscreteScheduler, ClampingLCMScheduler])
def test_fast_sampler_refuses_a_scheduler_that_is_not_an_lcm_scheduler(pipe, scheduler_class):
    """The sampler steps as LCMScheduler does: with another scheduler it drew other images (TCD, a subclass of
    LCMScheduler: 0.43 apart) or failed deep inside (Euler has no original_inference_steps)."""
    with scheduler_swapped(pipe, scheduler_class), pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=2)
    assert str(caught.value) == (f"pipe.scheduler is {scheduler_class.__name__}; FastLCMSampler samples as "
                                 "LCMScheduler does: set pipe.scheduler = LCMScheduler.from_config("
                                 "pipe.scheduler.config)")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_inference_steps": 51},
     "num_inference_steps=51 is invalid: it must be at most the scheduler's original_inference_steps=50 "
     "(or pass a larger original_inference_steps)"),
    # 0 was taken for "not given" and replaced by the scheduler's 50
    ({"original_inference_steps": 0},
     "original_inference_steps=0 is invalid: it must be an int in num_inference_steps..num_train_timesteps = 2..1000"),
    ({"original_inference_steps": 1001},
     "original_inference_steps=1001 is invalid: it must be an int in num_inference_steps..num_train_timesteps = "
     "2..1000"),
    ({"batch_size": 2.0}, "batch_size=2.0 is invalid: it must be an int >= 1"),
    ({"batch_size": "2"}, "batch_size='2' is invalid: it must be an int >= 1"),
    ({"num_inference_steps": 2.5}, "num_inference_steps=2.5 is invalid: it must be an int >= 1"),
    ({"height": 64.0}, "height=64.0 is invalid: it must be an int"),
    ({"guidance_scale": "8"}, "guidance_scale='8' is invalid: it must be a finite number"),
    ({"guidance_scale": float("nan")}, "guidance_scale=nan is invalid: it must be a finite number"),
    # a TypeError deep in torch at the first call
    ({"guidance_scale": torch.tensor([5.0])}, "guidance_scale=tensor([5.]) is invalid: it must be a finite number"),
    # a string from a config file was true: a minutes-long CPU compile
    ({"compile": "false"}, "compile='false' is invalid: it must be True, False or None (the device's default)"),
    ({"cuda_graph": 0}, "cuda_graph=0 is invalid: it must be True, False or None (the device's default)"),
    # bool is an int to Python: True was a batch of 1, a guidance of 1.0
    ({"batch_size": True}, "batch_size=True is invalid: it must be an int >= 1"),
    ({"guidance_scale": True}, "guidance_scale=True is invalid: it must be a finite number"),
    ({"original_inference_steps": 50.0},
     "original_inference_steps=50.0 is invalid: it must be an int in num_inference_steps..num_train_timesteps = "
     "2..1000"),
    ({"height": 64, "width": 32}, "height=64 and width=32: only square images are supported"),
    ({"height": 64},
     "height=64 alone would make a 32-by-64 image (the other side is the UNet's native 32 px, as in the pipeline); "
     "only square images are supported: give height=64 and width=64"),
])
def test_fast_sampler_names_the_bad_argument_in_one_line(pipe, kwargs, message):
    """Each of these failed deep inside torch or Python with a message naming no argument, or was accepted."""
    arguments = {"batch_size": 2, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe, **arguments)(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert str(caught.value) == message


def test_fast_sampler_takes_the_pipelines_generators_and_refuses_what_the_pipeline_refuses(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2)
    ours = fast(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images
    theirs = pipe(PROMPTS, num_inference_steps=2, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images
    assert (ours - theirs).abs().max().item() < 1e-5
    # The pipeline refuses a list of another length; the sampler silently used a list of 1 for the whole batch.
    with pytest.raises(ValueError) as caught:
        fast(PROMPTS, generator=[torch.Generator()])
    assert str(caught.value) == ("generator is a list of 1; this sampler was built for batch_size=2: give one "
                                 "torch.Generator or a list of 2")
    # A tuple is taken as the list it is in the pipeline.
    as_tuple = fast(PROMPTS, generator=tuple(torch.Generator().manual_seed(s) for s in (4, 5))).images
    torch.testing.assert_close(as_tuple, ours, atol=0, rtol=0)
    with pytest.raises(ValueError) as caught:  # was AttributeError: 'int' object has no attribute 'device'
        fast(PROMPTS, generator=3)
    assert str(caught.value) == "generator=3 is invalid: it must be a torch.Generator, a list of 2 of them, or None"
    # was "latents of dtype float32 given; this sampler samples torch.float32"
    with pytest.raises(ValueError) as caught:
        fast(PROMPTS, latents=np.zeros(fast.shape, np.float32))
    assert str(caught.value) == "latents of type ndarray given; it must be a torch.Tensor of shape (2, 4, 16, 16)"


def test_fast_sampler_refuses_a_pipeline_moved_or_cast_after_it_was_built():
    """Its cached prompt embeddings and guidance embedding keep the old dtype: the next call failed deep in a
    matmul ("expected m1 and m2 to have the same dtype")."""
    pipe = load_pipeline("tiny")
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1)
    fast(PROMPTS)
    pipe.to(torch.bfloat16)
    with pytest.raises(RuntimeError) as caught:
        fast(PROMPTS)
    assert str(caught.value) == ("the pipeline's UNet is now torch.bfloat16 on cpu; this sampler was built for "
                                 "torch.float32 on cpu: build a new FastLCMSampler after moving or casting the "
                                 "pipeline")


def test_fast_sampler_refuses_guidance_a_unet_without_a_guidance_embedding_cannot_take():
    """SD1.5 + LCM-LoRA: no guidance embedding, so the sampler does no guidance at all, while diffusers' Stable
    Diffusion pipeline does classifier-free guidance above 1: guidance_scale=8.0 silently meant 1.0."""
    pipe = load_pipeline("tiny-sd", method="ddpo")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, guidance_scale=8.0)
    assert str(caught.value) == ("guidance_scale=8.0 is invalid for this UNet: it has no guidance embedding "
                                 "(time_cond_proj_dim is None, e.g. SD1.5 + LCM-LoRA) and this sampler does no "
                                 "classifier-free guidance; pass guidance_scale=1.0")
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, guidance_scale=1.0)
    ours = fast(PROMPTS, generator=torch.Generator().manual_seed(2)).images
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(2),
                  output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-5


def test_fast_sampler_takes_prompt_embeds_as_the_pipeline_does(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2)
    embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0] * 1.5  # e.g. weighted prompts
    out = fast(prompt_embeds=embeds, generator=torch.Generator().manual_seed(6), return_trajectory=True)
    theirs = pipe(prompt_embeds=embeds, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(6)).images
    assert (out.images - theirs).abs().max().item() < 1e-5
    assert out.trajectory.prompts is None and out.trajectory.log_probs.shape == (2, 1)
    with pytest.raises(ValueError) as caught:
        fast(PROMPTS, prompt_embeds=embeds)
    assert str(caught.value) == "give prompt or prompt_embeds, not both"
    with pytest.raises(ValueError) as caught:
        fast(prompt_embeds=embeds[:1])
    assert str(caught.value) == ("prompt_embeds of shape (1, 77, 32) given; this sampler takes (batch_size, tokens, "
                                 "cross_attention_dim) = (2, tokens, 32)")
    # Long-prompt weighting gives more than the tokenizer's 77 tokens: the pipeline takes them (they were refused).
    long = torch.cat([embeds, torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))], dim=1)
    ours = fast(prompt_embeds=long, generator=torch.Generator().manual_seed(6)).images
    theirs = pipe(prompt_embeds=long, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(6)).images
    assert (ours - theirs).abs().max().item() < 1e-5 and (ours - out.images).abs().max().item() > 1e-3


def test_fast_sampler_refuses_a_call_after_the_unet_was_replaced(pipe):
    """It kept sampling the old UNet (0.64 from the pipeline's images, without a word)."""
    import copy

    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1)
    original = pipe.unet
    try:
        pipe.unet = copy.deepcopy(original)
        with pytest.raises(RuntimeError) as caught:
            fast(PROMPTS)
    finally:
        pipe.unet = original
    assert str(caught.value) == ("pipe.unet was replaced after this sampler was built, which samples the UNet it was "
                                 "built with: build a new FastLCMSampler")
    with pytest.raises(ValueError) as caught:
        fast(PROMPTS, return_trajectory="no")
    assert str(caught.value) == "return_trajectory='no' is invalid: it must be True or False"
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe.unet, batch_size=2, num_inference_steps=1)
    assert str(caught.value) == ("pipe is a UNet2DConditionModel; FastLCMSampler takes a diffusers "
                                 "LatentConsistencyModelPipeline (its unet, vae and scheduler)")


def test_fast_sampler_refuses_an_image_to_image_pipeline(pipe):
    """It has a UNet, a VAE and an LCMScheduler too, but starts from the caller's image: the sampler would have
    given text-to-image results for it."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline

    components = dict(pipe.components)
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(LatentConsistencyModelImg2ImgPipeline(**components), batch_size=2, num_inference_steps=2)
    assert str(caught.value) == (
        "pipe is a LatentConsistencyModelImg2ImgPipeline, which starts from an image; FastLCMSampler samples "
        "text-to-image, as LatentConsistencyModelPipeline does: build one from the same components "
        "(LatentConsistencyModelPipeline(**pipe.components))")
    assert FastLCMSampler(LatentConsistencyModelPipeline(**components), batch_size=2, num_inference_steps=2)


def test_fast_sampler_calls_do_not_walk_the_unets_modules(pipe, monkeypatch):
    """diffusers' unet.device and unet.dtype walk every module (2.8 and 3.3 ms on the sd15 UNet, on a 2-core
    CPU); a call asked for the device once per random draw, H times, on the host before the graph launched."""
    from diffusers.models import modeling_utils

    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=4)
    fast(PROMPTS, generator=torch.Generator().manual_seed(0))  # the first call caches the embeddings
    walks = []
    for name in ("get_parameter_device", "get_parameter_dtype"):
        walk = getattr(modeling_utils, name)
        monkeypatch.setattr(modeling_utils, name, lambda module, walk=walk: walks.append(module) or walk(module))
    fast(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert not [module for module in walks if module is pipe.unet]


def test_fast_sampler_keeps_a_bounded_number_of_prompt_embeddings(pipe, monkeypatch):
    """Every distinct prompt's embedding was kept for the sampler's life (100k distinct prompts: 12 GB of sd15's
    bf16 embeddings on the GPU). Only the most recently used are kept now."""
    monkeypatch.setattr(FastLCMSampler, "PROMPT_CACHE_SIZE", 2)
    encoded = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompt, *args, **kwargs: encoded.append(prompt) or
                        encode(prompt, *args, **kwargs))
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1)
    for prompts in (["a", "b"], ["c", "d"], ["a", "b"], ["a", "b"], ["b", "e"]):
        ours = fast(prompts, generator=torch.Generator().manual_seed(1)).images
    assert encoded == [["a"], ["b"], ["c"], ["d"], ["a"], ["b"], ["e"]]  # a and b again after c and d
    theirs = pipe(["b", "e"], num_inference_steps=1, generator=torch.Generator().manual_seed(1),
                  output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-5


def test_fast_sampler_names_the_scheduler_config_when_its_original_inference_steps_is_bad(pipe):
    """The message named an argument the user never passed (original_inference_steps=2000)."""
    with scheduler_swapped(pipe, LCMScheduler, original_inference_steps=2000), pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe, batch_size=2, num_inference_steps=2)
    assert str(caught.value) == ("the scheduler's config has original_inference_steps=2000, more than its "
                                 "num_train_timesteps=1000 (diffusers' pipeline refuses it too); pass "
                                 "original_inference_steps")


def test_a_horizon_of_all_the_schedulers_original_steps_is_allowed(pipe):
    """As in the pipeline: H may equal the scheduler's original_inference_steps (every step of its schedule)."""
    original = pipe.scheduler.config.original_inference_steps
    pipe.scheduler.register_to_config(original_inference_steps=4)
    try:
        assert FastLCMSampler(pipe, batch_size=1, num_inference_steps=4, compile=False, cuda_graph=False).horizon == 4
    finally:
        pipe.scheduler.register_to_config(original_inference_steps=original)


def test_a_unet_without_a_guidance_embedding_samples_without_guidance_by_default():
    """Stable Diffusion with an LCM scheduler (an LCM-LoRA's set-up): the pipeline's default 8.5 would be refused
    (it has no embedding to take it); no guidance_scale means none."""
    sd = load_pipeline("tiny-sd", method="ddpo")
    sd.scheduler = LCMScheduler.from_config(sd.scheduler.config)
    fast = FastLCMSampler(sd, batch_size=1, num_inference_steps=2, compile=False, cuda_graph=False)
    assert fast.sampler.guidance_scale == 1.0


def test_any_guidance_above_1_is_refused_without_a_guidance_embedding():
    """1.2 would be ignored as 8.0 would (diffusers' SD pipeline would do classifier-free guidance at 1.2)."""
    sd = load_pipeline("tiny-sd", method="ddpo")
    sd.scheduler = LCMScheduler.from_config(sd.scheduler.config)
    with pytest.raises(ValueError, match=r"guidance_scale=1\.2 is invalid for this UNet"):
        FastLCMSampler(sd, batch_size=2, num_inference_steps=2, guidance_scale=1.2)
    FastLCMSampler(sd, batch_size=2, num_inference_steps=2, guidance_scale=1.0)


def test_prompt_embeds_without_tokens_are_refused(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1, compile=False, cuda_graph=False)
    with pytest.raises(ValueError) as caught:
        fast(prompt_embeds=torch.zeros(2, 0, pipe.unet.config.cross_attention_dim))
    assert str(caught.value).startswith("prompt_embeds of shape (2, 0, 32) given")


def test_the_trajectory_says_each_rows_prompt(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1, compile=False, cuda_graph=False)
    out = fast(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert out.trajectory.prompts == ["a cat", "a dog"]
    one = fast("a bird", generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert one.trajectory.prompts == ["a bird", "a bird"]


def test_fast_sampler_encodes_again_after_its_prompt_cache_is_cleared(pipe):
    """After the text encoder's weights change, the cached embeddings are stale until clear_prompt_cache()."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2)
    fast(PROMPTS, generator=torch.Generator().manual_seed(0))
    weight = pipe.text_encoder.get_input_embeddings().weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        stale = fast(PROMPTS, generator=torch.Generator().manual_seed(0)).images
        fast.clear_prompt_cache()
        ours = fast(PROMPTS, generator=torch.Generator().manual_seed(0)).images
        theirs = pipeline_images(pipe, PROMPTS, 2, seed=0)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (stale - theirs).abs().max().item() > 1e-3


def test_a_bf16_pipelines_initial_latents_are_drawn_in_bf16_as_the_pipelines(pipe):
    """The pipeline draws x_0 in its prompt embeddings' dtype: drawn in float32, x_0 keeps bits the pipeline's
    bf16 draw has not (and on a CPU a bf16 stream is not always float32's rounded)."""
    from diffusers.utils.torch_utils import randn_tensor

    bf16 = load_pipeline("tiny", "cpu", torch.bfloat16)
    fast = FastLCMSampler(bf16, batch_size=2, num_inference_steps=2, compile=False, cuda_graph=False)
    out = fast(PROMPTS, generator=torch.Generator().manual_seed(4), return_trajectory=True)
    expected = randn_tensor(fast.shape, generator=torch.Generator().manual_seed(4), dtype=torch.bfloat16).float()
    torch.testing.assert_close(out.trajectory.states[:, 0], expected, atol=0, rtol=0)


def test_a_horizon_of_1_has_no_actions(pipe):
    """One UNet call and no noise: the trajectory is x_0 alone, with an empty (B, 0) row of log-probs."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1, compile=False, cuda_graph=False)
    out = fast(PROMPTS, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert out.trajectory.states.shape == (2, 1, 4, 16, 16)
    assert out.trajectory.log_probs.shape == (2, 0) and out.trajectory.log_probs.dtype == torch.float32


def test_float32_prompt_embeds_are_cast_for_a_bf16_pipeline_as_the_pipeline_does():
    """The pipeline's encode_prompt casts given embeddings to the text encoder's dtype and device."""
    bf16 = load_pipeline("tiny", "cpu", torch.bfloat16)
    fast = FastLCMSampler(bf16, batch_size=2, num_inference_steps=2, compile=False, cuda_graph=False)
    embeds = bf16.encode_prompt(PROMPTS, "cpu", 1, False)[0].float() * 1.5
    ours = fast(prompt_embeds=embeds, generator=torch.Generator().manual_seed(6)).images
    theirs = bf16(prompt_embeds=embeds, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(6)).images
    assert (ours - theirs.float()).abs().max().item() < BF16_PIXEL_TOLERANCE


def test_prompt_embeds_of_another_width_are_refused_in_one_line(pipe):
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1, compile=False, cuda_graph=False)
    with pytest.raises(ValueError) as caught:
        fast(prompt_embeds=torch.zeros(2, 77, 16))
    assert str(caught.value) == ("prompt_embeds of shape (2, 77, 16) given; this sampler takes (batch_size, tokens, "
                                 "cross_attention_dim) = (2, tokens, 32)")
