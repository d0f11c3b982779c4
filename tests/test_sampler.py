"""Sampler parity with diffusers' LatentConsistencyModelPipeline and its log-probs, on the tiny model."""

import math

import pytest
import torch
from diffusers import LCMScheduler

from rlcm_fast.models import load_pipeline
from rlcm_fast.sampler import LCMSampler
from scheduler_swap import scheduler_swapped

PROMPTS = ["a cat", "great white shark, white shark, man-eater"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("horizon", [2, 4])
def test_images_equal_the_diffusers_pipeline(pipe, prediction_type, horizon):
    with scheduler_swapped(pipe, LCMScheduler, prediction_type=prediction_type):
        sampler = LCMSampler(pipe, horizon=horizon, guidance_scale=8.0, resolution=32)
        ours = sampler.sample(pipe.unet, PROMPTS, generator=torch.Generator().manual_seed(0)).images
        theirs = pipe(PROMPTS, num_inference_steps=horizon, guidance_scale=8.0, height=32, width=32,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_trajectory_shapes_and_final_step_flag(pipe):
    default = LCMSampler(pipe, horizon=4, resolution=32).sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(1))
    assert default.states.shape == (2, 4, 4, 16, 16) and default.log_probs.shape == (2, 3)
    reference = LCMSampler(pipe, horizon=4, resolution=32, train_final_step=True)
    full = reference.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(1))
    assert full.states.shape == (2, 5, 4, 16, 16) and full.log_probs.shape == (2, 4)
    # The extra action is noise after the last call: the image is the same.
    torch.testing.assert_close(full.images, default.images, atol=0, rtol=0)
    torch.testing.assert_close(full.states[:, :4], default.states, atol=0, rtol=0)


