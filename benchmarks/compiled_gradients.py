"""Do the LoRA gradients of the UNet under torch.compile equal eager ones? (the trainer's `compile_unet`)

One forward and backward of a squared-error loss through the LoRA-wrapped UNet, eager and compiled, on
the same random inputs (float32; every LoRA factor non-zero so each has a gradient). For each compile
scope (the trainer's `compile_scope`: `unet`, the whole UNet; `blocks`, only its transformer blocks)
reports how long the first compiled call took (compiling forward and backward), the forward's largest
difference and, per LoRA tensor, the largest gradient difference relative to the tensor's largest eager
entry; prints the worst tensors. The first call compiles cold: inductor's on-disk cache is a fresh temporary
folder unless TORCHINDUCTOR_CACHE_DIR names one. With both scopes, the blocks reuse kernels that the whole
UNet's compile cached: for each one's cold time, run it alone (--scopes blocks).

Writes benchmarks/results/compiled_gradients-<device>.json (DIR/compiled_gradients.json with --out-dir).
Usage: python benchmarks/compiled_gradients.py [--backend inductor] [--scopes unet,blocks] [--model tiny]
       [--resolution PX] [--device cpu] [--rows 12] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, name_list, output_folder, positive_int  # noqa: E402

SCOPES = ("unet", "blocks")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--backend", default="inductor", help="a torch.compile backend (default inductor)")
    parser.add_argument("--scopes", type=name_list(SCOPES, "scopes"), default=list(SCOPES),
                        help="what to compile: unet (the whole UNet), blocks (its transformer blocks); "
                             "default both")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="image side in px (default: the model preset's resolution)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=positive_int, default=12, help="UNet batch")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/compiled_gradients.json instead of benchmarks/results/")
    return parser, parser.parse_args(argv)


FRESH_INDUCTOR_CACHE = None  # run as a script: a temporary folder for inductor's on-disk cache, removed at exit

if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()
    # A cold compile, as a new machine's first run has: a cache from earlier runs would hide most of it. Set
    # before torch is imported, which fixes the folder it caches in.
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        FRESH_INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")
        atexit.register(shutil.rmtree, FRESH_INDUCTOR_CACHE, ignore_errors=True)

import torch  # noqa: E402

from common import environment, refuse_missing_cuda, write_result  # noqa: E402
from rlcm_fast.config import ConfigError, resolve_config  # noqa: E402
from rlcm_fast.lora import add_policy_lora  # noqa: E402
from rlcm_fast.models import ModelLoadError, latent_shape, load_pipeline  # noqa: E402


def forward_backward(unet, inputs: dict, target: torch.Tensor, params: list[torch.Tensor]):
    for p in params:
        p.grad = None
    out = unet(**inputs, return_dict=False)[0]
    ((out.float() - target) ** 2).mean().backward()
    return out.detach().float(), [p.grad.detach().clone() for p in params]


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    refuse_missing_cuda(parser, args.device)
    # Checked before the model loads: dynamo would only say so at the first compiled call.
    if args.backend not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(f"--backend {args.backend} unknown; allowed: {', '.join(torch.compiler.list_backends())} "
                     "or a debug backend (eager, aot_eager)")

    device = torch.device(args.device)
    try:
        cfg = resolve_config(model=args.model)  # the model preset's LoRA rank and targets
    except ConfigError as error:
        parser.error(str(error))
    try:
        pipe = load_pipeline(cfg.model, device, torch.float32)
    except ModelLoadError as error:  # a preset name mistyped, or a folder that holds no model
        parser.error(str(error))
    torch.manual_seed(0)
    params = add_policy_lora(pipe.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    with torch.no_grad():  # LoRA B starts at zero, which would leave every A without a gradient
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    unet = pipe.unet.train()
    generator = torch.Generator(device).manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    try:
        shape = latent_shape(pipe, args.rows, args.resolution or cfg.resolution)
    except ValueError as error:  # not a multiple of the VAE's scale factor
        parser.error(f"--resolution {args.resolution}: {error}")
    inputs = {"sample": randn(*shape), "timestep": torch.randint(0, 1000, (args.rows,), generator=generator,
                                                                    device=device),
              "encoder_hidden_states": randn(args.rows, 77, unet.config.cross_attention_dim)}
    if unet.config.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = randn(args.rows, unet.config.time_cond_proj_dim)
    target = randn(*shape)

    eager_out, eager_grads = forward_backward(unet, inputs, target, params)
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    checks = []
    for scope in [scope for scope in SCOPES if scope in args.scopes]:  # unet first: blocks compiles in place
        torch.compiler.reset()
        if scope == "blocks":  # as the trainer does; the whole UNet's check, if any, compiled a wrapper of it
            unet.compile_repeated_blocks(backend=args.backend, dynamic=False)
            compiled = unet
        else:
            compiled = torch.compile(unet, backend=args.backend)
        started = time.perf_counter()
        compiled_out, compiled_grads = forward_backward(compiled, inputs, target, params)
        checks.append(compare(scope, time.perf_counter() - started, compiled_out, compiled_grads, eager_out,
                              eager_grads, names, args.backend, device))
        # the scopes compiled before this one in this run, whose kernels its compile may have found cached
        checks[-1]["compiled_after"] = [check["scope"] for check in checks[:-1]]
    path = write_result("compiled_gradients", {
        "benchmark": "compiled_gradients", **environment(),
        "config": {"backend": args.backend, "model": cfg.model, "device": str(device), "rows": args.rows,
                   "latents": list(shape[1:]), "inductor_cache": "fresh" if FRESH_INDUCTOR_CACHE else "reused"},
        "scopes": checks,
    }, args.out_dir)
    print(f"wrote {path}")
    return 0


def compare(scope, seconds, compiled_out, compiled_grads, eager_out, eager_grads, names, backend, device) -> dict:
    per_tensor = {name: ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()
                  for name, ours, theirs in zip(names, compiled_grads, eager_grads)}
    errors = sorted(per_tensor.values())
    zeroed = [name for name, ours, theirs in zip(names, compiled_grads, eager_grads)
              if ours.abs().max() == 0 and theirs.abs().max() > 0]
    forward_difference = (compiled_out - eager_out).abs().max().item()
    print(f"{backend} on {device}, scope {scope}: first call {seconds:.1f} s; forward max |difference| "
          f"{forward_difference:.3g}; LoRA gradients: median relative error {errors[len(errors) // 2]:.3g}, "
          f"worst {errors[-1]:.3g}, {len(zeroed)} of {len(names)} tensors all zero where eager's are not")
    for name in sorted(per_tensor, key=per_tensor.get)[-5:]:
        print(f"  {per_tensor[name]:.3g}  {name}")
    return {"scope": scope, "first_call_seconds": seconds, "forward_max_abs_difference": forward_difference,
            "gradient_relative_error_median": errors[len(errors) // 2], "gradient_relative_error_max": errors[-1],
            "tensors": len(names), "tensors_zeroed": zeroed}


if __name__ == "__main__":
    sys.exit(main())
