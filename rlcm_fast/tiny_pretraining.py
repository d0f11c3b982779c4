"""The tiny presets' UNets, trained in code: small sample-predicting denoisers of synthetic latent textures.

Why train it at all: a randomly initialised UNet's samples barely differ from one another (their JPEG
sizes spread by about 0.01 kB), and how LoRA changes its images is dominated by the last UNet call,
which the image is decoded from and which no policy-gradient estimate sees (README, "The tiny model"). RL on a
real LCM relies on samples that differ in what the reward measures, with the difference decided along
the trajectory. This denoiser gives the tiny model that property for the JPEG rewards.

The data: two kinds of 4 x 16 x 16 latent, half each: a flat colour per channel ("flat"), or the same
plus a checkerboard of strength TEXTURE_STRENGTH with alternating sign across channels ("checkered").
The tiny VAE decodes a flat latent into a smooth image (a small JPEG) and a checkered one into a busy
image (a large JPEG), so which kind a sample becomes, decided along the trajectory, is what the JPEG
rewards see. (With a strength drawn uniformly instead, incompressibility learned about half as fast.)
Training: the x0-prediction MSE at timesteps drawn uniformly from the schedule's 1000, with prompts from
`simple_animals` and guidance scales drawn at random, so the model learns to ignore both and any prompt
set or guidance scale works with it.

Both tiny presets get a UNet trained by this recipe: `tiny` (the LCM; its UNet also takes the guidance
embedding) and `tiny-sd` (DDPO's Stable Diffusion; the same UNet without it, classifier-free guidance at
sampling time), so that RLCM and DDPO are compared on equally able models. The results ship as
rlcm_fast/data/tiny_unet.safetensors and tiny_sd_unet.safetensors (float16, with this recipe in their
metadata); `python -m rlcm_fast.tiny_pretraining --preset tiny|tiny-sd` rewrites one. Two runs on one
machine gave the same weights, but float results may differ between CPUs, so a rerun elsewhere may not
be bit-identical. Each UNet is trained against its preset's random VAE and text encoder, which ship too
(tiny_presets.TINY_RANDOM_COMPONENTS); after a change to the tiny architecture, `--write-random-components`
writes new ones as the installed libraries initialise them, and the UNet is then trained again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .architectures import TINY, TINY_SD, initialised_random_components
from .tiny_presets import (TINY_RANDOM_COMPONENTS, TINY_SD_RANDOM_COMPONENTS, TINY_SD_UNET_WEIGHTS, TINY_UNET_WEIGHTS,
                           build_untrained_tiny_pipeline, build_untrained_tiny_sd_pipeline)
from .prompts import load_prompt_set

TEXTURE_STRENGTH = 0.4  # about where the tiny VAE's JPEG size stops rising with the strength (~0.3)
COLOUR_STD = 0.7
GUIDANCE_SCALE_RANGE = (1.0, 10.0)
RECIPE = dict(steps=400, batch_size=32, learning_rate=2e-3, seed=0)
# preset -> (its untrained pipeline, where its trained UNet ships). Both get the same recipe.
PRESETS = {"tiny": (build_untrained_tiny_pipeline, TINY_UNET_WEIGHTS),
           "tiny-sd": (build_untrained_tiny_sd_pipeline, TINY_SD_UNET_WEIGHTS)}
# preset -> (its architecture, where its random VAE and text encoder ship).
RANDOM_COMPONENT_FILES = {"tiny": (TINY, TINY_RANDOM_COMPONENTS), "tiny-sd": (TINY_SD, TINY_SD_RANDOM_COMPONENTS)}


def checkerboard(channels: int, side: int) -> torch.Tensor:
    """(channels, side, side) of +-1, the sign flipping from pixel to pixel and from channel to channel."""
    index = torch.arange(side)
    board = ((index.view(-1, 1) + index) % 2 * 2 - 1).float()
    signs = torch.tensor([1.0 if c % 2 == 0 else -1.0 for c in range(channels)])
    return signs.view(-1, 1, 1) * board


def texture_latents(batch: int, generator: torch.Generator, channels: int = 4, side: int = 16) -> torch.Tensor:
    """(batch, channels, side, side): a flat colour per channel, plus, for about half the latents (drawn
    at random), a checkerboard of strength TEXTURE_STRENGTH."""
    colour = COLOUR_STD * torch.randn(batch, channels, 1, 1, generator=generator)
    checkered = torch.rand(batch, 1, 1, 1, generator=generator) < 0.5
    return colour + TEXTURE_STRENGTH * checkered * checkerboard(channels, side)


def pretrain_denoiser(pipe, steps: int, batch_size: int, learning_rate: float, seed: int) -> list[float]:
    """Train `pipe.unet` (sample prediction) in place to denoise `texture_latents`; returns the losses.
    AdamW with a cosine decay of the learning rate to zero; everything random comes from `seed`."""
    unet, scheduler = pipe.unet, pipe.scheduler
    if scheduler.config.prediction_type != "sample":
        raise ValueError(f"the texture denoiser predicts samples; the scheduler's prediction_type is "
                         f"{scheduler.config.prediction_type!r}")
    generator = torch.Generator().manual_seed(seed)
    prompts = list(load_prompt_set("simple_animals"))
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(prompts, unet.device, 1, False)
    side = unet.config.sample_size
    channels = unet.config.in_channels

    unet.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    for _ in range(steps):
        clean = texture_latents(batch_size, generator, channels, side)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), timesteps)
        low, high = GUIDANCE_SCALE_RANGE
        guidance = low + (high - low) * torch.rand(batch_size, generator=generator)
        # Only an LCM UNet takes the guidance scale as an input; tiny-sd gets classifier-free guidance at
        # sampling time instead, so the guidance draw is kept for it too (same random stream for both).
        w_embedding = None
        if unet.config.time_cond_proj_dim is not None:
            w_embedding = pipe.get_guidance_scale_embedding(guidance - 1, embedding_dim=unet.config.time_cond_proj_dim)
        embeds = prompt_embeds[torch.randint(0, len(prompts), (batch_size,), generator=generator)]
        predicted = unet(noisy, timesteps, encoder_hidden_states=embeds, timestep_cond=w_embedding).sample
        loss = F.mse_loss(predicted, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    unet.requires_grad_(False).eval()
    return losses


def write_random_components(preset: str, out: Path) -> None:
    """The preset's VAE and text encoder as the installed libraries initialise them, in one float32 file
    whose metadata names the seed and the libraries' versions."""
    weights, provenance = initialised_random_components(RANDOM_COMPONENT_FILES[preset][0])
    save_file(weights, out, metadata=provenance)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlcm_fast.tiny_pretraining",
                                     description="Train a tiny preset's UNet and write its safetensors file.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, help="default: the file the preset ships, inside the installed package "
                                                 "(overwritten)")
    parser.add_argument("--write-random-components", action="store_true",
                        help="write the preset's random VAE and text encoder instead (only after a change to the "
                             "tiny architecture: the shipped UNet was trained against the shipped ones)")
    args = parser.parse_args(argv)
    if args.write_random_components:
        out = args.out or RANDOM_COMPONENT_FILES[args.preset][1]
        write_random_components(args.preset, out)
        print(f"wrote {args.preset}'s random VAE and text encoder to {out}")
        return
    build_untrained, shipped_weights = PRESETS[args.preset]
    out = args.out or shipped_weights
    pipe = build_untrained()
    # Minutes without a word otherwise; and say where it writes, which by default is the installed package's file.
    print(f"training {args.preset}'s UNet: {RECIPE['steps']} AdamW steps (about 3 minutes on 2 CPU cores), then "
          f"writing {out}", flush=True)
    started = time.perf_counter()
    losses = pretrain_denoiser(pipe, **RECIPE)
    seconds = time.perf_counter() - started
    tail = sum(losses[-20:]) / 20
    metadata = {**{key: str(value) for key, value in RECIPE.items()}, "final_loss": f"{tail:.4f}",
                "torch": torch.__version__}
    # float16 halves the shipped file; the preset casts back to float32 when it loads.
    weights = {name: tensor.half().contiguous() for name, tensor in pipe.unet.state_dict().items()}
    save_file(weights, out, metadata=metadata)
    print(f"trained {args.preset}'s UNet for {RECIPE['steps']} steps in {seconds:.0f} s, loss {losses[0]:.3f} "
          f"-> {tail:.4f} (mean of the last 20); wrote {out}")


if __name__ == "__main__":
    main()
