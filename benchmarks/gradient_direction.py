"""Does a step along the RLCM policy-gradient estimate raise the expected reward? A finite-difference check.

The estimate (the PPO loss's gradient at ratio 1, i.e. mean_i,k A_i * grad log pi(x_{k+1} | x_k)) only
sees the H-1 stochastic actions. The last UNet call, D_{H-1} = f_theta(x_{H-1}), is deterministic, and
its dependence on theta is not in a score-function estimate at all. This script measures how much that
matters on a model:

1. sample N trajectories, score them, normalise the rewards (batch mean and std) into advantages, and
   compute the estimate g over all of them;
2. move the LoRA weights to theta + s * eps * sign(g) for s = +1 and -1 (a first Adam step has this
   shape) and sample N fresh trajectories with the same noises each time (common random numbers), so
   that the reward differences are the step's effect, not sampling noise;
3. do this three ways: the step applied to every UNet call (`all`, what training does), only to the
   calls that produce actions (`actions`: the last call runs with the base weights; what the estimate
   accounts for), only to the last call (`final`: what it leaves out).

A first-order effect flips sign with s; an effect of the same sign for both s is curvature.
With `--set method=ddpo` (tiny-sd) only `all` is measured: every DDIM step is an action, the last one
included, so the DDPO estimate leaves no UNet call out.
Writes benchmarks/results/gradient_direction-<device>.json (DIR/gradient_direction.json with --out-dir);
gradient_direction_ddpo for DDPO.
Usage: python benchmarks/gradient_direction.py [--task incompressibility] [--samples 256] [--eps 0.001 0.003]
       [--set key=value ...] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, output_folder, positive_int  # noqa: E402

BATCH = 32  # trajectories per sampling round


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--task", default="incompressibility")
    parser.add_argument("--samples", type=positive_int, default=256,
                        help=f"trajectories per estimate and per evaluation, a multiple of {BATCH}")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.003], help="sign-step sizes, > 0")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/gradient_direction.json instead of benchmarks/results/")
    args = parser.parse_args(argv)
    if args.samples % BATCH:
        parser.error(f"--samples {args.samples} must be a multiple of {BATCH}")
    # Each size steps both ways (along and against the estimate): a negative one swaps the two, 0 moves nothing,
    # inf (or nan) makes every LoRA weight inf (nan).
    if bad := [eps for eps in args.eps if not (eps > 0 and math.isfinite(eps))]:
        parser.error(f"--eps {' '.join(f'{eps:g}' for eps in bad)} invalid: each sign-step size must be > 0 and "
                     "finite")
    if repeated := sorted({eps for eps in args.eps if args.eps.count(eps) > 1}):
        parser.error(f"--eps repeats {' '.join(f'{eps:g}' for eps in repeated)}: give each size once")
    return parser, args


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import environment, write_result  # noqa: E402
from rlcm_fast.config import ConfigError, parse_set_pairs, resolve_config  # noqa: E402
from rlcm_fast.models import ModelLoadError  # noqa: E402
from rlcm_fast.trainer import Trainer  # noqa: E402

SCOPES = ("all", "actions", "final")


@contextmanager
def base_weights_for(trainer: Trainer, scope: str):
    """Within: the UNet calls outside `scope` run with the LoRA switched off (the base weights)."""
    if scope == "all":  # nothing to switch off (and DDPO's sampler has no per-call hook)
        yield
        return
    sampler, horizon = trainer.sampler, trainer.sampler.horizon
    unet_output, calls = sampler.unet_output, [0]

    def scoped(unet, x, timesteps, embeds, w_embedding):
        k, calls[0] = calls[0] % horizon, calls[0] + 1
        final = k == horizon - 1
        if scope == "all" or (scope == "final") == final:
            return unet_output(unet, x, timesteps, embeds, w_embedding)
        trainer.unet.disable_adapters()
        try:
            return unet_output(unet, x, timesteps, embeds, w_embedding)
        finally:
            trainer.unet.enable_adapters()

    sampler.unet_output = scoped
    try:
        yield
    finally:
        sampler.unet_output = unet_output


def mean_reward(trainer: Trainer, epoch: int) -> tuple[float, float]:
    """Mean and std of the reward over one epoch of samples drawn from the seed's stream for `epoch`."""
    rewards = trainer.sample_epoch(epoch).rewards
    return float(np.mean(rewards)), float(np.std(rewards))


