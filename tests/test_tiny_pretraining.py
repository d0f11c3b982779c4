"""The tiny presets' trained UNets (tiny's and tiny-sd's): their data, their training code, and the shipped
weights' behaviour."""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from safetensors import safe_open

from rlcm_fast import architectures, tiny_presets
from rlcm_fast.architectures import RANDOM_COMPONENTS
from rlcm_fast.ddpo import DDPOSampler
from rlcm_fast.models import guidance_embedding
from rlcm_fast.rewards import make_reward
from rlcm_fast.sampler import LCMSampler
from rlcm_fast.tiny_presets import build_tiny_pipeline, build_tiny_sd_pipeline, build_untrained_tiny_pipeline
from rlcm_fast.tiny_pretraining import (PRESETS, RANDOM_COMPONENT_FILES, RECIPE, TEXTURE_STRENGTH, checkerboard,
                                        main, pretrain_denoiser, texture_latents)

TRAINED = {"tiny": build_tiny_pipeline, "tiny-sd": build_tiny_sd_pipeline}


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
    with torch.no_grad():  # tiny-sd's UNet takes no guidance embedding: guidance_embedding gives None
        predicted = pipe.unet(noisy, timestep, encoder_hidden_states=embeds,
                              timestep_cond=guidance_embedding(pipe, 8.0, 32, "cpu", torch.float32)).sample
    return float((predicted - clean).square().mean())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_few_pretraining_steps_lower_the_denoising_loss(preset):
    pipe = PRESETS[preset][0]()
    before = denoising_error(pipe, 259)
    losses = pretrain_denoiser(pipe, steps=40, batch_size=8, learning_rate=2e-3, seed=0)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())
    # Measured: the error at t=259 goes from 0.72 (the untrained UNet) to 0.29 (tiny), from 0.62 to 0.29 (tiny-sd).
    assert denoising_error(pipe, 259) < 0.5 * before


