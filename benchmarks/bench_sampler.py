"""Benchmark of sampling: diffusers' LCM pipeline (eager, and with its documented torch.compile recipe)
against rlcm-fast's FastLCMSampler, in images per second.

GPU (the default when CUDA is there): the random-weight LCM_Dreamshaper_v7 architecture (`sd15-lcm`,
same FLOPs as the real model), bf16, 768 px, H in {4, 8}, batch in {1, 8}; rlcm-fast also without its
CUDA graph (compiled UNet and decode only), to show what the graph buys. Each row also reports MFU:
FLOPs counted with torch.utils.flop_counter (one UNet call at that batch times H, plus the VAE decode),
over the time, against this device's measured bf16 matmul rate; and the largest pixel difference between
the variant's images and diffusers' eager images for the same generator (bf16 tolerance). Every call of
every variant encodes its prompt: rlcm-fast's prompt cache is cleared before each (its cached embeddings
would skip the text encoder, which the pipeline runs at every call; "prompt_encoded_every_call" in the JSON).

CPU (`--device cpu`, or no CUDA): the same rows on the `tiny` model at 32 px, H in {2, 4}, without the
compiled variants (inductor compiles take minutes there) and without MFU; a smoke test of the script, not
a speed claim.

Rows come in the order check_claims needs them (it runs this under a time limit): first, H-major, each
(H, batch)'s diffusers eager row (what the speedups divide by) and rlcm-fast; then diffusers +
torch.compile for each (H, batch); then the rows without the CUDA graph, which no claim reads. The JSON
is rewritten after every row ("complete": false until the last), so a run stopped early keeps what it
measured.

`--fast-attention cudnn` runs rlcm-fast's rows (only those) with `set_attention_backend(pipe, "cudnn")`
(rlcm_fast/attention.py); the diffusers rows keep the pipeline's default attention. The JSON records it.

Writes benchmarks/results/bench_sampler-<device>.json (DIR/bench_sampler.json with --out-dir DIR).
Usage: python benchmarks/bench_sampler.py [--device cuda|cpu] [--repeats 10] [--horizons 4,8] [--batches 1,8]
       [--fast-attention sdpa|cudnn] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, int_list, output_folder, positive_int  # noqa: E402

# diffusers' LCM pipeline takes H <= its scheduler's original_inference_steps, 50 in both presets
# (rlcm_fast/architectures.py); a larger H was diffusers' ValueError after the pipeline had loaded.
MAX_HORIZON = 50


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda where available")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--horizons", type=int_list(1, "integers", MAX_HORIZON), default=None,
                        help="comma-separated H values (default: GPU 4,8; CPU 2,4)")
    parser.add_argument("--batches", type=int_list(), default=None, help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--fast-attention", choices=("sdpa", "cudnn"), default="sdpa",
                        help="attention_backend of rlcm-fast's rows (default sdpa, the pipeline's)")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/bench_sampler.json instead of benchmarks/results/")
    return parser, parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import torch  # noqa: E402

from common import (environment, matmul_rate, refuse_missing_cuda, release_memory, synchronize,  # noqa: E402
                    write_result)
from rlcm_fast import FastLCMSampler  # noqa: E402
from rlcm_fast.attention import check_attention_backend, set_attention_backend  # noqa: E402
from rlcm_fast.models import load_pipeline  # noqa: E402

PROMPT = "a photograph of a red fox in the snow"
GUIDANCE = 8.0
EAGER, FAST, COMPILED_DIFFUSERS, FAST_WITHOUT_GRAPH = (
    "diffusers eager", "rlcm-fast", "diffusers + torch.compile", "rlcm-fast, no CUDA graph")



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


def decode_flops(pipe, batch: int, resolution: int) -> int:
    """FLOPs of the VAE decode of `batch` latents: at 768 px about 2.7 UNet calls' worth, so it belongs in MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    side = resolution // pipe.vae_scale_factor
    latents = torch.zeros(batch, pipe.vae.config.latent_channels, side, side, device=pipe.device, dtype=pipe.vae.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.vae.decode(latents).sample
    return counter.get_total_flops()


def diffusers_images(pipe, horizon: int, batch: int, resolution: int, device: torch.device) -> torch.Tensor:
    return pipe([PROMPT] * batch, num_inference_steps=horizon, guidance_scale=GUIDANCE, height=resolution,
                width=resolution, output_type="pt", generator=torch.Generator(device).manual_seed(0)).images


def variant_call(name: str, pipe, horizon: int, batch: int, resolution: int, device: torch.device):
    """The call that variant `name` is timed on: `batch` images at H=horizon, seed 0."""
    if name in (EAGER, COMPILED_DIFFUSERS):  # the pipeline holds the UNet of the variant when it is timed
        return lambda: diffusers_images(pipe, horizon, batch, resolution, device)
    gpu = device.type == "cuda"
    # Without the graph: the same compiled UNet and decode as rlcm-fast's (dynamo's cache: no new compile).
    fast = FastLCMSampler(pipe, batch, horizon, GUIDANCE, compile=gpu, cuda_graph=gpu and name == FAST)

    def call():
        fast.clear_prompt_cache()  # its text encoder runs at every call, as the pipeline's does: like for like
        return fast([PROMPT] * batch, generator=torch.Generator(device).manual_seed(0)).images
    return call


def time_variant(name: str, pipe, unet, horizon: int, batch: int, resolution: int, device: torch.device,
                 repeats: int, fast_attention: str = "sdpa") -> tuple[float, torch.Tensor]:
    """(median seconds per call, images) of variant `name` with `unet` in the pipeline, rlcm-fast's with
    `fast_attention`. Its call (and a sampler's graph) is made here, so that nothing holds it once this returns."""
    attention = fast_attention if name in (FAST, FAST_WITHOUT_GRAPH) else "sdpa"
    # Switched before the call is built (it is compiled and captured with it), and the pipeline's own
    # processor objects put back after: new ones would make dynamo recompile the diffusers + compile UNet.
    originals = {model: model.attn_processors for model in (pipe.unet, pipe.vae)} if attention != "sdpa" else {}
    if originals:
        set_attention_backend(pipe, attention)
    fn = variant_call(name, pipe, horizon, batch, resolution, device)  # built around the pipeline's eager UNet
    eager_unet, pipe.unet = pipe.unet, unet
    try:
        seconds = seconds_per_call(fn, device, warmup=3 if device.type == "cuda" else 1, repeats=repeats)
        return seconds, fn().float()
    finally:
        pipe.unet = eager_unet
        for model, processors in originals.items():
            model.set_attn_processor(processors)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    refuse_missing_cuda(parser, args.device)
    device = torch.device(args.device)
    try:
        check_attention_backend(args.fast_attention, device)
    except ValueError as error:
        parser.error(str(error))
    gpu = device.type == "cuda"
    model, resolution = ("sd15-lcm", 768) if gpu else ("tiny", 32)
    horizons, batches = ((4, 8), (1, 8)) if gpu else ((2, 4), (1, 8))
    horizons, batches = args.horizons or horizons, args.batches or batches
    dtype = torch.bfloat16 if gpu else torch.float32
    pipe = load_pipeline(model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.config.recompile_limit = 64  # one specialisation per (batch, H)

    result = {"benchmark": "bench_sampler", **environment(), "model": model, "resolution": resolution,
              "dtype": str(dtype).removeprefix("torch."), "prompt": PROMPT, "guidance_scale": GUIDANCE,
              "fast_attention_backend": args.fast_attention, "prompt_encoded_every_call": True,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": [], "skipped": []}
    if gpu:
        result["matmul_rate"] = matmul_rate(device)
        peak = result["matmul_rate"]["flops_per_s"] / 1e12
    else:
        peak = None
        result["skipped"].append({"row": "diffusers+compile, rlcm-fast compiled",
                                  "reason": "CPU run: inductor compiles take minutes; a smoke test of the script"})
    eager_unet = pipe.unet
    compiled_unet = torch.compile(eager_unet, mode="reduce-overhead", fullgraph=True) if gpu else None

    # The claims' rows first (see the module doc): rlcm-fast against eager at every (H, batch) before any
    # reduce-overhead compile, so that a run cut short has both batch sizes' speedups.
    passes = [[EAGER, FAST], [COMPILED_DIFFUSERS], [FAST_WITHOUT_GRAPH]] if gpu else [[EAGER, FAST]]
    references, flops_per_h_steps, eager_seconds = {}, {}, {}
    for variants in passes:
        for horizon in horizons:
            for batch in batches:
                group = (horizon, batch)
                if group not in references:
                    references[group] = diffusers_images(pipe, horizon, batch, resolution, device).float()
                    flops_per_h_steps[group] = (unet_call_flops(pipe, batch, resolution) * horizon
                                                + decode_flops(pipe, batch, resolution))
                flops = flops_per_h_steps[group]
                for name in variants:
                    unet = compiled_unet if name == COMPILED_DIFFUSERS else eager_unet
                    seconds, images = time_variant(name, pipe, unet, horizon, batch, resolution, device, args.repeats,
                                                   args.fast_attention)
                    if name == EAGER:
                        eager_seconds[group] = seconds  # measured before the group's other variants
                    row = {
                        "variant": name, "horizon": horizon, "batch": batch, "seconds_per_call": seconds,
                        "images_per_second": batch / seconds, "tflop_per_call": flops / 1e12,
                        "max_abs_pixel_diff_vs_diffusers_eager": (images - references[group]).abs().max().item(),
                        "speedup_vs_diffusers_eager": eager_seconds[group] / seconds,
                    }
                    if peak:
                        row["mfu"] = flops / seconds / 1e12 / peak
                    result["rows"].append(row)
                    write_result("bench_sampler", result, args.out_dir, complete=False)
                    print(f"H={horizon} B={batch} {name:<26} {batch / seconds:8.2f} img/s"
                          + (f"  MFU {row['mfu']:.1%}" if peak else ""), flush=True)
                release_memory(device)
    print(f"wrote {write_result('bench_sampler', result, args.out_dir, complete=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
