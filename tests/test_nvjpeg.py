"""The nvJPEG JPEG-size backend (rlcm_fast._nvjpeg). Binding checks run wherever the module was built;
size and speed checks need a CUDA GPU and the nvidia-nvjpeg wheel, and skip elsewhere."""

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast.rewards import make_reward, to_uint8_images
from rlcm_fast.rewards.jpeg import JpegSizeReward, NvJpeg, find_libnvjpeg, nvjpeg_unavailable_reason

try:
    from rlcm_fast import _nvjpeg
except ImportError:
    _nvjpeg = None

needs_module = pytest.mark.skipif(_nvjpeg is None, reason="rlcm_fast._nvjpeg was not built (no CUDA compiler/nvjpeg.h)")
needs_gpu = pytest.mark.skipif(nvjpeg_unavailable_reason() is not None,
                               reason=f"nvJPEG backend unavailable: {nvjpeg_unavailable_reason()}")


def varied_images(n, size, seed=0, device="cpu"):
    """Natural-looking images (smooth gradients, soft blobs, texture) from very smooth to very busy."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        busy = i / max(n - 1, 1)
        base = torch.stack([xs, ys, 1 - xs * ys]) * torch.rand(3, 1, 1, generator=g)
        for _ in range(4):
            cx, cy, r = torch.rand(3, generator=g)
            blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (0.02 + 0.1 * r))
            base = base + blob * (torch.rand(3, 1, 1, generator=g) - 0.5)
        coarse = torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size),
                                                 mode="bilinear", align_corners=False)[0]
        fine = torch.rand(3, size, size, generator=g)
        out.append((base + 0.3 * busy * coarse + 0.25 * busy ** 2 * fine).clamp(0, 1))
    return torch.stack(out).to(device)


def pillow_sizes(images):
    sizes = []
    for pixels in to_uint8_images(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell())
    return np.array(sizes, dtype=np.float64)


@needs_module
def test_binding_rejects_bad_arguments_before_touching_a_gpu():
    with pytest.raises(ValueError, match="quality must be in 1..100, got 0"):
        _nvjpeg.SizeEncoder(find_libnvjpeg(), 0)
    with pytest.raises(RuntimeError, match="cannot load /no/such/libnvjpeg.so"):
        _nvjpeg.SizeEncoder("/no/such/libnvjpeg.so", 95)


@pytest.mark.gpu
@needs_gpu
def test_nvjpeg_sizes_track_pillow_within_3_percent_and_in_rank():
    images = varied_images(24, 512, device="cuda")
    gpu = make_reward("jpeg_incompressibility", jpeg_backend="nvjpeg")(images, [""] * 24) * 1000
    cpu = pillow_sizes(images.cpu())
    relative = np.abs(gpu - cpu) / cpu
    assert relative.max() < 0.03, relative
    rank = lambda v: np.argsort(np.argsort(v))
    spearman = np.corrcoef(rank(gpu), rank(cpu))[0, 1]
    assert spearman > 0.99, spearman
    assert cpu.max() / cpu.min() > 3  # the set really is varied


@pytest.mark.gpu
@needs_gpu
def test_nvjpeg_given_libjpegs_colour_planes_tracks_pillow_within_3_percent():
    """nvjpeg_colour="libjpeg": the planes are libjpeg's exactly (test_jpeg_colour.py), so what is left
    between the sizes is nvJPEG's DCT, quantisation and coding."""
    images = varied_images(24, 512, device="cuda")
    libjpeg = make_reward("jpeg_incompressibility", jpeg_backend="nvjpeg", nvjpeg_colour="libjpeg")
    gpu = libjpeg(images, [""] * 24) * 1000
    relative = np.abs(gpu - pillow_sizes(images.cpu())) / pillow_sizes(images.cpu())
    assert relative.max() < 0.03, relative
    odd = varied_images(2, 255, seed=6, device="cuda")[..., :253]  # odd height and width: chroma planes padded
    own = make_reward("jpeg_incompressibility", jpeg_backend="nvjpeg")(odd, ["", ""])
    np.testing.assert_allclose(libjpeg(odd, ["", ""]), own, rtol=0.1)


