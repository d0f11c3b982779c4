"""A drop-in fast sampler for an existing diffusers `LatentConsistencyModelPipeline`.

    from rlcm_fast import FastLCMSampler
    fast = FastLCMSampler(pipe, batch_size=4, num_inference_steps=4, guidance_scale=8.0)
    images = fast(["a cat"] * 4, generator=torch.Generator("cuda").manual_seed(0)).images   # (4, 3, H, W) in [0, 1]

gives the images of `pipe(prompt, num_inference_steps=4, guidance_scale=8.0, generator=...,
output_type="pt")` (no safety checker), for one fixed batch size, resolution and horizon; `generator` may
be one or a list of batch_size, as there; `guidance_scale` defaults to the pipeline's default (8.5 in
diffusers 0.42; RLCM's trainer samples at the paper's 8.0). pipe.scheduler must be an LCMScheduler (not a subclass, which may
step otherwise), read when the sampler is built. What makes it faster than the pipeline:

- prompt embeddings are cached per prompt, the PROMPT_CACHE_SIZE most recently used (the text encoder runs
  once per distinct prompt while it is kept; after changing the text encoder, call clear_prompt_cache());
- every random draw is made up front from the caller's generator, in the pipeline's order (initial
  latents, then one noise per step but the last), so the images stay the pipeline's while the
  H-step loop itself has no Python-side randomness and no host synchronisation. (With generator=None
  they come from the global generator, before the loop: a UNet that draws random numbers itself, such
  as LoRA dropout in train mode, then sees other ones than in the pipeline.)
- the UNet and the VAE decode are compiled (`compile=True`, the default on CUDA): once per sampler, one
  UNet call and not the unrolled H-step loop, so compile time does not grow with H;
- on CUDA (`cuda_graph=True`, the default there) the whole H-step loop (UNet calls and fused policy
  steps) and the decode are captured as ONE CUDA graph at the first call and replayed after it, so a
  call is a copy of its inputs and one graph launch. Weights are read at replay: in-place updates (an
  optimizer step) are seen; loading or switching adapters, or changing a LoRA scale, needs a new sampler.
  A call with `latents` of another shape or of another dtype than the pipeline's prompt embeddings, is
  refused, not silently recaptured (outside autocast diffusers' pipeline fails on such latents too: its
  guidance embedding takes their dtype). So is a call after the pipeline was moved or cast, or after
  `pipe.unet` was replaced: build a new sampler then.

`prompt_embeds` may replace the prompts, as in the pipeline (e.g. weighted prompts, of any token length:
each new length is compiled and captured once more); the trajectory's `prompts` is None then. The image
is square: `height` and `width` default, as in the pipeline, to the UNet's native size.

It can also return the trajectory (states, per-action log-probs) that RL training needs.
"""

from __future__ import annotations

import inspect
import math
import numbers
import reprlib
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from .cuda_graphs import CaptureError, CapturedCall
from .models import latent_shape
from .sampler import MAX_CACHED_PROMPTS, LCMSampler, Trajectory


@dataclass
class FastSamplerOutput:
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1], whatever the VAE's dtype (the pipeline's output_type="pt"
    #                       comes in the VAE's dtype)
    trajectory: Trajectory | None = None


