"""Run every benchmark this machine supports, then render the results folder's README.md (tables) and plots.

    python benchmarks/run_all.py [--quick] [--out-dir DIR]

Writes DIR/*.json (default DIR: benchmarks/results/<device-slug>/, with --quick
benchmarks/results/<device-slug>-quick/), DIR/README.md, DIR/time_per_epoch.png (seconds per epoch by
variant, split into sampling, reward wait and training) and DIR/reward_vs_wallclock.png (RLCM vs DDPO on
the tiny presets). Each benchmark runs in its own process, so one that fails is reported and the others
still run. The README and plots show only the JSON this run wrote, not what an earlier run left in DIR.
What did not run (no CUDA, --quick) is listed in the README with the reason. `--quick` is a smoke run
(tiny sizes, fewest epochs; about 1-3 minutes on 2 CPU cores): its figures show the pipeline works, not
the machine's speed, so it does not write over a full run's folder (on an H200: the committed
nvidia-h200/). A full CPU run took 14 minutes on 2 AMD EPYC cores (amd-epyc/run_all.json), before
training_memory.py (1 min 43 s on an Intel Xeon) joined it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO_ROOT, RESULTS_DIR, description, device_name, device_slug, environment,  # noqa: E402
                    output_folder)

HERE = Path(__file__).resolve().parent


def plan(quick: bool, cuda: bool) -> tuple[list[tuple[str, list[str]]], list[dict]]:
    """(benchmark, arguments) to run here, and what is skipped with why."""
    runs, skipped = [], []
    if cuda:
        runs += [("bench_step", []), ("bench_sampler", ["--repeats", "3"] if quick else []), ("bench_attention", []),
                 ("bench_unet", ["--repeats", "2"] if quick else [])]
    else:
        skipped.append({"benchmark": "bench_step", "reason": "needs CUDA (Triton kernel timings); not available"})
        for name in ("bench_sampler", "bench_attention", "bench_unet"):
            skipped.append({"benchmark": name, "reason": "needs CUDA (its CPU mode is a smoke test of the script: "
                            f"python benchmarks/{name}.py --device cpu)"})
    # Does the compiled UNet (the trainer's compile_unet, whole and only its blocks) give eager's LoRA gradients?
    # Inductor on the GPU's own model size there; on a CPU (full runs) the tiny model, where torch 2.13's
    # inductor gets the whole UNet's wrong.
    if cuda:
        runs.append(("compiled_gradients", ["--device", "cuda", "--model", "sd15-lcm", "--rows", "2"]))
    elif quick:
        skipped.append({"benchmark": "compiled_gradients", "reason": "--quick (inductor compiles for minutes)"})
    else:
        runs.append(("compiled_gradients", []))
    if quick:
        runs.append(("bench_rewards", ["--quick", "--sizes", "512", "--batches", "8", "--no-aesthetic"]))
        skipped.append({"benchmark": "bench_rewards aesthetic rows, 768 px and batch 32",
                        "reason": "--quick (smoke run)"})
        runs.append(("bench_train", ["--quick"]))
        runs.append(("ablation_algorithms", ["--quick"]))
        skipped.append({"benchmark": "training_memory", "reason": "--quick (it traces sd15-lcm at 768 px: minutes)"})
    else:
        runs += [("bench_rewards", []), ("bench_train", []), ("ablation_algorithms", []), ("training_memory", [])]
    # An experiment about the method, not a measurement of this machine: run on its own when wanted.
    skipped.append({"benchmark": "gradient_direction", "reason": "an experiment on the method, not a benchmark "
                    "(README, 'The tiny model'): python benchmarks/gradient_direction.py"})
    return runs, skipped


def run_benchmark(name: str, args: list[str], out_dir: Path) -> dict:
    command = [sys.executable, str(HERE / f"{name}.py"), *args, "--out-dir", str(out_dir)]
    print(f"run_all: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (out_dir / f"{name}.log").write_text(result.stdout + result.stderr)
    status = {"benchmark": name, "args": args, "returncode": result.returncode, "seconds": seconds}
    if result.returncode != 0:
        status["error"] = (result.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        print(f"run_all: {name} FAILED ({status['error']})", file=sys.stderr, flush=True)
    return status


def table(header: list[str], body: list[list]) -> list[str]:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value).replace("|", "\\|")  # free text (an error line): a bare '|' would end the cell

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in body]


def train_section(train: dict) -> list[str]:
    lines = [f"## Whole RL loop (bench_train.py, mode `{train['mode']}`)", ""]
    rate = train["matmul_rate"]
    lines.append(f"Matmul rate measured here: {rate['flops_per_s'] / 1e12:.3g} TFLOP/s ({rate['dtype']}, "
                 f"{rate['size']}^3); load average at start {train['load_average_at_start'][0]:.2f}.")
    lines.append("")
    header = ["variant", "method", "model", "px", "steps", "samples/epoch", "epoch s", "sampling s",
              "reward wait s", "reward busy s", "training s", "images/s", "per-sample step vs fast",
              "peak allocated GiB", "MFU %"]
    body = [[r["variant"], r["method"], r["model"], r["resolution"], r["steps"], r["samples_per_epoch"], r["epoch_s"],
             r["sampling_s"], r["reward_wait_s"], r["reward_busy_s"], r["training_s"], r["images_per_s"],
             r.get("per_sample_step_vs_fast"), r["peak_memory_gib"], 100 * r["mfu"]] for r in train["rows"]]
    lines += table(header, body) + [""]
    curves = train.get("curves") or {}
    if curves:
        lines += ["Reward against wall-clock on the tiny presets (same reward queries per epoch):", ""]
        body = []
        for method, curve in curves.items():
            first, last = curve["epochs"][0], curve["epochs"][-1]
            body.append([method, curve["model"], curve["steps"], len(curve["epochs"]), curve["samples_per_epoch"],
                         first["reward_mean"], last["reward_mean"], last["elapsed_s"]])
        lines += table(["method", "model", "steps", "epochs", "samples/epoch", "first reward", "last reward",
                        "wall-clock s"], body) + [""]
    return lines


def rewards_section(rewards: dict) -> list[str]:
    lines = ["## Rewards (bench_rewards.py)", ""]
    body = [[r["backend"] + (f"/{r['engine']}" if r.get("engine") else ""), r["threads"], r["resolution"], r["batch"],
             r["images_on"], r["median_s"] * 1e3, r["images_per_s"]] for r in rewards.get("jpeg", [])]
    lines += table(["JPEG backend", "threads", "px", "batch", "images on", "median ms", "images/s"], body) + [""]
    body = [[r["batch"], r["images_on"], r["tower_dtype"], r["median_s"], r["images_per_s"]]
            for r in rewards.get("aesthetic", [])]
    if body:
        lines += table(["aesthetic batch", "images on", "dtype", "median s", "images/s"], body) + [""]
    return lines


def step_section(step: dict) -> list[str]:
    lines = ["## Policy step (bench_step.py)", ""]
    # The claims read the graph replays' GPU time; do_bench's (L2 flushed) and the back-to-back calls' are
    # what Python sees (host-bound at small B).
    copy_gbps = step["copy_bandwidth_gbps"]
    body = [[r["step_pass"], r["dtype"], r["batch"], r["variant"], r["time_us"], r.get("back_to_back_us"),
             graph if isinstance(graph := r.get("graph_time_us"), float) else graph and "capture failed",
             100 * r["graph_gbps"] / copy_gbps if r.get("graph_gbps") else None] for r in step["results"]]
    return lines + table(["pass", "dtype", "B", "variant", "do_bench us", "back-to-back us", "graph us",
                          "graph % of copy bandwidth"], body) + [""]


def sampler_section(sampler: dict) -> list[str]:
    lines = [f"## Sampling (bench_sampler.py, {sampler['model']} at {sampler['resolution']} px, {sampler['dtype']})", ""]
    body = [[r["variant"], r["horizon"], r["batch"], r["images_per_second"], r.get("speedup_vs_diffusers_eager"),
             None if r.get("mfu") is None else 100 * r["mfu"], r["max_abs_pixel_diff_vs_diffusers_eager"]]
            for r in sampler["rows"]]
    return lines + table(["variant", "H", "B", "images/s", "x diffusers eager", "MFU %", "max pixel diff"], body) + [""]


def attention_section(attention: dict) -> list[str]:
    lines = [f"## Attention kernels (bench_attention.py, {attention['model']} at {attention['resolution']} px, "
             f"{attention['dtype']}): ms per model call", ""]
    backends = attention["backends"]
    body = [[g["model_part"], g["batch"], g["pass"], g["ms_per_call"]["default"], g["ms_per_call"]["cudnn_first"],
             g["ms_per_call"]["fastest"], *(g["ms_per_call"].get(b) for b in backends)] for g in attention["groups"]]
    return lines + table(["model part", "B", "pass", "default", "cuDNN first", "fastest per shape", *backends],
                         body) + [""]


def unet_section(unet: dict) -> list[str]:
    lines = [f"## UNet and decode calls by switch (bench_unet.py, {unet['model']} at {unet['resolution']} px, "
             f"{unet['precision']}): ms per call", ""]
    body = [[r["call"], r["batch"], r["variant"], r["mode"], r.get("ms"), r.get("tflops_per_s"),
             r.get("speedup_vs_default_eager"), r.get("error")] for r in unet["rows"]]
    return lines + table(["call", "B", "variant", "mode", "ms", "TFLOP/s", "vs default eager", "error"], body) + [""]


def memory_section(memory: dict) -> list[str]:
    lines = [f"## Training memory, traced (training_memory.py, {memory['model']} at {memory['resolution']} px, "
             f"{memory['precision']}, norms {memory.get('norms', 'as the CPU ran them (bf16)')}): GiB", "",
             f"Weights {memory['weights_gib']:.2f}, LoRA + Adam {memory['lora_and_adam_gib']:.3f}; saved for the "
             f"backward per training row {memory['saved_gib_per_row']:.2f}.", ""]
    # The casts' bytes: since d5552d6 (an older JSON shows "-").
    body = [[r["rows"], r["saved_for_backward_gib"], r.get("forward_casts_gib")] for r in memory["rows"]]
    lines += table(["rows per training call", "saved for backward", "forward's casts write"], body) + [""]
    body = [[r["trajectories"], r["loop_peak_gib"], r.get("loop_casts_gib"), r["decode_batch"], r["decode_peak_gib"],
             r.get("decode_casts_gib")] for r in memory["sampling"]]
    return lines + table(["trajectories per sampling call", "loop peak", "loop's casts write", "decode batch",
                          "decode peak", "decode's casts write"], body) + [""]


def ablation_section(ablation: dict) -> list[str]:
    lines = ["## Algorithms (ablation_algorithms.py, tiny preset)", ""]
    body = []
    for name, run in ablation["cpu_tiny"]["runs"].items():
        body.append([name, len(run["epochs"]), run["epochs"][0]["reward_mean"], run["epochs"][-1]["reward_mean"],
                     run.get("final_kl_to_base"), run["wall_seconds"]])
    return lines + table(["variant", "epochs", "first reward", "last reward", "KL to base", "wall s"], body) + [""]


def gradients_section(check: dict) -> list[str]:
    config = check["config"]
    lines = ["## Compiled UNet gradients (compiled_gradients.py)", ""]
    body = [[config["backend"], scope["scope"], config["model"], config["device"], scope["first_call_seconds"],
             scope["forward_max_abs_difference"], scope["gradient_relative_error_median"],
             scope["gradient_relative_error_max"], f"{len(scope['tensors_zeroed'])} of {scope['tensors']}"]
            for scope in check["scopes"]]
    return lines + table(["backend", "scope", "model", "device", "first call s", "forward max diff",
                          "grad rel. error median", "grad rel. error max", "LoRA grads zeroed"], body) + [""]


def fresh_results(out_dir: Path, statuses: list[dict], since: float) -> dict[str, dict]:
    """The JSON this run's benchmarks wrote. Not an earlier run's left in DIR: of a benchmark not run now
    (--quick after a full run), or of one that failed before writing its own."""
    results = {}
    for status in statuses:
        path = out_dir / f"{status['benchmark']}.json"
        if path.is_file() and path.stat().st_mtime >= since:
            results[status["benchmark"]] = json.loads(path.read_text())
    return results


def render(out_dir: Path, statuses: list[dict], skipped: list[dict], quick: bool, results: dict[str, dict],
           plots: list[Path]) -> Path:
    env = environment()
    lines = [f"# Benchmark results: {device_name()}", "",
             f"Written by `python benchmarks/run_all.py{' --quick' if quick else ''}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit `{env['git_commit']}`, torch "
             f"{env['torch']}, {env['cpu_count']} CPU cores ({env['cpu']}).", ""]
    if quick:
        lines += ["**Quick (smoke) run**: tiny sizes and the fewest epochs; the figures show that the "
                  "benchmarks run, not this machine's speed.", ""]
    lines += table(["benchmark", "exit code", "seconds", "error"],
                   [[s["benchmark"], s["returncode"], s["seconds"], s.get("error")] for s in statuses]) + [""]
    sections = {"bench_train": train_section, "bench_step": step_section, "bench_sampler": sampler_section,
                "bench_attention": attention_section, "bench_rewards": rewards_section, "compiled_gradients": gradients_section,
                "ablation_algorithms": ablation_section, "bench_unet": unet_section, "training_memory": memory_section}
    for name, section in sections.items():
        data = results.get(name)
        if data is not None:
            lines += section(data)
            skipped += [{"benchmark": name, **s} for s in data.get("skipped", [])]
    lines += ["## Not run here", ""]
    lines += [f"- {s['benchmark']}{': ' + s.get('part', s.get('row', '')) if s.get('part') or s.get('row') else ''}"
              f" -- {s['reason']}" for s in skipped] or ["- nothing"]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{path.name}`" for path in plots) + "."]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(out_dir: Path, train: dict | None) -> list[Path]:
    if train is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = [r["variant"] for r in train["rows"]]
    figure, axis = plt.subplots(figsize=(9, 4))
    bottom = [0.0] * len(names)
    for key, label in (("sampling_s", "sampling"), ("reward_wait_s", "reward wait"), ("training_s", "training")):
        values = [r[key] for r in train["rows"]]
        axis.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_ylabel("seconds per epoch")
    axis.set_title(f"{train['device']} ({train['mode']})")
    axis.legend()
    plt.setp(axis.get_xticklabels(), rotation=20, ha="right")
    figure.tight_layout()
    figure.savefig(out_dir / "time_per_epoch.png", dpi=110)
    written.append(out_dir / "time_per_epoch.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    for method, curve in (train.get("curves") or {}).items():
        axis.plot([p["elapsed_s"] for p in curve["epochs"]], [p["reward_mean"] for p in curve["epochs"]], "o-",
                  label=f"{method} ({curve['model']}, {curve['steps']} steps)")
    axis.set_xlabel(f"wall-clock seconds ({train['device']})")
    axis.set_ylabel("mean reward (-JPEG kB)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "reward_vs_wallclock.png", dpi=110)
    written.append(out_dir / "reward_vs_wallclock.png")
    plt.close(figure)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, fewest epochs")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help=f"default: {RESULTS_DIR}/<device-slug>/ (with --quick: <device-slug>-quick/)")
    args = parser.parse_args(argv)
    import torch  # after the command line: --help and a bad flag need no torch (seconds to import)

    # A smoke run's figures must not replace a full run's (on an H200 the default folder is the committed
    # nvidia-h200/).
    folder = args.out_dir or RESULTS_DIR / (device_slug() + ("-quick" if args.quick else ""))
    folder.mkdir(parents=True, exist_ok=True)
    runs, skipped = plan(args.quick, torch.cuda.is_available())
    started = time.time() - 1  # file times are coarser than time.time()
    statuses = [run_benchmark(name, bench_args, folder) for name, bench_args in runs]
    results = fresh_results(folder, statuses, started)
    (folder / "run_all.json").write_text(json.dumps(
        {"benchmark": "run_all", **environment(), "quick": args.quick, "runs": statuses, "skipped": skipped},
        indent=2) + "\n")
    plots = plot(folder, results.get("bench_train"))
    readme = render(folder, statuses, list(skipped), args.quick, results, plots)
    for path in plots:
        print(f"wrote {path}")
    print(f"wrote {readme}")
    return 0 if all(s["returncode"] == 0 for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
