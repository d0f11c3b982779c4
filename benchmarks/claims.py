"""The package's GPU claims (issues 3, 4 and 5) and how each is read from the benchmarks' JSON: per claim its
threshold, the benchmark whose JSON it is judged on, and the function that reads the measured value.
check_claims.py runs the benchmarks and writes claims.md from `evaluate`. Light to import: no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import common  # noqa: F401  (first: it puts the source tree on sys.path where rlcm_fast is not installed)
from rlcm_fast.config import TrainConfig
from train_rows import GPU_ONLY_ROWS

DEFAULT_NVJPEG_COLOUR = TrainConfig.nvjpeg_colour
BF16_PIXEL_TOLERANCE = 0.05  # of the [0, 1] range: bf16 UNet calls compound over H steps
# bench_train rows that are the fast path: the defaults, and its opt-in switches (compiled UNet, graphed
# sampling, wider training calls): every row but the straightforward path, its optimisations off one at a time,
# and DDPO.
FAST_PATH_ROWS = ("fast", "half_norms", "training_calls_of_7", *GPU_ONLY_ROWS)


@dataclass
class Claim:
    issue: int
    text: str
    source: str  # the benchmark whose JSON it is judged on
    op: str  # the measured value passes when `value op threshold` holds: ">=", ">" or "<"
    threshold: float
    measure: Callable[[dict], tuple[float, str] | None]  # (value, how it was read) or None: not in the JSON


def worst(pick, items, key):
    """pick (min or max) of items by key, where an item whose figure is NaN (a broken measurement: NaN images, a
    constant ranking) is the worst: Python's min and max pass NaN over unless it comes first, and a claim read pass."""
    broken = [item for item in items if math.isnan(key(item))]
    return broken[0] if broken else pick(items, key=key)


def _rows(data: dict, **match) -> list[dict]:
    return [r for r in data.get("rows", data.get("results", [])) if all(r.get(k) == v for k, v in match.items())]


# The step claims are judged on GPU time: CUDA-graph replays (bench_step's graph_time_us), without the
# Python and launch overhead of one call at a time. In the sampler the step runs inside a CUDA graph, and in
# training its launches queue behind the UNet's, so GPU time is what it costs there. The wall-clock times
# (do_bench, one call at a time from Python) stay in the JSON and README: on the first H200 run they were
# 46-430 us per fused call against 3-150 us of GPU work.
def graphed_rows(step: dict, variant: str) -> list[dict]:
    """bench_step rows of `variant` whose CUDA graph was captured (else graph_time_us says why not)."""
    return [r for r in _rows(step, variant=variant) if isinstance(r.get("graph_time_us"), (int, float))]


def step_speedup_vs_eager(step: dict):
    ratios = []
    for fused in graphed_rows(step, "triton"):
        key = {k: fused[k] for k in ("step_pass", "dtype", "batch")}
        eager = [r for r in graphed_rows(step, "eager") if all(r[k] == v for k, v in key.items())]
        if eager:
            ratios.append((eager[0]["graph_time_us"] / fused["graph_time_us"], key))
    if not ratios:
        return None
    worst_ratio = worst(min, ratios, lambda r: r[0])
    return worst_ratio[0], (f"GPU time (CUDA-graph replays), smallest of {len(ratios)} (pass, dtype, batch) rows: "
                            f"{worst_ratio[1]}")


def step_bandwidth_fraction(step: dict):
    """GPU time at the largest batch, where every replay streams several times the L2's size (at B <= 16
    the operands stay in L2 and the figure would compare L2 speed with the HBM copy rate)."""
    fused = graphed_rows(step, "triton")
    if not fused:
        return None
    largest = max(r["batch"] for r in fused)
    copy_gbps = step["copy_bandwidth_gbps"]
    slowest = worst(min, [r for r in fused if r["batch"] == largest], lambda r: r["graph_gbps"])
    return (slowest["graph_gbps"] / copy_gbps,
            f"GPU time (CUDA-graph replays), batch {largest} ({slowest['bytes'] / 1e6:.0f} MB moved per call), "
            f"smallest over passes and dtypes: {slowest['step_pass']} {slowest['dtype']}")


