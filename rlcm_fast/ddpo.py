"""The DDPO baseline's policy: DDIM sampling of a Stable Diffusion model as an MDP (README, "The DDPO baseline").

DDPO (Black et al., 2024) shares everything with RLCM in this package (trainer, clipped loss, stat
tracker, rewards) except the policy, which lives here behind the same interface as `LCMSampler`:

    x_0 ~ N(0, I)
    for k = 0 .. S-1   (S = num_steps, diffusers' DDIMScheduler timesteps t_k and previous timesteps p_k):
        eps, pred_x0  = the UNet's prediction with classifier-free guidance (batch doubled, uncond = "")
        mean_k        = sqrt(a_{p_k}) pred_x0 + sqrt(1 - a_{p_k} - std_k^2) eps
        std_k         = eta * sqrt((1 - a_{p_k}) / (1 - a_{t_k}) * (1 - a_{t_k} / a_{p_k}))   (DDIM's eq. 16)
        x_{k+1}       = mean_k + std_k z_k                     (action k, every one of the S is trained)
    image = VAE.decode(x_S / scaling_factor)

log pi(x_{k+1} | x_k) is the Gaussian log-density MEANED over the latent's elements, as everywhere in
this package. The generator is drawn in `StableDiffusionPipeline`'s order (initial latents, then one
noise per step inside `DDIMScheduler.step`), so with the same generator the images are the pipeline's.
The step is plain PyTorch: DDPO is the baseline, as its reference implementation is.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers import DDIMScheduler

from .policy_step import check_prediction_type, mean_gaussian_log_prob, row_columns
from .sampler import PromptEmbeddingCache, Trajectory, decode_latents, standard_normal, weights_device

# Column order of the (S, 5) float64 table of per-action constants.
DDIM_SCALARS = ("alpha_t", "sigma_t", "alpha_prev", "direction", "std")


def ddim_row_scalars(scheduler: DDIMScheduler, eta: float) -> torch.Tensor:
    """(S, 5) float64 constants of each DDIM action of a scheduler whose timesteps are set, from the
    scheduler's own alphas_cumprod, final_alpha_cumprod and previous-timestep rule. The variance is DDIM's
    (Song et al., eq. 16), the one DDIMScheduler.step uses, written out here rather than read from the
    scheduler's private `_get_variance`."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps  # as DDIMScheduler.step
    rows = []
    for t in scheduler.timesteps.tolist():
        prev = t - step
        a_t = float(scheduler.alphas_cumprod[t])
        a_prev = float(scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod)
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        rows.append([math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_prev), math.sqrt(max(1 - a_prev - std**2, 0.0)),
                     std])
    return torch.tensor(rows, dtype=torch.float64)


