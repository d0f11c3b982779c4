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
- the UNet and the VAE decode are compiled (`compile=True`, the default on CUDA): once per sampler, one
  UNet call and not the unrolled H-step loop, so compile time does not grow with H;
- on CUDA (`cuda_graph=True`, the default there) the whole H-step loop (UNet calls and fused policy
  steps) and the decode are captured as ONE CUDA graph at the first call and replayed after it, so a
  call is a copy of its inputs and one graph launch. Weights are read at replay: in-place updates (an
  optimizer step) are seen; loading or switching adapters, or changing a LoRA scale, needs a new sampler.
  A call with other shapes, or with `latents` of another dtype than the pipeline's prompt embeddings, is
  refused, not silently recaptured (outside autocast diffusers' pipeline fails on such latents too: its
  guidance embedding takes their dtype).

It can also return the trajectory (states, per-action log-probs) that RL training needs.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .cuda_graphs import CaptureError, CapturedCall
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
        cuda_graph: bool | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} is invalid: it must be >= 1")
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        multiple = max(8, pipe.vae_scale_factor)  # diffusers' pipeline refuses sizes not divisible by 8
        for name, value in (("height", height), ("width", width)):
            if value is not None and (value < multiple or value % multiple):
                raise ValueError(f"{name}={value} is invalid: it must be a multiple of {multiple}, at least {multiple}")
        if height is None:  # one side given: a square of that side; none: the pipeline's native size
            height = native if width is None else width
        if width is None:
            width = height
        if height != width:
            raise ValueError(f"height={height} and width={width}: only square images are supported")
        device = pipe.unet.device
        if cuda_graph and "_original_forward" in vars(pipe.unet):  # the mark accelerate's prepare() leaves
            raise ValueError("cuda_graph=True with a UNet prepared by accelerate for mixed precision: its forward "
                             "runs an autocast with the cast cache on, which would freeze the weights' casts in "
                             "the graph; pass accelerator.unwrap_model(unet, keep_fp32_wrapper=False) first")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the pipeline on a CUDA device; its UNet is on {device}")
        original = original_inference_steps or pipe.scheduler.config.original_inference_steps
        # With train_final_step the sampler records an action for every UNet call; the last one's noise
        # never reaches the image (as in the pipeline, which also draws it).
        self.sampler = LCMSampler(pipe, num_inference_steps, guidance_scale, original, train_final_step=False,
                                  resolution=height)
        self.pipe = pipe
        self.batch_size = batch_size
        self.horizon = num_inference_steps
        self.shape = latent_shape(pipe, batch_size, height)
        self.compiled = device.type == "cuda" if compile is None else compile
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        # One UNet call is compiled, not the loop: dynamo unrolls the loop, and inductor's compile time grows
        # with H (tiny UNet, 2 CPU cores, first call: 70 s at H=1, 151 s at H=4, 280 s at H=8; only the UNet
        # compiled, 61 s at H=8).
        # Launch overhead between the steps is the CUDA graph's job, not the compiler's.
        self._unet = torch.compile(pipe.unet, dynamic=False) if self.compiled else pipe.unet
        self._decode = torch.compile(self.sampler.decode, dynamic=False) if self.compiled else self.sampler.decode
        self._replay = CapturedCall(self._sample_once, device) if self.cuda_graph else None

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _sample(self, *inputs):
        if self._replay is None:
            return self._sample_once(*inputs)
        try:
            return self._replay(*inputs)
        except CaptureError as error:
            raise CaptureError(f"{error}; FastLCMSampler(..., cuda_graph=False) samples without a graph") from error

    def _sample_once(self, latents, noises, embeds, w_embedding):
        """(states, log_probs, denoised, images): the H-step loop and the VAE decode, nothing else: no random
        draw and no host synchronisation, so that it can be captured as one CUDA graph."""
        states, log_probs, denoised = self.sampler.rollout(self._unet, latents, noises, embeds, w_embedding)
        return states, log_probs, denoised, self._decode(denoised)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        return_trajectory: bool = False,
    ) -> FastSamplerOutput:
        if isinstance(prompt, str):
            prompts = [prompt] * self.batch_size
        elif isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt={reprlib.repr(prompt)} is invalid: it must be a str or a sequence of str")
        if len(prompts) != self.batch_size:
            raise ValueError(f"{len(prompts)} prompts given; this sampler was built for batch_size={self.batch_size}")
        if latents is not None and tuple(latents.shape) != self.shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} given; this sampler samples {self.shape}")
        embeds = self.sampler.prompt_embeddings(prompts)
        w_embedding = self.sampler.guidance(self.batch_size, embeds.dtype)
        # The pipeline's draws, in its order: x_0, then z_0 .. z_{H-2} (the last step's noise is unused
        # by the pipeline's output and is not drawn by LCMScheduler.step at the last index).
        if latents is None:
            latents = self.sampler.draw_latents(self.batch_size, generator, embeds.dtype)
        elif latents.dtype != embeds.dtype:  # another dtype would be another graph (and the pipeline fails on it)
            raise ValueError(f"latents of dtype {latents.dtype} given; this sampler samples {embeds.dtype}")
        else:
            latents = latents.to(self.device)  # as the pipeline does
        noises = self.sampler.draw_noises(self.batch_size, generator, embeds.dtype)  # H-1: no train_final_step
        noises = torch.stack(noises) if noises else latents.new_zeros((0, *self.shape))
        states, log_probs, denoised, images = self._sample(latents, noises, embeds, w_embedding)
        if self.cuda_graph:
            images = images.clone()  # the graph's output buffers are overwritten by the next replay
        trajectory = None
        if return_trajectory:
            trajectory = Trajectory(prompts=prompts, states=states.clone(), log_probs=log_probs.clone(),
                                    denoised=denoised.clone(), images=images)
        return FastSamplerOutput(images=images, trajectory=trajectory)
