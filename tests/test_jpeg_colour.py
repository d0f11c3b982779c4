"""libjpeg's colour conversion and 4:2:0 downsampling (rlcm_fast/rewards/jpeg_colour.py) equal libjpeg-
turbo's own: Pillow, handed our planes as a YCbCr image (chroma repeated 2x2, which libjpeg's averaging
gives back exactly), writes the very bytes it writes from the RGB image."""

import io

import pytest
import torch
from PIL import Image

from rlcm_fast.rewards.jpeg_colour import downsample_2x2, libjpeg_ycbcr420, rgb_to_ycbcr
from test_nvjpeg import varied_images


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.mark.parametrize("size,seed", [(64, 0), (128, 1), (48, 2)])
@pytest.mark.parametrize("quality", [95, 75])
def test_planes_give_pillows_bytes(size, seed, quality):
    images = varied_images(4, size, seed=seed)
    images[0] = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))  # noise: every value
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)
    y, cb, cr = libjpeg_ycbcr420(pixels)
    assert y.shape == (4, size, size) and cb.shape == cr.shape == (4, size // 2, size // 2)
    for i in range(4):
        rgb = Image.fromarray(pixels[i].permute(1, 2, 0).numpy())
        full = [y[i], *(c[i].repeat_interleave(2, 0).repeat_interleave(2, 1) for c in (cb, cr))]
        ycbcr = Image.merge("YCbCr", [Image.fromarray(p.numpy()) for p in full])
        assert jpeg_bytes(ycbcr, quality) == jpeg_bytes(rgb, quality), (size, seed, i)


def test_conversion_matches_the_jfif_formulas_within_rounding_and_keeps_the_extremes():
    values = torch.arange(256, dtype=torch.uint8)
    pixels = torch.stack(torch.meshgrid(values[::5], values[::7], values[::3], indexing="ij")).reshape(1, 3, -1, 1)
    got = rgb_to_ycbcr(pixels).double()
    r, g, b = pixels.double()[0]
    want = torch.stack([0.299 * r + 0.587 * g + 0.114 * b, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                        128 + 0.5 * r - 0.418688 * g - 0.081312 * b])
    assert (got[0] - want).abs().max() <= 0.51  # rounding, plus the 16-bit fixed-point coefficients
    white, black = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), torch.zeros(1, 3, 1, 1, dtype=torch.uint8)
    assert rgb_to_ycbcr(white).flatten().tolist() == [255, 128, 128]
    assert rgb_to_ycbcr(black).flatten().tolist() == [0, 128, 128]


def test_downsampling_alternates_its_rounding_bias_and_pads_odd_edges():
    twos = torch.tensor([[[1] * 6, [0] * 6]], dtype=torch.uint8)  # every 2x2 sum is 2: (2 + 1, 2, 1) >> 2
    assert downsample_2x2(twos).tolist() == [[[0, 1, 0]]]
    odd = torch.tensor([[[4, 4, 8], [4, 4, 8], [12, 12, 0]]], dtype=torch.uint8)  # last row, column repeated
    assert downsample_2x2(odd).tolist() == [[[4, 8], [12, 0]]]  # sums 16, 32 / 48, 0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"N x 3 x H x W uint8, got \(2, 3, 4, 4\) torch.float32"):
        rgb_to_ycbcr(torch.zeros(2, 3, 4, 4))
