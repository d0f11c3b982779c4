"""Mutation-testing round 51b (sampler, fast_sampler), a third round over the modules of rounds 43a and 47d by
another helper with its own mutants, aimed at the trajectory's stored states and latents, the random draws'
dtype, the captured rollout kept per UNet, what the fast sampler returns through a replayed graph, and its
argument checks: those that survived the modules' tests (test_sampler, test_fast_sampler, test_cuda_graphs,
test_ddpo's sampler test and rounds 43a and 47d) are killed here, each test naming its mutant. All are CPU-only,
seeded and fast: the tiny model at 16-32 px, with stand-ins for a replayed CUDA graph as test_cuda_graphs has."""

import collections
import copy

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from rlcm_fast import FastLCMSampler
from rlcm_fast import sampler as sampler_module
from rlcm_fast.cuda_graphs import CaptureError
from rlcm_fast.models import load_pipeline
from rlcm_fast.sampler import LCMSampler, PromptEmbeddingCache
from test_cuda_graphs import ReusedBuffers

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def bf16_pipe():
    return load_pipeline("tiny", "cpu", torch.bfloat16)


def pipeline_draws(shape, seed, actions, dtype):
    """x_0 and the noise of each action as diffusers' pipeline draws them from one seeded generator: in order,
    each with randn_tensor in the prompt embeddings' dtype."""
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, dtype=dtype)
    return latents, [randn_tensor(shape, generator=generator, dtype=dtype) for _ in range(actions)]


# -- sampler ---------------------------------------------------------------------------------------------------

def test_a_bf16_samplers_own_draws_are_the_pipelines_bf16_draws(bf16_pipe):
    """Mutants: LCMSampler.sample draws x_0, or the noises, in float32 instead of the prompt embeddings' dtype.
    Under bf16 the pipeline draws both in bf16 (a bf16 stream is not float32's rounded on a CPU): a trajectory
    sampled from a generator must be the one sampled from the pipeline's own draws, to the bit, or the trainer's
    samples are not the pipeline's for the same seed."""
    sampler = LCMSampler(bf16_pipe, 3, resolution=16)
    drawn = sampler.sample(bf16_pipe.unet, PROMPTS, torch.Generator().manual_seed(11), decode=False)
    latents, noises = pipeline_draws((2, 4, 8, 8), seed=11, actions=2, dtype=torch.bfloat16)
    given = sampler.sample(bf16_pipe.unet, PROMPTS, latents=latents, noises=noises, decode=False)
    assert drawn.states.dtype == torch.float32 and drawn.states.shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(drawn.states, given.states, atol=0, rtol=0)
    torch.testing.assert_close(drawn.log_probs, given.log_probs, atol=0, rtol=0)


def test_a_trajectorys_denoised_latent_is_the_last_calls_d_its_image_is_decoded_from(pipe):
    """Mutant: LCMSampler.sample stores Trajectory(denoised=states[:, -1]), the last state x_{H-1}, instead of the
    last UNet call's D_{H-1}. The trainer samples with decode=False and decodes trajectory.denoised later for the
    rewards: that image must be the one sample(decode=True) gives (the pipeline's), not a noisy latent's."""
    sampler = LCMSampler(pipe, 3, resolution=16)
    later = sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(12), decode=False)
    now = sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(12))
    assert later.images is None
    torch.testing.assert_close(sampler.decode(later.denoised), now.images, atol=0, rtol=0)
    assert (later.denoised - later.states[:, -1]).abs().max().item() > 1e-2


def test_the_rollout_is_captured_once_per_unet_and_replayed_after(pipe, monkeypatch):
    """Mutant: `_rollout_replayed` makes a new CapturedCall at every call instead of keeping one per UNet. On CUDA
    each call would then warm up and capture the whole H-step loop again (seconds, and a graph's memory, per
    sampling batch) instead of replaying it. A second UNet (the trainer's policy next to its base) gets its own."""
    monkeypatch.setattr(sampler_module, "CapturedCall", ReusedBuffers)
    ReusedBuffers.made, ReusedBuffers.calls = [], []
    sampler = LCMSampler(pipe, 2, resolution=16)
    sampler.cuda_graph = True  # as on a CUDA device
    other = copy.deepcopy(pipe.unet)
    for seed, unet in ((1, pipe.unet), (2, pipe.unet), (3, other), (4, pipe.unet)):
        sampler.sample(unet, PROMPTS, torch.Generator().manual_seed(seed), decode=False)
    assert [call.replays for call in ReusedBuffers.made] == [3, 1]
    assert set(sampler._captured_rollouts) == {pipe.unet, other}


