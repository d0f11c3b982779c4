"""Benchmark of the kernels behind PyTorch's scaled_dot_product_attention at the shapes that one UNet call
and one VAE decode make: which backend (flash, memory-efficient, cuDNN) is fastest per shape, and what
each costs per UNet call, in the forward pass (sampling) and forward + backward (training). It says what
`attention_backend: cudnn` (rlcm_fast/attention.py) can buy, without compiling or sampling anything.

The shapes are recorded by running the model's forward on the meta device (nothing is computed), so they
are the model's own: at 768 px sd15-lcm's self-attention layers see 9216, 2304 and 576 tokens with 40-,
80- and 160-wide heads (8 heads), its cross-attention 77 keys; the VAE's mid-block one 512-wide head.
Per shape and backend: the median time (triton's do_bench on a GPU), TFLOP/s (forward: its two matmuls,
4·B·h·Sq·Sk·d FLOPs; backward: its four, twice that; recomputation not counted), and which backend SDPA
picks by default and with cuDNN first (`torch._fused_sdp_choice`, as at run time). A backend that has no
kernel for a shape says so. Per model call: the sum over its layers for the default choice, the
cuDNN-first choice, and the fastest backend per shape.

GPU (the default when CUDA is there): sd15-lcm, 768 px, bf16; sampling batch 8 (UNet and VAE decode,
forward), training calls of 2 and 7 rows (UNet, forward + backward).
CPU (`--device cpu`, or no CUDA): tiny at 32 px, float32; a smoke test of the script, not a speed claim.

Writes bench_attention.json (under --out-dir, else benchmarks/results/bench_attention-<device>.json).
Usage: python benchmarks/bench_attention.py [--device cuda|cpu] [--batches 8] [--train-rows 2,7] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, int_list, output_folder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda where available")
    parser.add_argument("--batches", type=int_list(), default=(8,),
                        help="sampling batch sizes, comma-separated (default 8)")
    parser.add_argument("--train-rows", type=int_list(empty=True), default=(2, 7),
                        help="training rows per UNet call, comma-separated (default 2,7; '' for none)")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/bench_attention.json instead of benchmarks/results/")
    return parser, parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from common import environment, refuse_missing_cuda, release_memory, write_result  # noqa: E402
from rlcm_fast.attention import CUDNN_FIRST  # noqa: E402
from rlcm_fast.architectures import SD15_LCM, TINY  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
BACKEND_NAMES = {backend.name: name for name, backend in BACKENDS.items()}  # SDPBackend's name -> ours


def attention_shapes(spec, resolution: int) -> dict[str, Counter]:
    """{"unet": Counter, "vae_decode": Counter} of (heads, query tokens, key tokens, head width) for one
    image, from the model's forward on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    seen: Counter = Counter()
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        _, heads, q_tokens, width = query.shape
        seen[(heads, q_tokens, key.shape[-2], width)] += 1
        return sdpa(query, key, value, *args, **kwargs)

    shapes = {}
    side = resolution // 2 ** (len(spec.vae["block_out_channels"]) - 1)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**spec.unet), AutoencoderKL(**spec.vae)
        latents = torch.zeros(1, spec.unet.get("in_channels", 4), side, side)
        text = torch.zeros(1, 77, spec.unet["cross_attention_dim"])
        guidance = torch.zeros(1, spec.unet["time_cond_proj_dim"]) if "time_cond_proj_dim" in spec.unet else None
        F.scaled_dot_product_attention = recording
        try:
            with torch.no_grad():
                unet(latents, torch.tensor([999]), text, timestep_cond=guidance)
                shapes["unet"], seen = seen, Counter()
                vae.decode(latents)
                shapes["vae_decode"] = seen
        finally:
            F.scaled_dot_product_attention = sdpa
    return shapes


def median_ms(fn, device: torch.device, grads: list[torch.Tensor]) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def chosen(query, key, value, priority=None) -> str:
    """The backend SDPA dispatches these inputs to (by default, or with `priority` first)."""
    if priority is None:
        return SDPBackend(torch._fused_sdp_choice(query, key, value)).name
    with sdpa_kernel(priority, set_priority=True):
        return SDPBackend(torch._fused_sdp_choice(query, key, value)).name


