"""Benchmark of the trainer's UNet and VAE calls under the switches that change which kernels run but no
result: which is fastest at the shapes an epoch runs, eager and replayed from CUDA graphs. One short run
decides `channels_last`, `cudnn_benchmark` and `attention_backend` (rlcm_fast/config.py) without sampling
or training whole epochs (bench_train.py does that, one row per combination).

Variants: config switches, applied in place to one Trainer's models (the values a user would `--set`):
    default          NCHW tensors, cuDNN's heuristic algorithm choice, SDPA's default attention kernels
    channels_last    the UNet and the VAE in channels-last (NHWC) memory format
    cudnn_benchmark  cuDNN times its convolution algorithms once per shape and keeps the fastest
    cudnn_attention  attention_backend: cudnn (SDPA tries cuDNN's fused attention first)
    all              the three together
    half_precision_norms  the group and layer norms in bf16 under autocast, not its float32 (this one changes
                     the result by a rounding: rlcm_fast/norm_precision.py); GPU only, a CPU's autocast has no
                     float32 norms to remove
Calls, each timed eager and (on a GPU) replayed from CUDA graphs, as the trainer's switches capture them:
    training R   one training call: the UNet forward of R (sample, step) rows, the policy step's log-prob and
                 the backward to the LoRA weights (graph: GraphedTrainingUNet); R = 2, the paper's train
                 batch, and 7 (train_rows_per_call 7)
    sampling B   the sampling loop (UNet calls and policy steps, no decode) of B trajectories at horizon 2,
                 reported per UNet call (graph: the sampler's captured loop); B = 20 (sample_batches_per_call
                 5) and 4, a sampling batch
    decode B     one VAE decode of B latents (graph: CapturedCall); B = 4
GPU (the default when CUDA is there): sd15-lcm at 768 px, bf16 autocast, the compressibility task's LoRA.
CPU (`--device cpu`, or no CUDA): tiny at 32 px, float32, the default and channels_last variants, eager
only; a smoke test of the script, not a speed claim.

Per (call, variant, mode): the median of --repeats calls after two warm-up calls (the first searches
cuDNN's algorithms or captures the graph), on a thread of its own (cuDNN's plan cache is per thread: see
on_own_thread), in ms; TFLOP/s from the call's counted FLOPs; the speedup over
the default variant's eager time. Calls run outer, variants inner, so that a run cut short has every
variant of the calls it reached. Writes bench_unet.json (under --out-dir, else
benchmarks/results/bench_unet-<device>.json).
Usage: python benchmarks/bench_unet.py [--device cuda|cpu] [--variants a,b] [--calls ...] [--repeats 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, name_list, output_folder, positive_int, refuse_repeats  # noqa: E402

VARIANTS = {
    "default": {},
    "channels_last": {"channels_last": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "cudnn_attention": {"attention_backend": "cudnn"},
    "all": {"channels_last": True, "cudnn_benchmark": True, "attention_backend": "cudnn"},
    "half_precision_norms": {"half_precision_norms": True},
}
CPU_VARIANTS = ("default", "channels_last")  # cuDNN is CUDA's
CALLS = ("training:2", "training:7", "sampling:20", "sampling:4", "decode:4")
SAMPLING_HORIZON = 2  # per UNet call, the loop's cost does not depend on H; 2 keeps each timed call short
GPU_CONFIG = {"device": "cuda", "model": "sd15-lcm", "task": "compressibility", "resolution": 768}
CPU_CONFIG = {"device": "cpu", "model": "tiny"}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line with its checks that need no torch; `args.calls` becomes [(kind, batch), ...]."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda where available")
    parser.add_argument("--variants", type=name_list(VARIANTS, "variants"), default=None, help=f"comma-separated, of {', '.join(VARIANTS)} "
                        f"(default: all on a GPU, {', '.join(CPU_VARIANTS)} on a CPU)")
    parser.add_argument("--calls", default=",".join(CALLS),
                        help=f"comma-separated kind:batch (default {','.join(CALLS)})")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed calls per row, after two warm-up calls")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/bench_unet.json instead of benchmarks/results/")
    args = parser.parse_args(argv)
    try:
        calls = [(kind, int(batch)) for kind, batch in (c.split(":") for c in args.calls.split(","))]
        if any(kind not in ("training", "sampling", "decode") or batch < 1 for kind, batch in calls):
            raise ValueError
    except ValueError:
        parser.error(f"--calls {args.calls!r} is invalid: expected kind:batch pairs, comma-separated, kind one of "
                     "training, sampling, decode, batch a positive integer")
    try:  # a call named twice would be measured twice (training:2 and training:02 are one)
        refuse_repeats(args.calls, [f"{kind}:{batch}" for kind, batch in calls])
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--calls {exc}")
    args.calls = calls
    return parser, args


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from common import environment, refuse_missing_cuda, release_memory, synchronize, write_result  # noqa: E402
from rlcm_fast.attention import set_attention_backend  # noqa: E402
from rlcm_fast.config import resolve_config  # noqa: E402
from rlcm_fast.cuda_graphs import CapturedCall, GraphedTrainingUNet  # noqa: E402
from rlcm_fast.faults import one_line  # noqa: E402
from rlcm_fast.models import set_channels_last  # noqa: E402
from rlcm_fast.norm_precision import use_half_precision_norms  # noqa: E402
from rlcm_fast.sampler import LCMSampler  # noqa: E402
from rlcm_fast.trainer import Trainer  # noqa: E402


def apply_variant(trainer: Trainer, switches: dict) -> None:
    """Set the variant's switches on the trainer's models in place, every one of them (back to its default
    where the variant does not name it)."""
    set_channels_last(trainer.pipe, bool(switches.get("channels_last")))
    torch.backends.cudnn.benchmark = bool(switches.get("cudnn_benchmark"))
    set_attention_backend(trainer.pipe, switches.get("attention_backend", "sdpa"))
    use_half_precision_norms(trainer.pipe.unet, trainer.pipe.vae, enabled=bool(switches.get("half_precision_norms")))



def on_own_thread(measure):
    """measure() run on a thread of its own, its result returned (its exception raised) here. PyTorch keeps
    cuDNN's convolution plans per thread (aten/src/ATen/native/cudnn/Conv_v8.cpp), keyed by the shapes but not
    by torch.backends.cudnn.benchmark, and a plan found by its heuristics is kept too: in a thread that had
    run a shape before (the FLOP count, the default variant), cudnn_benchmark would time nothing and reuse the
    heuristic plan. A fresh thread starts with an empty cache; autocast and grad mode are set by each call.
    A daemon thread, joined: Ctrl-C (check_claims' stop) ends the wait at once, not after the measurement."""
    outcome = {}

    def run():
        try:
            outcome["value"] = measure()
        except BaseException as error:  # raised again on the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="bench_unet-measurement", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def timed_ms(call, repeats: int, device: torch.device) -> float:
    """The median wall time of `call()` over `repeats` calls after two warm-up calls, in ms."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


class Calls:
    """The three kinds of call at one batch size, built on the trainer's own models and sampler settings."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.cfg, self.device = trainer, trainer.cfg, trainer.device
        self.prompt = trainer.prompt_set[0]

    def sampler(self, graphed: bool) -> LCMSampler:
        cfg = self.cfg
        return LCMSampler(self.trainer.pipe, SAMPLING_HORIZON, cfg.guidance_scale, cfg.original_inference_steps,
                          train_final_step=False, resolution=cfg.resolution, step_backend=cfg.policy_step_backend,
                          cuda_graph=graphed)

    def make(self, kind: str, batch: int, graphed: bool):
        """A function of no arguments that runs one call, with its inputs made once here."""
        trainer, sampler = self.trainer, self.sampler(graphed)
        generator = torch.Generator(self.device).manual_seed(0)
        dtype = trainer.pipe.text_encoder.dtype
        latents = sampler.draw_latents(batch, generator, dtype)
        if kind == "sampling":
            noises = sampler.draw_noises(batch, generator, dtype)
            prompts = [self.prompt] * batch

            def sampling():
                with trainer.autocast():
                    sampler.sample(trainer.unet, prompts, latents=latents, noises=noises, decode=False)
            return sampling
        if kind == "decode":
            decode = CapturedCall(sampler.decode, self.device) if graphed else sampler.decode

            def decoding():
                with trainer.autocast(), torch.no_grad():
                    decode(latents.float())
            return decoding
        # Training: rows of step 0 -> 1 (what a row costs does not depend on its step or values).
        states = torch.stack([latents.float(), torch.randn_like(latents, dtype=torch.float32)], dim=1)
        rows, steps = torch.arange(batch, device=self.device), torch.zeros(batch, dtype=torch.long, device=self.device)
        embeds = sampler.prompt_embeddings([self.prompt] * batch)
        unet = GraphedTrainingUNet(trainer.unet, self.device) if graphed else trainer.unet
        for p in trainer.params:  # allocated before the first backward and zeroed in place, as the trainer does
            p.grad = torch.zeros_like(p)

        def training():
            with trainer.autocast():
                log_probs = sampler.action_log_probs(unet, states, rows, steps, embeds)[0]
            log_probs.mean().backward()
            trainer.optimizer.zero_grad(set_to_none=False)
        return training


def counted_tflop(call) -> float:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() / 1e12


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    refuse_missing_cuda(parser, args.device)
    gpu = args.device == "cuda"
    variants = args.variants or list(VARIANTS if gpu else CPU_VARIANTS)
    # The default variant first, whatever the order asked for: each other row's speedup is over its eager time.
    variants = sorted(variants, key=lambda name: name != "default")
    allowed = list(VARIANTS if gpu else CPU_VARIANTS)
    if unknown := [v for v in variants if v not in allowed]:
        parser.error(f"--variants {unknown} unknown{'' if gpu else ' on a CPU'}; allowed: {', '.join(allowed)}")
    calls = args.calls
    # The trainer's run directory holds nothing this benchmark reports: gone when it ends.
    with tempfile.TemporaryDirectory(prefix="bench_unet-") as run_dir:
        return measure(args, variants, calls, gpu, Path(run_dir))


def measure(args: argparse.Namespace, variants: list[str], calls: list[tuple[str, int]], gpu: bool,
            run_dir: Path) -> int:
    modes = ("eager", "graph") if gpu else ("eager",)
    trainer = Trainer(resolve_config(overrides={**(GPU_CONFIG if gpu else CPU_CONFIG), "grid_every": 0}), run_dir)
    device, builder = trainer.device, Calls(trainer)
    result = {"benchmark": "bench_unet", **environment(), "model": trainer.cfg.model,
              "resolution": trainer.cfg.resolution, "precision": {"no": "float32"}.get(precision := trainer.accelerator.mixed_precision, f"{precision} autocast"),
              "sampling_horizon": SAMPLING_HORIZON, "repeats": args.repeats,
              "variants": {name: VARIANTS[name] for name in variants},
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}
    for kind, batch in calls:
        apply_variant(trainer, {})
        tflop = counted_tflop(builder.make(kind, batch, graphed=False))
        per_unet_call = SAMPLING_HORIZON if kind == "sampling" else 1
        baseline = None
        for variant in variants:
            apply_variant(trainer, VARIANTS[variant])
            for mode in modes:
                row = {"call": kind, "batch": batch, "variant": variant, "mode": mode, "tflop": tflop}
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        ms = on_own_thread(lambda: timed_ms(builder.make(kind, batch, graphed=mode == "graph"),
                                                            args.repeats, device))
                    # A capture that fails warns and runs the call without the graph: not a graph's time.
                    if fallbacks := [str(w.message) for w in caught if "could not be captured" in str(w.message)
                                     or "without CUDA graphs" in str(w.message)]:
                        raise RuntimeError(fallbacks[0])
                except RuntimeError as error:  # one row's failure (a capture, memory) is its result
                    row["error"] = one_line(error, limit=300)
                    print(f"{kind} {batch} {variant} {mode}: {row['error']}", flush=True)
                else:
                    baseline = baseline or (ms if variant == "default" and mode == "eager" else None)
                    row.update(ms=ms, tflops_per_s=tflop / (ms * 1e-3),
                               speedup_vs_default_eager=baseline / ms if baseline else None)
                    if per_unet_call > 1:
                        row["ms_per_unet_call"] = ms / per_unet_call
                    print(f"{kind:8s} {batch:3d} {variant:16s} {mode:5s} {ms:9.2f} ms  "
                          f"{row['tflops_per_s']:8.2f} TFLOP/s  x{row['speedup_vs_default_eager'] or float('nan'):.3f}",
                          flush=True)
                result["rows"].append(row)
                write_result("bench_unet", result, args.out_dir, complete=False)
                release_memory(device)
    apply_variant(trainer, {})
    print(f"wrote {write_result('bench_unet', result, args.out_dir, complete=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