def jpeg_rows_on_cuda(rewards: dict, **match) -> list[dict]:
    return [r for r in rewards.get("jpeg", []) if r["images_on"].startswith("cuda")
            and all(r.get(k) == v for k, v in match.items())]


def nvjpeg_vs_pillow_speed(rewards: dict):
    nvjpeg = jpeg_rows_on_cuda(rewards, backend="nvjpeg", resolution=768, batch=32)
    pillow = jpeg_rows_on_cuda(rewards, backend="pillow", threads=1, resolution=768, batch=32)
    if not (nvjpeg and pillow):
        return None
    return nvjpeg[0]["images_per_s"] / pillow[0]["images_per_s"], "images/s, batch 32 at 768 px, CUDA images"


def nvjpeg_agreement_rows(rewards: dict, colour: str = DEFAULT_NVJPEG_COLOUR) -> list[dict]:
    """The nvJPEG-vs-Pillow rows of one nvjpeg_colour (runs before the setting existed had nvJPEG's own)."""
    return [r for r in rewards.get("nvjpeg_vs_pillow") or [] if r.get("nvjpeg_colour", "nvjpeg") == colour]


def nvjpeg_size_difference(rewards: dict):
    """Judged with the default nvjpeg_colour; the other setting's figure is reported beside it."""
    rows = nvjpeg_agreement_rows(rewards)
    if not rows:
        return None
    how = f"largest over {sum(r['images'] for r in rows)} images, nvjpeg_colour {DEFAULT_NVJPEG_COLOUR} (default)"
    measured = dict.fromkeys(r.get("nvjpeg_colour", "nvjpeg") for r in rewards.get("nvjpeg_vs_pillow") or [])
    for colour in (c for c in measured if c != DEFAULT_NVJPEG_COLOUR):  # the other settings the run compared
        if other := nvjpeg_agreement_rows(rewards, colour):
            how += f"; with nvjpeg_colour {colour}: {_largest_size_difference(other):.4g}"
    return _largest_size_difference(rows), how


def _largest_size_difference(rows: list[dict]) -> float:
    return worst(max, rows, lambda r: r["max_relative_difference"])["max_relative_difference"]


def nvjpeg_rank_correlation(rewards: dict):
    rows = nvjpeg_agreement_rows(rewards)
    if not rows:
        return None
    return worst(min, rows, lambda r: r["spearman"])["spearman"], "smallest Spearman over the image sets"


def sampler_rows(sampler: dict, variant: str) -> list[dict]:
    return _rows(sampler, variant=variant) if sampler.get("model") == "sd15-lcm" else []


def cached_prompt_note(sampler: dict) -> str:
    """Said of a run from before bench_sampler cleared rlcm-fast's prompt cache at each call."""
    if sampler.get("prompt_encoded_every_call"):
        return ""
    return "; rlcm-fast's calls reused a cached prompt embedding, diffusers' encoded the prompt at each call"


def sampler_speedup(batch: int):
    def measure(sampler: dict):
        rows = [r for r in sampler_rows(sampler, "rlcm-fast") if r["batch"] == batch]
        if not rows:
            return None
        slowest = worst(min, rows, lambda r: r["speedup_vs_diffusers_eager"])
        return (slowest["speedup_vs_diffusers_eager"],
                f"smallest over H in {sorted(r['horizon'] for r in rows)}{cached_prompt_note(sampler)}")
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
    slowest = worst(min, sorted(ratios), lambda r: r[0])
    return slowest[0], f"smallest over (H, batch): H={slowest[1]} batch {slowest[2]}{cached_prompt_note(sampler)}"


def sampler_pixel_difference(sampler: dict):
    rows = sampler_rows(sampler, "rlcm-fast")
    if not rows:
        return None
    largest = worst(max, rows, lambda r: r["max_abs_pixel_diff_vs_diffusers_eager"])
    return largest["max_abs_pixel_diff_vs_diffusers_eager"], "largest over (H, batch), images in [0, 1]"


def gpu_train_rows(train: dict) -> dict[str, dict]:
    return {r["variant"]: r for r in train.get("rows", [])} if train.get("mode") == "gpu-sd15" else {}


def fast_path_rows(train: dict) -> list[dict]:
    return [row for name, row in gpu_train_rows(train).items() if name in FAST_PATH_ROWS]