def time_shape(batch: int, shape: tuple, backward: bool, device: torch.device, dtype: torch.dtype,
               backends: list[str]) -> dict:
    heads, q_tokens, k_tokens, width = shape
    generator = torch.Generator(device).manual_seed(0)
    query = torch.randn(batch, heads, q_tokens, width, device=device, dtype=dtype, generator=generator)
    key, value = (torch.randn(batch, heads, k_tokens, width, device=device, dtype=dtype, generator=generator)
                  for _ in range(2))
    if backward:  # before the choice: some kernels have no backward for some shapes
        query, key, value = (t.requires_grad_() for t in (query, key, value))
        out_grad = torch.randn(batch, heads, q_tokens, width, device=device, dtype=dtype, generator=generator)
    flops = 4 * batch * heads * q_tokens * k_tokens * width * (3 if backward else 1)
    row = {"batch": batch, "heads": heads, "query_tokens": q_tokens, "key_tokens": k_tokens, "head_width": width,
           "pass": "forward_backward" if backward else "forward", "gflop": flops / 1e9,
           "default_choice": BACKEND_NAMES[chosen(query, key, value)],
           "cudnn_first_choice": BACKEND_NAMES[chosen(query, key, value, CUDNN_FIRST)], "ms": {}, "tflops": {},
           "no_kernel": []}
    # The backends SDPA would pick are always timed (math, on a GPU, only for a shape no fused kernel takes).
    picked = [row["default_choice"], row["cudnn_first_choice"]]
    for name in backends + [name for name in dict.fromkeys(picked) if name not in backends]:
        def call():
            with sdpa_kernel(BACKENDS[name]):
                out = F.scaled_dot_product_attention(query, key, value)
            if backward:
                out.backward(out_grad)

        try:
            ms = median_ms(call, device, [query, key, value] if backward else [])
        except RuntimeError:  # "No viable backend ...": this backend has no kernel for these inputs
            row["no_kernel"].append(name)
            continue
        row["ms"][name], row["tflops"][name] = ms, flops / (ms * 1e-3) / 1e12
    return row



def call_totals(rows: list[dict], counts: list[int]) -> dict:
    """ms per model call: the default choice, the cuDNN-first choice, the fastest backend of each shape,
    and each backend where it has a kernel for every shape."""
    def total(pick) -> float | None:
        times = [row["ms"].get(pick(row)) for row in rows]
        return None if None in times else sum(n * t for n, t in zip(counts, times))

    totals = {"default": total(lambda r: r["default_choice"]), "cudnn_first": total(lambda r: r["cudnn_first_choice"]),
              # A shape no backend ran (each out of memory, say) leaves the totals that need it None, not a traceback
              "fastest": total(lambda r: min(r["ms"], key=r["ms"].get) if r["ms"] else None)}
    for name in BACKENDS:
        totals[name] = total(lambda r, name=name: name)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    refuse_missing_cuda(parser, args.device)
    batches, train_rows = args.batches, args.train_rows
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model, spec, resolution, dtype = ("sd15-lcm", SD15_LCM, 768, torch.bfloat16) if gpu else ("tiny", TINY, 32,
                                                                                               torch.float32)
    # Math materialises the attention matrix (11 GB for sampling's largest UNet layer at batch 8) and is
    # not timed on a GPU unless SDPA would pick it (time_shape); on the CPU it is what runs.
    backends = ["flash", "efficient", "cudnn"] if gpu else ["flash", "math", "cudnn"]
    shapes = attention_shapes(spec, resolution)
    result = {"benchmark": "bench_attention", **environment(), "model": model, "resolution": resolution,
              "dtype": str(dtype).removeprefix("torch."), "backends": backends,
              "cudnn_version": torch.backends.cudnn.version(),  # None without cuDNN; its attention kernels vary by it
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "layers_per_call": {part: [{"shape": list(s), "count": n} for s, n in c.items()] for part, c in shapes.items()},
              "groups": []}
    # Training first: at 2 rows per call it is where the 3x epoch claim is decided.
    plan = ([("unet", rows, True) for rows in train_rows]
            + [(part, batch, False) for batch in batches for part in ("unet", "vae_decode")])
    for part, batch, backward in plan:
        counts = list(shapes[part].values())
        rows = [time_shape(batch, shape, backward, device, dtype, backends) for shape in shapes[part]]
        group = {"model_part": part, "batch": batch, "pass": "forward_backward" if backward else "forward",
                 "rows": rows, "layer_counts": counts, "ms_per_call": call_totals(rows, counts)}
        result["groups"].append(group)
        write_result("bench_attention", result, args.out_dir, complete=False)
        totals = "  ".join(f"{k} {v:.2f}" for k, v in group["ms_per_call"].items() if v is not None)
        print(f"{part} batch {batch} {group['pass']}: ms per call: {totals}", flush=True)
        release_memory(device)
    print(f"wrote {write_result('bench_attention', result, args.out_dir, complete=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
