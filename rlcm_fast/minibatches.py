"""How an epoch's trained (sample, step) rows are cut into optimizer updates and minibatches.

Each plan is a generator over updates; an update is a list of minibatches (sample_idx, step_idx), both
(rows, K) index tensors: K = 1 for PPO's mixed rows, K = trained steps for REBEL's whole trajectories.
`trained` is the (samples, K) table of each sample's trained steps (`algorithms.choose_trained_steps`).
A plan draws its one shuffle from `generator` when it starts, before yielding anything, so a resumed
epoch that skips finished updates still consumes the same random numbers.
"""

from __future__ import annotations

import torch


def updates_per_pass(algorithm: str, samples: int, rows: int, accumulation: int) -> int:
    """Optimizer updates in one pass over an epoch's `samples` trajectories: each update takes
    accumulation x rows units (REBEL's unit is a pair of trajectories, PPO's a trajectory); a remainder
    too small for an update is left out. Every plan below yields this many, and the trainer counts its
    progress (and a resume's position) by it."""
    units = samples // 2 if algorithm == "rebel" else samples
    return units // (rows * accumulation)


def flattened_rows(trained: torch.Tensor, generator: torch.Generator, rows: int, accumulation: int):
    """PPO (the fast path): each update takes accumulation x rows shuffled samples, as the reference loop
    does (`per_timestep_rows`, the same samples for the same generator), and shuffles all their (sample,
    trained step) pairs together into accumulation x K minibatches of `rows` pairs. So an update covers
    every trained step of its samples (README, "The algorithm"), with timesteps mixed within a minibatch."""
    n, count = trained.shape
    per_update = rows * accumulation
    order = torch.randperm(n, generator=generator).to(trained.device)
    mixes = [torch.randperm(per_update * count, generator=generator).to(trained.device)  # every draw up front
             for _ in range(updates_per_pass("ppo", n, rows, accumulation))]
    for update, mix in enumerate(mixes):
        sample_idx = order[update * per_update : (update + 1) * per_update][mix // count]
        step_idx = trained[sample_idx, mix % count]
        yield [
            (sample_idx[m * rows : (m + 1) * rows, None], step_idx[m * rows : (m + 1) * rows, None])
            for m in range(accumulation * count)
        ]


def per_timestep_rows(trained: torch.Tensor, generator: torch.Generator, rows: int, accumulation: int):
    """The reference loop (`train_rows: per_timestep`, the straightforward path): each update takes
    accumulation x rows shuffled samples, and each minibatch is `rows` of them at ONE of their trained
    steps, step after step. Same pairs and weights per update as `flattened_rows`, other batching."""
    n, count = trained.shape
    order = torch.randperm(n, generator=generator).to(trained.device)
    for update in range(updates_per_pass("ppo", n, rows, accumulation)):
        minibatches = []
        for m in range(accumulation):
            chosen = order[(update * accumulation + m) * rows :][:rows]
            minibatches += [(chosen[:, None], trained[chosen, column][:, None]) for column in range(count)]
        yield minibatches


def trajectory_pairs(trained: torch.Tensor, generator: torch.Generator, rows: int, accumulation: int):
    """REBEL: minibatches of `rows` PAIRS of whole trajectories (both images of a pair share a prompt:
    samples 2p and 2p+1 of a round), each trajectory with all its trained steps."""
    pairs = trained.shape[0] // 2
    order = torch.randperm(pairs, generator=generator).to(trained.device)
    for update in range(updates_per_pass("rebel", trained.shape[0], rows, accumulation)):
        minibatches = []
        for m in range(accumulation):
            chosen = order[(update * accumulation + m) * rows :][:rows]
            sample_idx = torch.stack([2 * chosen, 2 * chosen + 1], dim=1).flatten()  # y, y' side by side
            minibatches.append((sample_idx[:, None].expand(-1, trained.shape[1]), trained[sample_idx]))
        yield minibatches


def regrouped(plan, rows_per_call: int):
    """`plan` with each update's minibatches (K = 1 rows) joined and cut again into minibatches of
    `rows_per_call` rows (the last one may be shorter): the same rows in the same order, other UNet
    batches. The trainer weights each minibatch's mean loss by its share of the update's rows, so the
    update's gradient is unchanged."""
    def plan_in_calls(trained, generator, rows, accumulation):
        for minibatches in plan(trained, generator, rows, accumulation):
            sample_idx = torch.cat([s for s, _ in minibatches])
            step_idx = torch.cat([k for _, k in minibatches])
            yield list(zip(sample_idx.split(rows_per_call), step_idx.split(rows_per_call)))
    return plan_in_calls


def minibatch_plan(algorithm: str, train_rows: str, rows_per_call: int = 0):
    """The plan for a config: REBEL needs whole trajectories; PPO takes flattened or per-timestep rows,
    flattened ones in UNet calls of `rows_per_call` rows when it is set."""
    if algorithm == "rebel":
        return trajectory_pairs
    if train_rows == "per_timestep":
        return per_timestep_rows
    return regrouped(flattened_rows, rows_per_call) if rows_per_call else flattened_rows
