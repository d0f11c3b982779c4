"""Whole RL training loop: seconds per epoch split into sampling, reward and training, images/s, peak GPU
memory and MFU, for the fast path, each optimisation off on its own, the straightforward path, and DDPO.

GPU mode (CUDA available): the compression task at the paper's hyperparameters (Table 1, per GPU: 10
batches of 4 samples, train batch 2, gradient accumulation 2, H = 8, LoRA rank 16) on `sd15-lcm`
(LCM_Dreamshaper_v7's architecture, random weights: the rewards mean nothing, the times do) at 768 px,
bf16. The defaults (`fast`) make UNet calls as `auto` chooses (rlcm_fast/call_sizes.py: on the H200 at 768
px, 7 training rows and 20 sampling trajectories); each row named after call sizes sets its own, and
`paper_calls` (GPU only) the paper's (train_batch_size rows, one sampling batch a call), as does the
straightforward path. DDPO runs on `sd15` (the same UNet without the guidance embedding) at its defaults (50
DDIM steps, CFG 5, all 50 actions trained, train batch 1) in ddpo-pytorch's call sizes (the paper's), with
the same number of reward queries per epoch (the same 10 batches of 4) and the same 768 px. Besides, rows
with the fast path's opt-in switches: `training_calls_of_7` (train_rows_per_call 7), and on a GPU only
`compiled_unet`, `sample_cuda_graph`, both together (`compiled_and_graphed`), `graphed_calls_of_7` (the
graphed sampling loop with training calls of 7 rows), `graphed_calls_of_7_cudnn` (the same with
attention_backend cudnn), `all_graphed` / `all_graphed_calls_of_7` (the training calls replayed from CUDA
graphs too, train_cuda_graph), and `calls_of_20_and_7` / `all_graphed_calls_of_20_and_7` (sampling in UNet
batches of 20, eager and graphed), `compiled_sampling_calls_of_20_and_7` /
`compiled_sampling_graphed_training_calls_of_20_and_7` (the same wide calls with sampling's UNet and VAE
decode compiled, compile_scope sampling and compile_decode; training eager, and replayed from CUDA graphs),
the same two with half_precision_norms (`compiled_sampling_half_norms_...`), `half_norms` (the defaults with
it), and `compiled_blocks_graphed_calls_of_7` (only the transformer blocks compiled, compile_scope blocks,
with the graphed sampling loop and training calls of 7); asked for on a CPU, these and `paper_calls` (16 rows)
are listed under "skipped".
CPU mode (no CUDA): the same rows on the `tiny` / `tiny-sd` presets (32 px; DDPO with the tiny-sd
preset's 10 DDIM steps) with small batches, 1-2 epochs; the JSON says `"mode": "cpu-tiny"`.

Timing: an epoch is timed from the first sampling call to the end of its last optimizer step, with a
device synchronisation at each boundary. `sampling_s` is sampling (and VAE decode) minus the time spent
waiting for rewards; `reward_wait_s` is that wait (the reward time the loop could not hide);
`reward_busy_s` is the time the reward function ran (on its worker thread, partly hidden behind sampling
when `reward_overlap` is on; a reward on the GPU, such as nvJPEG, queues on the stream the next sampling
batch's kernels went to first, so its busy time includes waiting for them: not comparable with a CPU
reward's); `training_s` is advantages plus all updates. Before its measured epochs
each row is warmed up, not timed: one sampling call and one optimizer update with every shape its epochs
use (`--warmup-epochs`: one whole epoch). Peak GPU memory is recorded as allocated and as reserved by
PyTorch's caching allocator (`peak_reserved_gib`, what the GPU must hold). MFU = UNet FLOPs of the epoch (counted
with torch.utils.flop_counter on one trajectory's sampling and one trained row's forward+backward, times
the epoch's counts; VAE, text encoder and reward excluded) / epoch seconds / the measured matmul rate of
this device (bf16 on a GPU, fp32 on a CPU). `unet_aten_ops` counts the ATen ops (views excluded) of the
same two units, and `training_us_per_unet_aten_op` divides the training time by the ops its UNet
forward+backward calls ran: a few microseconds per op says the host's launches set the pace.

`first_update_statistics`: per measured epoch, its first update's approx_kl, clipfrac and mean ratio, which
the numerics of sampling against training alone set (that update's weights sampled the epoch).

`--profile ROWS`: after a row's measured epochs (its timing untouched, its figures written first), one
sampling call and the first training call of its minibatch plan under torch.profiler: the JSON row's
`profile` holds the ops and kernels that took the most time and how busy the GPU was (unet_profile.py says
how to read it).

--quick is a smoke run: 2 samples per epoch, one measured epoch, DDPO with 4 steps, curves of 2 epochs.

Also (`curves`, always on the tiny presets): RLCM vs DDPO mean reward against wall-clock, the same
reward queries per epoch, for run_all.py's plot.

Usage: python benchmarks/bench_train.py [--quick] [--epochs N] [--curve-epochs N] [--rows A,B]
       [--ddpo-batches N] [--warmup-epochs] [--no-curves] [--profile A,B] [--out-dir DIR]
Writes benchmarks/results/bench_train-<device>.json (or DIR/bench_train.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, name_list, output_folder, positive_int  # noqa: E402
from train_rows import COMMON, rows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewest epochs, smallest batches")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="measured epochs per row (GPU default 2, CPU 1)")
    parser.add_argument("--curve-epochs", type=positive_int, default=None,
                        help="epochs of the tiny RLCM/DDPO curves (default 12, --quick 2)")
    # Every row; those a CPU cannot run are listed as skipped.
    parser.add_argument("--rows", type=name_list(rows(gpu=True, quick=False), "rows"), default=None,
                        help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--ddpo-batches", type=positive_int, default=10, help="GPU: DDPO's sampling batches of 4 "
                        "per epoch (default 10, RLCM's reward queries; fewer for a shorter run)")
    parser.add_argument("--warmup-epochs", action="store_true",
                        help="warm each row up with a whole epoch (default: one sampling call and one update)")
    parser.add_argument("--no-curves", action="store_true", help="skip the tiny RLCM/DDPO reward curves")
    parser.add_argument("--profile", type=name_list(rows(gpu=True, quick=False), "rows"), default=[],
                        help="comma-separated rows to profile after their measured epochs: one sampling call and "
                        "one training call under torch.profiler (unet_profile.py; default: none)")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/bench_train.json instead of benchmarks/results/")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import environment, matmul_rate, release_memory, synchronize, write_result  # noqa: E402
from rlcm_fast.config import resolve_config  # noqa: E402
from rlcm_fast.cuda_graphs import GraphedTrainingUNet  # noqa: E402
from rlcm_fast.faults import one_line  # noqa: E402
from rlcm_fast.minibatches import minibatch_plan  # noqa: E402
from rlcm_fast.policy_step import select_backend  # noqa: E402
from rlcm_fast.trainer import Trainer  # noqa: E402
from unet_profile import format_profile, profile_row  # noqa: E402



class TimedReward:
    """Wraps the trainer's AsyncReward: time the reward function runs, and time the loop waits for it."""

    def __init__(self, reward):
        self.reward, self.busy, self.wait = reward, 0.0, 0.0
        inner = reward.fn

        def timed(images, prompts):
            started = time.perf_counter()
            try:
                return inner(images, prompts)
            finally:
                self.busy += time.perf_counter() - started

        reward.fn = timed

    def submit(self, images, prompts):
        future, meter = self.reward.submit(images, prompts), self

        class Waited:
            def result(self):
                started = time.perf_counter()
                try:
                    return future.result()
                finally:
                    meter.wait += time.perf_counter() - started

        return Waited()


