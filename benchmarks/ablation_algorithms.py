"""Ablation of the training algorithms: PPO (the paper's), REBEL and group-relative PPO, each with and
without a KL penalty to the base model.

CPU part (always): seeded runs on the tiny preset and JPEG compressibility; reward against reward
queries (images scored) and against wall-clock, plus the final KL of the policy to the base model.
GPU part (when CUDA is there): time only, on the random-weight LCM_Dreamshaper_v7 architecture
(`sd15-lcm`) at the paper's compression hyperparameters: seconds per epoch split into sampling and
training for every variant (random weights: the rewards mean nothing, the times do).

Writes benchmarks/results/ablation_algorithms-<device>.json and .png (DIR/ablation_algorithms.json and .png
with --out-dir DIR). --quick: PPO with and without KL only, 1 epoch (or --epochs) of 8 samples, no GPU part
(a smoke run).
Usage: python benchmarks/ablation_algorithms.py [--epochs 15] [--seed 0] [--kl-beta 0.01] [--gpu-epochs 1]
       [--quick] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, output_folder, positive_int  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs per tiny run (default 15, --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl-beta", type=float, default=0.01)
    parser.add_argument("--gpu-epochs", type=positive_int, default=1, help="epochs per sd15-lcm timing run (GPU only)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: PPO with and without KL, 1 epoch of 8 samples, no GPU part")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write into DIR instead of benchmarks/results/")
    return parser, parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import torch  # noqa: E402

from common import environment, results_path, write_result  # noqa: E402
from rlcm_fast.config import ConfigError, resolve_config  # noqa: E402
from rlcm_fast.trainer import Trainer  # noqa: E402

# Overrides per variant on top of the preset. REBEL trains pairs: 2 images per prompt, and its
# train_batch_size counts pairs, so 4 pairs (8 trajectories) per minibatch on the tiny preset.
VARIANTS = {
    "ppo": {},
    "rebel": {"algorithm": "rebel", "images_per_prompt": 2, "train_batch_size": 4},
    "group_ppo": {"advantages": "group", "images_per_prompt": 4},
}
# On sd15-lcm the paper's sample batch is 4 and train batch 2 (per GPU): REBEL gets 1 pair per minibatch.
GPU_VARIANTS = {
    "ppo": {},
    "rebel": {"algorithm": "rebel", "images_per_prompt": 2, "train_batch_size": 1},
    "group_ppo": {"advantages": "group", "images_per_prompt": 4},
}


def run_variant(overrides: dict, run_dir: Path, measure_kl: bool) -> dict:
    cfg = resolve_config(overrides={"grid_every": 0, "checkpoint_every": 10_000, **overrides})
    trainer = Trainer(cfg, run_dir)
    started = time.perf_counter()
    records = trainer.train()
    wall = time.perf_counter() - started
    per_epoch = cfg.samples_per_epoch * trainer.accelerator.num_processes
    result = {
        "config": {k: v for k, v in cfg.to_dict().items() if k in overrides or k in ("model", "epochs", "seed")},
        "wall_seconds": wall,
        "epochs": [
            {
                "epoch": r["epoch"],
                "reward_mean": r["reward_mean"],
                "reward_std": r["reward_std"],
                "reward_queries": r["epoch"] * per_epoch,
                "sample_seconds": r["sample_seconds"],
                "train_seconds": r["train_seconds"],
            }
            for r in records
        ],
    }
    elapsed = 0.0
    for record in result["epochs"]:
        elapsed += record["sample_seconds"] + record["train_seconds"]
        record["elapsed_seconds"] = elapsed
    if measure_kl:
        result["final_kl_to_base"] = trainer.kl_to_base(trainer.sample_epoch(cfg.epochs))
    return result


def variants(kl_beta: float, table: dict) -> dict[str, dict]:
    out = {}
    for name, overrides in table.items():
        out[name] = dict(overrides)
        out[f"{name}+kl"] = {**overrides, "kl_beta": kl_beta}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_queries, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in result["cpu_tiny"]["runs"].items():
        style = "--" if name.endswith("+kl") else "-"
        rewards = [e["reward_mean"] for e in run["epochs"]]
        by_queries.plot([e["reward_queries"] for e in run["epochs"]], rewards, style, label=name)
        by_time.plot([e["elapsed_seconds"] for e in run["epochs"]], rewards, style, label=name)
    by_queries.set_xlabel("reward queries (images scored)")
    by_time.set_xlabel(f"wall-clock seconds ({result['device']})")
    for axis in (by_queries, by_time):
        axis.set_ylabel("mean reward (-JPEG kB)")
        axis.grid(alpha=0.3)
    by_queries.legend(fontsize=8)
    figure.suptitle(f"tiny preset, JPEG compressibility, seed {result['cpu_tiny']['seed']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 15)  # --epochs, when given, also holds with --quick
    # Quick: one sampling batch of 8 per epoch (REBEL: 4 pairs in one minibatch; group PPO: 2 groups of 4).
    quick = {"batches_per_epoch": 1, "sample_batch_size": 8, "train_batch_size": 8} if args.quick else {}
    table = {"ppo": VARIANTS["ppo"]} if args.quick else VARIANTS
    tiny = {name: {"device": "cpu", "model": "tiny", "epochs": epochs, "seed": args.seed, **quick, **overrides}
            for name, overrides in variants(args.kl_beta, table).items()}
    try:  # a bad --kl-beta (say): one line now, not a traceback after the first variant's training
        for overrides in tiny.values():
            resolve_config(overrides=overrides)
    except ConfigError as error:
        parser.error(str(error))

    result = {"benchmark": "ablation_algorithms", **environment(),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, overrides in tiny.items():
            print(f"tiny: {name}", file=sys.stderr)
            runs[name] = run_variant(overrides, Path(tmp) / f"tiny-{name}", measure_kl=True)
        result["cpu_tiny"] = {"seed": args.seed, "kl_beta": args.kl_beta, "runs": runs}
        if args.quick:
            result["skipped"].append({"part": "rebel and group_ppo variants", "reason": "--quick (smoke run)"})

        if torch.cuda.is_available() and not args.quick:
            timings = {}
            for name, overrides in variants(args.kl_beta, GPU_VARIANTS).items():
                print(f"sd15-lcm: {name}", file=sys.stderr)
                run = run_variant({"device": "cuda", "model": "sd15-lcm", "task": "compressibility",
                                   "epochs": args.gpu_epochs, "seed": args.seed, **overrides},
                                  Path(tmp) / f"gpu-{name}", measure_kl=False)
                timings[name] = {"config": run["config"], "epochs": run["epochs"]}
            result["gpu_sd15_lcm"] = timings
        else:
            reason = "--quick (smoke run)" if args.quick else "CUDA is not available"
            result["skipped"].append({"part": "gpu_sd15_lcm timings", "reason": reason})

    plot(result, results_path("ablation_algorithms", ".png", args.out_dir))
    print(f"wrote {write_result('ablation_algorithms', result, args.out_dir)}")
    for name, run in result["cpu_tiny"]["runs"].items():
        first, last = run["epochs"][0]["reward_mean"], run["epochs"][-1]["reward_mean"]
        print(f"{name:14s} reward {first:+.3f} -> {last:+.3f}  KL to base {run['final_kl_to_base']:.4f}  "
              f"{run['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