def ddim_mean(model_output, x, scalars, prediction_type: str):
    """The DDIM action's Gaussian mean (B, ...) and std (B,), in float32 (float64 for float64 x)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    alpha_t, sigma_t, alpha_prev, direction, std = row_columns(scalars.to(x.device), x.ndim, dtype)
    out, xc = model_output.to(dtype), x.to(dtype)
    if prediction_type == "epsilon":
        eps, pred_x0 = out, (xc - sigma_t * out) / alpha_t
    elif prediction_type == "sample":
        pred_x0, eps = out, (xc - alpha_t * out) / sigma_t
    elif prediction_type == "v_prediction":
        pred_x0, eps = alpha_t * xc - sigma_t * out, alpha_t * out + sigma_t * xc
    else:
        check_prediction_type(prediction_type)
    return alpha_prev * pred_x0 + direction * eps, std.flatten()


def ddim_step(model_output, x, scalars, prediction_type: str, noise=None, next_state=None):
    """One DDIM action: (mean, next state, per-row mean log-prob). Give `noise` (sampling) or the
    stored `next_state` (training). Differentiable with respect to `model_output`."""
    if (noise is None) == (next_state is None):
        raise ValueError("give exactly one of noise (sampling) or next_state (training)")
    mean, std = ddim_mean(model_output, x, scalars, prediction_type)
    shape = (-1,) + (1,) * (x.ndim - 1)
    if next_state is None:
        next_state = (mean + std.view(shape) * noise.to(mean.dtype)).to(x.dtype)
    return mean, next_state, mean_gaussian_log_prob(next_state, mean, std)


def _first_timestep(scheduler_config, num_steps: int) -> int:
    """The first (largest) of `num_steps` DDIM timesteps, set on a copy of the scheduler."""
    probe = DDIMScheduler.from_config(scheduler_config)
    probe.set_timesteps(num_steps)
    return int(probe.timesteps.max())


def ddim_horizon_problem(scheduler_config, num_steps: int) -> str | None:
    """Why a scheduler cannot take `num_steps` DDIM steps, for a message, or None. Beyond num_train_timesteps
    diffusers' own message names no key; within, steps_offset (1 for SD1.5) can put the first step past
    alphas_cumprod's end (1000 steps: timestep 1000 of 0..999), an IndexError mid-sampling."""
    total = scheduler_config.num_train_timesteps
    if not 1 <= num_steps <= total:
        return f"it must be in 1..{total} (the scheduler's num_train_timesteps)"
    if (first := _first_timestep(scheduler_config, num_steps)) < total:
        return None
    fits = next((n for n in range(num_steps - 1, 0, -1) if _first_timestep(scheduler_config, n) < total), None)
    return (f"its first DDIM timestep would be {first}, past the scheduler's 0..{total - 1} (steps_offset="
            f"{scheduler_config.steps_offset}); "
            + (f"{fits} steps fit" if fits else f"no step count fits: steps_offset must be below {total}"))


