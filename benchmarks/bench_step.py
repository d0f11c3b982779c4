"""Benchmark of the policy step: eager reference, torch.compile of the reference, fused Triton kernel.

For B latents of 4x96x96 (768 px), bf16 and fp32, epsilon prediction, times:
  forward_sampling   D, x_next and logp from (model_output, x, noise)
  forward_training   D and logp from (model_output, x, stored x_next)
  forward_backward   forward_training plus the gradient of logp w.r.t. model_output (the PPO loss path)
B = 2, 8, 16 are the sizes the sampler and the trainer use; there the step is bound by launch latency,
not memory. B = 512 (95-600 MB moved per call, well above an H100/H200's 50 MB L2) is where the
fraction of copy bandwidth means something. Each time is reported three times: `time_us` from
triton.testing.do_bench (median, L2 flushed before every call, kernels launched from Python), whose flush
runs on the GPU while the host launches the call, so that it hides up to the flush's time (some 60 us on
an H200) of a host-bound call; `back_to_back_us`, per call of BACK_TO_BACK_CALLS launched in a row from
Python between two synchronisations (the host's pace where the host is the slower side, as in eager
training; L2 warm); and `graph_time_us` from replays of a CUDA graph (no launch overhead, but L2 warm: at
B <= 16 the operands stay in L2, so graph GB/s can exceed the HBM copy rate). check_claims judges the
step on GPU time (graph replays; at B = 512 no replay finds its operands in L2): on an H200 the Python
side of one fused call (two Triton launches, autograd) took 46-430 us by do_bench (so at least that)
against 3-150 us of GPU work, and in the sampler the step runs inside a CUDA graph. Bandwidth counts the
bytes the step must move (every input read once, every output written once), as a fraction of this
device's measured device-to-device copy bandwidth. Eager and Triton are measured at every size first,
then torch.compile (one compile per size, dtype and pass; no claim reads it). The JSON is rewritten after
every measured (dtype, B) group, so a run cut short keeps what it measured ("complete": false).

Usage: python benchmarks/bench_step.py [--batches 512,16,8,2] [--out-dir DIR]
(needs CUDA; elsewhere it says so in one line and exits 1). Writes
benchmarks/results/bench_step-<device>.json, or DIR/bench_step.json with --out-dir.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, int_list, output_folder  # noqa: E402

# Measured in this order (bf16 first, then fp32), so a run cut short has the claim-relevant rows.
BATCH_SIZES = (512, 16, 8, 2)
BACK_TO_BACK_CALLS = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--batches", type=int_list(1, "batch sizes"), default=BATCH_SIZES,
                        help="comma-separated batch sizes, measured in this order (default 512,16,8,2)")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/bench_step.json instead of benchmarks/results/")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import torch  # noqa: E402

from common import environment, write_result  # noqa: E402

LATENT_SHAPE = (4, 96, 96)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("forward_sampling", "forward_training", "forward_backward")
PREDICTION_TYPE = "epsilon"


def copy_bandwidth_gbps(do_bench) -> float:
    """Device-to-device copy of 1 GiB: read + write bytes over time, the practical bandwidth ceiling."""
    source = torch.empty(2**28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), warmup=100, rep=500, return_mode="median")
    return 2 * source.numel() * source.element_size() / (ms * 1e-3) / 1e9


def bytes_moved(step_pass: str, batch: int, dtype: torch.dtype) -> int:
    latent = batch * torch.Size(LATENT_SHAPE).numel() * dtype.itemsize
    per_row = batch * (6 * 8 + 4)  # the float64 scalars read, the fp32 logp written
    if step_pass == "forward_sampling":  # read model_output, x, noise; write D, x_next
        return 5 * latent + per_row
    if step_pass == "forward_training":  # read model_output, x, x_next; write D
        return 4 * latent + per_row
    # forward_training, then read model_output, x, x_next, the scalars and grad_logp; write grad_model_output
    return 8 * latent + 2 * per_row


def make_inputs(policy_step_reference, batch: int, dtype: torch.dtype):
    generator = torch.Generator(device="cuda").manual_seed(batch)
    shape = (batch, *LATENT_SHAPE)
    model_output, x, noise = (torch.randn(shape, generator=generator, device="cuda").to(dtype) for _ in range(3))
    # Valid per-row scalars (alpha^2 + sigma^2 = 1); their values do not affect the timing.
    alpha_t, alpha_next, c_skip, c_out = torch.rand(4, batch, generator=generator, device="cuda", dtype=torch.float64)
    alpha_t, alpha_next = 0.1 + 0.8 * alpha_t, 0.1 + 0.8 * alpha_next
    sigma_t, sigma_next = (1 - alpha_t**2).sqrt(), (1 - alpha_next**2).sqrt()
    scalars = torch.stack([alpha_t, sigma_t, c_skip, c_out, alpha_next, sigma_next], dim=1).contiguous()
    next_state = policy_step_reference(model_output, x, scalars, PREDICTION_TYPE, noise=noise)[1]
    grad_logp = torch.randn(batch, generator=generator, device="cuda")
    return model_output, x, noise, next_state, scalars, grad_logp


def step_call(step_fn, step_pass: str, inputs):
    model_output, x, noise, next_state, scalars, grad_logp = inputs
    if step_pass == "forward_sampling":
        return lambda: step_fn(model_output, x, scalars, PREDICTION_TYPE, noise=noise)
    if step_pass == "forward_training":
        return lambda: step_fn(model_output, x, scalars, PREDICTION_TYPE, next_state=next_state)
    leaf = model_output.detach().requires_grad_()

    def forward_backward():
        logp = step_fn(leaf, x, scalars, PREDICTION_TYPE, next_state=next_state)[2]
        return torch.autograd.grad(logp, leaf, grad_logp)

    return forward_backward


def back_to_back_us(fn) -> float:
    """Microseconds per call of BACK_TO_BACK_CALLS calls launched in a row, between two synchronisations."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(BACK_TO_BACK_CALLS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / BACK_TO_BACK_CALLS * 1e6


