"""Mutation-testing round 47b (rewards/jpeg_exact's zigzag_order, _canonical_codes, pillow_tables, fdct_islow,
quantize, _bit_length, _code, entropy_code, entropy_bytes and jpeg_sizes; rewards/jpeg_colour): hand-written
mutants of those parts were run against their tests (test_jpeg_exact, test_jpeg_colour, the JPEG tests of
test_mutants_round43c, test_mutants_round46a, test_jpeg_triton); each test here kills one that survived (named in
its docstring). All are CPU-only, seeded and fast: the chunking test stubs the encoder's steps, so no large image
is encoded."""

import pytest
import torch

from rlcm_fast.rewards import jpeg_exact
from rlcm_fast.rewards.jpeg_colour import downsample_2x2, libjpeg_ycbcr420, rgb_to_ycbcr
from rlcm_fast.rewards.jpeg_exact import jpeg_sizes, pillow_tables


# -- rewards/jpeg_exact: jpeg_sizes' chunks ----------------------------------------------------------------------

def chunks_encoded(monkeypatch, pixels: torch.Tensor, quality: int = 95) -> tuple[list[int], list[int]]:
    """The batch sizes jpeg_sizes hands its encoder, and the sizes it returns, with the encoder's steps stubbed:
    each image's "entropy-coded bytes" are its first pixel, so the sizes show which image each came from."""
    chunks = []

    def scan_blocks(chunk, quant):
        chunks.append(chunk.shape[0])
        return chunk[:, 0, 0, 0].to(torch.int64)

    monkeypatch.setattr(jpeg_exact, "scan_blocks", scan_blocks)
    monkeypatch.setattr(jpeg_exact, "entropy_code", lambda first_pixels, huffman: (first_pixels, None))
    monkeypatch.setattr(jpeg_exact, "entropy_bytes", lambda first_pixels, lengths: first_pixels)
    header_bytes = pillow_tables(quality)[2]
    return chunks, [size - header_bytes for size in jpeg_sizes(pixels, quality).tolist()]


def test_a_batch_of_768_px_images_is_encoded_seven_images_at_a_time_in_order(monkeypatch):
    """Mutants: jpeg_sizes encoding the whole batch in one piece (no split), the chunk's image count from the width
    alone (4M / 768 = 5461 images of 768 x 768), and a budget of 2^32 pixels instead of 2^22. Every size is
    still right, but a chunk's intermediates take some 270 bytes per pixel: the documented 1.1 GB for 7 images
    of 768 px becomes 2.4 GB for a batch of 15, and grows with the batch until the GPU runs out of memory."""
    pixels = torch.arange(15, dtype=torch.uint8).view(15, 1, 1, 1).expand(15, 3, 768, 768)
    chunks, sizes = chunks_encoded(monkeypatch, pixels)
    assert chunks == [7, 7, 1] and 7 * 768 * 768 <= jpeg_exact._PIXELS_PER_CHUNK < 8 * 768 * 768
    assert sizes == list(range(15))  # each image's size, in the batch's order


def test_images_larger_than_a_chunk_are_encoded_one_at_a_time(monkeypatch):
    """Mutant: `max(2, ...)` for `max(1, ...)` in jpeg_sizes' chunk size. An image of more pixels than the budget
    (2048 x 2048 and up with the default) must be encoded alone: two at a time is twice the memory the budget is
    there to bound. (round43c's test of `max(1, ...)` compares sizes only, which two at a time does not change.)"""
    monkeypatch.setattr(jpeg_exact, "_PIXELS_PER_CHUNK", 100)
    pixels = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 12, 20)
    chunks, sizes = chunks_encoded(monkeypatch, pixels)
    assert chunks == [1, 1, 1] and sizes == [0, 1, 2]


# -- rewards/jpeg_colour ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 4, 4, 4), (1, 1, 4, 4), (3, 3, 4), (1, 3, 4, 4, 1)])
def test_rgb_to_ycbcr_refuses_other_than_three_planes_and_four_dimensions_in_one_line(shape):
    """Mutants: rgb_to_ycbcr without its `shape[1] != 3` check, and without its `dim() != 4` check. RGBA pixels
    (or a 4-channel batch) were converted from their first three planes without a word, one plane gave an
    IndexError traceback, and a C x H x W image without its batch axis (shape[1] 3 by chance) was read along the
    wrong axis: planes of garbage handed on to nvJPEG as libjpeg's."""
    pixels = torch.zeros(shape, dtype=torch.uint8)
    message = rf"^rgb_to_ycbcr takes N x 3 x H x W uint8, got \({', '.join(map(str, shape))}\) torch.uint8$"
    with pytest.raises(ValueError, match=message):
        rgb_to_ycbcr(pixels)
    with pytest.raises(ValueError, match=message):
        libjpeg_ycbcr420(pixels)


@pytest.mark.parametrize("height, width", [(3, 4), (4, 3)])
def test_downsampling_pads_an_odd_height_or_width_alone(height, width):
    """Mutants: _even padding the height by the width's parity (and the width by the height's), or the width by
    the height's. test_jpeg_colour's odd plane is 3 x 3, and jpeg_sizes pads its planes to even sizes before
    downsampling, so only a plane odd one way shows: libjpeg_ycbcr420's chroma of a 3 x 4 or 4 x 3 image (the
    planes handed to nvJPEG) failed with a shape error, or came out a row or column short."""
    torch.manual_seed(0)
    plane = torch.randint(0, 256, (2, height, width), dtype=torch.uint8)
    padded = torch.cat([plane, plane[:, -1:]], 1) if height % 2 else torch.cat([plane, plane[:, :, -1:]], 2)
    sums = padded.to(torch.int32).unfold(1, 2, 2).unfold(2, 2, 2).sum((-1, -2))  # each 2 x 2 block's sum
    bias = torch.tensor([1, 2], dtype=torch.int32)  # libjpeg's, alternating along the row
    assert downsample_2x2(plane).tolist() == ((sums + bias) >> 2).tolist()
    pixels = plane[:1, None].expand(1, 3, height, width)  # grey: Cb and Cr 128 everywhere
    assert [tuple(p.shape) for p in libjpeg_ycbcr420(pixels)] == [(1, height, width), (1, 2, 2), (1, 2, 2)]
