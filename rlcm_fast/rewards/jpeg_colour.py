"""libjpeg's colour conversion and 4:2:0 chroma downsampling, in integer tensor ops on any device.

Why by hand: nvJPEG, given RGB, converts and downsamples the colour its own way, and its files then
come out up to 4.4% smaller than Pillow's (libjpeg-turbo's) at the same quality, tables and sampling,
with larger chroma errors (benchmarks/results/nvidia-h200/714cdca/README.md). nvJPEG also takes ready
YCbCr 4:2:0 planes (nvjpegEncodeYUV); these are the planes libjpeg itself would compute, so that only
the DCT, quantisation and entropy coding are left to nvJPEG. On the H200 (d986b71) the gap stayed (4.3%
largest, against 4.4% from RGB): it is in those, not in the colour.

The arithmetic is libjpeg's (jccolor.c, jcsample.c; libjpeg-turbo's SIMD code is bit-exact with it):
16-bit fixed-point coefficients, Y rounded half up, Cb/Cr rounded with 0.5 - 2^-16 so that 255 cannot
overflow, and each chroma sample the mean of a 2x2 block with a bias alternating 1, 2 along the row.
tests/test_jpeg_colour.py checks that Pillow writes byte-identical files from these planes and from RGB.
"""

from __future__ import annotations

import torch

_SCALE_BITS = 16
_ONE_HALF = 1 << (_SCALE_BITS - 1)
_CHROMA_OFFSET = 128 << _SCALE_BITS


def _fix(x: float) -> int:
    return int(x * (1 << _SCALE_BITS) + 0.5)


# Rows: Y, Cb, Cr; columns: R, G, B (libjpeg's FIX() of the JFIF coefficients).
_COEFFICIENTS = (
    (_fix(0.29900), _fix(0.58700), _fix(0.11400)),
    (-_fix(0.16874), -_fix(0.33126), _fix(0.50000)),
    (_fix(0.50000), -_fix(0.41869), -_fix(0.08131)),
)
_ROUNDING = (_ONE_HALF, _CHROMA_OFFSET + _ONE_HALF - 1, _CHROMA_OFFSET + _ONE_HALF - 1)


def rgb_to_ycbcr(pixels: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W uint8 RGB -> N x 3 x H x W uint8 YCbCr, exactly as libjpeg converts."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"rgb_to_ycbcr takes N x 3 x H x W uint8, got {tuple(pixels.shape)} {pixels.dtype}")
    rgb = pixels.to(torch.int32)
    planes = [
        (sum(c * rgb[:, i] for i, c in enumerate(row)) + rounding) >> _SCALE_BITS
        for row, rounding in zip(_COEFFICIENTS, _ROUNDING)
    ]
    return torch.stack(planes, dim=1).to(torch.uint8)


def pad_edges(plane: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x h x w -> N x height x width, repeating the last row and column (libjpeg's expand_*_edge)."""
    plane = torch.cat([plane, plane[:, -1:].expand(-1, height - plane.shape[1], -1)], dim=1)
    return torch.cat([plane, plane[:, :, -1:].expand(-1, -1, width - plane.shape[2])], dim=2)


def _even(plane: torch.Tensor) -> torch.Tensor:
    """Pad N x H x W to even H and W as libjpeg pads its edges."""
    height, width = plane.shape[-2:]
    return pad_edges(plane, height + height % 2, width + width % 2)


def downsample_2x2(plane: torch.Tensor) -> torch.Tensor:
    """N x H x W uint8 -> N x ceil(H/2) x ceil(W/2): libjpeg's h2v2 downsampling (bias 1, 2, 1, 2, ...)."""
    blocks = _even(plane).to(torch.int32)
    total = blocks[..., 0::2, 0::2] + blocks[..., 0::2, 1::2] + blocks[..., 1::2, 0::2] + blocks[..., 1::2, 1::2]
    bias = 1 + torch.arange(total.shape[-1], device=plane.device, dtype=torch.int32) % 2
    return ((total + bias) >> 2).to(torch.uint8)


def libjpeg_ycbcr420(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N x 3 x H x W uint8 RGB -> contiguous Y (N x H x W), Cb and Cr (N x ceil(H/2) x ceil(W/2)), uint8:
    the planes libjpeg encodes at 4:2:0. (For H or W not a multiple of 16 libjpeg also fills the last
    blocks' padding from the full-resolution edge; that padding is not part of these planes.)"""
    ycbcr = rgb_to_ycbcr(pixels)
    return (ycbcr[:, 0].contiguous(), downsample_2x2(ycbcr[:, 1]).contiguous(),
            downsample_2x2(ycbcr[:, 2]).contiguous())
