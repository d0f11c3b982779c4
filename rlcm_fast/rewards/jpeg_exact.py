"""The byte count of the JPEG file Pillow writes for an image, computed with tensor ops on the image's
device: jpeg_backend "exact".

Why by hand: the rewards compare JPEG sizes, and the paper's are Pillow's (libjpeg-turbo). nvJPEG's files
are up to 4.4% smaller than Pillow's on the same images, with the same tables, sampling and colour planes
(benchmarks/results/nvidia-h200/d986b71/README.md), and no library computes libjpeg's size on a GPU. A
file's size depends on its coefficients only through their entropy code, so this runs libjpeg's steps up
to the bits and counts them, writing no file:

- the colour planes as libjpeg makes them at 4:2:0, with its edge padding (jpeg_colour.py);
- libjpeg's integer forward DCT (jfdctint.c, "islow", Pillow's default; libjpeg-turbo's SIMD code is
  bit-exact with it) and its quantisation (jcdctmgr.c);
- the blocks in the scan's order (per 16 x 16 MCU: four luma blocks, then Cb, then Cr), libjpeg's dummy
  luma blocks past an edge (zero AC, the DC of the block before: jccoefct.c), and the DC differences;
- the Huffman code and magnitude bits of every coefficient (jchuff.c), packed into the byte stream so that
  each 0xFF byte's stuffed zero can be counted, and the last byte filled with ones.

The quantisation and Huffman tables, and the bytes of every marker segment, are read from a small file
Pillow writes at the same quality, so the sizes are those of the installed Pillow; tests/test_jpeg_exact.py
checks them byte for byte against Pillow's files.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
import torch
from PIL import Image

from .jpeg_colour import downsample_2x2, pad_edges, rgb_to_ycbcr

_CONST_BITS, _PASS1_BITS = 13, 2  # jfdctint.c's fixed-point scaling
# Pixels per chunk of images: at its peak a chunk takes some 270 bytes per pixel (int64 intermediates; measured
# on the CPU), so about 1.1 GB here (7 images of 768 px).
_PIXELS_PER_CHUNK = 1 << 22


def zigzag_order() -> list[int]:
    """The natural (row-major) index of each coefficient in zigzag order."""
    cells = sorted(((r, c) for r in range(8) for c in range(8)),
                   key=lambda rc: (rc[0] + rc[1], rc[0] if (rc[0] + rc[1]) % 2 else rc[1]))
    return [r * 8 + c for r, c in cells]


def _canonical_codes(bits: bytes, symbols: bytes) -> tuple[list[int], list[int]]:
    """A DHT segment's table as (code, length) per symbol 0..255 (JPEG Annex C)."""
    codes, lengths, code, k = [0] * 256, [0] * 256, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[symbols[k]], lengths[symbols[k]] = code, length
            code, k = code + 1, k + 1
        code <<= 1
    return codes, lengths


@functools.lru_cache(maxsize=8)
def pillow_tables(quality: int) -> tuple[dict, dict, int]:
    """From the file Pillow writes for a flat 16 x 16 image at `quality`: the quantisation tables by id (in
    zigzag order), the Huffman tables by (class, id) as (codes, lengths), and the bytes of the file that are
    not entropy-coded data (every marker segment and the two-byte markers; the same for any image size)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    quant, huffman, pos = {}, {}, 2  # after SOI
    while True:
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])[0]
        segment, i = data[pos + 4:pos + 2 + length], 0
        if marker == 0xDB:  # DQT: one or more 8-bit tables
            while i < len(segment):
                quant[segment[i] & 15] = list(segment[i + 1:i + 65])
                i += 65
        elif marker == 0xC4:  # DHT
            while i < len(segment):
                bits = segment[i + 1:i + 17]
                huffman[(segment[i] >> 4, segment[i] & 15)] = _canonical_codes(bits, segment[i + 17:i + 17 + sum(bits)])
                i += 17 + sum(bits)
        pos += 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows, then EOI
            return quant, huffman, pos + 2


def fdct_islow(samples: torch.Tensor) -> torch.Tensor:
    """libjpeg's jpeg_fdct_islow on int64 blocks (..., 8, 8) of samples minus 128: rows, then columns.
    The output is scaled up by 8, as libjpeg's is."""
    return fdct_islow_pass(fdct_islow_pass(samples, dim=-1, first=True), dim=-2, first=False)


