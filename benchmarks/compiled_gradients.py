"""Do the LoRA gradients of the UNet under torch.compile equal eager ones? (the trainer's `compile_unet`)

One forward and backward of a squared-error loss through the LoRA-wrapped UNet, eager and compiled, on
the same random inputs (float32; every LoRA factor non-zero so each has a gradient). Reports the
forward's largest difference and, per LoRA tensor, the largest gradient difference relative to the
tensor's largest eager entry; prints the worst tensors.

Writes benchmarks/results/compiled_gradients-<device>.json (DIR/compiled_gradients.json with --out-dir).
Usage: python benchmarks/compiled_gradients.py [--backend inductor] [--model tiny] [--device cpu] [--rows 12]
       [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, output_folder, positive_int  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--backend", default="inductor", help="a torch.compile backend (default inductor)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=positive_int, default=12, help="UNet batch")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/compiled_gradients.json instead of benchmarks/results/")
    return parser, parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

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
    if args.backend not in torch._dynamo.list_backends(exclude_tags=()):
        parser.error(f"--backend {args.backend} unknown; allowed: {', '.join(torch._dynamo.list_backends())} "
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

    shape = latent_shape(pipe, args.rows, cfg.resolution)
    inputs = {"sample": randn(*shape), "timestep": torch.randint(0, 1000, (args.rows,), generator=generator,
                                                                    device=device),
              "encoder_hidden_states": randn(args.rows, 77, unet.config.cross_attention_dim)}
    if unet.config.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = randn(args.rows, unet.config.time_cond_proj_dim)
    target = randn(*shape)

    eager_out, eager_grads = forward_backward(unet, inputs, target, params)
    started = time.perf_counter()
    compiled_out, compiled_grads = forward_backward(torch.compile(unet, backend=args.backend), inputs, target, params)
    compile_seconds = time.perf_counter() - started
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    per_tensor = {name: ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()
                  for name, ours, theirs in zip(names, compiled_grads, eager_grads)}
    errors = sorted(per_tensor.values())
    zeroed = [name for name, ours, theirs in zip(names, compiled_grads, eager_grads)
              if ours.abs().max() == 0 and theirs.abs().max() > 0]
    forward_difference = (compiled_out - eager_out).abs().max().item()
    print(f"{args.backend} on {device}: forward max |difference| {forward_difference:.3g}; LoRA gradients: "
          f"median relative error {errors[len(errors) // 2]:.3g}, worst {errors[-1]:.3g}, "
          f"{len(zeroed)} of {len(names)} tensors all zero where eager's are not")
    for name in sorted(per_tensor, key=per_tensor.get)[-5:]:
        print(f"  {per_tensor[name]:.3g}  {name}")
    path = write_result("compiled_gradients", {
        "benchmark": "compiled_gradients", **environment(),
        "config": {"backend": args.backend, "model": cfg.model, "device": str(device), "rows": args.rows},
        "forward_max_abs_difference": forward_difference,
        "gradient_relative_error_median": errors[len(errors) // 2],
        "gradient_relative_error_max": errors[-1],
        "tensors": len(names),
        "tensors_zeroed": zeroed,
        "first_call_seconds": compile_seconds,
    }, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
