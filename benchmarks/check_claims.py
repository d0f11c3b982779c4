"""Check the package's GPU claims on this machine, within a time budget: run the GPU tests and the
benchmarks that measure them, then judge each claim against its threshold.

    python benchmarks/check_claims.py [--budget-s 540] [--stages tests,step,rewards,sampler,train] [--out-dir DIR]
    python benchmarks/check_claims.py --evaluate-only --out-dir DIR     (judge the JSON already in DIR)

The stages run in that order (most claims per second first), each in a process of its own whose
timeout is what is left of the budget; a stage that does not fit is skipped and its claims say "not
measured". DIR (default benchmarks/results/<device-slug>/) gets the benchmarks' JSON, check_claims.log
(every stage's output), claims.json and claims.md: per claim the threshold, the measured value, and
pass, fail or not measured. A failed claim is a measured result, not an error: the exit code is 0
unless the script itself could not run. Without CUDA every stage is skipped (the claims are about GPUs).

Stages, sized to fit one session of a lent GPU (sd15-lcm / sd15 at 768 px, bf16):
  tests    the GPU tests: Triton kernels, CUDA-graph sampling (fast sampler, trainer), nvJPEG, CLIP rewards
  step     bench_step.py: fused step vs eager and torch.compile, fraction of copy bandwidth
  rewards  bench_rewards.py, JPEG rows only: nvJPEG vs Pillow speed, and their sizes' agreement
  sampler  bench_sampler.py: images/s vs diffusers eager and diffusers + torch.compile, pixel agreement
  train    bench_train.py, rows fast, straightforward and ddpo, one measured epoch each, DDPO with one
           sampling batch of 4 per epoch (its per-sample step time, not the paper's epoch)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, device_name, device_slug, git_commit  # noqa: E402

HERE = Path(__file__).resolve().parent
GPU_TEST_FILES = ["tests/test_triton_step.py", "tests/test_fast_sampler.py", "tests/test_cuda_graphs.py",
                  "tests/test_nvjpeg.py", "tests/test_clip_rewards.py"]
BF16_PIXEL_TOLERANCE = 0.05  # of the [0, 1] range: bf16 UNet calls compound over H steps


def stage_commands(out_dir: Path) -> dict[str, list[str]]:
    py, out = sys.executable, ["--out-dir", str(out_dir)]
    return {
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES],
        "step": [py, str(HERE / "bench_step.py"), *out],
        "rewards": [py, str(HERE / "bench_rewards.py"), "--no-aesthetic", *out],
        "sampler": [py, str(HERE / "bench_sampler.py"), "--repeats", "5", *out],
        "train": [py, str(HERE / "bench_train.py"), "--rows", "fast,straightforward,ddpo", "--epochs", "1",
                  "--ddpo-batches", "1", "--no-curves", *out],
    }


def run_stages(names: list[str], budget_s: float, out_dir: Path) -> list[dict]:
    commands, deadline, log = stage_commands(out_dir), time.monotonic() + budget_s, out_dir / "check_claims.log"
    statuses = []
    for name in names:
        left = deadline - time.monotonic()
        if not torch.cuda.is_available():
            statuses.append({"stage": name, "ran": False, "reason": "CUDA is not available"})
            continue
        if left < 30:
            statuses.append({"stage": name, "ran": False, "reason": f"time budget spent ({budget_s:.0f} s)"})
            continue
        print(f"check_claims: {name} (at most {left:.0f} s)", flush=True)
        started = time.monotonic()
        try:
            result = subprocess.run(commands[name], cwd=REPO_ROOT, capture_output=True, text=True, timeout=left)
            output, code, timed_out = result.stdout + result.stderr, result.returncode, False
        except subprocess.TimeoutExpired as expired:
            output = "".join(part.decode() if isinstance(part, bytes) else (part or "")
                             for part in (expired.stdout, expired.stderr))
            code, timed_out = None, True
        seconds = time.monotonic() - started
        with log.open("a") as handle:
            handle.write(f"===== {name}: {' '.join(commands[name][1:])}\n{output}\n")
        status = {"stage": name, "ran": True, "returncode": code, "timed_out": timed_out, "seconds": seconds}
        if name == "tests" and output.strip():
            status["summary"] = output.strip().splitlines()[-1]
        statuses.append(status)
        print(f"check_claims: {name} {'timed out' if timed_out else f'exit {code}'} after {seconds:.0f} s", flush=True)
    return statuses


@dataclass
class Claim:
    issue: int
    text: str
    source: str  # the benchmark whose JSON it is judged on
    op: str  # the measured value passes when `value op threshold` holds: ">=", ">" or "<"
    threshold: float
    measure: Callable[[dict], tuple[float, str] | None]  # (value, how it was read) or None: not in the JSON


def _rows(data: dict, **match) -> list[dict]:
    return [r for r in data.get("rows", data.get("results", [])) if all(r.get(k) == v for k, v in match.items())]


def step_speedup_vs_eager(step: dict):
    ratios = []
    for fused in _rows(step, variant="triton"):
        key = {k: fused[k] for k in ("step_pass", "dtype", "batch")}
        eager = _rows(step, variant="eager", **key)
        if eager:
            ratios.append((eager[0]["time_us"] / fused["time_us"], key))
    if not ratios:
        return None
    worst = min(ratios, key=lambda r: r[0])
    return worst[0], f"smallest of {len(ratios)} (pass, dtype, batch) rows: {worst[1]}"


def step_bandwidth_fraction(step: dict):
    fused = [r for r in _rows(step, variant="triton") if isinstance(r.get("graph_time_us"), float)]
    if not fused:
        return None
    largest = max(r["batch"] for r in fused)
    rows = [r for r in fused if r["batch"] == largest]
    worst = min(rows, key=lambda r: r["graph_gbps"])
    return (worst["graph_gbps"] / step["copy_bandwidth_gbps"],
            f"CUDA-graph timing, batch {largest}, smallest over passes and dtypes: {worst['step_pass']} {worst['dtype']}")


def jpeg_rows_on_cuda(rewards: dict, **match) -> list[dict]:
    return [r for r in rewards.get("jpeg", []) if r["images_on"].startswith("cuda")
            and all(r.get(k) == v for k, v in match.items())]


def nvjpeg_vs_pillow_speed(rewards: dict):
    nvjpeg = jpeg_rows_on_cuda(rewards, backend="nvjpeg", resolution=768, batch=32)
    pillow = jpeg_rows_on_cuda(rewards, backend="pillow", threads=1, resolution=768, batch=32)
    if not (nvjpeg and pillow):
        return None
    return nvjpeg[0]["images_per_s"] / pillow[0]["images_per_s"], "images/s, batch 32 at 768 px, CUDA images"


def nvjpeg_size_difference(rewards: dict):
    rows = rewards.get("nvjpeg_vs_pillow") or []
    if not rows:
        return None
    return max(r["max_relative_difference"] for r in rows), f"largest over {sum(r['images'] for r in rows)} images"


def nvjpeg_rank_correlation(rewards: dict):
    rows = rewards.get("nvjpeg_vs_pillow") or []
    if not rows:
        return None
    return min(r["spearman"] for r in rows), "smallest Spearman over the image sets"


def sampler_rows(sampler: dict, variant: str) -> list[dict]:
    return _rows(sampler, variant=variant) if sampler.get("model") == "sd15-lcm" else []


def sampler_speedup(batch: int):
    def measure(sampler: dict):
        rows = [r for r in sampler_rows(sampler, "rlcm-fast") if r["batch"] == batch]
        if not rows:
            return None
        worst = min(rows, key=lambda r: r["speedup_vs_diffusers_eager"])
        return worst["speedup_vs_diffusers_eager"], f"smallest over H in {sorted(r['horizon'] for r in rows)}"
    return measure


def sampler_vs_compiled_diffusers(sampler: dict):
    ratios = []
    for fast in sampler_rows(sampler, "rlcm-fast"):
        compiled = [r for r in sampler_rows(sampler, "diffusers + torch.compile")
                    if (r["horizon"], r["batch"]) == (fast["horizon"], fast["batch"])]
        if compiled:
            ratios.append((compiled[0]["seconds_per_call"] / fast["seconds_per_call"], fast["horizon"], fast["batch"]))
    if not ratios:
        return None
    worst = min(ratios)
    return worst[0], f"smallest over (H, batch): H={worst[1]} batch {worst[2]}"


def sampler_pixel_difference(sampler: dict):
    rows = sampler_rows(sampler, "rlcm-fast")
    if not rows:
        return None
    return max(r["max_abs_pixel_diff_vs_diffusers_eager"] for r in rows), "largest over (H, batch), images in [0, 1]"


def train_row(train: dict, variant: str) -> dict | None:
    rows = _rows(train, variant=variant) if train.get("mode") == "gpu-sd15" else []
    return rows[0] if rows else None


def train_ratio(slow: str, field: str, detail: str):
    def measure(train: dict):
        fast, other = train_row(train, "fast"), train_row(train, slow)
        if not (fast and other):
            return None
        return other[field] / fast[field], detail
    return measure


def fast_path_peak_memory(train: dict):
    fast = train_row(train, "fast")
    if not fast or fast.get("peak_memory_gib") is None:
        return None
    return fast["peak_memory_gib"], (f"GiB, sample batch {fast['sample_batch_size']}, train batch "
                                     f"{fast['train_batch_size']}, {fast['resolution']} px")


CLAIMS = [
    Claim(3, "fused policy step at least 3x faster than eager PyTorch", "bench_step", ">=", 3.0, step_speedup_vs_eager),
    Claim(3, "fused policy step at least 70% of the measured copy bandwidth", "bench_step", ">=", 0.7,
          step_bandwidth_fraction),
    Claim(3, "rlcm-fast sampler at least 2.5x diffusers eager at batch 1", "bench_sampler", ">=", 2.5, sampler_speedup(1)),
    Claim(3, "rlcm-fast sampler at least 1.5x diffusers eager at batch 8", "bench_sampler", ">=", 1.5, sampler_speedup(8)),
    Claim(3, "rlcm-fast sampler faster than diffusers + torch.compile", "bench_sampler", ">", 1.0,
          sampler_vs_compiled_diffusers),
    Claim(3, "rlcm-fast images equal diffusers' within bf16 tolerance", "bench_sampler", "<", BF16_PIXEL_TOLERANCE,
          sampler_pixel_difference),
    Claim(4, "nvJPEG sizes within 3% of Pillow's", "bench_rewards", "<", 0.03, nvjpeg_size_difference),
    Claim(4, "nvJPEG and Pillow sizes rank-correlated above 0.99", "bench_rewards", ">", 0.99, nvjpeg_rank_correlation),
    Claim(4, "nvJPEG at least 10x Pillow's single-thread throughput", "bench_rewards", ">=", 10.0, nvjpeg_vs_pillow_speed),
    Claim(5, "rlcm-fast epoch at least 3x faster than the straightforward path", "bench_train", ">=", 3.0,
          train_ratio("straightforward", "epoch_s", "straightforward epoch s / fast epoch s")),
    Claim(5, "DDPO's per-sample RL step at least 10x rlcm-fast's", "bench_train", ">=", 10.0,
          train_ratio("ddpo", "per_sample_rl_step_s", "DDPO s per sample / fast s per sample")),
    Claim(5, "fast path's peak GPU memory below 24 GiB at the paper's batch sizes", "bench_train", "<", 24.0,
          fast_path_peak_memory),
]
HOLDS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def judge(claim: Claim, results: dict[str, dict]) -> dict:
    entry = {"issue": claim.issue, "claim": claim.text, "source": claim.source,
             "threshold": f"{claim.op} {claim.threshold:g}"}
    data = results.get(claim.source)
    measured = claim.measure(data) if data else None
    if measured is None:
        return {**entry, "status": "not measured", "measured": None,
                "detail": f"no GPU rows in {claim.source}.json" if data else f"{claim.source}.json not found"}
    value, detail = measured
    status = "pass" if HOLDS[claim.op](value, claim.threshold) else "fail"
    return {**entry, "status": status, "measured": value, "detail": detail}


def evaluate(out_dir: Path) -> list[dict]:
    results = {}
    for name in {claim.source for claim in CLAIMS}:
        path = out_dir / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    return [judge(claim, results) for claim in CLAIMS]


def markdown(report: dict) -> str:
    lines = [f"# Claims checked on {report['device']}", "",
             f"Commit {report['git_commit']}, {report['time_utc']}; `python benchmarks/check_claims.py`.", ""]
    for stage in report["stages"]:
        if stage["ran"]:
            how = "timed out" if stage["timed_out"] else f"exit {stage['returncode']}"
            lines.append(f"- stage {stage['stage']}: {how}, {stage['seconds']:.0f} s"
                         + (f" ({stage['summary']})" if stage.get("summary") else ""))
        else:
            lines.append(f"- stage {stage['stage']}: not run ({stage['reason']})")
    lines += ["", "| issue | claim | threshold | measured | status | how |", "|---|---|---|---|---|---|"]
    for c in report["claims"]:
        value = "-" if c["measured"] is None else f"{c['measured']:.4g}"
        lines.append(f"| {c['issue']} | {c['claim']} | {c['threshold']} | {value} | {c['status']} | {c['detail']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for all stages together")
    parser.add_argument("--stages", default="tests,step,rewards,sampler,train", help="comma-separated, run in order")
    parser.add_argument("--evaluate-only", action="store_true", help="run nothing; judge the JSON in --out-dir")
    parser.add_argument("--out-dir", default=None, help=f"default: {RESULTS_DIR}/<device-slug>/")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(stage_commands(Path("."))))
    if unknown:
        parser.error(f"--stages {','.join(unknown)} unknown; allowed: {', '.join(stage_commands(Path('.')))}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s:g} is invalid: it must be > 0")
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    statuses = [] if args.evaluate_only else run_stages(stages, args.budget_s, out_dir)
    report = {"device": device_name(), "torch": torch.__version__, "git_commit": git_commit(),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": statuses,
              "claims": evaluate(out_dir)}
    (out_dir / "claims.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "claims.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
