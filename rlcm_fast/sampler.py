"""Multi-step consistency sampling as an MDP (README, "The algorithm"), returning the whole trajectory.

With the same weights, initial latents and per-step noises (or the same generator), the images equal
diffusers' `LatentConsistencyModelPipeline` output: the generator is drawn in the pipeline's order
(initial latents, then one noise per step but the last).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .cuda_graphs import CaptureError, CapturedCall
from .models import guidance_embedding, latent_shape
from .policy_step import consistency_output, policy_mean_std, policy_step, row_scalars_for_schedule


@dataclass
class Trajectory:
    """B sampled trajectories. T = trained actions per trajectory (H-1, or H with train_final_step; DDPO: all
    its S steps)."""

    prompts: list[str] | None  # None: sampled from given prompt embeddings (FastLCMSampler)
    states: torch.Tensor  # (B, T+1, C, h, w) float32: x_0 .. x_T; action k maps states[:, k] -> states[:, k+1]
    log_probs: torch.Tensor  # (B, T) float32: log pi_old of each action at sampling time
    denoised: torch.Tensor  # (B, C, h, w): the latent the image is decoded from (LCM: D_{H-1}; DDPO: x_S)
    images: torch.Tensor | None = None  # (B, 3, H, W) float in [0, 1]


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], as the pipelines' VAE decode and post-processing do."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def weights_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first weight. diffusers' `unet.device` first looks for group-offloading hooks
    in every submodule (about 3 ms on sd15's UNet on a 2-core CPU), and the samplers ask at every step."""
    return next(module.parameters()).device


def standard_normal(sampler, batch: int, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """One draw of `batch` latents' worth of N(0, I) at the sampler's resolution, on its device, as the
    pipelines draw it (diffusers' randn_tensor). Shared by the LCM and DDPO samplers."""
    shape = latent_shape(sampler.pipe, batch, sampler.resolution)
    return randn_tensor(shape, generator=generator, device=sampler.device, dtype=dtype)


def policy_sampler(pipe, cfg):
    """The sampler of a TrainConfig's method: DDPO's DDIM policy or the LCM's (ValueError on step counts
    the model's scheduler refuses)."""
    if cfg.method == "ddpo":
        from .ddpo import DDPOSampler  # ddpo.py builds on this module

        sampler = DDPOSampler(pipe, cfg.horizon, cfg.guidance_scale, cfg.eta, resolution=cfg.resolution)
    else:
        sampler = LCMSampler(pipe, cfg.horizon, cfg.guidance_scale, cfg.original_inference_steps, cfg.train_final_step,
                             resolution=cfg.resolution, step_backend=cfg.policy_step_backend,
                             cuda_graph=cfg.sample_cuda_graph)
    if cfg.compile_decode:  # one graph per batch size decoded: sample_batch_size, and a sample grid's
        sampler.decode = torch.compile(sampler.decode, backend=cfg.compile_backend, dynamic=False)
    return sampler


# The most prompt embeddings a sampler keeps, the most recently used: a user's prompt file need not be small
# (50k prompts would hold 6 GB of SD1.5's bf16 embeddings on the device); 1024 of them are 121 MB, and the
# built-in prompt sets (398 prompts at most) stay whole.
MAX_CACHED_PROMPTS = 1024


class PromptEmbeddingCache:
    """(B, L, D) text embeddings from a pipeline's text encoder; each distinct prompt is encoded once while
    it is cached. Shared by the LCM and DDPO samplers and by FastLCMSampler.

    Each prompt is encoded on its own: encoded in a batch, its embedding would depend in the last bits on
    the batch it was first seen in (matmul blocking), so a resumed run, which meets its prompts in other
    batches than the uninterrupted run did, would drift from it (by 1e-3 in loss within two epochs), and a
    prompt encoded again after it left the cache gets the same embedding. `max_prompts`: the most recently
    used are kept (None: all)."""

    def __init__(self, pipe, max_prompts: int | None = MAX_CACHED_PROMPTS):
        if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                        or max_prompts < 0):  # -1 failed at the first call: KeyError on popitem
            raise ValueError(f"max_prompts={max_prompts!r} is invalid: the prompt cache's bound must be an int >= 0, "
                             "or None to keep every prompt")
        self.pipe = pipe
        self.max_prompts = max_prompts
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        for prompt in dict.fromkeys(prompts):
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
            else:
                device = weights_device(self.pipe.unet)
                self._cache[prompt] = self.pipe.encode_prompt([prompt], device, 1, False)[0][0]
        embeds = torch.stack([self._cache[p] for p in prompts])
        while self.max_prompts is not None and len(self._cache) > self.max_prompts:  # after the stack: a batch
            self._cache.popitem(last=False)  # may hold more distinct prompts than that
        return embeds

    def clear(self) -> None:
        """Forget every embedding: each prompt is encoded again (after the text encoder changed)."""
        self._cache.clear()


