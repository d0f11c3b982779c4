"""Mutation-testing round 46a (kernels/jpeg_size, with the helpers it shares in rewards/jpeg_exact and the exact
engine's choice in rewards/jpeg): hand-written mutants of those modules were run against their tests
(test_jpeg_triton, test_jpeg_exact, test_mutants_round43c); each test here kills one that survived (named in its
docstring). All are CPU-only, seeded and fast: the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on one image of 8 x 8 or 32 x 32 px (on a GPU where there is one). Four of the five kill mutants
that change no bit count, only bits: a JPEG file's size still changes by its stuffed zeros, one after each 0xFF byte,
so each test's image is one whose 0xFF bytes the mutant changes, and the test checks that premise with the reference
(jpeg_exact) before comparing the kernels' size with Pillow's file."""

import math
import os

import pytest
import torch

from rlcm_fast.rewards.base import RewardError
from rlcm_fast.rewards.jpeg import ExactJpeg
from rlcm_fast.rewards.jpeg_exact import entropy_code, pillow_tables, scan_blocks
from test_jpeg_exact import pillow_bytes

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def chroma_pattern(amplitude: float, vertical: int, horizontal: int) -> torch.Tensor:
    """1 x 3 x 32 x 32 uint8 (four MCUs): grey luma, and in blue minus red one DCT basis pattern (frequencies
    vertical, horizontal) at chroma's 2 x 2 scale, so that each chroma block holds that one AC coefficient."""
    k = torch.arange(8, dtype=torch.float64)
    basis = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)  # [frequency, sample]
    pattern = amplitude * torch.outer(basis[vertical], basis[horizontal])
    pattern = pattern.repeat_interleave(2, 0).repeat_interleave(2, 1)  # 16 x 16
    pixels = torch.stack([128 - pattern / 2, torch.full((16, 16), 128.0), 128 + pattern]).round().to(torch.uint8)
    return pixels.repeat(1, 2, 2)[None]


# -- rewards/jpeg: the exact engine's choice -------------------------------------------------------------------

def test_an_exact_jpeg_made_in_code_refuses_an_unknown_engine_in_one_line():
    """Mutant: ExactJpeg without its own check_exact_engine. JpegSizeReward checks the engine before making one,
    but ExactJpeg made directly with engine "Triton" (or any typo) took it, and then computed with the tensor ops:
    a user who asked for the kernels got the other engine without a word."""
    with pytest.raises(RewardError, match=r"^exact JPEG engine 'Triton' is invalid; allowed: tensor_ops, triton$"):
        ExactJpeg(95, engine="Triton")


# -- kernels/jpeg_size: the last program's empty lanes ---------------------------------------------------------

def test_the_empty_lanes_of_the_last_program_write_no_eob_into_the_first_images_stream():
    """Mutant: the EOB's length not masked by `valid` in _block_strings. Every empty lane of the last program (one
    image of 6 blocks leaves 250 of the interpreter's 256, 10 of a GPU's 16) stands for block 0 with no
    coefficients, and or-ed a luma EOB code at bit 0 of the first image's stream. Its bit count is unchanged, so
    only a 0xFF byte it makes shows: this image's first byte, or-ed with that code, is 0xFF (checked from the
    reference's strings), and the mutant counted one stuffed byte too many against Pillow's file."""
    from rlcm_fast.kernels.jpeg_size import triton_jpeg_sizes

    pixels = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    quant, huffman, _ = pillow_tables(95)
    values, lengths = entropy_code(scan_blocks(pixels, quant), huffman)
    stream = "".join(format(int(v), f"0{int(n)}b") for v, n in zip(values[0], lengths[0]) if n > 0)
    first_byte = int(stream[:8], 2)
    eob_code, eob_length = huffman[(1, 0)][0][0], huffman[(1, 0)][1][0]
    assert first_byte != 0xFF and first_byte | (eob_code << (8 - eob_length)) == 0xFF  # the premise
    assert triton_jpeg_sizes(pixels.to(DEVICE), 95).tolist() == pillow_bytes(pixels, 95)


