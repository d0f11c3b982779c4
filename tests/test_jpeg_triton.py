"""The Triton JPEG sizes (kernels/jpeg_size.py) against the tensor-op reference (rlcm_fast/rewards/jpeg_exact.py)
and the bytes of Pillow's own files.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1);
with CUDA the same tests run the compiled kernels. The interpreter runs a scan one element at a time, so these
cases are few and small; the edge cases (dummy blocks, padded chroma, 0xFF bytes, long codes) are all in them.
"""

import math
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from rlcm_fast.kernels import jpeg_size
from rlcm_fast.kernels.jpeg_size import islow_matrix, triton_jpeg_sizes
from rlcm_fast.rewards import jpeg as jpeg_rewards
from rlcm_fast.rewards.base import RewardError
from rlcm_fast.rewards.jpeg import ExactJpeg, JpegSizeReward
from rlcm_fast.rewards.jpeg_exact import fdct_islow, jpeg_sizes, pillow_tables, scan_blocks
from test_jpeg_exact import pillow_bytes, sample_images
from test_nvjpeg import varied_images

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = pytest.mark.gpu  # on a GPU where there is one


def test_the_islow_dct_is_a_matrix_product_then_a_rounding_shift_per_pass():
    """What the kernel computes (int32 products, a shift of 11 then of 15) equals libjpeg's DCT on random blocks,
    the extremes of 8-bit samples included."""
    samples = torch.randint(-128, 128, (2000, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    samples[0], samples[1], samples[2, ::2] = -128, 127, 127
    matrix = islow_matrix().to(torch.int64)

    def descale(x, shift):
        return (x + (1 << (shift - 1))) >> shift

    rows = descale(samples @ matrix.T, 11)
    assert torch.equal(descale(matrix @ rows, 15), fdct_islow(samples))
    assert matrix.dtype == torch.int64 and islow_matrix().dtype == torch.int32 and matrix[0].eq(8192).all()


# Whole 16-px MCUs; dummy luma blocks across and down (odd counts of 8-px blocks) with padded chroma; one pixel.
@pytest.mark.parametrize("height, width, quality", [(16, 16, 95), (17, 23, 1), (33, 50, 100), (1, 1, 75),
                                                    (40, 24, 95)])
def test_sizes_equal_the_bytes_of_pillows_files(height, width, quality):
    pixels = sample_images(height, width, seed=height * width)
    sizes = triton_jpeg_sizes(pixels.to(DEVICE), quality)
    assert sizes.dtype == torch.int64 and sizes.device.type == DEVICE
    assert sizes.tolist() == pillow_bytes(pixels, quality)


def test_blocks_split_over_many_programs_give_the_same_sizes(monkeypatch):
    """Tiles of 16 blocks, the GPU's: tiles that end mid-MCU and mid-image, a last tile part empty, and the DC
    differences and shared stream words across tiles."""
    monkeypatch.setattr(jpeg_size, "_BLOCKS_INTERPRETER", 16)
    pixels = sample_images(24, 40, seed=5)  # 6 images of 2 x 3 MCUs: 216 blocks, the last tile half full
    assert triton_jpeg_sizes(pixels.to(DEVICE), 95).tolist() == jpeg_sizes(pixels, 95).tolist()


def test_a_run_of_61_zeros_takes_three_zrl_codes():
    """Grey blocks of one pattern whose only AC coefficient at quality 75 is the 62nd in zigzag order: three ZRL
    codes (16 zeros each) before its code, then EOB. Natural images rarely have such runs."""
    k = torch.arange(8, dtype=torch.float64)
    basis = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)  # [frequency, sample]
    block = (128 + 100 * torch.outer(basis[7], basis[6])).round().to(torch.uint8)
    pixels = block.repeat(3, 5).expand(3, 24, 40)[None].contiguous()
    quant, _, _ = pillow_tables(75)
    ac = scan_blocks(pixels, quant)[0, :, 0, 1:]  # the premise, from the reference: one AC coefficient, the 62nd
    assert (ac != 0).sum(1).eq(1).any() and ac[:, 61].ne(0).any() and ac[:, :61].eq(0).all()
    assert triton_jpeg_sizes(pixels.to(DEVICE), 75).tolist() == pillow_bytes(pixels, 75)


@pytest.mark.parametrize("shape, dtype", [((2, 3, 8, 8), torch.float32), ((1, 3, 0, 8), torch.uint8)])
def test_bad_pixels_and_quality_are_refused_in_one_line(shape, dtype):
    with pytest.raises(ValueError, match=r"jpeg_sizes takes N x 3 x H x W uint8 with N, H, W >= 1, got \("):
        triton_jpeg_sizes(torch.zeros(shape, dtype=dtype, device=DEVICE), 95)
    with pytest.raises(ValueError, match=r"jpeg quality 0 is invalid: it must be an int in 1..100"):
        triton_jpeg_sizes(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=DEVICE), 0)


def test_cpu_images_outside_the_interpreter_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(jpeg_size, "_interpreting", lambda: False)
    message = r"the Triton JPEG sizes run on CUDA tensors \(or on the CPU under TRITON_INTERPRET=1\), got device cpu"
    with pytest.raises(ValueError, match=message):
        triton_jpeg_sizes(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 95)
    with pytest.raises(RewardError, match=message):  # the reward says it as its own error, not a traceback
        JpegSizeReward(1.0, 95, backend="exact", exact_engine="triton")(torch.zeros(1, 3, 8, 8), [""])


