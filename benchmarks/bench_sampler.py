"""Benchmark of sampling: diffusers' LCM pipeline (eager, and with its documented torch.compile recipe)
against rlcm-fast's FastLCMSampler, in images per second.

GPU (the default when CUDA is there): the random-weight LCM_Dreamshaper_v7 architecture (`sd15-lcm`,
same FLOPs as the real model), bf16, 768 px, H in {4, 8}, batch in {1, 8}; rlcm-fast also without its
CUDA graph (compiled UNet and decode only), to show what the graph buys. Each row also reports MFU:
UNet FLOPs counted with torch.utils.flop_counter for one call at that batch, times H calls, over the
time, against this device's measured bf16 matmul rate; and the largest pixel difference between the
variant's images and diffusers' eager images for the same generator (bf16 tolerance).

CPU (`--device cpu`, or no CUDA): the same rows on the `tiny` model at 32 px without the compiled
variants (inductor compiles take minutes there); a smoke test of the script, not a speed claim.

Writes benchmarks/results/bench_sampler-<device>.json.
Usage: python benchmarks/bench_sampler.py [--device cuda|cpu] [--repeats 10] [--horizons 4,8] [--batches 1,8]
       [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from rlcm_fast import FastLCMSampler  # noqa: E402
from rlcm_fast.models import load_pipeline  # noqa: E402

PROMPT = "a photograph of a red fox in the snow"
GUIDANCE = 8.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):  # compile, capture, allocator warm-up
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bf16_matmul_tflops() -> float:
    """Measured dense bf16 matmul rate (8192^3), the MFU denominator."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def unet_call_flops(pipe, batch: int, resolution: int) -> int:
    """FLOPs of one UNet forward at this batch (flop_counter counts matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rlcm_fast.sampler import LCMSampler

    sampler = LCMSampler(pipe, 4, GUIDANCE, resolution=resolution)
    embeds = sampler.prompt_embeddings([PROMPT] * batch)
    side = resolution // pipe.vae_scale_factor
    x = torch.randn(batch, pipe.unet.config.in_channels, side, side, device=pipe.device, dtype=embeds.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sampler.unet_output(pipe.unet, x, sampler.timesteps[0].to(pipe.device), embeds,
                            sampler.guidance(batch, embeds.dtype))
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--horizons", default=None, help="comma-separated H values (default: GPU 4,8; CPU 2,4)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--out-dir", default=None, help="write DIR/bench_sampler.json instead of benchmarks/results/")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model, resolution = ("sd15-lcm", 768) if gpu else ("tiny", 32)
    horizons, batches = ((4, 8), (1, 8)) if gpu else ((2, 4), (1, 8))
    if args.horizons:
        horizons = tuple(int(v) for v in args.horizons.split(","))
    if args.batches:
        batches = tuple(int(v) for v in args.batches.split(","))
    dtype = torch.bfloat16 if gpu else torch.float32
    pipe = load_pipeline(model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.config.recompile_limit = 64  # one specialisation per (batch, H)

    result = {"benchmark": "bench_sampler", **environment(), "model": model, "resolution": resolution,
              "dtype": str(dtype).removeprefix("torch."), "prompt": PROMPT, "guidance_scale": GUIDANCE,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": [], "skipped": []}
    if gpu:
        result["bf16_matmul_tflops"] = peak = bf16_matmul_tflops()
    else:
        peak = None
        result["skipped"].append({"rows": "diffusers+compile, rlcm-fast compiled",
                                  "reason": "CPU run: inductor compiles take minutes; a smoke test of the script"})
    eager_unet = pipe.unet
    compiled_unet = torch.compile(eager_unet, mode="reduce-overhead", fullgraph=True) if gpu else None

    for horizon in horizons:
        for batch in batches:
            flops = unet_call_flops(pipe, batch, resolution) * horizon

            def diffusers_call(seed=0):
                return pipe([PROMPT] * batch, num_inference_steps=horizon, guidance_scale=GUIDANCE,
                            height=resolution, width=resolution, output_type="pt",
                            generator=torch.Generator(device).manual_seed(seed)).images

            pipe.unet = eager_unet
            reference = diffusers_call().float()
            variants = {"diffusers eager": diffusers_call}
            fast = FastLCMSampler(pipe, batch, horizon, GUIDANCE, compile=gpu)
            variants["rlcm-fast"] = lambda: fast([PROMPT] * batch, generator=torch.Generator(device).manual_seed(0)).images
            if gpu:
                variants["diffusers + torch.compile"] = diffusers_call
                # What the CUDA graph buys: the same compiled UNet and decode (dynamo's cache: no new compile).
                ungraphed = FastLCMSampler(pipe, batch, horizon, GUIDANCE, compile=True, cuda_graph=False)
                variants["rlcm-fast, no CUDA graph"] = (
                    lambda: ungraphed([PROMPT] * batch, generator=torch.Generator(device).manual_seed(0)).images)
            for name, fn in variants.items():
                pipe.unet = compiled_unet if name == "diffusers + torch.compile" else eager_unet
                seconds = seconds_per_call(fn, device, warmup=3 if gpu else 1, repeats=args.repeats)
                images = fn().float()
                row = {
                    "variant": name, "horizon": horizon, "batch": batch, "seconds_per_call": seconds,
                    "images_per_second": batch / seconds, "unet_tflop_per_call": flops / 1e12,
                    "max_abs_pixel_diff_vs_diffusers_eager": (images - reference).abs().max().item(),
                }
                if peak:
                    row["mfu"] = flops / seconds / 1e12 / peak
                result["rows"].append(row)
                print(f"H={horizon} B={batch} {name:<26} {batch / seconds:8.2f} img/s"
                      + (f"  MFU {row['mfu']:.1%}" if peak else ""), flush=True)
            pipe.unet = eager_unet
    for row in result["rows"]:
        base = next(r for r in result["rows"] if r["variant"] == "diffusers eager"
                    and (r["horizon"], r["batch"]) == (row["horizon"], row["batch"]))
        row["speedup_vs_diffusers_eager"] = base["seconds_per_call"] / row["seconds_per_call"]
    print(f"wrote {write_result('bench_sampler', result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