class AtenOpCounter(TorchDispatchMode):
    """Counts the ATen ops that run, views excluded (they launch nothing; nor does _unsafe_view, the
    reshape of every Linear's 3-D input and output, which is not marked a view). In eager PyTorch each of
    the others is about one kernel launch from the host, so ops per UNet call times the host's cost per op
    bounds how fast the GPU can be fed: the eager loop is host-bound when that beats the GPU time."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False) and func.overloadpacket is not torch.ops.aten._unsafe_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def unet_work(trainer: Trainer) -> tuple[dict, dict]:
    """UNet FLOPs, and ATen ops, of sampling one trajectory and of one trained row's forward+backward (LoRA
    gradients). Ops do not grow with the batch: a training minibatch's forward+backward runs as many as
    one row's."""
    from torch.utils.flop_counter import FlopCounterMode

    sampler, prompt = trainer.sampler, trainer.prompt_set[0]
    sampler.prompt_embeddings([prompt, ""])  # text encoder outside the count
    generator = torch.Generator(device=trainer.device).manual_seed(0)
    # The plain loop: a CUDA-graph capture would run (and count) the loop WARMUP_CALLS + 1 times.
    graphed, sampler.cuda_graph = getattr(sampler, "cuda_graph", False), False
    # Each unit in an autocast of its own, as the trainer runs every call: in one shared autocast, its cache
    # would hand the training row the sampling's casts of the float32 LoRA weights (256 casts on sd15-lcm).
    with trainer.autocast():
        with FlopCounterMode(display=False) as counter, AtenOpCounter() as sampling_ops:
            trajectory = sampler.sample(trainer.unet, [prompt], generator=generator, decode=False)
        per_trajectory = counter.get_total_flops()
    index = torch.zeros(1, dtype=torch.long, device=trainer.device)
    embeds = sampler.prompt_embeddings([prompt])
    states = trajectory.states.to(trainer.device)
    with trainer.autocast():
        with FlopCounterMode(display=False) as counter, AtenOpCounter() as training_ops:
            log_probs = sampler.action_log_probs(trainer.unet, states, index, index, embeds)[0]
            log_probs.sum().backward()
        per_row = counter.get_total_flops()
    trainer.optimizer.zero_grad(set_to_none=True)
    sampler.cuda_graph = graphed
    return ({"sampling_per_trajectory": per_trajectory, "training_per_row": per_row},
            {"sampling_per_trajectory": sampling_ops.ops, "training_per_row": training_ops.ops})