def test_a_negative_prompt_cache_bound_is_refused_in_one_line(pipe):
    """Found next to the mutants of the cache's eviction (`>` -> `>=`, popitem's end): the bound is never checked.
    max_prompts=-1 (LCMSampler's max_cached_prompts, FastLCMSampler.PROMPT_CACHE_SIZE) empties the cache and
    then pops from the empty dict: a KeyError traceback at the first call instead of the one-line ValueError
    naming the value and what is allowed; 0 (keep nothing) and None (keep all) are valid. (Mended in round 51b:
    refused when the cache is made.)"""
    assert PromptEmbeddingCache(pipe, max_prompts=0)(PROMPTS).shape[0] == 2
    assert PromptEmbeddingCache(pipe, max_prompts=None)(PROMPTS).shape[0] == 2
    with pytest.raises(ValueError) as caught:
        PromptEmbeddingCache(pipe, max_prompts=-1)  # at its making, not at the first call
    assert str(caught.value) == ("max_prompts=-1 is invalid: the prompt cache's bound must be an int >= 0, or None "
                                 "to keep every prompt")


# -- fast_sampler: what a call returns through a replayed graph --------------------------------------------------

def replaying(fast):
    """The fast sampler as on CUDA with cuda_graph=True, its graph a ReusedBuffers stand-in."""
    fast._replay = ReusedBuffers(fast._sample_once)
    fast.cuda_graph = True
    return fast


def test_what_a_replayed_fast_sampler_returns_is_the_callers_own(pipe):
    """Mutants: FastLCMSampler.__call__ without `images.clone()` under a graph, or its trajectory's states or
    denoised without `.clone()`. A replay overwrites the graph's output buffers: a caller keeping one batch's
    images and trajectory (a list of samples, an RL buffer) would see them turn into the next call's."""
    fast = replaying(FastLCMSampler(pipe, batch_size=2, num_inference_steps=3, compile=False, cuda_graph=False))
    first = fast(PROMPTS, generator=torch.Generator().manual_seed(21), return_trajectory=True)
    kept = [t.clone() for t in (first.images, first.trajectory.states, first.trajectory.log_probs,
                                first.trajectory.denoised)]
    second = fast(PROMPTS, generator=torch.Generator().manual_seed(22), return_trajectory=True)
    assert (second.images - kept[0]).abs().max().item() > 1e-3
    for now, then in zip((first.images, first.trajectory.states, first.trajectory.log_probs,
                          first.trajectory.denoised), kept):
        torch.testing.assert_close(now, then, atol=0, rtol=0)


def test_a_fast_samplers_trajectory_carries_its_images(pipe):
    """Mutant: the returned Trajectory made with images=None. With return_trajectory the trajectory is what RL
    code keeps (Trajectory.images: the (B, 3, H, W) images in [0, 1]): it must hold the call's images, as the
    trainer's sampler's does, not leave the rewards without them."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, guidance_scale=8.0, compile=False,
                          cuda_graph=False)
    out = fast(PROMPTS, generator=torch.Generator().manual_seed(23), return_trajectory=True)
    reference = LCMSampler(pipe, 2, resolution=32).sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(23))
    assert out.trajectory.images is not None
    torch.testing.assert_close(out.trajectory.images, out.images, atol=0, rtol=0)
    torch.testing.assert_close(out.trajectory.images, reference.images, atol=1e-6, rtol=0)


def test_a_failed_capture_tells_how_to_sample_without_a_graph(pipe):
    """Mutant: `_sample` no longer adds its hint to a CaptureError. A capture that fails (a UNet that synchronises
    with the host) must say in its one line how to go on: FastLCMSampler(..., cuda_graph=False)."""
    class FailingCapture:
        def __call__(self, *inputs):
            raise CaptureError("CUDA-graph capture failed (RuntimeError: operation not permitted when stream is "
                               "capturing)")

    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, compile=False, cuda_graph=False)
    fast._replay, fast.cuda_graph = FailingCapture(), True
    with pytest.raises(CaptureError) as caught:
        fast(PROMPTS, generator=torch.Generator().manual_seed(0))
    assert str(caught.value) == ("CUDA-graph capture failed (RuntimeError: operation not permitted when stream is "
                                 "capturing); FastLCMSampler(..., cuda_graph=False) samples without a graph")


# -- fast_sampler: the random draws ------------------------------------------------------------------------------

def test_a_bf16_fast_samplers_noises_are_the_pipelines_bf16_draws(bf16_pipe):
    """Mutant: FastLCMSampler draws the step noises in float32 instead of the prompt embeddings' dtype. The
    pipeline's LCMScheduler.step draws each noise in bf16 for a bf16 pipeline: the fast sampler's trajectory must
    be the one of those very draws (to the bit), not of float32 noises that only round close to them."""
    fast = FastLCMSampler(bf16_pipe, batch_size=2, num_inference_steps=3, compile=False, cuda_graph=False)
    out = fast(PROMPTS, generator=torch.Generator().manual_seed(13), return_trajectory=True)
    latents, noises = pipeline_draws(fast.shape, seed=13, actions=2, dtype=torch.bfloat16)
    given = fast.sampler.sample(bf16_pipe.unet, PROMPTS, latents=latents, noises=noises, decode=False)
    torch.testing.assert_close(out.trajectory.states, given.states, atol=0, rtol=0)
    torch.testing.assert_close(out.trajectory.log_probs, given.log_probs, atol=0, rtol=0)


# -- fast_sampler: argument checks -------------------------------------------------------------------------------

def test_a_generator_list_with_something_else_in_it_is_refused_in_one_line(pipe):
    """Mutants: the generator list taken when any (not all) of its items is a torch.Generator, or any list let
    past the type check. A list of 2 with an int in it failed deep in diffusers' randn_tensor ("'int' object has
    no attribute 'device'"); it must be the one-line ValueError naming the argument and what is allowed."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, compile=False, cuda_graph=False)
    with pytest.raises(ValueError, match=r"^generator=\[<torch\._C\.Gen\.\.\.x[0-9a-f]+>, 3\] is invalid: "
                                         r"it must be a torch\.Generator, a list of 2 of them, or None$"):
        fast(PROMPTS, generator=[torch.Generator().manual_seed(0), 3])


