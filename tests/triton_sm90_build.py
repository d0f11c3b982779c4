"""Compile the fused policy-step kernels ahead of time for sm_90 (H100/H200) and describe the machine code.

    python tests/triton_sm90_build.py        (prints one JSON line per kernel variant)
    python tests/triton_sm90_build.py jpeg   (the same for the JPEG-size kernels, kernels/jpeg_size.py)

Needs no GPU: Triton lowers to PTX and its bundled ptxas assembles the cubin. The CPU test suite runs the
kernels in Triton's interpreter, which accepts some programs that the compiler rejects; this builds them
for the real target. Each variant is given the argument types and the divisibility-by-16 hints that
Triton's JIT infers at a launch on 16-byte-aligned tensors whose row length is a multiple of 16 (a
4x96x96 latent row: 36864 elements). Run in a process of its own with TRITON_INTERPRET=0: under the
interpreter `triton.jit` gives no compilable function.
"""

from __future__ import annotations

import json
import math
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlcm_fast.kernels import jpeg_size  # the installed kernels, as the tests import them
from rlcm_fast.kernels import policy_step as kernels

HOPPER = GPUTarget("cuda", 90, 32)
TRITON_TYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
STREAMED_BLOCK = 2048  # _launch_config's choice for a batch of 8 such rows on a 132-SM device


def build(kernel, dtype: str, args: dict[str, str], constexprs: dict, aligned: list[str], num_warps: int,
          options: dict = kernels._LAUNCH_OPTIONS) -> dict:
    """Compile `kernel` with arguments {name: Triton type}; the `aligned` ones get tt.divisibility=16."""
    signature = {**args, **{name: "constexpr" for name in constexprs}}
    names = kernel.arg_names
    missing = set(names) ^ set(signature)
    if missing:
        raise SystemExit(f"{kernel.__name__}: signature and kernel arguments differ in {sorted(missing)}")
    signature = {name: signature[name] for name in names}
    hints = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, hints), target=HOPPER,
                              options={**options, "num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel.__name__,
        "constexprs": constexprs,
        "dtype": dtype,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "vector_loads": len(re.findall(r"ld\.global(?:\.[a-z]+)*\.v[24]\.", ptx)),
        "scalar_16bit_loads": len(re.findall(r"ld\.global(?:\.[a-z]+)*\.[bu]16\b", ptx)),
        "vector_stores": len(re.findall(r"st\.global(?:\.[a-z]+)*\.v[24]\.", ptx)),
        "fma": len(re.findall(r"\bfma\.", ptx)),
    }


def variants(n: int = 36864, batch: int = 8):
    num_chunks = math.ceil(n / STREAMED_BLOCK)
    for dtype, prediction_type, sampling in (
        [("float32", "epsilon", s) for s in (True, False)]
        + [("float16", "epsilon", s) for s in (True, False)]
        + [("bfloat16", p, s) for p in ("epsilon", "v_prediction", "sample") for s in (True, False)]
    ):
        t = f"*{TRITON_TYPE[dtype]}"
        streamed = ["model_output_ptr", "x_ptr", "noise_or_next_ptr", "denoised_ptr", "next_out_ptr"]
        args = {**{name: t for name in streamed}, "scalars_ptr": "*fp64", "sq_partials_ptr": "*fp32",
                "n": "i32", "num_chunks": "i32"}
        yield build(kernels._policy_step_forward_kernel, dtype, args,
                    {"PREDICTION_TYPE": prediction_type, "SAMPLING": sampling, "BLOCK": STREAMED_BLOCK},
                    aligned=[*streamed, "scalars_ptr", "sq_partials_ptr", "n"], num_warps=8)
    yield build(kernels._row_log_prob_kernel, "float32",
                {"sq_partials_ptr": "*fp32", "scalars_ptr": "*fp64", "logp_ptr": "*fp32", "n": "i32",
                 "num_chunks": "i32"},
                {"LOG_SQRT_2PI": kernels.LOG_SQRT_2PI, "BLOCK_CHUNKS": triton.next_power_of_2(num_chunks)},
                aligned=["sq_partials_ptr", "scalars_ptr", "logp_ptr", "n"], num_warps=1)
    backward_modes = {  # what the trainer and the sampler's autograd ask for
        "training": dict(LOGP_TERM=True, HAS_GRAD_DENOISED=False, HAS_GRAD_NEXT=False),
        "training_with_denoised": dict(LOGP_TERM=True, HAS_GRAD_DENOISED=True, HAS_GRAD_NEXT=False),
        "sampling_pathwise": dict(LOGP_TERM=False, HAS_GRAD_DENOISED=True, HAS_GRAD_NEXT=True),
    }
    for dtype in ("float32", "bfloat16"):
        t = f"*{TRITON_TYPE[dtype]}"
        streamed = ["model_output_ptr", "x_ptr", "next_ptr", "grad_denoised_ptr", "grad_next_ptr",
                    "grad_model_output_ptr", "grad_x_ptr"]
        args = {**{name: t for name in streamed}, "scalars_ptr": "*fp64", "grad_logp_ptr": "*fp32", "n": "i32"}
        for flags in backward_modes.values():
            yield build(kernels._policy_step_backward_kernel, dtype, args,
                        {"PREDICTION_TYPE": "epsilon", **flags, "WRITE_GRAD_MODEL_OUTPUT": True,
                         "WRITE_GRAD_X": True, "BLOCK": STREAMED_BLOCK},
                        aligned=[*streamed, "scalars_ptr", "grad_logp_ptr", "n"], num_warps=8)


def jpeg_variants():
    """The JPEG-size kernels as triton_jpeg_sizes launches them on CUDA (Triton's default options, 4 warps)."""
    blocks = {"BLOCKS": jpeg_size._BLOCKS_CUDA}
    tables = {"codes_ptr": "*i32", "lengths_ptr": "*i32", "n_blocks": "i32", "mcus": "i32"}
    for luma in (True, False):
        yield build(jpeg_size._dct_quantise_kernel, "uint8",
                    {"plane_ptr": "*u8", "coef_ptr": "*i32", "matrix_ptr": "*i32", "divisor_ptr": "*i32",
                     "zigzag_ptr": "*i32", "n_blocks": "i32", "block_rows": "i32", "block_cols": "i32",
                     "mcu_cols": "i32", "mcus": "i32", "slot_base": "i32"},
                    {"LUMA": luma, **blocks, "SHIFT_PASS1": jpeg_size._SHIFT_PASS1,
                     "SHIFT_PASS2": jpeg_size._SHIFT_PASS2}, aligned=[], num_warps=4, options={})
    yield build(jpeg_size._block_bits_kernel, "int32", {"coef_ptr": "*i32", **tables, "bits_ptr": "*i64"},
                blocks, aligned=[], num_warps=4, options={})
    yield build(jpeg_size._pack_bits_kernel, "int32",
                {"coef_ptr": "*i32", **tables, "first_bit_ptr": "*i64", "words_ptr": "*i64"},
                blocks, aligned=[], num_warps=4, options={})


if __name__ == "__main__":
    for described in (jpeg_variants() if sys.argv[1:] == ["jpeg"] else variants()):
        print(json.dumps(described), flush=True)