class FastLCMSampler:
    """The pipeline's sampling for a fixed (batch size, resolution, horizon), faster; see module doc."""

    PROMPT_CACHE_SIZE = MAX_CACHED_PROMPTS  # the most recently used prompts' embeddings are kept

    def __init__(
        self,
        pipe,
        batch_size: int,
        num_inference_steps: int,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        original_inference_steps: int | None = None,
        compile: bool | None = None,
        cuda_graph: bool | None = None,
    ):
        if not all(hasattr(pipe, name) for name in ("unet", "vae", "scheduler")):
            raise ValueError(f"pipe is a {type(pipe).__name__}; FastLCMSampler takes a diffusers "
                             "LatentConsistencyModelPipeline (its unet, vae and scheduler)")
        call = getattr(type(pipe), "__call__", None)
        if call is not None and "image" in inspect.signature(call).parameters:  # img2img, inpainting: from noise
            raise ValueError(f"pipe is a {type(pipe).__name__}, which starts from an image; FastLCMSampler samples "
                             "text-to-image, as LatentConsistencyModelPipeline does: build one from the same "
                             "components (LatentConsistencyModelPipeline(**pipe.components))")
        for name, value in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: it must be an int >= 1")
        for name, value in (("compile", compile), ("cuda_graph", cuda_graph)):  # "false" would be true
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: it must be True, False or None (the device's default)")
        # The sampler steps as LCMScheduler does, whatever pipe.scheduler is: another one (a subclass too)
        # would give other images.
        if type(pipe.scheduler) is not LCMScheduler:
            raise ValueError(f"pipe.scheduler is {type(pipe.scheduler).__name__}; FastLCMSampler samples as "
                             "LCMScheduler does: set pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)")
        original_inference_steps = _checked_original_inference_steps(pipe.scheduler.config, num_inference_steps,
                                                                     original_inference_steps)
        guidance_scale = _checked_guidance_scale(pipe, guidance_scale)
        height = _square_side(pipe, height, width)
        device = pipe.unet.device
        if cuda_graph and "_original_forward" in vars(pipe.unet):  # the mark accelerate's prepare() leaves
            raise ValueError("cuda_graph=True with a UNet prepared by accelerate for mixed precision: its forward "
                             "runs an autocast with the cast cache on, which would freeze the weights' casts in "
                             "the graph; pass accelerator.unwrap_model(unet, keep_fp32_wrapper=False) first")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the pipeline on a CUDA device; its UNet is on {device}")
        # train_final_step=False: H-1 actions and H-1 noises, exactly the pipeline's draws (LCMScheduler.step
        # draws none at the last step).
        self.sampler = LCMSampler(pipe, num_inference_steps, guidance_scale, original_inference_steps,
                                  train_final_step=False, resolution=height, max_cached_prompts=self.PROMPT_CACHE_SIZE)
        self.pipe = pipe
        self._built_unet = pipe.unet  # the UNet it compiles and captures: a call refuses a replaced one
        # The cached prompt and guidance embeddings (and a captured graph) are of this device and dtype; a call
        # checks them on one weight, which pipe.to() converts in place.
        self._probe = next(pipe.unet.parameters())
        self._built_for = (self._probe.device, self._probe.dtype)
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
        return self.sampler.device

    def clear_prompt_cache(self) -> None:
        """Forget the cached prompt embeddings, so that each prompt is encoded again at its next call: after
        the text encoder's weights changed (the captured graph reads the embeddings as inputs, so it stays)."""
        self.sampler.prompt_cache.clear()

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
        prompt: str | Sequence[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        return_trajectory: bool = False,
        prompt_embeds: torch.Tensor | None = None,
    ) -> FastSamplerOutput:
        if (self._probe.device, self._probe.dtype) != self._built_for:
            raise RuntimeError(f"the pipeline's UNet is now {self._probe.dtype} on {self._probe.device}; this sampler "
                               f"was built for {self._built_for[1]} on {self._built_for[0]}: build a new "
                               "FastLCMSampler after moving or casting the pipeline")
        if self.pipe.unet is not self._built_unet:
            raise RuntimeError("pipe.unet was replaced after this sampler was built, which samples the UNet it was "
                               "built with: build a new FastLCMSampler")
        if not isinstance(return_trajectory, bool):
            raise ValueError(f"return_trajectory={return_trajectory!r} is invalid: it must be True or False")
        prompts = None
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("give prompt or prompt_embeds, not both")
        elif isinstance(prompt, str):
            prompts = [prompt] * self.batch_size
        elif isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt={reprlib.repr(prompt)} is invalid: it must be a str or a sequence of str (or "
                             "give prompt_embeds)")
        if prompts is not None and len(prompts) != self.batch_size:
            raise ValueError(f"{len(prompts)} prompts given; this sampler was built for batch_size={self.batch_size}")
        # diffusers' pipeline refuses a list of another length; randn_tensor alone would take a list of 1 for
        # the whole batch and ignore generators past the batch.
        if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
            if len(generator) != self.batch_size:
                raise ValueError(f"generator is a list of {len(generator)}; this sampler was built for batch_size="
                                 f"{self.batch_size}: give one torch.Generator or a list of {self.batch_size}")
            generator = list(generator)
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator={reprlib.repr(generator)} is invalid: it must be a torch.Generator, a list "
                             f"of {self.batch_size} of them, or None")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents of type {type(latents).__name__} given; it must be a torch.Tensor of shape "
                             f"{self.shape}")
        if latents is not None and tuple(latents.shape) != self.shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} given; this sampler samples {self.shape}")
        if prompt_embeds is not None:
            embeds = self._given_embeddings(prompt_embeds)
        else:
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

    def _given_embeddings(self, prompt_embeds) -> torch.Tensor:
        """prompt_embeds on the device and in the dtype the pipeline gives them (its encode_prompt does it), of
        the prompts' shape: another shape would be another graph."""
        # Any token length, as in the pipeline (long-prompt weighting makes 154 and more).
        expected = (self.batch_size, "tokens", self.pipe.unet.config.cross_attention_dim)
        shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else None
        if (shape is None or len(shape) != 3 or shape[1] < 1
                or any(e != s for e, s in zip(expected, shape) if isinstance(e, int))):
            given = f"of shape {shape}" if shape is not None else f"of type {type(prompt_embeds).__name__}"
            raise ValueError(f"prompt_embeds {given} given; this sampler takes (batch_size, tokens, "
                             f"cross_attention_dim) = ({', '.join(map(str, expected))})")
        return self.pipe.encode_prompt(None, self.device, 1, False, prompt_embeds=prompt_embeds)[0]


