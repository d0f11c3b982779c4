"""A drop-in fast sampler for an existing diffusers `LatentConsistencyModelPipeline`.

    from rlcm_fast import FastLCMSampler
    fast = FastLCMSampler(pipe, batch_size=4, num_inference_steps=4, guidance_scale=8.0)
    images = fast(["a cat"] * 4, generator=torch.Generator("cuda").manual_seed(0)).images   # (4, 3, H, W) in [0, 1]

gives the images of `pipe(prompt, num_inference_steps=4, guidance_scale=8.0, generator=...,
output_type="pt")` (no safety checker), for one fixed batch size, resolution and horizon. What makes it
faster than the pipeline:

- prompt embeddings are cached per prompt (the text encoder runs once per distinct prompt);
- every random draw is made up front from the caller's generator, in the pipeline's order (initial
  latents, then one noise per step but the last), so the images stay the pipeline's while the
  H-step loop itself has no Python-side randomness and no host synchronisation;
- on CUDA (`compile=True`, the default there) the whole H-step loop (UNet calls and policy steps) and
  the VAE decode run as one function under `torch.compile(mode="reduce-overhead")`, which captures it
  as CUDA graphs for the fixed shapes and replays them; a call with other shapes is refused, not silently recompiled.

It can also return the trajectory (states, per-action log-probs) that RL training needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from .models import latent_shape
from .sampler import LCMSampler, Trajectory


@dataclass
class FastSamplerOutput:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1], as the pipeline's output_type="pt"
    trajectory: Trajectory | None = None


class FastLCMSampler:
    """The pipeline's sampling for a fixed (batch size, resolution, horizon), faster; see module doc."""

    def __init__(
        self,
        pipe,
        batch_size: int,
        num_inference_steps: int,
        guidance_scale: float = 8.0,
        height: int | None = None,
        width: int | None = None,
        original_inference_steps: int | None = None,
        compile: bool | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} is invalid: it must be >= 1")
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or native, width or native
        if height != width:
            raise ValueError(f"height={height} and width={width}: only square images are supported")
        original = original_inference_steps or pipe.scheduler.config.original_inference_steps
        # With train_final_step the sampler records an action for every UNet call; the last one's noise
        # never reaches the image (as in the pipeline, which also draws it).
        self.sampler = LCMSampler(pipe, num_inference_steps, guidance_scale, original, train_final_step=False,
                                  resolution=height)
        self.pipe = pipe
        self.batch_size = batch_size
        self.horizon = num_inference_steps
        self.shape = latent_shape(pipe, batch_size, height)
        device = pipe.unet.device
        self.compiled = device.type == "cuda" if compile is None else compile
        self._sample = self._sample_eager
        if self.compiled:
            self._sample = torch.compile(self._sample_eager, mode="reduce-overhead" if device.type == "cuda" else None)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _sample_eager(self, latents, noises, embeds, w_embedding):
        """(states, log_probs, denoised, images): the H-step loop and the VAE decode, one compiled region.
        Two reduce-overhead functions, the second fed the first's output, fail on CUDA: the second call
        starts a new CUDA-graph generation, which frees the first's outputs (pytorch/pytorch#160281)."""
        # Inside torch.compile the plain-PyTorch step is what inductor fuses; eager uses the fused kernels.
        states, log_probs, denoised = self.sampler.rollout(self.pipe.unet, latents, noises, embeds, w_embedding,
                                                           backend="reference" if self.compiled else "auto")
        return states, log_probs, denoised, self.sampler.decode(denoised)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        return_trajectory: bool = False,
    ) -> FastSamplerOutput:
        prompts = [prompt] * self.batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != self.batch_size:
            raise ValueError(f"{len(prompts)} prompts given; this sampler was built for batch_size={self.batch_size}")
        if latents is not None and tuple(latents.shape) != self.shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} given; this sampler samples {self.shape}")
        embeds = self.sampler.prompt_embeddings(prompts)
        w_embedding = self.sampler.guidance(self.batch_size, embeds.dtype)
        # The pipeline's draws, in its order: x_0, then z_0 .. z_{H-2} (the last step's noise is unused
        # by the pipeline's output and is not drawn by LCMScheduler.step at the last index).
        if latents is None:
            latents = randn_tensor(self.shape, generator=generator, device=self.device, dtype=embeds.dtype)
        noises = [randn_tensor(self.shape, generator=generator, device=self.device, dtype=embeds.dtype)
                  for _ in range(self.horizon - 1)]
        noises = torch.stack(noises) if noises else latents.new_zeros((0, *self.shape))
        states, log_probs, denoised, images = self._sample(latents.to(self.device), noises, embeds, w_embedding)
        if self.compiled and self.device.type == "cuda":
            images = images.clone()  # CUDA-graph outputs are overwritten by the next replay
        trajectory = None
        if return_trajectory:
            trajectory = Trajectory(prompts=prompts, states=states.clone(), log_probs=log_probs.clone(),
                                    denoised=denoised.clone(), images=images)
        return FastSamplerOutput(images=images, trajectory=trajectory)