@pytest.mark.parametrize("train_final_step", [False, True])
def test_log_probs_equal_an_independent_float64_computation(pipe, train_final_step):
    sampler = LCMSampler(pipe, horizon=4, guidance_scale=8.0, resolution=32, train_final_step=train_final_step)
    trajectory = sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(2))
    alphas = pipe.scheduler.alphas_cumprod.double()
    embeds = sampler.prompt_embeddings(PROMPTS)
    w = sampler.guidance(2, embeds.dtype)
    actions = 4 if train_final_step else 3
    assert trajectory.log_probs.shape == (2, actions)
    for k in range(actions):
        # The extra final action's next timestep is t_{H-1}, LCMScheduler.step's rule past the end.
        t, t_next = int(sampler.timesteps[k]), int(sampler.timesteps[min(k + 1, 3)])
        x, x_next = trajectory.states[:, k].double(), trajectory.states[:, k + 1].double()
        with torch.no_grad():
            x0 = pipe.unet(x.float(), t, encoder_hidden_states=embeds, timestep_cond=w).sample.double()  # sample prediction
        c_skip = 0.25 / ((10 * t) ** 2 + 0.25)
        c_out = 10 * t / math.sqrt((10 * t) ** 2 + 0.25)
        mean = alphas[t_next].sqrt() * (c_out * x0 + c_skip * x)
        std = (1 - alphas[t_next]).sqrt()
        expected = (-((x_next - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
        torch.testing.assert_close(trajectory.log_probs[:, k].double(), expected, atol=1e-5, rtol=0)


def test_prompt_embeddings_are_cached(pipe):
    sampler = LCMSampler(pipe, horizon=2, resolution=32)
    calls = []
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda prompts, *a, **k: calls.append(list(prompts)) or encode(prompts, *a, **k)
    try:
        sampler.prompt_embeddings(["a", "b", "a"])
        sampler.prompt_embeddings(["b", "c"])
    finally:
        del pipe.encode_prompt
    assert calls == [["a"], ["b"], ["c"]]  # each distinct prompt once, on its own


def test_the_trainers_samplers_keep_a_bounded_number_of_prompt_embeddings():
    """A user's prompt file of 50k lines would have kept 6 GB of SD1.5's embeddings on the device (the bound's
    eviction itself: tests/test_fast_sampler.py)."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.sampler import MAX_CACHED_PROMPTS, policy_sampler

    for model, method in (("tiny", "rlcm"), ("tiny-sd", "ddpo")):
        cfg = resolve_config(model=model, overrides={"method": method})
        sampler = policy_sampler(load_pipeline(model, method=method), cfg)
        assert sampler.prompt_cache.max_prompts == MAX_CACHED_PROMPTS == 1024


def test_a_prompts_embedding_does_not_depend_on_the_batch_it_was_first_seen_in(pipe):
    """A resumed run meets its prompts in other batches than the uninterrupted run did; their embeddings
    must be the same to the bit, or the two runs drift apart."""
    from rlcm_fast.prompts import load_prompt_set

    animals = load_prompt_set("simple_animals")  # 45 prompts: batched, some embeddings differed by ~5e-7
    together = LCMSampler(pipe, horizon=2, resolution=32).prompt_embeddings(animals)
    one_by_one = LCMSampler(pipe, horizon=2, resolution=32)
    assert all(torch.equal(one_by_one.prompt_embeddings([p])[0], together[i]) for i, p in enumerate(animals))


def test_guidance_embedding_is_made_once_per_batch_size(pipe):
    from rlcm_fast.models import guidance_embedding

    sampler = LCMSampler(pipe, horizon=2, guidance_scale=6.0, resolution=32)
    first = sampler.guidance(3, torch.float32)
    assert first.shape == (3, pipe.unet.config.time_cond_proj_dim)
    torch.testing.assert_close(first, guidance_embedding(pipe, 6.0, 3, "cpu", torch.float32), atol=0, rtol=0)
    assert sampler.guidance(3, torch.float32) is first  # no new host-to-device copy per minibatch
    assert sampler.guidance(5, torch.float32).shape[0] == 5


def test_policy_sampler_takes_the_final_step_flag_and_step_backend_from_the_config(pipe):
    from rlcm_fast.config import resolve_config
    from rlcm_fast.sampler import policy_sampler

    cfg = resolve_config(model="tiny", overrides={"policy_step_backend": "reference", "train_final_step": True})
    sampler = policy_sampler(pipe, cfg)
    assert sampler.step_backend == "reference"
    assert sampler.train_final_step and sampler.trained_steps == cfg.horizon


def test_sample_without_decode_returns_no_images(pipe):
    """The trainer decodes later, in its own batches: decode=False must skip the VAE."""
    sampler = LCMSampler(pipe, horizon=2, resolution=32)
    trajectory = sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(0), decode=False)
    assert trajectory.images is None and trajectory.denoised.shape == (2, 4, 16, 16)


def test_resolution_defaults_to_the_unets_native_size(pipe):
    """The tiny model's VAE factor is 2, not 8: its native size is 16 latent pixels * 2 = 32."""
    sampler = LCMSampler(pipe, horizon=2)
    assert sampler.resolution == pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    trajectory = sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(0), decode=False)
    assert trajectory.states.shape == (2, 2, 4, 16, 16)


@pytest.mark.parametrize("setting", ["clip_sample", "thresholding"])
def test_a_clipping_or_thresholding_scheduler_is_refused(pipe, setting):
    """The Gaussian policy's mean is the unclipped one: its log-probs would not be the sampled actions'."""
    with scheduler_swapped(pipe, LCMScheduler, **{setting: True}), pytest.raises(ValueError) as caught:
        LCMSampler(pipe, horizon=2, resolution=32)
    assert str(caught.value) == ("LCMScheduler with clip_sample or thresholding is not supported by the policy step "
                                 "(its Gaussian policy has no clipped mean): set clip_sample=False and "
                                 "thresholding=False in the scheduler's config")


def recorded_encodings(pipe, monkeypatch):
    """The prompts pipe.encode_prompt is called with, one list per call."""
    calls = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompts, *a, **k: calls.append(list(prompts)) or
                        encode(prompts, *a, **k))
    return calls


def test_prompt_cache_keeps_the_most_recently_used_prompts(pipe, monkeypatch):
    """Least recently used, not first in: "a", used again before "c" came, stays; "b" is the one dropped."""
    from rlcm_fast.sampler import PromptEmbeddingCache

    calls = recorded_encodings(pipe, monkeypatch)
    cache = PromptEmbeddingCache(pipe, max_prompts=2)
    for prompts in (["a"], ["b"], ["a"], ["c"], ["a"]):
        cache(prompts)
    assert calls == [["a"], ["b"], ["c"]]


def test_prompt_cache_returns_a_batch_of_more_distinct_prompts_than_it_keeps(pipe, monkeypatch):
    """The bound is applied after the batch is stacked: every row comes back, and then only the bound is kept."""
    from rlcm_fast.sampler import PromptEmbeddingCache

    calls = recorded_encodings(pipe, monkeypatch)
    cache = PromptEmbeddingCache(pipe, max_prompts=1)
    embeds = cache(["a", "b", "c"])
    assert embeds.shape == (3, 77, pipe.unet.config.cross_attention_dim) and calls == [["a"], ["b"], ["c"]]
    assert not torch.equal(embeds[0], embeds[2])
    torch.testing.assert_close(cache(["c"])[0], embeds[2], atol=0, rtol=0)  # the one kept: not encoded again
    cache(["a"])
    assert calls == [["a"], ["b"], ["c"], ["a"]]


def test_guidance_embedding_is_made_per_dtype(pipe):
    """A bf16 call after a float32 one of the same batch size gets a bf16 embedding, not the cached float32 one."""
    sampler = LCMSampler(pipe, horizon=2, guidance_scale=6.0, resolution=32)
    assert sampler.guidance(3, torch.float32).dtype == torch.float32
    assert sampler.guidance(3, torch.bfloat16).dtype == torch.bfloat16