def _default_guidance_scale(pipe) -> float:
    """What `pipe(prompt)` guides with when not told: its own default (8.5 in diffusers 0.42; RLCM trains at the
    paper's 8.0), or 1 (no guidance) for a UNet without a guidance embedding, which the pipeline does not guide."""
    if pipe.unet.config.time_cond_proj_dim is None:
        return 1.0
    parameter = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    if parameter is None or not isinstance(parameter.default, numbers.Real):  # another kind of pipeline object
        parameter = inspect.signature(LatentConsistencyModelPipeline.__call__).parameters["guidance_scale"]
    return float(parameter.default)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_original_inference_steps(scheduler_config, num_inference_steps: int, original_inference_steps):
    """The schedule's original_inference_steps: the one given, or the scheduler's, each checked as the
    pipeline would (a one-line ValueError)."""
    if original_inference_steps is None:
        original_inference_steps = scheduler_config.original_inference_steps
        if num_inference_steps > original_inference_steps:  # the user never named original_inference_steps
            raise ValueError(f"num_inference_steps={num_inference_steps} is invalid: it must be at most the "
                             f"scheduler's original_inference_steps={original_inference_steps} (or pass a larger "
                             "original_inference_steps)")
        if original_inference_steps > scheduler_config.num_train_timesteps:
            raise ValueError(f"the scheduler's config has original_inference_steps={original_inference_steps}, "
                             f"more than its num_train_timesteps={scheduler_config.num_train_timesteps} (diffusers' "
                             "pipeline refuses it too); pass original_inference_steps")
    elif (not _is_int(original_inference_steps)
          or not num_inference_steps <= original_inference_steps <= scheduler_config.num_train_timesteps):
        raise ValueError(f"original_inference_steps={original_inference_steps!r} is invalid: it must be an int in "
                         f"num_inference_steps..num_train_timesteps = {num_inference_steps}.."
                         f"{scheduler_config.num_train_timesteps}")
    return original_inference_steps


def _checked_guidance_scale(pipe, guidance_scale) -> float:
    """guidance_scale as a float (the pipeline's default for None), refused where it is no finite number or
    this UNet cannot apply it."""
    if guidance_scale is None:
        guidance_scale = _default_guidance_scale(pipe)
    try:
        finite = not isinstance(guidance_scale, (str, bytes, bool)) and math.isfinite(float(guidance_scale))
    except (TypeError, ValueError, RuntimeError):
        finite = False
    if not finite or (isinstance(guidance_scale, torch.Tensor) and guidance_scale.ndim):
        raise ValueError(f"guidance_scale={guidance_scale!r} is invalid: it must be a finite number")
    guidance_scale = float(guidance_scale)  # a 0-d tensor or NumPy scalar, as a number
    # Without a guidance embedding (SD1.5 + LCM-LoRA) the sampler does no guidance at all, while diffusers'
    # Stable Diffusion pipeline does classifier-free guidance above 1: refused rather than ignored.
    if pipe.unet.config.time_cond_proj_dim is None and float(guidance_scale) > 1:
        raise ValueError(f"guidance_scale={guidance_scale!r} is invalid for this UNet: it has no guidance "
                         "embedding (time_cond_proj_dim is None, e.g. SD1.5 + LCM-LoRA) and this sampler does no "
                         "classifier-free guidance; pass guidance_scale=1.0")
    return guidance_scale


def _square_side(pipe, height, width) -> int:
    """The square image's side from the pipeline's height and width arguments (None: the UNet's native size);
    refused where they are no multiple of the VAE's factor or do not make a square."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    multiple = max(8, pipe.vae_scale_factor)  # diffusers' pipeline refuses sizes not divisible by 8
    for name, value in (("height", height), ("width", width)):
        if value is not None and not _is_int(value):
            raise ValueError(f"{name}={value!r} is invalid: it must be an int")
        if value is not None and (value < multiple or value % multiple):
            raise ValueError(f"{name}={value} is invalid: it must be a multiple of {multiple}, at least {multiple}")
    if height != width and None not in (height, width):
        raise ValueError(f"height={height} and width={width}: only square images are supported")
    if height != width:  # one side given: the other is the native size, as in the pipeline
        given, side = ("height", height) if width is None else ("width", width)
        if side != native:
            raise ValueError(f"{given}={side} alone would make a {native}-by-{side} image (the other side is "
                             f"the UNet's native {native} px, as in the pipeline); only square images are "
                             f"supported: give height={side} and width={side}")
    return native if height is None and width is None else (height or width)
