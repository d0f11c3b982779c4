"""jpeg_backend "exact" (rlcm_fast/rewards/jpeg_exact.py): Pillow's JPEG byte counts computed with tensor ops,
checked byte for byte against the files the installed Pillow writes; on a GPU, against the CPU's counts."""

import itertools
import math

import numpy as np
import pytest
import torch

from rlcm_fast.rewards import jpeg_exact
from rlcm_fast.rewards.base import RewardError
from rlcm_fast.rewards.jpeg import JpegSizeReward, jpeg_size_kb, to_uint8
from rlcm_fast.rewards.jpeg_exact import entropy_bytes, fdct_islow, jpeg_sizes, zigzag_order
from test_nvjpeg import varied_images


def pillow_bytes(pixels: torch.Tensor, quality: int) -> list[int]:
    return [round(jpeg_size_kb(image, quality) * 1000) for image in pixels.permute(0, 2, 3, 1).numpy()]


def sample_images(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth to busy natural-looking images, uniform noise (long codes, few zero runs), black and white."""
    natural = to_uint8(varied_images(3, max(height, width, 16), seed=seed)[:, :, :height, :width])
    noise = torch.randint(0, 256, (1, 3, height, width), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    flat = torch.stack([torch.zeros(3, height, width, dtype=torch.uint8), torch.full((3, height, width), 255,
                                                                                    dtype=torch.uint8)])
    return torch.cat([natural, noise, flat])


# Multiples of 16, and sizes that leave libjpeg's dummy luma blocks (an odd count of 8-px blocks across or
# down) and padded chroma (a size not a multiple of 16, odd sizes, a single pixel).
@pytest.mark.parametrize("height, width", [(16, 16), (64, 48), (1, 1), (7, 5), (17, 23), (31, 9), (33, 50)])
@pytest.mark.parametrize("quality", [95, 75, 100, 1])
def test_sizes_equal_the_bytes_of_pillows_files(height, width, quality):
    pixels = sample_images(height, width, seed=height * width)
    assert jpeg_sizes(pixels, quality).tolist() == pillow_bytes(pixels, quality)


def test_a_batch_split_into_chunks_gives_the_same_sizes(monkeypatch):
    pixels = sample_images(17, 23, seed=4)
    monkeypatch.setattr(jpeg_exact, "_PIXELS_PER_CHUNK", 4 * 17 * 23)  # 6 images: chunks of 4 and 2
    assert jpeg_sizes(pixels, 95).tolist() == pillow_bytes(pixels, 95)


def test_sizes_equal_pillows_on_a_512_px_batch_and_the_reward_on_float_images():
    images = varied_images(4, 512, seed=3)
    images[2, 1, 5, 7] = float("nan")  # the reward's NaN, as every JPEG backend has it
    with pytest.warns(UserWarning, match="'exact' on CPU images gives Pillow's sizes about 90x slower"):
        exact = JpegSizeReward(-1.0, 95, backend="exact")(images, [""] * 4)
    pillow = JpegSizeReward(-1.0, 95, backend="pillow")(images, [""] * 4)
    np.testing.assert_array_equal(exact, pillow)
    assert np.isnan(exact[2]) and np.isfinite(exact[[0, 1, 3]]).all()


def test_the_command_line_says_the_warning_in_its_own_one_line_form(tmp_path, capsys):
    """It was Python's `.../rlcm_fast/rewards/jpeg.py:175: UserWarning: ...` and a line of the package's source,
    where every other warning of the command reads `rlcm-fast: warning: ...` (found by a newcomer's walk through
    README). Once per run, as before."""
    from rlcm_fast.cli import main

    assert main(["train", "--device", "cpu", "--output-dir", str(tmp_path / "run"), "--set", "epochs=2",
                 "--set", "batches_per_epoch=1", "--set", "jpeg_backend=exact"]) == 0
    err = capsys.readouterr().err
    assert err.count("rlcm-fast: warning: jpeg_backend 'exact' on CPU images gives Pillow's sizes about 90x slower "
                     "than Pillow; jpeg_backend pillow (or auto) gives the same sizes for CPU images\n") == 1
    assert "UserWarning" not in err and "warnings.warn" not in err


def test_fdct_islow_is_eight_times_the_orthonormal_dct_up_to_its_rounding():
    """The integer DCT against the float formula (libjpeg scales its output by 8): within its fixed-point error."""
    samples = torch.randint(-128, 128, (50, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    k = torch.arange(8, dtype=torch.float64)
    scale = torch.where(k == 0, math.sqrt(1 / 8), 0.5)[:, None]
    basis = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * scale
    reference = 8 * basis @ samples.double() @ basis.T
    assert (fdct_islow(samples).double() - reference).abs().max() < 2.0  # 1.17 seen
    assert fdct_islow(torch.full((1, 8, 8), 100, dtype=torch.int64))[0, 0, 0] == 8 * 8 * 100  # DC of a flat block


def test_entropy_bytes_fill_the_last_byte_with_ones_and_stuff_a_zero_after_each_0xff():
    """Per image (each stream starting at a byte of its own): "1" + seven fill ones is 0xFF, stuffed; "0" + ones
    is 0x7F; 0xFF, 0x00 written as codes; a 12-bit code then a 4-bit one."""
    values = torch.tensor([[1, 0], [0, 0], [0xFF, 0], [0xABC, 0xF]])
    lengths = torch.tensor([[1, 0], [1, 0], [8, 8], [12, 4]])
    assert entropy_bytes(values, lengths).tolist() == [2, 1, 3, 2]


def test_zigzag_order_starts_and_ends_as_the_standards():
    order = zigzag_order()
    assert order[:10] == [0, 1, 8, 16, 9, 2, 3, 10, 17, 24] and order[-3:] == [55, 62, 63]
    assert sorted(order) == list(range(64))


@pytest.mark.parametrize("shape, dtype", [((2, 3, 8, 8), torch.float32), ((0, 3, 8, 8), torch.uint8),
                                          ((1, 3, 0, 8), torch.uint8), ((1, 4, 8, 8), torch.uint8)])
def test_bad_pixels_are_refused_in_one_line(shape, dtype):
    message = rf"jpeg_sizes takes N x 3 x H x W uint8 with N, H, W >= 1, got \({', '.join(map(str, shape))}\) {dtype}"
    with pytest.raises(ValueError, match=message):
        jpeg_sizes(torch.zeros(shape, dtype=dtype), 95)


@pytest.mark.parametrize("quality", [0, 101, 95.0, True])
def test_a_bad_quality_is_refused_in_one_line(quality):
    with pytest.raises(ValueError, match=rf"jpeg quality {quality!r} is invalid: it must be an int in 1..100"):
        jpeg_sizes(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), quality)


def test_exact_refuses_a_pillow_without_libjpeg_turbo(monkeypatch):
    from PIL import features

    monkeypatch.setattr(features, "check_feature", lambda name: False)
    with pytest.raises(RewardError, match="jpeg_backend 'exact' computes libjpeg-turbo's sizes, and this Pillow is"):
        JpegSizeReward(1.0, 95, backend="exact")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_sizes_equal_pillows():
    """The sizes of the CPU tests (dummy blocks, padded chroma), a 768 px batch, and the reward on CUDA images."""
    for (height, width), quality in itertools.product([(1, 1), (17, 23), (33, 50)], (95, 1)):
        pixels = sample_images(height, width, seed=height * width)
        assert jpeg_sizes(pixels.cuda(), quality).tolist() == pillow_bytes(pixels, quality)
    pixels = torch.cat([sample_images(768, 768, seed=7), sample_images(768, 768, seed=8)])
    assert jpeg_sizes(pixels.cuda(), 95).tolist() == pillow_bytes(pixels, 95)
    images = varied_images(4, 512, seed=3)
    images[2, 1, 5, 7] = float("nan")
    exact = JpegSizeReward(-1.0, 95, backend="exact")(images.cuda(), [""] * 4)
    np.testing.assert_array_equal(exact, JpegSizeReward(-1.0, 95, backend="pillow")(images, [""] * 4))