class DDPOSampler:
    """Samples S-step DDIM trajectories with classifier-free guidance; the same interface as LCMSampler."""

    def __init__(self, pipe, num_steps: int = 50, guidance_scale: float = 5.0, eta: float = 1.0,
                 resolution: int | None = None):
        if not (math.isfinite(eta) and 0 < eta <= 1):  # beyond 1, eta^2 sigma_t^2 > 1 - a_prev: no DDIM direction
            raise ValueError(f"eta={eta} is invalid: DDPO's DDIM eta must be in (0, 1] (0 has no log-density)")
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("DDPOSampler needs a Stable Diffusion UNet; this one has an LCM guidance embedding")
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # own copy: set_timesteps mutates it
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            raise ValueError("DDIMScheduler with clip_sample or thresholding is not supported by the DDPO policy")
        if problem := ddim_horizon_problem(scheduler.config, num_steps):
            raise ValueError(f"horizon={num_steps} is invalid: {problem}")
        scheduler.set_timesteps(num_steps)
        self.pipe = pipe
        self.horizon = num_steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.prediction_type = scheduler.config.prediction_type
        check_prediction_type(self.prediction_type)
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        self.timesteps = scheduler.timesteps.cpu()
        self.action_scalars = ddim_row_scalars(scheduler, eta)  # (S, 5)
        if not (self.action_scalars[:, DDIM_SCALARS.index("std")] > 0).all():
            raise ValueError(f"eta={eta} with this scheduler gives an action of zero variance (eta must be > 0, and "
                             "set_alpha_to_one=True makes the last step deterministic): it has no log-density")
        self.prompt_cache = PromptEmbeddingCache(pipe)
        self._device_scalars = self.action_scalars.to(self.device)  # no host-to-device copy per step or minibatch
        self._device_timesteps = self.timesteps.to(self.device)

    @property
    def trained_steps(self) -> int:
        return self.horizon  # all S actions (DDPO's timestep_fraction 1.0; step_fraction subsamples)

    @property
    def device(self) -> torch.device:
        return weights_device(self.pipe.unet)

    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prompt_cache(prompts)

    def guided_output(self, unet, x, timesteps, embeds) -> torch.Tensor:
        """The UNet's prediction with classifier-free guidance: one doubled batch [uncond; cond], then
        uncond + g (cond - uncond), as StableDiffusionPipeline does. `timesteps`: one, or one per row."""
        dtype = embeds.dtype
        if self.guidance_scale <= 1.0:
            return unet(x.to(dtype), timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        uncond = self.prompt_embeddings([""]).to(dtype).expand(len(x), -1, -1)
        if timesteps.ndim:
            timesteps = torch.cat([timesteps, timesteps])
        both = unet(torch.cat([x, x]).to(dtype), timesteps, encoder_hidden_states=torch.cat([uncond, embeds]),
                    return_dict=False)[0]
        output_uncond, output_cond = both.float().chunk(2)  # the guidance arithmetic in float32
        return output_uncond + self.guidance_scale * (output_cond - output_uncond)

    def _stored_rows(self, unet, states, sample_idx, step_idx, embeds):
        """(model_output, x, DDIM scalars) of rows (i, k) of stored trajectories, as LCMSampler's."""
        x = states[sample_idx, step_idx]
        model_output = self.guided_output(unet, x, self._device_timesteps[step_idx], embeds)
        return model_output.float(), x, self._device_scalars[step_idx]

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds, with_mean: bool = False):
        """log pi of the stored actions states[i, k] -> states[i, k+1] for rows (i, k), any mix of k,
        differentiable with respect to the UNet's (LoRA) weights; with `with_mean` also the Gaussian mean
        (B, C, h, w) and per-row std (B,), else None, None."""
        model_output, x, scalars = self._stored_rows(unet, states, sample_idx, step_idx, embeds)
        mean, _, log_probs = ddim_step(model_output, x, scalars, self.prediction_type,
                                       next_state=states[sample_idx, step_idx + 1])
        if not with_mean:
            return log_probs.float(), None, None
        return log_probs.float(), mean.float(), scalars[:, DDIM_SCALARS.index("std")].to(self.device, torch.float32)

    @torch.no_grad()
    def action_means(self, unet, states, sample_idx, step_idx, embeds):
        """The policy's Gaussian mean (B, C, h, w) and per-row std (B,) at states[i, k], no gradient."""
        model_output, x, scalars = self._stored_rows(unet, states, sample_idx, step_idx, embeds)
        mean, std = ddim_mean(model_output, x, scalars, self.prediction_type)
        return mean.float(), std.to(torch.float32)

    @torch.no_grad()
    def sample(self, unet, prompts: Sequence[str], generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None, noises: Sequence[torch.Tensor] | None = None,
               decode: bool = True) -> Trajectory:
        """S guided UNet calls from x_0, every action recorded with its log-prob; the image is decoded from
        x_S. `latents` and `noises` may be given; what is missing is drawn from `generator` in the
        pipeline's order."""
        batch = len(prompts)
        embeds = self.prompt_embeddings(prompts)
        # The pipeline's order: x_0, then one noise per step. Nothing else draws from the generator in between,
        # so drawing them all before the loop gives the pipeline's values.
        if latents is None:
            latents = self.draw_latents(batch, generator, embeds.dtype)
        if noises is None:
            noises = self.draw_noises(batch, generator, embeds.dtype)
        x = latents.to(self.device, torch.float32)
        states, log_probs = [x], []
        for k in range(self.horizon):
            model_output = self.guided_output(unet, x, self._device_timesteps[k], embeds).float()
            _, x, logp = ddim_step(model_output, x, self._device_scalars[k].expand(batch, -1), self.prediction_type,
                                   noise=noises[k].to(self.device, torch.float32))
            states.append(x)
            log_probs.append(logp.float())
        trajectory = Trajectory(prompts=list(prompts), states=torch.stack(states, dim=1),
                                log_probs=torch.stack(log_probs, dim=1), denoised=x)
        if decode:
            trajectory.images = self.decode(x)
        return trajectory

    def draw_latents(self, batch: int, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
        """x_0 for `batch` trajectories, as `sample` draws it (see LCMSampler.draw_latents)."""
        return standard_normal(self, batch, generator, dtype) * self.init_noise_sigma

    def draw_noises(self, batch: int, generator: torch.Generator | None, dtype: torch.dtype) -> list[torch.Tensor]:
        """The noise of each DDIM step for `batch` trajectories, as `sample` draws them after x_0."""
        return [standard_normal(self, batch, generator, dtype) for _ in range(self.horizon)]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe, latents)