def fdct_islow_pass(data: torch.Tensor, dim: int, first: bool) -> torch.Tensor:
    """One of jfdctint.c's two passes, along `dim`: pass 1 (`first`) keeps PASS1_BITS of extra precision."""

    def fix(x: float) -> int:
        return int(x * (1 << _CONST_BITS) + 0.5)

    def descale(x: torch.Tensor, n: int) -> torch.Tensor:
        return (x + (1 << (n - 1))) >> n

    v = data.unbind(dim)
    tmp0, tmp7, tmp1, tmp6 = v[0] + v[7], v[0] - v[7], v[1] + v[6], v[1] - v[6]
    tmp2, tmp5, tmp3, tmp4 = v[2] + v[5], v[2] - v[5], v[3] + v[4], v[3] - v[4]
    tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    out = [None] * 8
    if first:  # pass 1 keeps PASS1_BITS of extra precision; pass 2 removes it
        out[0], out[4] = (tmp10 + tmp11) << _PASS1_BITS, (tmp10 - tmp11) << _PASS1_BITS
        n = _CONST_BITS - _PASS1_BITS
    else:
        out[0], out[4] = descale(tmp10 + tmp11, _PASS1_BITS), descale(tmp10 - tmp11, _PASS1_BITS)
        n = _CONST_BITS + _PASS1_BITS
    z1 = (tmp12 + tmp13) * fix(0.541196100)
    out[2] = descale(z1 + tmp13 * fix(0.765366865), n)
    out[6] = descale(z1 - tmp12 * fix(1.847759065), n)
    z1, z2, z3, z4 = tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7
    z5 = (z3 + z4) * fix(1.175875602)
    tmp4, tmp5 = tmp4 * fix(0.298631336), tmp5 * fix(2.053119869)
    tmp6, tmp7 = tmp6 * fix(3.072711026), tmp7 * fix(1.501321110)
    z1, z2 = z1 * -fix(0.899976223), z2 * -fix(2.562915447)
    z3, z4 = z3 * -fix(1.961570560) + z5, z4 * -fix(0.390180644) + z5
    out[7], out[5] = descale(tmp4 + z1 + z3, n), descale(tmp5 + z2 + z4, n)
    out[3], out[1] = descale(tmp6 + z2 + z3, n), descale(tmp7 + z1 + z4, n)
    return torch.stack(out, dim=dim)


def natural_order(values_zigzag) -> list:
    """64 values given in zigzag order (a DQT table, say) -> the same values in natural (row-major) order."""
    natural = [0] * 64
    for k, index in enumerate(zigzag_order()):
        natural[index] = values_zigzag[k]
    return natural


