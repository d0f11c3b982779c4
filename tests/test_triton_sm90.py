"""The Triton kernels build for the H100/H200 (sm_90) with no GPU present, and their machine code streams.
The JPEG-size kernels (kernels/jpeg_size.py) are built too, for the first check only.

The interpreter tests (test_triton_step.py) check the kernels' values; this checks what only the
compiler sees: every variant the package launches lowers to a cubin, each streamed operand moves in
16-byte vector accesses when the tensors are aligned (the op is memory-bound, so that is its speed), and
no multiply-add is contracted into an FMA (the sampling pass and the training-mode recompute must round
the Gaussian mean identically for the stored log-probs to be reproduced bit for bit).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BUILD_SCRIPT = Path(__file__).resolve().parent / "triton_sm90_build.py"
THREADS = 8 * 32  # num_warps 8 at BLOCK 2048: 8 elements per thread
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def build(tmp_path_factory, *args: str) -> list[dict]:
    # A process of its own: this one runs Triton's interpreter, under which nothing compiles.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("triton-cache"))}
    result = subprocess.run([sys.executable, str(BUILD_SCRIPT), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> list[dict]:
    return build(tmp_path_factory)


def vector_accesses_per_operand(variant: dict) -> int:
    """16-byte accesses per thread for one operand of BLOCK elements."""
    per_thread = variant["constexprs"]["BLOCK"] // THREADS
    return per_thread * ITEMSIZE[variant["dtype"]] // 16


def streamed_operands(variant: dict) -> tuple[int, int]:
    """(operands loaded, operands stored) per element, from the kernel's constexpr flags."""
    c = variant["constexprs"]
    if variant["kernel"] == "_policy_step_forward_kernel":
        return 3, 2 if c["SAMPLING"] else 1  # model_output, x, noise or next -> D (and x_next)
    loads = 3 * c["LOGP_TERM"] + c["HAS_GRAD_DENOISED"] + c["HAS_GRAD_NEXT"]
    return loads, c["WRITE_GRAD_MODEL_OUTPUT"] + c["WRITE_GRAD_X"]


def test_every_launched_variant_builds_a_cubin(built):
    kernels = {v["kernel"] for v in built}
    assert kernels == {"_policy_step_forward_kernel", "_row_log_prob_kernel", "_policy_step_backward_kernel"}
    assert len(built) == 17 and all(v["cubin_bytes"] > 1000 for v in built)


def test_streamed_operands_move_in_16_byte_vectors(built):
    streaming = [v for v in built if v["kernel"] != "_row_log_prob_kernel"]
    for variant in streaming:
        loads, stores = streamed_operands(variant)
        per_operand = vector_accesses_per_operand(variant)
        assert (variant["vector_loads"], variant["vector_stores"]) == (loads * per_operand, stores * per_operand), variant
        assert variant["scalar_16bit_loads"] == 0, variant


def test_no_fused_multiply_add_in_the_streaming_kernels(built):
    for variant in built:
        if variant["kernel"] != "_row_log_prob_kernel":  # its log() is libdevice's, written with fmaf
            assert variant["fma"] == 0, variant


def test_the_jpeg_size_kernels_build_a_cubin(tmp_path_factory):
    """The interpreter accepts what the compiler refuses (a kernel reading a plain module-level int did pass there):
    every JPEG-size kernel, both DCT variants, lowers to a cubin for sm_90."""
    built = build(tmp_path_factory, "jpeg")
    assert [(v["kernel"], v["constexprs"].get("LUMA")) for v in built] == [
        ("_dct_quantise_kernel", True), ("_dct_quantise_kernel", False), ("_block_bits_kernel", None),
        ("_pack_bits_kernel", None)]
    assert all(v["cubin_bytes"] > 1000 for v in built)