def test_pretraining_refuses_a_scheduler_that_does_not_predict_samples():
    pipe = build_untrained_tiny_pipeline()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type is 'epsilon'"):
        pretrain_denoiser(pipe, steps=1, batch_size=2, learning_rate=1e-3, seed=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_tiny_preset_carries_its_shipped_unet_trained_by_this_recipe(preset):
    with safe_open(PRESETS[preset][1], "pt") as weights:
        metadata = weights.metadata()
        shipped = {name: weights.get_tensor(name) for name in weights.keys()}
    assert {key: metadata[key] for key in RECIPE} == {key: str(value) for key, value in RECIPE.items()}
    state = TRAINED[preset]().unet.state_dict()
    assert shipped.keys() == state.keys()
    assert all(torch.equal(state[name], shipped[name].float()) for name in shipped)


def shipped_random_components(preset: str) -> tuple[dict, dict]:
    with safe_open(RANDOM_COMPONENT_FILES[preset][1], "pt") as weights:
        return weights.metadata(), {name: weights.get_tensor(name) for name in weights.keys()}


def component_weights(pipe) -> dict:
    return {f"{name}.{key}": tensor for name in RANDOM_COMPONENTS
            for key, tensor in getattr(pipe, name).state_dict().items()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_tiny_preset_carries_its_shipped_random_vae_and_text_encoder(preset):
    metadata, shipped = shipped_random_components(preset)
    assert metadata["seed"] == str(architectures.INIT_SEED) and {"torch", "diffusers", "transformers"} <= metadata.keys()
    for pipe in (TRAINED[preset](), PRESETS[preset][0]()):  # the pretraining starts from them too
        state = component_weights(pipe)
        assert state.keys() == shipped.keys()
        assert all(state[name].dtype == torch.float32 and torch.equal(state[name], shipped[name]) for name in shipped)


def test_the_tiny_presets_weights_do_not_follow_the_libraries_initialisation(monkeypatch):
    """Another initialisation (here another seed; in life another transformers or diffusers release) changes
    the untrained UNet, and nothing of the presets."""
    expected = {preset: {**component_weights(TRAINED[preset]()), **TRAINED[preset]().unet.state_dict()}
                for preset in TRAINED}
    untrained_unet = build_untrained_tiny_pipeline().unet.state_dict()
    monkeypatch.setattr(architectures, "INIT_SEED", 1)
    assert not torch.equal(build_untrained_tiny_pipeline().unet.state_dict()["conv_in.weight"],
                           untrained_unet["conv_in.weight"])
    for preset, build in TRAINED.items():
        pipe = build()
        got = {**component_weights(pipe), **pipe.unet.state_dict()}
        assert all(torch.equal(got[name], expected[preset][name]) for name in expected[preset]), preset


def test_the_preset_cache_key_names_the_shipped_random_components(monkeypatch):
    keys = {}
    monkeypatch.setattr(tiny_presets, "_preset_id", lambda name, key: keys.setdefault(name, key))
    tiny_presets.preset_weights_id("tiny"), tiny_presets.preset_weights_id("tiny-sd", "ddpo")
    assert tiny_presets._digest(tiny_presets.TINY_RANDOM_COMPONENTS) in keys["tiny"]
    assert tiny_presets._digest(tiny_presets.TINY_SD_RANDOM_COMPONENTS) in keys["tiny-sd"]
    assert tiny_presets._digest(tiny_presets.TINY_RANDOM_COMPONENTS) != tiny_presets._digest(tiny_presets.TINY_SD_RANDOM_COMPONENTS)


def test_write_random_components_writes_what_the_seed_initialises(tmp_path, capsys):
    out = tmp_path / "components.safetensors"
    main(["--preset", "tiny-sd", "--write-random-components", "--out", str(out)])
    assert "wrote tiny-sd's random VAE and text encoder" in capsys.readouterr().out
    with safe_open(out, "pt") as weights:
        metadata, written = weights.metadata(), {name: weights.get_tensor(name) for name in weights.keys()}
    fresh = component_weights(architectures.build_random_pipeline(architectures.TINY_SD, torch.device("cpu"), torch.float32))
    assert written.keys() == fresh.keys() == shipped_random_components("tiny-sd")[1].keys()
    assert all(torch.equal(written[name], fresh[name]) for name in fresh)
    assert metadata["seed"] == "0" and metadata["transformers"] == __import__("transformers").__version__


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_shipped_unet_denoises_textures_far_better_than_the_untrained_one(preset):
    trained, untrained = denoising_error(TRAINED[preset](), 259), denoising_error(PRESETS[preset][0](), 259)
    # Measured: trained 0.020, untrained 0.72 (tiny); trained 0.013, untrained 0.62 (tiny-sd).
    assert trained < 0.1 < 0.4 < untrained


def sample(pipe, preset: str):
    if preset == "tiny":
        sampler = LCMSampler(pipe, horizon=4, resolution=32)
    else:  # DDPO's sampler: DDIM, eta 1, classifier-free guidance
        sampler = DDPOSampler(pipe, num_steps=4, guidance_scale=5.0, eta=1.0, resolution=32)
    return sampler.sample(pipe.unet, ["a cat", "a dog"] * 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tiny_samples_differ_in_jpeg_size(preset):
    """What RL on the JPEG rewards needs: samples whose size differs, more than the untrained UNet's do."""
    sizes = {}
    for name, pipe in (("trained", TRAINED[preset]()), ("untrained", PRESETS[preset][0]())):
        sizes[name] = make_reward("jpeg_incompressibility", threads=1)(sample(pipe, preset).images, [""] * 32)
    # Measured: std 0.091 kB trained, 0.013 kB untrained (both presets, 4 steps).
    assert sizes["trained"].std() > 0.05 > 0.02 > sizes["untrained"].std(), sizes


def test_the_command_says_what_it_trains_and_where_it_writes_before_the_minutes_of_training(tmp_path, capsys,
                                                                                             monkeypatch):
    import rlcm_fast.tiny_pretraining as module

    def quick(pipe, **recipe):
        assert capsys.readouterr().out == (f"training tiny's UNet: {RECIPE['steps']} AdamW steps (about 3 minutes "
                                           f"on 2 CPU cores), then writing {tmp_path / 'unet.safetensors'}\n")
        return [1.0] * 20

    monkeypatch.setattr(module, "pretrain_denoiser", quick)
    main(["--out", str(tmp_path / "unet.safetensors")])
    assert capsys.readouterr().out.startswith(f"trained tiny's UNet for {RECIPE['steps']} steps in ")
    assert (tmp_path / "unet.safetensors").is_file()


def test_the_help_names_the_command_to_type_and_that_the_default_out_overwrites_the_package(capsys):
    """Its usage read `tiny_pretraining.py`, a file a user does not run, and --out's default hid that it is the
    installed package's own weights (found by a newcomer's walk through README)."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and usage.startswith("usage: python -m rlcm_fast.tiny_pretraining [-h]")
    assert "default: the file the preset ships, inside the installed package (overwritten)" in usage