def test_an_eob_written_after_seven_ones_or_a_byte_0xfe_is_written_at_its_own_bit():
    """Mutant: _pack_bits_kernel or-ing each block's EOB one bit early (first_bit + its strings' length - 1).
    The bit count is unchanged (only block_bits counts), and the chroma EOB is "00", so only a luma EOB moved to
    or from a 0xFF byte shows: one that starts at a byte's last bit after seven ones (the byte is 0xFF, and the
    mutant made it 0xFE) or at a byte's first bit after a byte 0xFE (the mutant made that one 0xFF). This grey
    image of flat 8 x 8 blocks (each luma block: its DC string, then EOB) has such an EOB (checked from the
    reference's strings); the mutant's size was one byte off Pillow's file."""
    from rlcm_fast.kernels.jpeg_size import triton_jpeg_sizes

    levels = torch.randint(0, 256, (1, 1, 4, 4), generator=torch.Generator().manual_seed(51), dtype=torch.uint8)
    pixels = levels.repeat_interleave(8, 2).repeat_interleave(8, 3).expand(1, 3, 32, 32).contiguous()
    quant, huffman, _ = pillow_tables(75)
    values, lengths = entropy_code(scan_blocks(pixels, quant), huffman)
    values, lengths = values[0].tolist(), lengths[0].tolist()
    stream = "".join(format(v, f"0{n}b") for v, n in zip(values, lengths) if n > 0)
    starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0).tolist()
    per_block = 1 + 2 * 63 + 1  # a block's strings: DC, 63 x (ZRL codes, coefficient), EOB
    luma_eobs = [starts[i] for i in range(per_block - 1, len(values), per_block)
                 if (i // per_block) % 6 < 4 and lengths[i] > 0]
    assert any(p % 8 == 7 and stream[p - 7:p] == "1" * 7 or p % 8 == 0 and stream[p - 8:p] == "11111110"
               for p in luma_eobs)  # the premise
    assert triton_jpeg_sizes(pixels.to(DEVICE), 75).tolist() == pillow_bytes(pixels, 75)


def test_a_run_of_61_zeros_in_a_chroma_block_takes_the_chroma_tables_zrl_code():
    """Mutant: _block_strings loading the ZRL code from the luma AC table for chroma blocks too (its length still
    the chroma table's). The bit count is unchanged, but the bits are another code's, so the 0xFF bytes, and the
    stuffed zeros, are not Pillow's. test_jpeg_triton's run of 61 zeros is in a grey image (chroma flat); here the
    same pattern, at chroma's 2 x 2 scale, is in blue minus red, so each chroma block's only AC coefficient is the
    62nd in zigzag order (checked with the reference): three chroma ZRL codes per block. The mutant's size was 4
    bytes off Pillow's file."""
    from rlcm_fast.kernels.jpeg_size import triton_jpeg_sizes

    pixels = chroma_pattern(100, 7, 6)
    quant, _, _ = pillow_tables(75)
    chroma_ac = scan_blocks(pixels, quant)[0, :, 4:, 1:]
    assert chroma_ac[..., 61].ne(0).all() and chroma_ac.ne(0).sum(-1).eq(1).all()  # the premise
    assert triton_jpeg_sizes(pixels.to(DEVICE), 75).tolist() == pillow_bytes(pixels, 75)


def test_a_chroma_blocks_eob_is_the_chroma_tables_code():
    """Mutant: _block_strings loading the EOB code from the luma AC table for chroma blocks too (its length still
    the chroma table's 2 bits). The bit count is unchanged, but luma's "1010" or-ed as a 2-bit string sets bits
    outside its place, so the 0xFF bytes, and the stuffed zeros, are not Pillow's. Here each chroma block (a
    pattern in blue minus red at chroma's 2 x 2 scale) has one AC coefficient, then its EOB (checked with the
    reference); the mutant's size was one byte off Pillow's file."""
    from rlcm_fast.kernels.jpeg_size import triton_jpeg_sizes

    pixels = chroma_pattern(40, 4, 7)
    quant, _, _ = pillow_tables(90)
    chroma = scan_blocks(pixels, quant)[0, :, 4:]
    assert chroma[..., 1:].ne(0).sum(-1).eq(1).all() and chroma[..., 63].eq(0).all()  # the premise
    assert triton_jpeg_sizes(pixels.to(DEVICE), 90).tolist() == pillow_bytes(pixels, 90)