@pytest.mark.gpu
@needs_gpu
def test_nvjpeg_file_is_a_4_2_0_jpeg_of_the_image_and_as_long_as_its_size():
    from PIL import JpegImagePlugin

    images = varied_images(2, 256, seed=5, device="cuda")
    backend = NvJpeg(95)
    file = backend.encode_file(images[1])
    assert len(file) == round(backend.sizes_kb(images[1:])[0] * 1000)
    decoded = Image.open(io.BytesIO(file))
    assert decoded.format == "JPEG" and decoded.size == (256, 256)
    assert JpegImagePlugin.get_sampling(decoded) == 2  # 4:2:0, Pillow's default
    original = to_uint8_images(images[1:].cpu())[0]
    pillows = io.BytesIO()
    Image.fromarray(original).save(pillows, format="JPEG", quality=95)

    def luma_error(image: Image.Image) -> float:
        luma = np.asarray(image.convert("YCbCr"), dtype=np.float64)[..., 0]
        return np.abs(luma - np.asarray(Image.fromarray(original).convert("YCbCr"), dtype=np.float64)[..., 0]).mean()

    # In luma: the busy image's pixel-level colour noise is lost to 4:2:0 at any quality (Pillow's own file is
    # 11.5 levels off in RGB; nvJPEG's was 11.54 on the H200), while its luma error grows with the quantisation:
    # Pillow's 1.63 at quality 95, 2.21 at 93. nvJPEG's file must be as faithful as Pillow's at 95.
    assert luma_error(decoded) < 1.05 * luma_error(Image.open(io.BytesIO(pillows.getvalue())))


@pytest.mark.gpu
@needs_gpu
def test_nvjpeg_encoder_is_reused_across_batch_sizes_and_resolutions():
    backend = NvJpeg(95)
    first = backend.sizes_kb(varied_images(8, 256, seed=1, device="cuda"))
    backend.sizes_kb(varied_images(32, 768, seed=2, device="cuda"))
    again = backend.sizes_kb(varied_images(8, 256, seed=1, device="cuda"))
    np.testing.assert_array_equal(first, again)
    assert len(backend.encoders) == 1


@pytest.mark.gpu
@needs_gpu
def test_auto_backend_uses_nvjpeg_for_cuda_images_and_pillow_for_cpu_images():
    reward = JpegSizeReward(-1.0, backend="auto")
    images = varied_images(4, 128, seed=3)
    np.testing.assert_array_equal(reward(images, [""] * 4), -pillow_sizes(images) / 1000)
    reward(images.cuda(), [""] * 4)
    assert reward.encoder_for(images.cuda()).name == "nvjpeg"


@pytest.mark.gpu
@needs_gpu
def test_nvjpeg_is_10x_pillow_single_thread_at_batch_32_768px():
    images = varied_images(32, 768, seed=4, device="cuda")
    gpu, cpu = JpegSizeReward(1.0, backend="nvjpeg"), JpegSizeReward(1.0, backend="pillow", threads=1)
    for reward in (gpu, cpu):
        reward(images, [""] * 32)  # warm-up: encoder states, thread pool
    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn(images, [""] * 32)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)
    assert best_of(cpu) / best_of(gpu) > 10


def test_libnvjpeg_is_found_in_the_wheel_layouts_or_the_override(tmp_path, monkeypatch):
    import types

    monkeypatch.delenv("RLCM_FAST_LIBNVJPEG", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "nvidia", types.SimpleNamespace(__path__=[str(tmp_path)]))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    layouts = ("cu13/lib/libnvjpeg.so.13", "nvjpeg/lib/libnvjpeg.so.12")  # nvidia-nvjpeg 13.x, nvidia-nvjpeg-cu12
    for layout in layouts:
        root = tmp_path / layout.split("/")[0]
        library = tmp_path / layout
        library.parent.mkdir(parents=True)
        library.write_bytes(b"")
        assert find_libnvjpeg() == str(library)
        library.unlink()
        library.parent.rmdir()
        root.rmdir()
    assert find_libnvjpeg() == "libnvjpeg.so"  # nothing in the wheel: the system loader's search

    # Both wheels installed: the library of torch's CUDA major wins, whichever sorts first.
    for layout in layouts:
        (tmp_path / layout).parent.mkdir(parents=True)
        (tmp_path / layout).write_bytes(b"")
    assert find_libnvjpeg() == str(tmp_path / "cu13/lib/libnvjpeg.so.13")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert find_libnvjpeg() == str(tmp_path / "nvjpeg/lib/libnvjpeg.so.12")
    for no_match in (None, "11.8"):  # a CPU torch, or no library of torch's major: the first one found
        monkeypatch.setattr(torch.version, "cuda", no_match)
        assert find_libnvjpeg() == str(tmp_path / "nvjpeg/lib/libnvjpeg.so.12")

    monkeypatch.setenv("RLCM_FAST_LIBNVJPEG", "/opt/nvjpeg/libnvjpeg.so.13")
    assert find_libnvjpeg() == "/opt/nvjpeg/libnvjpeg.so.13"