def train_row_label(row: dict) -> str:
    """`row NAME`, and what ran without CUDA graphs where the row asked for them (a failed capture warns and runs
    eagerly, under the row's name all the same)."""
    without = []
    if row.get("overrides", {}).get("sample_cuda_graph") and row.get("sampling_cuda_graph") is False:
        without.append("sampling")
    if (row.get("training_cuda_graph_signatures") or {}).get("not_graphed"):
        without.append("some training calls")
    return f"row {row['variant']}" + (f" ({' and '.join(without)} without CUDA graphs: captures failed)"
                                       if without else "")


def fastest_fast_path(train: dict) -> dict | None:
    """The quickest measured fast-path row: the defaults, or an opt-in switch of the fast path."""
    rows = fast_path_rows(train)
    return min(rows, key=lambda r: r["epoch_s"]) if rows else None


def train_ratio(slow: str, field: str, what: str):
    def measure(train: dict):
        fast, other = fastest_fast_path(train), gpu_train_rows(train).get(slow)
        if not (fast and other):
            return None
        detail = f"{what}; fast path: {train_row_label(fast)}"
        # check_claims gives DDPO fewer sampling batches than RLCM (--ddpo-batches) to fit its budget: said here.
        if (theirs := other.get("samples_per_epoch")) != (ours := fast.get("samples_per_epoch")):
            detail += f"; samples per epoch: {slow} {theirs}, fast path {ours}"
        epochs = {row.get("epochs_measured") for row in (fast, other)}
        if len(epochs) == 1 and None not in epochs:
            detail += f"; {epochs.pop()} measured epoch(s) per row"
        elif epochs != {None}:
            detail += (f"; measured epochs: {slow} {other.get('epochs_measured')}, "
                       f"fast path {fast.get('epochs_measured')}")
        return other[field] / fast[field], detail
    return measure


def fast_path_peak_memory(train: dict):
    """The peak of the fastest fast-path row (the one the epoch claim is judged on: speed and memory of
    one configuration): memory reserved by PyTorch's allocator (what the GPU must hold; allocated memory
    is less), or allocated where an older run did not record it. The other fast-path rows' largest peak
    is reported beside it."""
    fast = fastest_fast_path(train)
    if not fast or fast.get("peak_memory_gib") is None:
        return None
    field = "peak_reserved_gib" if fast.get("peak_reserved_gib") is not None else "peak_memory_gib"
    how = (f"GiB {'reserved' if field == 'peak_reserved_gib' else 'allocated'}, {train_row_label(fast)} (the "
           f"fastest), sample batch {fast['sample_batch_size']}, train batch {fast['train_batch_size']}, "
           f"{fast['resolution']} px")
    joined, rows_per_call = fast.get("sample_batches_per_call", 1), fast.get("train_rows_per_call", 0)
    if joined > 1 or rows_per_call:
        how += (f" (UNet batches: sampling {joined * fast['sample_batch_size']}, "
                f"training {rows_per_call or fast['train_batch_size']} rows)")
    others = [r for r in fast_path_rows(train) if r is not fast and r.get(field) is not None]
    if others:
        worst = max(others, key=lambda r: r[field])
        how += f"; largest of the other fast-path rows: {worst[field]:.3g} (row {worst['variant']})"
    return fast[field], how


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
          train_ratio("straightforward", "epoch_s", "straightforward epoch s / fast-path epoch s")),
    Claim(5, "DDPO's per-sample RL step at least 10x rlcm-fast's", "bench_train", ">=", 10.0,
          train_ratio("ddpo", "per_sample_rl_step_s", "DDPO s per sample / fast-path s per sample")),
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
    if data.get("complete") is False:
        detail += f"; partial: {claim.source} stopped before its last row"
    if data.get("fast_attention_backend", "sdpa") != "sdpa":  # bench_sampler --fast-attention: not the default
        detail += f"; rlcm-fast with attention_backend={data['fast_attention_backend']}"
    status = "pass" if HOLDS[claim.op](value, claim.threshold) else "fail"
    return {**entry, "status": status, "measured": value, "detail": detail}


def evaluate(out_dir: Path) -> list[dict]:
    results = {}
    for name in {claim.source for claim in CLAIMS}:
        path = out_dir / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    return [judge(claim, results) for claim in CLAIMS]
