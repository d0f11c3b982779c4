"""The policy-gradient objectives and advantage estimators the trainer can use, as plain functions.

- `clipped_policy_loss`: PPO's clipped surrogate, the RLCM paper's Algorithm 1 (the default).
- `rebel_loss`: REBEL (Gao et al., 2024) as the reference RLCM code applies it: regress the difference
  of two trajectories' log-ratios (summed over their trained steps) onto their advantage difference.
- `group_advantages`: GRPO-style normalisation within each group of images of one prompt.
- `gaussian_kl`: KL between the policy's and the base model's Gaussians at the same state.
- `choose_trained_steps`: the steps of each trajectory trained this epoch (step subsampling).

Each works on tensors that the trainer gathers; none knows about models, so each is tested on its own.
"""

from __future__ import annotations

import numpy as np
import torch


def clipped_policy_loss(log_probs, old_log_probs, advantages, clip_range: float, adv_clip_max: float):
    """PPO's clipped surrogate over (sample, step) rows, plus the diagnostics logged per optimizer step."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * ((log_probs - old_log_probs) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio": ratio.mean(),
        }
    return loss, stats


def rebel_loss(log_probs, old_log_probs, advantages, eta: float, adv_clip_max: float):
    """REBEL's squared regression loss over pairs of trajectories of the same prompt.

    log_probs, old_log_probs: (2P, K) per trained step, rows 2p and 2p+1 are the pair (y, y').
    advantages: (2P,). The trajectory's log-ratio is the SUM over its K trained steps (each step's
    log-prob itself being a mean over the latent's elements, as everywhere in this package):

        loss = mean_p ( eta * [log_ratio(y) - log_ratio(y')] - [A(y) - A(y')] )^2
    """
    if log_probs.shape[0] % 2:
        raise ValueError(f"REBEL needs trajectories in pairs; got {log_probs.shape[0]} rows")
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = (log_probs - old_log_probs).sum(dim=1).view(-1, 2)
    advantage_pairs = advantages.view(-1, 2)
    residual = eta * (log_ratio[:, 0] - log_ratio[:, 1]) - (advantage_pairs[:, 0] - advantage_pairs[:, 1])
    loss = (residual**2).mean()
    with torch.no_grad():
        step_log_ratio = log_probs - old_log_probs
        stats = {
            "approx_kl": 0.5 * (step_log_ratio**2).mean(),
            "ratio": torch.exp(step_log_ratio).mean(),
        }
    return loss, stats


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """(r - group mean) / (group std + 1e-6) within consecutive groups of `group_size` rewards.

    The sampler lays a round out as [p0 x G, p1 x G, ...], and gathering concatenates whole rounds, so
    consecutive blocks of G are exactly the images of one prompt in one round. Population std (ddof=0),
    so each group comes out with mean 0 and std 1 (up to the 1e-6).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if group_size < 1 or rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    normalised = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, keepdims=True) + 1e-6)
    return normalised.reshape(-1)


def gaussian_kl(mean, base_mean, std) -> torch.Tensor:
    """Per-row KL( N(mean, std^2) || N(base_mean, std^2) ) of two Gaussian policies with the same std,
    averaged over the elements like the log-prob: mean over elements of (mean - base_mean)^2 / (2 std^2).

    mean, base_mean: (B, ...); std: (B,), one per row (the action's noise level)."""
    shape = (-1,) + (1,) * (mean.ndim - 1)
    z = (mean - base_mean.to(mean.dtype)) / std.to(mean.dtype).view(shape)
    return 0.5 * (z * z).flatten(1).mean(dim=1)


def trained_step_count(total_steps: int, fraction: float) -> int:
    """How many of a trajectory's `total_steps` trained actions a `fraction` keeps: int(fraction x steps), as
    ddpo-pytorch's timestep_fraction counts them, and at least one."""
    return max(1, min(total_steps, int(fraction * total_steps)))


def choose_trained_steps(samples: int, total_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(samples, K) step indices, sorted per row, K = trained_step_count(total_steps, fraction).

    Each trajectory gets its own random subset of K steps; with fraction 1 every step, in order, with no
    random draw (so a default run's shuffles are unaffected)."""
    count = trained_step_count(total_steps, fraction)
    if count == total_steps:
        return torch.arange(total_steps).expand(samples, total_steps).clone()
    keys = torch.rand(samples, total_steps, generator=generator)
    return keys.argsort(dim=1)[:, :count].sort(dim=1).values