def graph_time_us(fn, do_bench_cudagraph) -> float | str:
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    except Exception as error:  # a variant that cannot be captured is reported, not fatal
        torch.cuda.synchronize()
        return f"capture failed: {type(error).__name__}: {error}"[:200]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():  # not a success: a caller checking the exit code must not read "measured"
        print("bench_step: no CUDA device here; it times the CUDA kernels only: nothing measured, no results written",
              file=sys.stderr)
        return 1
    from triton.testing import do_bench, do_bench_cudagraph

    from rlcm_fast.kernels.policy_step import fused_policy_step
    from rlcm_fast.policy_step import policy_step_reference

    torch._dynamo.config.recompile_limit = 64  # one specialisation per (batch, dtype, pass)
    variants = {
        "eager": policy_step_reference,
        "compile": torch.compile(policy_step_reference, dynamic=False),
        "triton": fused_policy_step,
    }
    copy_gbps = copy_bandwidth_gbps(do_bench)
    report = dict(
        benchmark="bench_step", **environment(), cuda=torch.version.cuda,
        latent_shape=list(LATENT_SHAPE), prediction_type=PREDICTION_TYPE, copy_bandwidth_gbps=copy_gbps,
        timing="triton.testing.do_bench median (L2 flushed per call); back to back: mean of "
               f"{BACK_TO_BACK_CALLS} calls launched in a row from Python; graph: do_bench_cudagraph median",
        results=[],
    )
    print(f"{report['device']}: device-to-device copy {copy_gbps:.0f} GB/s")
    print(f"{'pass':<17} {'dtype':<5} {'B':>3} {'variant':<8} {'us':>8} {'GB/s':>7} {'copy%':>6} {'in a row':>9} "
          f"{'graph us':>9}")
    # torch.compile's variant last: it compiles once per (dtype, batch, pass), and no claim reads it.
    for variant_names in (("eager", "triton"), ("compile",)):
        for dtype_name, dtype in DTYPES.items():
            for batch in args.batches:
                inputs = make_inputs(policy_step_reference, batch, dtype)
                reference_logp = policy_step_reference(*inputs[:2], inputs[4], PREDICTION_TYPE,
                                                       next_state=inputs[3])[2]
                for step_pass in PASSES:
                    moved = bytes_moved(step_pass, batch, dtype)
                    for variant in variant_names:
                        step_fn = variants[variant]
                        fn = step_call(step_fn, step_pass, inputs)
                        us = do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3
                        in_a_row_us = back_to_back_us(fn)
                        graph_us = graph_time_us(fn, do_bench_cudagraph)
                        gbps = moved / (us * 1e-6) / 1e9
                        logp = step_fn(*inputs[:2], inputs[4], PREDICTION_TYPE, next_state=inputs[3])[2]
                        report["results"].append(
                            dict(
                                variant=variant, step_pass=step_pass, dtype=dtype_name, batch=batch,
                                time_us=us, bytes=moved, gbps=gbps, fraction_of_copy_bandwidth=gbps / copy_gbps,
                                back_to_back_us=in_a_row_us, graph_time_us=graph_us,
                                graph_gbps=moved / (graph_us * 1e-6) / 1e9 if isinstance(graph_us, float) else None,
                                max_abs_logp_diff_vs_eager=(logp.float() - reference_logp.float()).abs().max().item(),
                            )
                        )
                        graph_text = f"{graph_us:9.1f}" if isinstance(graph_us, float) else "   failed"
                        print(
                            f"{step_pass:<17} {dtype_name:<5} {batch:>3} {variant:<8} {us:8.1f} {gbps:7.0f} "
                            f"{100 * gbps / copy_gbps:5.1f}% {in_a_row_us:9.1f} {graph_text}", flush=True
                        )
                del inputs, reference_logp
                write_result("bench_step", report, args.out_dir, complete=False)
    print(f"wrote {write_result('bench_step', report, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