def test_fewer_prompts_than_the_batch_are_refused_in_one_line(pipe):
    """Mutant: `len(prompts) != batch_size` -> `>`: one prompt in a list for a batch of 2 was let through to fail
    inside the UNet with a shape error. The pipeline would make one image of it; the sampler, built for 2, must
    say how many prompts it got and which batch size it takes."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, compile=False, cuda_graph=False)
    with pytest.raises(ValueError) as caught:
        fast(["a cat"], generator=torch.Generator().manual_seed(0))
    assert str(caught.value) == "1 prompts given; this sampler was built for batch_size=2"


def test_latents_of_another_batch_size_are_refused_in_one_line(pipe):
    """Mutant: the latents' shape check reduced to their per-image shape. Latents for 1 image given to a sampler
    of 2 must be refused naming both shapes, not broadcast or failed deep in the UNet."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=2, compile=False, cuda_graph=False)
    with pytest.raises(ValueError) as caught:
        fast(PROMPTS, latents=torch.zeros(1, 4, 16, 16))
    assert str(caught.value) == "latents of shape (1, 4, 16, 16) given; this sampler samples (2, 4, 16, 16)"


@pytest.mark.parametrize("shape", [(2, 32), (2, 77, 32, 1)])
def test_prompt_embeds_of_another_rank_are_refused_in_one_line(pipe, shape):
    """Mutant: `len(shape) != 3` dropped from _given_embeddings' check. 2-D embeddings (one vector per prompt) or
    4-D ones matched its checked dimensions and went on to fail deep inside the UNet's attention; they must be
    the one-line ValueError naming the shape given and the (batch_size, tokens, cross_attention_dim) taken."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1, compile=False, cuda_graph=False)
    with pytest.raises(ValueError) as caught:
        fast(prompt_embeds=torch.zeros(shape))
    assert str(caught.value) == (f"prompt_embeds of shape {shape} given; this sampler takes (batch_size, tokens, "
                                 "cross_attention_dim) = (2, tokens, 32)")


def test_any_sequence_of_prompts_is_taken_as_the_error_message_says(pipe):
    """Mutant: the prompts' check narrowed from any Sequence to list or tuple. The refusal says "a str or a sequence
    of str": a sequence that is neither (a collections.UserList, a prompt set's own list type) must be sampled as
    the same prompts in a list are, not refused."""
    fast = FastLCMSampler(pipe, batch_size=2, num_inference_steps=1, compile=False, cuda_graph=False)
    ours = fast(collections.UserList(PROMPTS), generator=torch.Generator().manual_seed(24), return_trajectory=True)
    theirs = fast(PROMPTS, generator=torch.Generator().manual_seed(24))
    assert ours.trajectory.prompts == PROMPTS
    torch.testing.assert_close(ours.images, theirs.images, atol=0, rtol=0)
