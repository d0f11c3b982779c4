"""Pillow's JPEG byte counts in Triton, for CUDA images: jpeg_backend "exact" with exact_engine="triton".

The reference is `rlcm_fast.rewards.jpeg_exact.jpeg_sizes` (tensor ops, any device), which runs libjpeg's
steps up to the entropy-coded bits and counts them; these kernels compute the same counts in three passes
over the blocks instead of the reference's few dozen int64 tensor ops over every coefficient:

1. `_dct_quantise_kernel`: per 8 x 8 block of one plane, libjpeg's integer DCT and quantisation, stored in
   zigzag order at the block's place in the scan (MCU by MCU: Y0..Y3, Cb, Cr). Each of the islow DCT's two
   passes is linear in its input up to one rounding shift at its end (jfdctint.c rounds nowhere else), so
   a pass is an integer 8 x 8 matrix product then that shift; `islow_matrix` reads the matrix off the
   reference's own pass. Products stay in int32: |row sums of the matrix| x |samples| < 2^31 (asserted).
2. `_block_bits_kernel`: per block, the length in bits of its Huffman strings (DC difference, zero runs
   with their ZRL codes, coefficients, EOB).
3. `_pack_bits_kernel`: after a prefix sum gives each block its first bit in its image's stream, the
   strings are or-ed into 64-bit words at their places, so that the 0xFF bytes (each followed by a
   stuffed zero in the file) can be counted. Blocks own disjoint bits, so the atomic or is only there
   for the words two blocks share.

The colour planes, the edge padding and libjpeg's dummy blocks are the reference's own functions
(jpeg_exact.py), and so is the counting of filled and stuffed bytes. tests/test_jpeg_triton.py checks the
kernels against the reference and Pillow's files under TRITON_INTERPRET=1 on the CPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rlcm_fast.kernels.policy_step import _interpreting, on_tensors_device
from rlcm_fast.rewards.jpeg_exact import (
    check_jpeg_inputs, fdct_islow_pass, mcu_planes, natural_order, pillow_tables, stuffed_sizes, zero_dummy_blocks,
)

# jfdctint.c's descale in pass 1 (CONST_BITS - PASS1_BITS) and pass 2 (+). Passed to the kernel as constexpr
# arguments: the compiler refuses a kernel that reads a plain module-level int (the interpreter does not).
_SHIFT_PASS1, _SHIFT_PASS2 = 11, 15
# Blocks per program: on a GPU a 16 x 64 tile (16 x 512 products per DCT pass; not tuned: no GPU has run these
# kernels yet). Triton's interpreter runs programs one after another, so fewer, larger ones are quicker there.
_BLOCKS_CUDA, _BLOCKS_INTERPRETER = 16, 256


@functools.lru_cache(maxsize=1)
def islow_matrix() -> torch.Tensor:
    """The 8 x 8 int32 matrix M with pass(x) = descale(M x) for both passes of libjpeg's islow DCT (pass 1's
    even outputs, shifted up rather than descaled, are M x descaled by a shift that drops only zeros)."""
    columns = []
    for j in range(8):  # a unit sample of 2^20: the pass descales by 2^11, which leaves M's column times 2^9
        unit = torch.zeros(1, 8, dtype=torch.int64)
        unit[0, j] = 1 << 20
        columns.append(fdct_islow_pass(unit, dim=-1, first=True)[0] >> 9)
    matrix = torch.stack(columns, dim=1)
    pass2_input = (int(matrix.abs().sum(1).max()) * 128 >> _SHIFT_PASS1) + 1
    assert int(matrix.abs().sum(1).max()) * pass2_input < 2**31, "the DCT's products would overflow int32"
    return matrix.to(torch.int32)


@triton.jit
def _descale(x, shift: tl.constexpr):
    return (x + (1 << (shift - 1))) >> shift


@triton.jit
def _dct_quantise_kernel(plane_ptr, coef_ptr, matrix_ptr, divisor_ptr, zigzag_ptr, n_blocks, block_rows,
                         block_cols, mcu_cols, mcus, slot_base, LUMA: tl.constexpr, BLOCKS: tl.constexpr,
                         SHIFT_PASS1: tl.constexpr, SHIFT_PASS2: tl.constexpr):
    """Blocks of an N x (8 block_rows) x (8 block_cols) uint8 plane -> coef[image, mcu, slot, zigzag] int32."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    valid = blk < n_blocks
    blk = tl.where(valid, blk, 0)
    image, rest = blk // (block_rows * block_cols), blk % (block_rows * block_cols)
    block_row, block_col = rest // block_cols, rest % block_cols
    e = tl.arange(0, 64)
    row, col = e // 8, e % 8
    width = 8 * block_cols
    pixel = (image * (8 * block_rows) * width + block_row * 8 * width + block_col * 8)[:, None] + row * width + col
    samples = tl.load(plane_ptr + pixel, mask=valid[:, None], other=128).to(tl.int32) - 128
    i8 = tl.arange(0, 8)
    matrix = tl.load(matrix_ptr + i8[:, None] * 8 + i8[None, :])
    x = tl.reshape(samples, (BLOCKS, 8, 8))  # [block, row, column]
    # Pass 1 along each row: y[b, r, u] = sum_c M[u, c] x[b, r, c]; pass 2 along each column.
    y = _descale(tl.sum(x[:, :, None, :] * matrix[None, None, :, :], axis=3), SHIFT_PASS1)
    z = _descale(tl.sum(y[:, None, :, :] * matrix[None, :, :, None], axis=2), SHIFT_PASS2)  # [b, v, u]
    dct = tl.reshape(z, (BLOCKS, 64))
    divisor = tl.load(divisor_ptr + e)
    magnitude = (tl.abs(dct) + (divisor >> 1)) // divisor[None, :]
    quantised = tl.where(dct < 0, -magnitude, magnitude)
    if LUMA:  # four blocks per MCU, 2 x 2
        mcu = (block_row // 2) * mcu_cols + block_col // 2
        slot = (block_row % 2) * 2 + block_col % 2
    else:
        mcu = block_row * mcu_cols + block_col
        slot = slot_base + block_col * 0
    target = ((image * mcus + mcu) * 6 + slot) * 64
    tl.store(coef_ptr + target[:, None] + tl.load(zigzag_ptr + e)[None, :], quantised, mask=valid[:, None])


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _block_strings(coef_ptr, codes_ptr, lengths_ptr, blk, valid, mcus):
    """The Huffman strings of the scan-ordered blocks `blk`: (value int64, length int32) per zigzag position
    (position 0: the DC difference's code and bits; k >= 1: the zero run's ZRL codes, then coefficient k's
    code and bits, where coefficient k is not zero), and each block's EOB (code, length; length 0 when
    coefficient 63 is not zero). Tables: codes/lengths[4, 256] for DC luma, DC chroma, AC luma, AC chroma."""
    e = tl.arange(0, 64)[None, :]
    base = blk[:, None] * 64
    slot = blk % 6
    mcu = (blk // 6) % mcus
    chroma = (slot >= 4).to(tl.int32)
    # The DC's previous block in its component: the slot before in this MCU, or the previous MCU's last luma
    # block / the same chroma slot; the first block of each component starts from 0.
    previous = tl.where((slot >= 1) & (slot <= 3), blk - 1, tl.where(slot == 0, blk - 3, blk - 6))
    has_previous = ((slot >= 1) & (slot <= 3)) | (mcu > 0)
    previous_dc = tl.load(coef_ptr + previous * 64, mask=valid & has_previous, other=0)
    coefficients = tl.load(coef_ptr + base + e, mask=valid[:, None], other=0)
    before = tl.load(coef_ptr + base + e - 1, mask=valid[:, None] & (e >= 2), other=0)
    value = tl.where(e == 0, coefficients - previous_dc[:, None], coefficients)
    nonzero = (e >= 1) & (coefficients != 0)
    # Position of the last non-zero AC coefficient before k (0: none), so the zero run is k - that - 1.
    last_before = tl.associative_scan(tl.where((e >= 2) & (before != 0), e - 1, 0), 1, _max)
    run = e - last_before - 1
    magnitude = tl.abs(value)
    size = tl.zeros_like(magnitude)
    for bit in tl.static_range(16):  # bit length of |value|: JPEG's coefficients need at most 15
        size += ((magnitude >> bit) > 0).to(tl.int32)
    table = tl.where(e == 0, 0, 2) + chroma[:, None]
    symbol = tl.where(e == 0, size, ((run & 15) << 4) | size)
    code = tl.load(codes_ptr + table * 256 + symbol).to(tl.int64)
    code_length = tl.load(lengths_ptr + table * 256 + symbol)
    bits = (tl.where(value < 0, value - 1, value) & ((1 << size) - 1)).to(tl.int64)
    zrl_code = tl.load(codes_ptr + (2 + chroma) * 256 + 0xF0).to(tl.int64)[:, None]
    zrl_length = tl.load(lengths_ptr + (2 + chroma) * 256 + 0xF0)[:, None]
    zrls = tl.where(nonzero, run >> 4, 0)  # at most 3: a run is at most 62 zeros
    prefix = tl.zeros_like(code)
    for k in tl.static_range(3):
        prefix = tl.where(zrls > k, (prefix << zrl_length) | zrl_code, prefix)
    keep = ((e == 0) | nonzero) & valid[:, None]
    strings = tl.where(keep, (((prefix << code_length) | code) << size) | bits, 0)  # at most 59 bits
    lengths = tl.where(keep, zrls * zrl_length + code_length + size, 0)
    last = tl.max(tl.where(nonzero, e, 0), axis=1)
    eob_code = tl.load(codes_ptr + (2 + chroma) * 256).to(tl.int64)
    eob_length = tl.where(valid & (last < 63), tl.load(lengths_ptr + (2 + chroma) * 256), 0)
    return strings, lengths, eob_code, eob_length


@triton.jit
def _block_bits_kernel(coef_ptr, codes_ptr, lengths_ptr, bits_ptr, n_blocks, mcus, BLOCKS: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    valid = blk < n_blocks
    blk = tl.where(valid, blk, 0)
    _, lengths, _, eob_length = _block_strings(coef_ptr, codes_ptr, lengths_ptr, blk, valid, mcus)
    tl.store(bits_ptr + blk, (tl.sum(lengths, axis=1) + eob_length).to(tl.int64), mask=valid)


@triton.jit
def _or_string(words_ptr, position, string, length, mask):
    """Or a string of `length` (1..59) bits into the stream at bit `position` (bit 0: the top bit of word 0)."""
    word = position >> 6
    end = (position & 63) + length  # where the string ends, counted from the top of its first word
    fits = end <= 64
    # Shift counts kept in 0..63 on every lane, masked ones too (a shift by 64 is undefined on a GPU).
    first = tl.where(fits, string << tl.minimum(tl.where(fits, 64 - end, 0), 63), string >> tl.where(fits, 0, end - 64))
    tl.atomic_or(words_ptr + word, first, mask=mask)
    second = string << tl.where(fits, 0, 128 - end)
    tl.atomic_or(words_ptr + word + 1, second, mask=mask & ~fits)


@triton.jit
def _pack_bits_kernel(coef_ptr, codes_ptr, lengths_ptr, first_bit_ptr, words_ptr, n_blocks, mcus,
                      BLOCKS: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    valid = blk < n_blocks
    blk = tl.where(valid, blk, 0)
    strings, lengths, eob_code, eob_length = _block_strings(coef_ptr, codes_ptr, lengths_ptr, blk, valid, mcus)
    first_bit = tl.load(first_bit_ptr + blk, mask=valid, other=0)
    ends = tl.cumsum(lengths, axis=1)
    _or_string(words_ptr, first_bit[:, None] + (ends - lengths), strings, lengths, lengths > 0)
    _or_string(words_ptr, first_bit + tl.sum(lengths, axis=1), eob_code, eob_length, eob_length > 0)


@functools.lru_cache(maxsize=8)
def _tables(quality: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """On `device`: the DCT matrix; the divisors (8 x the quantisation table, natural order) of luma and
    chroma; each natural index's zigzag position; the Huffman codes and lengths, [4, 256] int32."""
    quant, huffman, _ = pillow_tables(quality)
    divisors = [torch.tensor(natural_order(table), dtype=torch.int32) << 3 for table in (quant[0], quant[1])]
    position = natural_order(range(64))  # natural index -> zigzag position
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    codes = torch.tensor([huffman[key][0] for key in keys], dtype=torch.int32)
    lengths = torch.tensor([huffman[key][1] for key in keys], dtype=torch.int32)
    return tuple(t.to(device) for t in (islow_matrix(), *divisors, torch.tensor(position, dtype=torch.int32),
                                          codes, lengths))


def triton_jpeg_sizes(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """N x 3 x H x W uint8 RGB -> the byte counts of Pillow's JPEG files at `quality`, N int64 on the pixels'
    device. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; same contract as jpeg_exact.jpeg_sizes."""
    check_jpeg_inputs(pixels, quality)
    if pixels.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton JPEG sizes run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), "
                         f"got device {pixels.device}")
    with on_tensors_device(pixels):
        return _sizes(pixels, quality)


def _sizes(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    blocks = _BLOCKS_CUDA if pixels.device.type == "cuda" else _BLOCKS_INTERPRETER
    _, _, header_bytes = pillow_tables(quality)
    matrix, luma_divisor, chroma_divisor, position, codes, lengths = _tables(quality, pixels.device)
    n = pixels.shape[0]
    planes, luma_blocks = mcu_planes(pixels)
    mcu_rows, mcu_cols = planes[1].shape[1] // 8, planes[1].shape[2] // 8
    mcus = mcu_rows * mcu_cols
    coef = torch.empty(n, mcus, 6, 64, dtype=torch.int32, device=pixels.device)
    for slot, (plane, divisor) in enumerate(zip(planes, (luma_divisor, chroma_divisor, chroma_divisor))):
        block_rows, block_cols = plane.shape[1] // 8, plane.shape[2] // 8
        n_blocks = n * block_rows * block_cols
        _dct_quantise_kernel[(triton.cdiv(n_blocks, blocks),)](
            plane.contiguous(), coef, matrix, divisor, position, n_blocks, block_rows, block_cols, mcu_cols, mcus,
            slot + 3, LUMA=slot == 0, BLOCKS=blocks, SHIFT_PASS1=_SHIFT_PASS1,
            SHIFT_PASS2=_SHIFT_PASS2)
    zero_dummy_blocks(coef.view(n, mcu_rows, mcu_cols, 6, 64), *luma_blocks)
    n_blocks = coef.shape[0] * mcus * 6
    grid = (triton.cdiv(n_blocks, blocks),)
    block_bits = torch.empty(n, mcus * 6, dtype=torch.int64, device=pixels.device)
    _block_bits_kernel[grid](coef, codes, lengths, block_bits, n_blocks, mcus, BLOCKS=blocks)
    bits = block_bits.sum(1)
    data_bytes = (bits + 7) // 8
    start = torch.cumsum(data_bytes, 0) - data_bytes  # each image's stream starts at a byte of its own
    first_bit = torch.cumsum(block_bits, 1) - block_bits + 8 * start[:, None]
    total_bytes = int(data_bytes.sum())
    words = torch.zeros(total_bytes // 8 + 1, dtype=torch.int64, device=pixels.device)  # every byte's
    _pack_bits_kernel[grid](coef, codes, lengths, first_bit, words, n_blocks, mcus, BLOCKS=blocks)
    # Stream byte k is the (k % 8)-th byte of word k // 8 from its top: in little-endian memory (CUDA's,
    # x86's) the words' bytes are stored the other way round.
    stream = words.view(torch.uint8).view(-1, 8).flip(1).reshape(-1)[:total_bytes].to(torch.int64)
    return stuffed_sizes(stream, start, data_bytes, bits) + header_bytes