def policy_gradient_estimate(trainer: Trainer, samples) -> list[torch.Tensor]:
    """mean over (i, k) of A_i * grad log pi(x_{k+1} | x_k): the PPO loss's descent direction at ratio 1."""
    rewards = samples.rewards
    advantages = torch.as_tensor((rewards - rewards.mean()) / (rewards.std() + 1e-6), dtype=torch.float32)
    n, steps = samples.log_probs.shape
    embeds = trainer.sampler.prompt_embeddings(samples.prompts)
    trainer.unet.train()
    for p in trainer.params:
        p.grad = None
    for rows in torch.arange(n).split(BATCH):
        sample_idx, step_idx = rows.repeat_interleave(steps), torch.arange(steps).repeat(len(rows))
        with trainer.autocast():  # as the trainer's own updates (a no-op in float32, the default on a CPU)
            log_probs = trainer.sampler.action_log_probs(trainer.unet, samples.states, sample_idx, step_idx,
                                                         embeds[sample_idx])[0]
        ((advantages[sample_idx] * log_probs).sum() / (n * steps)).backward()
    return [p.grad.detach().clone() for p in trainer.params]


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:  # an unknown task or a bad --set: one line before any model loads
        overrides = {"device": "cpu", "sample_batch_size": BATCH, "batches_per_epoch": args.samples // BATCH,
                     "reward_overlap": False, "grid_every": 0, **parse_set_pairs(args.set)}
        cfg = resolve_config(task=args.task, overrides=overrides)
    except ConfigError as error:
        parser.error(str(error))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        try:  # what only the trainer checks (--set device=cuda without CUDA, a model that does not load)
            # Its sampling bars say "epoch 2" at every evaluation: on a terminal only, not through a log file.
            trainer = Trainer(cfg, Path(run_dir), progress_bars=sys.stderr.isatty())
        except (ConfigError, ModelLoadError) as error:
            parser.error(str(error))
        estimate = policy_gradient_estimate(trainer, trainer.sample_epoch(0))
        base = [p.detach().clone() for p in trainer.params]
        evaluation_epoch = 1  # other trajectories than the estimate's, the same ones for every evaluation
        base_mean, base_std = mean_reward(trainer, evaluation_epoch)
        print(f"{cfg.reward}: base reward {base_mean:.4f} +- {base_std:.4f} over {args.samples} samples", flush=True)
        effects = []
        for scope in SCOPES if cfg.method == "rlcm" else ("all",):
            for eps in args.eps:
                row = {"scope": scope, "eps": eps}
                for sign, name in ((1, "along"), (-1, "against")):
                    with torch.no_grad():
                        for p, p0, g in zip(trainer.params, base, estimate):
                            p.copy_(p0 + sign * eps * g.sign())
                    with base_weights_for(trainer, scope):
                        row[name] = mean_reward(trainer, evaluation_epoch)[0] - base_mean
                effects.append(row)
                print(f"  {scope:8s} eps {eps:g}: along the estimate {row['along']:+.4f}, "
                      f"against it {row['against']:+.4f}", flush=True)
    name = "gradient_direction" if cfg.method == "rlcm" else f"gradient_direction_{cfg.method}"
    path = write_result(name, {
        "benchmark": "gradient_direction", **environment(),
        "config": {"task": args.task, "method": cfg.method, "model": cfg.model, "reward": cfg.reward,
                   "samples": args.samples, "horizon": cfg.horizon, "seed": cfg.seed,
                   "overrides": parse_set_pairs(args.set)},
        "base_reward_mean": base_mean,
        "base_reward_std": base_std,
        "reward_change": effects,
        "seconds": time.perf_counter() - started,
    }, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
