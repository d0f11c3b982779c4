"""The tiny preset's trained UNet: its data, its training code, and the shipped weights' behaviour."""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from safetensors import safe_open

from rlcm_fast.models import TINY_UNET_WEIGHTS, build_tiny_pipeline, build_untrained_tiny_pipeline, guidance_embedding
from rlcm_fast.rewards import make_reward
from rlcm_fast.sampler import LCMSampler
from rlcm_fast.tiny_pretraining import RECIPE, TEXTURE_STRENGTH, checkerboard, pretrain_denoiser, texture_latents


def test_texture_latents_are_a_flat_colour_with_or_without_a_checkerboard():
    latents = texture_latents(64, torch.Generator().manual_seed(0))
    assert latents.shape == (64, 4, 16, 16)
    board = checkerboard(4, 16)
    assert board.abs().eq(1).all() and board[0, 0, 0] == -board[0, 0, 1] == -board[1, 0, 0]
    colour = latents.mean(dim=(2, 3), keepdim=True)  # the checkerboard sums to zero over a channel
    strength = ((latents - colour) * board).mean(dim=(1, 2, 3))
    torch.testing.assert_close(latents, colour + strength.view(-1, 1, 1, 1) * board)
    checkered = strength > TEXTURE_STRENGTH / 2
    torch.testing.assert_close(strength, TEXTURE_STRENGTH * checkered.float())
    assert 16 < int(checkered.sum()) < 48  # about half of each kind
    assert colour.std() > 0.5  # colours differ between latents and channels


def denoising_error(pipe, timestep: int, seed: int = 1) -> float:
    """MSE of the UNet's prediction of clean texture latents at one timestep of the schedule."""
    generator = torch.Generator().manual_seed(seed)
    clean = texture_latents(32, generator)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = pipe.scheduler.add_noise(clean, noise, torch.full((32,), timestep))
    embeds, _ = pipe.encode_prompt(["a cat"] * 32, "cpu", 1, False)
    with torch.no_grad():
        predicted = pipe.unet(noisy, timestep, encoder_hidden_states=embeds,
                              timestep_cond=guidance_embedding(pipe, 8.0, 32, "cpu", torch.float32)).sample
    return float((predicted - clean).square().mean())


def test_a_few_pretraining_steps_lower_the_denoising_loss():
    pipe = build_untrained_tiny_pipeline()
    before = denoising_error(pipe, 259)
    losses = pretrain_denoiser(pipe, steps=40, batch_size=8, learning_rate=2e-3, seed=0)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    # Measured: the error at t=259 goes from 0.72 (the untrained UNet) to 0.29.
    assert denoising_error(pipe, 259) < 0.5 * before


def test_pretraining_refuses_a_scheduler_that_does_not_predict_samples():
    pipe = build_untrained_tiny_pipeline()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type is 'epsilon'"):
        pretrain_denoiser(pipe, steps=1, batch_size=2, learning_rate=1e-3, seed=0)


def test_the_tiny_preset_carries_the_shipped_unet_trained_by_this_recipe():
    with safe_open(TINY_UNET_WEIGHTS, "pt") as weights:
        metadata = weights.metadata()
        shipped = {name: weights.get_tensor(name) for name in weights.keys()}
    assert {key: metadata[key] for key in RECIPE} == {key: str(value) for key, value in RECIPE.items()}
    state = build_tiny_pipeline().unet.state_dict()
    assert shipped.keys() == state.keys()
    assert all(torch.equal(state[name], shipped[name].float()) for name in shipped)


def test_the_shipped_unet_denoises_textures_far_better_than_the_untrained_one():
    trained, untrained = denoising_error(build_tiny_pipeline(), 259), denoising_error(build_untrained_tiny_pipeline(), 259)
    # Measured: trained 0.020, untrained 0.72.
    assert trained < 0.1 < 0.4 < untrained


def test_tiny_samples_differ_in_jpeg_size():
    """What RL on the JPEG rewards needs: samples whose size differs, more than the untrained UNet's do."""
    sizes = {}
    for name, pipe in (("trained", build_tiny_pipeline()), ("untrained", build_untrained_tiny_pipeline())):
        trajectory = LCMSampler(pipe, horizon=4, resolution=32).sample(
            pipe.unet, ["a cat", "a dog"] * 16, generator=torch.Generator().manual_seed(0))
        sizes[name] = make_reward("jpeg_incompressibility", threads=1)(trajectory.images, [""] * 32)
    # Measured: std 0.091 kB trained, 0.013 kB untrained.
    assert sizes["trained"].std() > 0.05 > 0.02 > sizes["untrained"].std(), sizes