def quantize(coefficients: torch.Tensor, table_zigzag: list[int]) -> torch.Tensor:
    """(..., 8, 8) DCT output -> quantised coefficients in zigzag order (..., 64)."""
    natural = natural_order(table_zigzag)
    # libjpeg divides by 8 x the table's value (the DCT's scale), rounding half away from zero. (libjpeg-turbo
    # multiplies by reciprocals instead, which gives the same quotient for every input below 2^15: checked.)
    divisor = torch.tensor(natural, dtype=torch.int64, device=coefficients.device).view(8, 8) << 3
    magnitude = (coefficients.abs() + (divisor >> 1)) // divisor
    quantised = torch.where(coefficients < 0, -magnitude, magnitude).flatten(-2)
    return quantised[..., torch.tensor(zigzag_order(), device=coefficients.device)]


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    """N x 8a x 8b uint8 -> N x a x b x 8 x 8 int64 samples minus 128."""
    n, h, w = plane.shape
    return plane.view(n, h // 8, 8, w // 8, 8).transpose(2, 3).to(torch.int64) - 128


def mcu_planes(pixels: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """N x 3 x H x W uint8 RGB -> the planes libjpeg cuts into blocks, uint8: Y (N x 16R x 16C) and Cb, Cr
    (N x 8R x 8C) for R x C MCUs, edges padded as libjpeg pads them; and the count of real 8-px luma block
    rows and columns (the rest of the MCU grid's luma blocks are dummies: `zero_dummy_blocks`)."""
    _, _, height, width = pixels.shape
    mcu_rows, mcu_cols = -(-height // 16), -(-width // 16)
    ycbcr = rgb_to_ycbcr(pixels)
    planes = [pad_edges(ycbcr[:, 0], 16 * mcu_rows, 16 * mcu_cols)]
    for plane in (ycbcr[:, 1], ycbcr[:, 2]):
        # Full width padded to the MCUs', height to even; downsampled; then rows repeated to the MCUs' height.
        plane = downsample_2x2(pad_edges(plane, height + height % 2, 16 * mcu_cols))
        planes.append(pad_edges(plane, 8 * mcu_rows, 8 * mcu_cols))
    return planes, (-(-height // 8), -(-width // 8))


def zero_dummy_blocks(blocks: torch.Tensor, luma_rows: int, luma_cols: int) -> None:
    """In place on quantised blocks N x R x C x 6 x 64 (zigzag order): libjpeg's dummy luma blocks past the
    image's last 8-px block row or column get zero AC and the DC of the block before them (jccoefct.c)."""
    if luma_cols % 2:  # the right blocks of the last MCU column: the DC of the block on their left
        for left, right in ((0, 1), (2, 3)):
            blocks[:, :, -1, right, 1:] = 0
            blocks[:, :, -1, right, 0] = blocks[:, :, -1, left, 0]
    if luma_rows % 2:  # the bottom blocks of the last MCU row: the DC of their MCU's last block above them
        blocks[:, -1, :, 2:4, 1:] = 0
        blocks[:, -1, :, 2:4, 0] = blocks[:, -1, :, 1:2, 0]


def scan_blocks(pixels: torch.Tensor, quant: dict) -> torch.Tensor:
    """N x 3 x H x W uint8 RGB -> the quantised blocks in scan order, N x MCUs x 6 x 64 (Y0..Y3, Cb, Cr)."""
    n = pixels.shape[0]
    (luma, *chroma), luma_blocks = mcu_planes(pixels)
    mcu_rows, mcu_cols = luma.shape[1] // 16, luma.shape[2] // 16
    luma = quantize(fdct_islow(_blocks(luma)), quant[0])
    luma = luma.view(n, mcu_rows, 2, mcu_cols, 2, 64).permute(0, 1, 3, 2, 4, 5).reshape(n, mcu_rows, mcu_cols, 4, 64)
    chroma = [quantize(fdct_islow(_blocks(plane)), quant[1]).view(n, mcu_rows, mcu_cols, 1, 64) for plane in chroma]
    blocks = torch.cat([luma, *chroma], dim=3)
    zero_dummy_blocks(blocks, *luma_blocks)
    return blocks.view(n, mcu_rows * mcu_cols, 6, 64)


def _bit_length(values: torch.Tensor) -> torch.Tensor:
    """Bits of |v| (0 for 0): frexp's exponent, exact in float32 for JPEG's coefficients (< 2^16)."""
    return torch.frexp(values.abs().to(torch.float32)).exponent.to(torch.int64)


def _code(tables: tuple, chroma: torch.Tensor, symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Huffman (code, length) of each symbol, by the luma or chroma table as `chroma` (broadcast) says."""
    (luma_codes, luma_lengths), (chroma_codes, chroma_lengths) = tables
    return (torch.where(chroma, chroma_codes[symbols], luma_codes[symbols]),
            torch.where(chroma, chroma_lengths[symbols], luma_lengths[symbols]))


def entropy_code(blocks: torch.Tensor, huffman: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan-ordered blocks N x MCUs x 6 x 64 -> the bit strings libjpeg's Huffman encoder writes, as
    (value, length) pairs in stream order, N x P each: per block its DC code, then per AC position the run
    of zeros' ZRL codes and the coefficient's code (length 0 where there is none), then EOB."""
    n, device = blocks.shape[0], blocks.device

    def table(cls: int) -> tuple:
        return tuple(tuple(torch.tensor(t, dtype=torch.int64, device=device) for t in huffman[(cls, i)])
                     for i in (0, 1))

    dc_tables, ac_tables = table(0), table(1)
    chroma = torch.tensor([False] * 4 + [True] * 2, device=device).view(1, 1, 6)
    # DC: each component's difference from its previous block in the scan (the first from 0).
    dc = blocks[..., 0]
    luma_dc, chroma_dc = dc[..., :4].reshape(n, -1), dc[..., 4:]
    luma_diff = torch.diff(luma_dc, dim=1, prepend=torch.zeros_like(luma_dc[:, :1])).view(n, -1, 4)
    chroma_diff = torch.diff(chroma_dc, dim=1, prepend=torch.zeros_like(chroma_dc[:, :1]))
    diff = torch.cat([luma_diff, chroma_diff], dim=2)
    size = _bit_length(diff)
    code, length = _code(dc_tables, chroma, size)
    # A negative value's bits are those of value - 1 (its low `size` bits): jchuff.c.
    dc_value = (code << size) | (torch.where(diff < 0, diff - 1, diff) & ((1 << size) - 1))
    dc_length = length + size
    # AC: for each non-zero coefficient, the zeros since the previous one (runs of 16 as ZRL codes).
    ac = blocks[..., 1:]
    nonzero = ac != 0
    position = torch.arange(1, 64, device=device)
    last = torch.cummax(torch.where(nonzero, position, 0), dim=-1).values
    run = position - torch.cat([torch.zeros_like(last[..., :1]), last[..., :-1]], dim=-1) - 1
    size = _bit_length(ac)
    code, length = _code(ac_tables, chroma.unsqueeze(-1), torch.where(nonzero, ((run % 16) << 4) + size, 0))
    ac_value = torch.where(nonzero, (code << size) | (torch.where(ac < 0, ac - 1, ac) & ((1 << size) - 1)), 0)
    ac_length = torch.where(nonzero, length + size, 0)
    zrl_code, zrl_length = _code(ac_tables, chroma.unsqueeze(-1), torch.full_like(run, 0xF0))
    zrls = torch.where(nonzero, run // 16, 0)  # at most 3: a run is at most 62 zeros
    zrl_value = torch.zeros_like(zrl_code)
    for k in range(3):
        zrl_value = torch.where(zrls > k, (zrl_value << zrl_length) | zrl_code, zrl_value)
    eob_code, eob_length = _code(ac_tables, chroma, torch.zeros_like(dc))
    eob_length = torch.where(last[..., -1] < 63, eob_length, 0)  # no EOB after a non-zero 63rd coefficient
    values = torch.cat([dc_value[..., None], torch.stack([zrl_value, ac_value], -1).flatten(-2),
                        eob_code[..., None]], -1)
    lengths = torch.cat([dc_length[..., None], torch.stack([zrls * zrl_length, ac_length], -1).flatten(-2),
                         eob_length[..., None]], -1)
    return values.reshape(n, -1), lengths.reshape(n, -1)


def entropy_bytes(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Bytes of each image's entropy-coded segment, N: its bits packed MSB first, the last byte filled
    with ones, and a zero stuffed after every 0xFF byte (so they are packed, and the 0xFF bytes counted)."""
    bits = lengths.sum(1)
    data_bytes = (bits + 7) // 8
    start = torch.cumsum(data_bytes, 0) - data_bytes  # each image's stream starts at a byte of its own
    offset = (torch.cumsum(lengths, 1) - lengths) + 8 * start[:, None]
    keep = lengths > 0
    values, lengths, offset = values[keep], lengths[keep], offset[keep]
    # A string is at most 33 bits (three ZRL codes; a coefficient's code and bits are at most 27): at its
    # offset within a byte (0..7) in a 48-bit window it stays inside the window's 6 bytes, clear of the sign.
    window = values << (48 - offset % 8 - lengths)
    stream = torch.zeros(int(data_bytes.sum()) + 6, dtype=torch.int64, device=values.device)
    for j in range(6):  # the codes' bits do not overlap, so adding them is or-ing them
        stream.index_add_(0, offset // 8 + j, (window >> (40 - 8 * j)) & 0xFF)
    return stuffed_sizes(stream, start, data_bytes, bits)


def stuffed_sizes(stream: torch.Tensor, start: torch.Tensor, data_bytes: torch.Tensor,
                  bits: torch.Tensor) -> torch.Tensor:
    """The images' entropy-coded bytes, N, from their packed streams (int64 bytes, image i's `data_bytes[i]`
    from `start[i]`, of which `bits[i]` are written): the last byte filled with ones as libjpeg fills it
    (in place), then one more byte per 0xFF byte, the zero stuffed after it."""
    n, device = bits.shape[0], bits.device
    fill = 8 * data_bytes - bits
    last = start + data_bytes - 1
    stream[last] |= torch.where(fill > 0, (1 << fill) - 1, 0)
    owner = torch.repeat_interleave(torch.arange(n, device=device), data_bytes)
    stuffed = torch.zeros(n, dtype=torch.int64, device=device).index_add_(
        0, owner, (stream[:int(data_bytes.sum())] == 0xFF).to(torch.int64))
    return data_bytes + stuffed


def check_jpeg_inputs(pixels: torch.Tensor, quality: int) -> None:
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3 or 0 in pixels.shape:
        raise ValueError(f"jpeg_sizes takes N x 3 x H x W uint8 with N, H, W >= 1, got {tuple(pixels.shape)} "
                         f"{pixels.dtype}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality {quality!r} is invalid: it must be an int in 1..100")


def jpeg_sizes(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """N x 3 x H x W uint8 RGB (any device) -> the byte counts of Pillow's JPEG files at `quality`, N int64."""
    check_jpeg_inputs(pixels, quality)
    quant, huffman, header_bytes = pillow_tables(quality)
    per_chunk = max(1, _PIXELS_PER_CHUNK // (pixels.shape[2] * pixels.shape[3]))
    sizes = [entropy_bytes(*entropy_code(scan_blocks(chunk, quant), huffman))
             for chunk in pixels.split(per_chunk)]
    return torch.cat(sizes) + header_bytes