def test_the_reward_with_the_triton_engine_gives_pillows_sizes_and_nan_for_broken_images():
    images = varied_images(3, 32, seed=2)
    images[1, 0, 3, 4] = float("nan")
    with warnings.catch_warnings():  # the tensor ops' "90x slower than Pillow" on CPU images is not this engine's
        warnings.simplefilter("error")
        triton = JpegSizeReward(-1.0, 95, backend="exact", exact_engine="triton")(images.to(DEVICE), [""] * 3)
    pillow = JpegSizeReward(-1.0, 95, backend="pillow")(images, [""] * 3)
    np.testing.assert_array_equal(triton, pillow)
    assert np.isnan(triton[1]) and np.isfinite(triton[[0, 2]]).all()


def test_a_bad_or_unavailable_engine_is_refused_in_one_line(monkeypatch):
    for backend in ("exact", "pillow"):  # refused with any backend, not ignored where it does not apply
        with pytest.raises(RewardError, match="exact JPEG engine 'cuda' is invalid; allowed: tensor_ops, triton"):
            JpegSizeReward(1.0, 95, backend=backend, exact_engine="cuda")
    assert ExactJpeg(95).engine == "tensor_ops"  # the kernels are opt-in until a GPU run has checked them
    monkeypatch.setattr(jpeg_rewards, "triton_available", lambda: False)
    with pytest.raises(RewardError, match="the exact JPEG engine 'triton' needs triton, which is not installed"):
        ExactJpeg(95, engine="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_768_px_batch_has_pillows_sizes():
    pixels = torch.cat([sample_images(768, 768, seed=7), sample_images(768, 768, seed=8)])
    assert triton_jpeg_sizes(pixels.cuda(), 95).tolist() == pillow_bytes(pixels, 95)


def test_the_kernels_launch_under_the_pixels_device_guard(monkeypatch):
    """Triton launches on the thread's current CUDA device, and the reward may run on a worker thread (whose current
    device is 0) with images on another GPU: every launch happens inside on_tensors_device(pixels)."""
    events = []

    class Recording:
        def __init__(self, tensor):
            self.tensor = tensor

        def __enter__(self):
            events.append(("enter", self.tensor.device))

        def __exit__(self, *exc):
            events.append("exit")

    original = jpeg_size._sizes
    monkeypatch.setattr(jpeg_size, "_sizes", lambda pixels, quality: (events.append("sizes"),
                                                                       original(pixels, quality))[1])
    monkeypatch.setattr(jpeg_size, "on_tensors_device", Recording)
    pixels = sample_images(8, 8, seed=30)
    moved = pixels.to(DEVICE)
    assert triton_jpeg_sizes(moved, 95).tolist() == pillow_bytes(pixels, 95)
    assert events == [("enter", moved.device), "sizes", "exit"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_images_on_a_second_gpu_from_a_new_thread_have_pillows_sizes():
    """A new thread's current device is GPU 0 (the reward's worker thread): the kernels still run on GPU 1's images."""
    from concurrent.futures import ThreadPoolExecutor

    pixels = sample_images(64, 48, seed=31)
    with ThreadPoolExecutor(1) as pool:
        sizes = pool.submit(triton_jpeg_sizes, pixels.to("cuda:1"), 95).result()
    assert sizes.device == torch.device("cuda", 1) and sizes.tolist() == pillow_bytes(pixels, 95)


def test_bench_rewards_times_the_exact_backend_with_both_engines_on_a_gpu(monkeypatch):
    """On CUDA images bench_rewards adds the exact backend once per engine, each row saying its engine (the GPU
    is stood in for: the rewards, the timer and the images are stubs)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_rewards

    made = []

    class Reward:
        def __init__(self, weight, quality, threads, backend, nvjpeg_colour="nvjpeg", exact_engine=None):
            made.append((backend, exact_engine))

        def __call__(self, images, prompts):
            return np.full(len(prompts), 2.0)

    class Images:
        def to(self, device):
            return torch.zeros(2, 3, 8, 8)

    monkeypatch.setattr(bench_rewards, "JpegSizeReward", Reward)
    monkeypatch.setattr(bench_rewards, "natural_images", lambda batch, size: Images())
    monkeypatch.setattr(bench_rewards, "time_call", lambda call, device, repeats: [0.5] * repeats)
    monkeypatch.setattr(bench_rewards, "nvjpeg_unavailable_reason", lambda: "no nvJPEG here")
    monkeypatch.setattr(bench_rewards, "usable_cpu_cores", lambda: 2)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # not importable
    rows = bench_rewards.jpeg_rows(torch.device("cuda"), 3, [], sizes=(8,), batches=(2,))
    assert [(r["backend"], r.get("engine")) for r in rows] == [
        ("pillow", None), ("pillow", None), ("exact", "tensor_ops"), ("exact", "triton")]
    assert ("exact", "triton") in made and all(r["images_per_s"] == 4.0 for r in rows)