class LCMSampler:
    """Samples trajectories of a fixed horizon with a pipeline's UNet (or a LoRA-wrapped copy of it).

    Holds the schedule's per-action scalars and a cache of prompt embeddings.
    """

    def __init__(
        self,
        pipe,
        horizon: int,
        guidance_scale: float = 8.0,
        original_inference_steps: int = 50,
        train_final_step: bool = False,
        resolution: int | None = None,
        step_backend: str = "auto",
        cuda_graph: bool = False,
        max_cached_prompts: int | None = MAX_CACHED_PROMPTS,
    ):
        scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # own copy: set_timesteps mutates it
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            raise ValueError("LCMScheduler with clip_sample or thresholding is not supported by the policy step (its "
                             "Gaussian policy has no clipped mean): set clip_sample=False and thresholding=False in the "
                             "scheduler's config")
        if not horizon <= original_inference_steps <= scheduler.config.num_train_timesteps:
            raise ValueError(f"original_inference_steps={original_inference_steps} is invalid: it must be in "
                             f"horizon..num_train_timesteps = {horizon}..{scheduler.config.num_train_timesteps}")
        scheduler.set_timesteps(horizon, original_inference_steps=original_inference_steps)
        self.pipe = pipe
        self.horizon = horizon
        self.guidance_scale = guidance_scale
        self.train_final_step = train_final_step
        self.step_backend = step_backend  # policy_step's backend: "auto" (fused C++/Triton) or "reference"
        self.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.prediction_type = scheduler.config.prediction_type
        self.timesteps = scheduler.timesteps.cpu()
        # The last action (trained only with train_final_step, as the reference RLCM code does) takes t_{H-1}
        # as its next timestep: LCMScheduler.step's rule past the end (step itself adds no noise there).
        next_timesteps = torch.cat([self.timesteps[1:], self.timesteps[-1:]])
        self.action_scalars = row_scalars_for_schedule(scheduler, self.timesteps, next_timesteps)  # (H, 6)
        self.prompt_cache = PromptEmbeddingCache(pipe, max_cached_prompts)
        # On the device once: the loop reads them every step (and a host tensor would stop CUDA-graph capture).
        self._device_scalars = self.action_scalars.to(self.device)
        self._device_timesteps = self.timesteps.to(self.device)
        self._guidance_cache: dict[tuple[int, torch.dtype], torch.Tensor | None] = {}
        # sample() replays the H-step loop as one CUDA graph per UNet (cuda_graphs.CapturedCall).
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._captured_rollouts: dict[torch.nn.Module, CapturedCall] = {}

    @property
    def trained_steps(self) -> int:
        return self.horizon if self.train_final_step else self.horizon - 1

    @property
    def device(self) -> torch.device:
        return weights_device(self.pipe.unet)

    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prompt_cache(prompts)

    def guidance(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The guidance embedding for `batch` rows, made once per (batch, dtype): it is built on the host,
        and a host-to-GPU copy from pageable memory waits for the GPU, once per training minibatch otherwise."""
        key = (batch, dtype)
        if key not in self._guidance_cache:
            self._guidance_cache[key] = guidance_embedding(self.pipe, self.guidance_scale, batch, self.device, dtype)
        return self._guidance_cache[key]

    def unet_output(self, unet, x, timesteps, embeds, w_embedding) -> torch.Tensor:
        """The UNet's raw prediction at states x (B rows), timesteps per row or shared."""
        dtype = embeds.dtype
        return unet(
            x.to(dtype), timesteps, encoder_hidden_states=embeds, timestep_cond=w_embedding, return_dict=False
        )[0]

    def _stored_rows(self, unet, states, sample_idx, step_idx, embeds):
        """The UNet's output at the stored states[i, k] of rows (i, k), with those states and their scalars."""
        x = states[sample_idx, step_idx]
        scalars = self._device_scalars[step_idx]  # indexed on the device: no host sync per minibatch
        model_output = self.unet_output(unet, x, self._device_timesteps[step_idx], embeds,
                                        self.guidance(len(x), embeds.dtype))
        return model_output.float(), x, scalars

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds, with_mean: bool = False):
        """log pi of the stored actions states[i, k] -> states[i, k+1] for rows (i, k), any mix of k,
        differentiable with respect to the UNet's (LoRA) weights. With `with_mean` also the policy's
        Gaussian mean (B, C, h, w) and per-row std (B,) at those states (for a KL), else None, None."""
        model_output, x, scalars = self._stored_rows(unet, states, sample_idx, step_idx, embeds)
        denoised, _, log_probs = policy_step(
            model_output, x, scalars, self.prediction_type, next_state=states[sample_idx, step_idx + 1],
            backend=self.step_backend,
        )
        if not with_mean:
            return log_probs.float(), None, None
        return (log_probs.float(), *policy_mean_std(denoised, scalars))

    @torch.no_grad()
    def action_means(self, unet, states, sample_idx, step_idx, embeds):
        """The policy's Gaussian mean (B, C, h, w) and per-row std (B,) at states[i, k], no gradient."""
        model_output, x, scalars = self._stored_rows(unet, states, sample_idx, step_idx, embeds)
        return policy_mean_std(consistency_output(model_output, x, scalars, self.prediction_type), scalars)

    def rollout(self, unet, x, noises, embeds, w_embedding):
        """The H UNet calls from x_0 with the given noise of each action (T = trained_steps of them):
        states (B, T+1, ...), log-probs (B, T) and D_{H-1}. No random draw and no host synchronisation
        inside, so that the whole loop can be captured as one CUDA graph (`_rollout_replayed`, FastLCMSampler)."""
        x = x.float()
        states, log_probs = [x], []
        for k in range(self.horizon):
            scalars = self._device_scalars[k].expand(x.shape[0], 6)
            model_output = self.unet_output(unet, x, self._device_timesteps[k], embeds, w_embedding).float()
            if k == self.trained_steps:  # the last call is no action: its D is the latent the image decodes from
                denoised = consistency_output(model_output, x, scalars, self.prediction_type)
                break
            denoised, x, logp = policy_step(model_output, x, scalars, self.prediction_type, noise=noises[k].float(),
                                            backend=self.step_backend)
            states.append(x)
            log_probs.append(logp.float())
        log_probs = torch.stack(log_probs, dim=1) if log_probs else x.new_zeros(x.shape[0], 0)
        return torch.stack(states, dim=1), log_probs, denoised

    @torch.no_grad()
    def sample(
        self,
        unet,
        prompts: Sequence[str],
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        noises: Sequence[torch.Tensor] | None = None,
        decode: bool = True,
    ) -> Trajectory:
        """Run H UNet calls from x_0 and record every trained action with its log-prob.

        `latents` (x_0) and `noises` (z_0 .. z_{T-1}) may be given; what is missing is drawn from
        `generator` in the pipeline's order.
        """
        batch = len(prompts)
        embeds = self.prompt_embeddings(prompts)
        w_embedding = self.guidance(batch, embeds.dtype)
        # The pipeline's order: x_0, then one noise per action. Nothing else draws from the generator in between,
        # so drawing them all before the loop gives the pipeline's values.
        if latents is None:
            latents = self.draw_latents(batch, generator, embeds.dtype)
        if noises is None:
            noises = self.draw_noises(batch, generator, embeds.dtype)
        x, noises = latents.to(self.device), [z.to(self.device) for z in noises]
        if self.cuda_graph:
            states, log_probs, denoised = self._rollout_replayed(unet, x, noises, embeds, w_embedding)
        else:
            states, log_probs, denoised = self.rollout(unet, x, noises, embeds, w_embedding)
        trajectory = Trajectory(prompts=list(prompts), states=states, log_probs=log_probs, denoised=denoised)
        if decode:
            trajectory.images = self.decode(denoised)
        return trajectory

    def draw_latents(self, batch: int, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
        """x_0 for `batch` trajectories, as `sample` draws it (the trainer draws several sampling batches'
        x_0 and noises this way, batch after batch, and samples them in one call)."""
        return standard_normal(self, batch, generator, dtype)

    def draw_noises(self, batch: int, generator: torch.Generator | None, dtype: torch.dtype) -> list[torch.Tensor]:
        """The noise of each action for `batch` trajectories, as `sample` draws them after x_0."""
        return [standard_normal(self, batch, generator, dtype) for _ in range(self.trained_steps)]

    def _rollout_replayed(self, unet, x, noises, embeds, w_embedding):
        """`rollout` through its CUDA graph, with outputs of their own; without the graph (and a warning)
        from here on if it cannot be captured."""
        if unet not in self._captured_rollouts:
            self._captured_rollouts[unet] = CapturedCall(lambda *inputs: self.rollout(unet, *inputs), self.device)
        stacked = torch.stack(noises) if noises else x.new_zeros((0, *x.shape))
        try:
            outputs = self._captured_rollouts[unet](x, stacked, embeds, w_embedding)
        except CaptureError as error:
            warnings.warn(f"{error}; sampling goes on without CUDA graphs")
            self.cuda_graph = False
            return self.rollout(unet, x, noises, embeds, w_embedding)
        return tuple(t.clone() for t in outputs)  # the next replay overwrites the graph's buffers

    def decode(self, denoised: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe, denoised)