def training_calls(cfg, trained_steps: int) -> int:
    """UNet forward+backward calls that train an epoch: the minibatches of the trainer's own plan
    (rlcm_fast.minibatches), counted on a placeholder table of trained steps."""
    trained = torch.zeros(cfg.samples_per_epoch, trained_steps, dtype=torch.long)
    plan = minibatch_plan(cfg.algorithm, cfg.train_rows, cfg.train_rows_per_call)
    updates = plan(trained, torch.Generator().manual_seed(0), cfg.train_batch_size, cfg.gradient_accumulation_steps)
    return cfg.num_inner_epochs * sum(len(minibatches) for minibatches in updates)


def policy_step_backend(cfg, device: torch.device) -> str | None:
    """The LCM step's backend in this row: what "auto" resolves to here (on CUDA, "reference" would mean
    that Triton or rlcm_fast.kernels did not import). None for DDPO, whose DDIM step is plain PyTorch."""
    if cfg.method == "ddpo":
        return None
    if cfg.policy_step_backend != "auto":
        return cfg.policy_step_backend
    return select_backend(torch.zeros(1, device=device))


def warm_up(trainer: Trainer, epoch: int) -> None:
    """One sampling call and one optimizer update, with every shape the row's epochs use: what a fresh
    trainer pays once (cuDNN and allocator warm-up, CUDA-graph captures, compilation) is paid here.
    A whole warm-up epoch costs as much as a measured one; on the H200 (6675037, tqdm's bars in
    check_claims.log) the fast row's took 27 s against 24 s for the next, and the extra 3 s were in its
    first sampling batch (1.8 s against 0.7) and first update (3.4 s against 1.7)."""
    cfg = trainer.cfg
    units_per_update = cfg.train_batch_size * cfg.gradient_accumulation_steps
    samples_per_update = units_per_update * (2 if cfg.algorithm == "rebel" else 1)
    call = cfg.sample_batches_per_call * cfg.sample_batch_size  # samples per sampling call
    calls = -(-samples_per_update // call)  # enough calls for one update
    trainer.cfg = dataclasses.replace(cfg, batches_per_epoch=calls * cfg.sample_batches_per_call, num_sample_iters=1)
    try:
        samples = trainer.sample_epoch(epoch)
        trainer.compute_advantages(samples)
        first = {field.name: getattr(samples, field.name)[:samples_per_update] for field in dataclasses.fields(samples)}
        trainer.train_epoch(epoch, dataclasses.replace(samples, **first))
    finally:
        trainer.cfg = cfg


def record_first_updates(trainer: Trainer, warmup: int) -> list[dict]:
    """A list that gets, for each epoch from `warmup` on, the loss statistics of its first optimizer update
    (approx_kl, clipfrac, mean ratio: Trainer.objective's) as the trainer hands them to finish_update."""
    first_updates, finish_update = [], trainer.finish_update

    def recording(epoch, sums, grad_norm, done, total):
        if done == 1 and epoch >= warmup:
            first_updates.append({k: sums[k] for k in ("approx_kl", "clipfrac", "ratio") if k in sums})
        return finish_update(epoch, sums, grad_norm, done, total)

    trainer.finish_update = recording
    return first_updates


def time_row(name: str, overrides: dict, epochs: int, warmup: int, rate: float, run_dir: Path,
             warmup_epochs: bool = False, profiled: bool = False, timed=lambda result: None) -> dict:
    """The row's measured epochs, then with `profiled` its profile (unet_profile.py); `timed(result)` is called
    with the row's figures before the profile runs (main writes them)."""
    trainer = Trainer(resolve_config(overrides={**COMMON, **overrides, "epochs": epochs + warmup}), run_dir)
    cfg = trainer.cfg  # its UNet batch sizes chosen where the row says auto
    device = trainer.device
    timed_reward = TimedReward(trainer.reward)
    trainer.reward = timed_reward
    flops, aten_ops = unet_work(trainer)
    samples_per_epoch = cfg.samples_per_epoch
    trained_rows = samples_per_epoch * trainer.sampler.trained_steps * cfg.num_inner_epochs
    epoch_flops = samples_per_epoch * flops["sampling_per_trajectory"] + trained_rows * flops["training_per_row"]
    measured, rewards = [], []
    first_updates = record_first_updates(trainer, warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in range(epochs + warmup):
        if epoch < warmup and not warmup_epochs:
            warm_up(trainer, epoch)
            continue
        if device.type == "cuda" and epoch == warmup:
            torch.cuda.reset_peak_memory_stats(device)
        timed_reward.busy = timed_reward.wait = 0.0
        synchronize(device)
        started = time.perf_counter()
        samples = trainer.sample_epoch(epoch)
        synchronize(device)
        sampled = time.perf_counter()
        stats = trainer.compute_advantages(samples)
        trainer.train_epoch(epoch, samples)
        synchronize(device)
        finished = time.perf_counter()
        rewards.append(stats["reward_mean"])
        if epoch < warmup:
            continue
        epoch_s = finished - started
        measured.append({
            "epoch_s": epoch_s, "sampling_s": sampled - started - timed_reward.wait,
            "reward_wait_s": timed_reward.wait, "reward_busy_s": timed_reward.busy, "training_s": finished - sampled,
            "images_per_s": samples_per_epoch / epoch_s, "mfu": epoch_flops / epoch_s / rate,
        })
    mean = {key: sum(m[key] for m in measured) / len(measured) for key in measured[0]}
    result = {
        "variant": name,
        "overrides": overrides,
        "method": cfg.method, "model": cfg.model, "resolution": cfg.resolution, "steps": cfg.horizon,
        "trained_steps": trainer.sampler.trained_steps, "samples_per_epoch": samples_per_epoch,
        "sample_batch_size": cfg.sample_batch_size, "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "mixed_precision": cfg.mixed_precision,
        # The UNet's batches: sampling batches joined per call, training rows per call (0: train_batch_size).
        "sample_batches_per_call": cfg.sample_batches_per_call, "train_rows_per_call": cfg.train_rows_per_call,
        "policy_step_backend": policy_step_backend(cfg, device),
        "unet_flops": flops, "unet_flops_per_epoch": epoch_flops, "unet_aten_ops": aten_ops,
        # Training time per ATen op the UNet's forward+backward runs, one run per minibatch (the optimizer
        # and loss excluded from the count): some microseconds means the host, not the GPU, sets the pace.
        "training_us_per_unet_aten_op": 1e6 * mean["training_s"] / (calls * aten_ops["training_per_row"])
        if (calls := training_calls(cfg, trainer.sampler.trained_steps)) else None,
        "epochs_measured": len(measured),
        # Per measured epoch, its first update's statistics: that update evaluates the very weights that sampled
        # the epoch, so its ratios differ from 1 only by the numerics of the sampling and training calls (batch
        # composition, bf16, a compiled or graphed call against an eager one). clipfrac: the share of rows that
        # those numerics alone push past clip_range (the paper's 1e-4); sqrt(2 approx_kl): their RMS log-prob gap.
        "first_update_statistics": first_updates, "clip_range": cfg.clip_range,
        # Before the measured epochs: whole epochs, or (the default) one sampling call and one update each.
        "warmup": {"count": warmup, "kind": "epoch" if warmup_epochs else "sampling call and update"}, **mean,
        "per_sample_rl_step_s": mean["epoch_s"] / samples_per_epoch, "epochs": measured,
        "reward_mean_per_epoch": rewards,
        # Allocated: what the tensors needed; reserved: what PyTorch's caching allocator held from the GPU.
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        # What ran: a CUDA-graph capture that fails warns and runs eagerly, under the row's name all the same.
        "sampling_cuda_graph": getattr(trainer.sampler, "cuda_graph", False),  # DDPO's sampler has no graph
        "training_cuda_graph_signatures": None,
    }
    if isinstance(trainer.train_unet, GraphedTrainingUNet):
        result["training_cuda_graph_signatures"] = trainer.train_unet.signatures()
    if cfg.sample_cuda_graph and device.type == "cuda" and not result["sampling_cuda_graph"]:
        print(f"bench_train: row {name} sampled without its CUDA graph (the capture failed)", file=sys.stderr)
    if (result["training_cuda_graph_signatures"] or {}).get("not_graphed"):
        print(f"bench_train: row {name} trained some calls without CUDA graphs: "
              f"{result['training_cuda_graph_signatures']}", file=sys.stderr)
    print(f"{name:24s} epoch {mean['epoch_s']:8.2f} s (sampling {mean['sampling_s']:.2f}, reward wait "
          f"{mean['reward_wait_s']:.2f}, training {mean['training_s']:.2f})  {mean['images_per_s']:7.2f} img/s  "
          f"MFU {100 * mean['mfu']:.2f}%", flush=True)
    if profiled:
        timed(result)  # the row's figures kept before the profile, whatever happens to it
        try:
            result["profile"] = profile_row(trainer)
            print(format_profile(name, result["profile"]), flush=True)
        except Exception as exc:  # noqa: BLE001 (a profiler that fails costs the profile alone)
            result["profile"] = {"failed": one_line(exc)}
            print(f"bench_train: row {name} not profiled: {one_line(exc)}", file=sys.stderr, flush=True)
    return result


def reward_curves(epochs: int, quick: bool, run_root: Path) -> dict:
    """RLCM (tiny) and DDPO (tiny-sd) from the same seed, the same reward queries per epoch."""
    batch = 2 if quick else 16
    shared = {**COMMON, "device": "cpu", "epochs": epochs, "batches_per_epoch": 1, "sample_batch_size": batch,
              "train_batch_size": batch, **({"horizon": 4} if quick else {})}
    curves = {}
    for method, model in (("rlcm", "tiny"), ("ddpo", "tiny-sd")):
        cfg = resolve_config(overrides={**shared, "method": method, "model": model,
                                        **({"horizon": 4} if method == "ddpo" and quick else {})})
        records = Trainer(cfg, run_root / f"curve-{method}").train()
        elapsed, points = 0.0, []
        for record in records:
            elapsed += record["sample_seconds"] + record["train_seconds"]
            points.append({"epoch": record["epoch"], "reward_mean": record["reward_mean"],
                           "reward_std": record["reward_std"], "elapsed_s": elapsed,
                           "reward_queries": record["epoch"] * cfg.samples_per_epoch})
        curves[method] = {"model": model, "steps": cfg.horizon, "samples_per_epoch": cfg.samples_per_epoch,
                          "epochs": points}
        print(f"curve {method}: reward {points[0]['reward_mean']:+.3f} -> {points[-1]['reward_mean']:+.3f} "
              f"in {elapsed:.1f} s", flush=True)
    return curves


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    epochs = args.epochs or (1 if args.quick or not gpu else 2)
    # A fresh trainer's first sampling call and update pay one-time costs; --quick too, or its first row
    # (`fast`, every other row's yardstick) would carry them. One call and one update: under a second on `tiny`.
    warmup = 1
    curve_epochs = args.curve_epochs or (2 if args.quick else 12)
    table = rows(gpu, args.quick, args.ddpo_batches)
    skipped = []
    if args.rows is not None:
        wanted = args.rows
        skipped = [{"row": name, "reason": "CUDA is not available: a GPU-only row (its switches run only on a GPU; "
                                          "paper_calls: a CPU's auto already chooses its call sizes)"}
                   for name in wanted if name not in table]
        table = {name: table[name] for name in wanted if name in table}
        for row in skipped:  # in the JSON too; said here, or a run of GPU rows on a CPU looks like it measured
            print(f"bench_train: row {row['row']} skipped: {row['reason']}", file=sys.stderr, flush=True)
    for name in args.profile:
        if name not in table and name not in [row["row"] for row in skipped]:
            print(f"bench_train: --profile row {name} is not among the rows that run; not profiled",
                  file=sys.stderr, flush=True)
    rate = matmul_rate(device)
    result = {
        "benchmark": "bench_train", **environment(), "cuda": torch.version.cuda,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "gpu-sd15" if gpu else "cpu-tiny", "quick": args.quick,
        "load_average_at_start": os.getloadavg(), "matmul_rate": rate, "rows": [], "skipped": skipped,
    }
    if not gpu:
        result["skipped"].append({"part": "sd15-lcm / sd15 rows at 768 px, peak GPU memory",
                                  "reason": "CUDA is not available: the rows ran on the tiny presets (32 px)"})
    with tempfile.TemporaryDirectory() as tmp:
        def write_row(row: dict) -> None:
            write_result("bench_train", {**result, "rows": [*result["rows"], row]}, args.out_dir, complete=False)

        for name, overrides in table.items():
            try:
                result["rows"].append(time_row(name, overrides, epochs, warmup, rate["flops_per_s"],
                                              Path(tmp) / name, args.warmup_epochs, name in args.profile, write_row))
            except Exception as exc:  # noqa: BLE001 (one row's failure must not cost the rows after it)
                traceback.print_exc()
                result["skipped"].append({"row": name, "reason": f"failed: {one_line(exc)}"})
                print(f"bench_train: row {name} failed: {one_line(exc)}", file=sys.stderr, flush=True)
            write_result("bench_train", result, args.out_dir, complete=False)  # a run cut short keeps its rows
            release_memory(device)  # after the except block, which frees the failed row's frames
        if args.no_curves:
            result["skipped"].append({"part": "curves", "reason": "--no-curves"})
        else:
            result["curves"] = reward_curves(curve_epochs, args.quick, Path(tmp))
    fast = next((r for r in result["rows"] if r["variant"] == "fast"), None)
    if fast:
        for row in result["rows"]:
            row["epoch_time_vs_fast"] = row["epoch_s"] / fast["epoch_s"]
            row["per_sample_step_vs_fast"] = row["per_sample_rl_step_s"] / fast["per_sample_rl_step_s"]
    result["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result('bench_train', result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
