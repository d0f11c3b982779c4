"""JPEG file size as a reward (README, "Rewards"), through one of five backends.

All backends take the same N x 3 x H x W float tensor in [0, 1], round it to uint8 as
(x * 255).round().clamp(0, 255) on the tensor's own device, and return the size in kB (bytes / 1000)
at quality `quality`:

- pillow: libjpeg-turbo on the CPU, one image per pool thread; with several threads each writes into a
  memory-backed file of its own (Pillow encodes into a file descriptor without holding the GIL; into
  io.BytesIO, one thread's buffer, it holds it).
  CUDA images are rounded to uint8 on the GPU first, so only a quarter of the bytes cross to the host.
  4:2:0 chroma subsampling and standard Huffman tables (Pillow's defaults).
- nvjpeg: the package's native extension rlcm_fast._nvjpeg (csrc/nvjpeg_size.cu), pixels stay on the
  GPU and only byte counts come back. libnvjpeg is loaded at run time from the `nvidia-nvjpeg` wheel.
  Set to Pillow's settings (4:2:0, standard Huffman tables), so its sizes track the pillow backend's.
  Its files come out up to 4.4% smaller than Pillow's; `nvjpeg_colour="libjpeg"` hands it YCbCr 4:2:0
  planes computed as libjpeg computes them (jpeg_colour.py), which on the H200 left the gap (4.3%).
- torchvision: torchvision.io.encode_jpeg. CPU images: libjpeg with its defaults (jpeg_set_defaults,
  which is 4:2:0 for RGB input), like Pillow. CUDA images: torchvision's own nvJPEG encoder, which always
  encodes 4:4:4 (full-resolution chroma), so its sizes are larger than, and not comparable with, the
  pillow and nvjpeg backends' on the same images.
- exact: the byte count of Pillow's file, computed with tensor ops on the images' own device without
  writing the file (jpeg_exact.py): equal to pillow's sizes, for CUDA images without the copy to the host.
  On a CPU about 90x slower than Pillow (it warns); on the H200 2.2x Pillow's single thread at 768 px.
  `exact_engine="triton"` computes the same with Triton kernels (kernels/jpeg_size.py), which no GPU has
  run yet: checked only in Triton's interpreter on the CPU.
- auto: nvjpeg for CUDA images when it is available (else pillow), pillow for CPU images.

Different encoders give slightly different byte counts for the same pixels; compare runs only within
one backend (and, for torchvision, one device type).
"""

from __future__ import annotations

import glob
import io
import numbers
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..launch import usable_cpu_cores
from ..policy_step import triton_available
from .base import RewardError, check_reward_inputs
from .jpeg_colour import libjpeg_ycbcr420
from .jpeg_exact import jpeg_sizes, pillow_tables

JPEG_BACKENDS = ("auto", "nvjpeg", "torchvision", "pillow", "exact")
# Who converts RGB to YCbCr 4:2:0 for nvJPEG: nvJPEG itself, or jpeg_colour.py the way libjpeg does.
NVJPEG_COLOURS = ("nvjpeg", "libjpeg")


def check_nvjpeg_colour(colour: str) -> None:
    if colour not in NVJPEG_COLOURS:
        raise RewardError(f"nvjpeg_colour {colour!r} is invalid; allowed: {', '.join(NVJPEG_COLOURS)}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W floats in [0, 1] -> uint8 of the same shape and device."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise RewardError(f"JPEG rewards take images of shape N x 3 x H x W, got {tuple(images.shape)}")
    scaled = images.detach().float() * 255  # a new tensor, rounded and clamped in place: 2x quicker on a CPU
    return scaled.round_().clamp_(0, 255).to(torch.uint8)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W floats in [0, 1] -> N x H x W x 3 uint8 on the host (rounded on the images' device)."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def jpeg_size_kb(pixels: np.ndarray, quality: int, file=None) -> float:
    """Size in kB (bytes / 1000) of one H x W x 3 uint8 image saved as JPEG by Pillow (libjpeg-turbo): into
    `file` when given (a binary file with a descriptor, unbuffered; rewritten from its start, its old bytes past
    the new end left), else into an in-memory buffer."""
    if file is None:
        file = io.BytesIO()
    file.seek(0)
    Image.fromarray(pixels).save(file, format="JPEG", quality=quality)
    return file.tell() / 1000.0


class PillowJpeg:
    name = "pillow"

    def __init__(self, quality: int, threads: int = 0):
        self.quality = quality
        workers = threads or usable_cpu_cores()  # 0: one per core it may use
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # With several threads each writes into a memory-backed file of its own (Linux's memfd): Pillow then
        # encodes without holding the GIL, which into io.BytesIO it holds, so that a pool of 16 ran at most 1.2x
        # one thread in the H200 runs. On a 2-core AMD EPYC, 32 images of 768 px: 2 threads into files 31-32 ms,
        # into BytesIO 56-60 ms, one thread 56-60 ms; alone BytesIO was the quicker (62 ms against 71).
        self._files = threading.local() if workers > 1 and hasattr(os, "memfd_create") else None

    def _size_kb(self, pixels: np.ndarray) -> float:
        file, files = None, self._files  # read once: another pool thread may set it to None
        if files is not None:
            file = getattr(files, "file", None)
            if file is None:  # one per pool thread, kept while it lives
                try:
                    file = files.file = os.fdopen(os.memfd_create("rlcm-fast-jpeg"), "w+b", buffering=0)
                except OSError:  # memfd refused (a sandbox's seccomp, say): BytesIO from now on, the same sizes
                    self._files = None
        return jpeg_size_kb(pixels, self.quality, file)

    def sizes_kb(self, images: torch.Tensor) -> np.ndarray:
        pixels = to_uint8_images(images)
        return np.fromiter(self.pool.map(self._size_kb, pixels), dtype=np.float64, count=len(pixels))


class TorchvisionJpeg:
    name = "torchvision"

    def __init__(self, quality: int):
        try:
            from torchvision.io import encode_jpeg
        except ImportError as exc:
            raise RewardError(
                f"jpeg_backend 'torchvision' needs torchvision, which cannot be imported ({exc}); "
                "install it or use jpeg_backend auto, pillow or exact (or nvjpeg, for CUDA images)"
            ) from None
        self.encode_jpeg = encode_jpeg
        self.quality = quality

    def sizes_kb(self, images: torch.Tensor) -> np.ndarray:
        pixels = to_uint8(images)
        if pixels.is_cuda:
            # torchvision encodes CUDA tensors on a stream of its own that does not wait for ours: without
            # this, it could read `pixels` before the rounding kernel queued on our stream has written them.
            torch.cuda.current_stream(pixels.device).synchronize()
        encoded = self.encode_jpeg(list(pixels), quality=self.quality)
        return np.array([data.numel() / 1000.0 for data in encoded], dtype=np.float64)


# How ExactJpeg computes: tensor ops (jpeg_exact.py, any device), or Triton kernels (kernels/jpeg_size.py, CUDA
# images). The backend uses tensor ops until a GPU run has checked the kernels and timed them against these.
EXACT_ENGINES = ("tensor_ops", "triton")


def check_exact_engine(engine: str) -> None:
    if engine not in EXACT_ENGINES:
        raise RewardError(f"exact JPEG engine {engine!r} is invalid; allowed: {', '.join(EXACT_ENGINES)}")


class ExactJpeg:
    """Pillow's byte counts, computed on the images' device (jpeg_exact.py)."""

    name = "exact"

    def __init__(self, quality: int, engine: str = "tensor_ops"):
        check_exact_engine(engine)
        if engine == "triton" and not triton_available():
            raise RewardError("the exact JPEG engine 'triton' needs triton, which is not installed")
        self.engine = engine
        from PIL import features

        # The tables come from Pillow's file, but the DCT and quantisation are libjpeg-turbo's: with another
        # libjpeg under Pillow (IJG's 9, mozjpeg) the sizes would differ from Pillow's without a word.
        if not features.check_feature("libjpeg_turbo"):
            raise RewardError("jpeg_backend 'exact' computes libjpeg-turbo's sizes, and this Pillow is not built "
                              "with libjpeg-turbo; use jpeg_backend pillow")
        self.quality = quality
        self.warned_cpu = False
        pillow_tables(quality)  # the tables from Pillow's file: once, at construction

    def sizes_kb(self, images: torch.Tensor) -> np.ndarray:
        if images.device.type == "cpu" and self.engine == "tensor_ops" and not self.warned_cpu:
            self.warned_cpu = True
            warnings.warn("jpeg_backend 'exact' on CPU images gives Pillow's sizes about 90x slower than Pillow; "
                          "jpeg_backend pillow (or auto) gives the same sizes for CPU images")
        pixels = to_uint8(images)
        if self.engine == "triton":
            from ..kernels.jpeg_size import triton_jpeg_sizes

            try:
                return triton_jpeg_sizes(pixels, self.quality).cpu().numpy() / 1000.0
            except ValueError as exc:  # CPU images outside Triton's interpreter
                raise RewardError(str(exc)) from None
        return jpeg_sizes(pixels, self.quality).cpu().numpy() / 1000.0


def libnvjpeg_major(path: str) -> int | None:
    """The major version in a libnvjpeg file name ("libnvjpeg.so.13" -> 13), None when there is none."""
    suffix = Path(path).name.partition(".so.")[2]
    major = suffix.split(".")[0]
    return int(major) if major.isdigit() else None


def find_libnvjpeg() -> str:
    """Path of libnvjpeg: $RLCM_FAST_LIBNVJPEG, else the nvidia-nvjpeg wheel (cu13 or cu12 layout), else the
    bare soname for the system loader.

    With several wheels installed (say nvidia-nvjpeg-cu12 beside nvidia-nvjpeg 13.x), the library of
    torch's CUDA major version wins: the driver is known to serve that major, while another major's
    library may need a newer driver."""
    override = os.environ.get("RLCM_FAST_LIBNVJPEG")
    if override:
        return override
    try:
        import nvidia  # the namespace package of NVIDIA's pip wheels
    except ImportError:
        return "libnvjpeg.so"
    # nvidia-nvjpeg 13.x: nvidia/cu13/lib; nvidia-nvjpeg-cu12: nvidia/nvjpeg/lib
    found = [path for root in getattr(nvidia, "__path__", [])
             for path in sorted(glob.glob(str(Path(root, "*", "lib", "libnvjpeg.so.*"))), reverse=True)]
    torch_cuda_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    # No library of torch's major (or a CPU torch): the first one found.
    return next((path for path in found if libnvjpeg_major(path) == torch_cuda_major),
                found[0] if found else "libnvjpeg.so")


def nvjpeg_unavailable_reason() -> str | None:
    """None when the nvjpeg backend can run here, else why not (one phrase)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from .. import _nvjpeg  # noqa: F401
    except ImportError:
        return "the extension rlcm_fast._nvjpeg was not built (no CUDA compiler or nvjpeg.h at install time)"
    return None


class NvJpeg:
    """Batched nvJPEG encoding on the images' GPU; one native encoder (handle, states) per device, reused."""

    name = "nvjpeg"

    def __init__(self, quality: int, colour: str = "nvjpeg"):
        check_nvjpeg_colour(colour)
        reason = nvjpeg_unavailable_reason()
        if reason:
            raise RewardError(f"jpeg_backend 'nvjpeg' cannot run: {reason}; "
                              "use jpeg_backend auto, pillow or exact (or torchvision, where it is installed)")
        self.quality, self.colour = quality, colour
        self.library = find_libnvjpeg()
        self.encoders: dict[int, object] = {}
        self.lock = threading.Lock()

    def _encoder(self, device: torch.device):
        from .. import _nvjpeg

        index = device.index if device.index is not None else torch.cuda.current_device()
        with self.lock:
            if index not in self.encoders:
                with torch.cuda.device(index):
                    try:
                        self.encoders[index] = _nvjpeg.SizeEncoder(self.library, self.quality)
                    except RuntimeError as exc:
                        raise RewardError(f"jpeg_backend 'nvjpeg' failed to start ({self.library}): {exc}") from None
            return self.encoders[index]

    def sizes_kb(self, images: torch.Tensor) -> np.ndarray:
        if images.device.type != "cuda":
            raise RewardError(f"jpeg_backend 'nvjpeg' needs CUDA images, got images on {images.device}")
        pixels = to_uint8(images).contiguous()  # planar RGB: nvJPEG reads each channel plane in place
        encoder = self._encoder(images.device)
        count, _, height, width = pixels.shape
        with torch.cuda.device(images.device):
            stream = torch.cuda.current_stream().cuda_stream
            if self.colour == "libjpeg":  # the planes are made on this stream, which nvJPEG reads on
                y, cb, cr = libjpeg_ycbcr420(pixels)
                sizes = encoder.encode_sizes_ycbcr420(y.data_ptr(), cb.data_ptr(), cr.data_ptr(), count, height,
                                                      width, stream)
            else:
                sizes = encoder.encode_sizes(pixels.data_ptr(), count, height, width, stream)
        return np.asarray(sizes, dtype=np.float64) / 1000.0

    def encode_file(self, image: torch.Tensor) -> bytes:
        """The JPEG file nvJPEG makes of one CUDA image (3, H, W) in [0, 1], from RGB (nvJPEG's own colour
        conversion, whatever `colour` says): to compare its tables and decoded pixels with Pillow's (the
        reward itself only ever reads sizes)."""
        if image.device.type != "cuda" or image.ndim != 3:
            raise RewardError(f"encode_file needs one CUDA image (3, H, W), got {tuple(image.shape)} on {image.device}")
        pixels = to_uint8(image[None]).contiguous()
        encoder = self._encoder(image.device)
        with torch.cuda.device(image.device):
            return encoder.encode_file(pixels.data_ptr(), *pixels.shape[2:], torch.cuda.current_stream().cuda_stream)


class JpegSizeReward:
    """sign * JPEG size in kB: +1 incompressibility, -1 compressibility."""

    def __init__(self, sign: float, quality: int = 95, threads: int = 0, backend: str = "auto",
                 nvjpeg_colour: str = "nvjpeg", exact_engine: str = "tensor_ops"):
        if backend not in JPEG_BACKENDS:
            raise RewardError(f"jpeg_backend {backend!r} is invalid; allowed: {', '.join(JPEG_BACKENDS)}")
        # As config_checks checks them: a reward made in code failed only at its first call (Pillow, the pool).
        if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
            raise RewardError(f"jpeg quality {quality!r} is invalid: it must be an int in 1..100")
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 0:
            raise RewardError(f"reward threads {threads!r} is invalid: it must be an int >= 0 (0: one per core)")
        check_nvjpeg_colour(nvjpeg_colour)
        check_exact_engine(exact_engine)
        self.sign, self.quality, self.threads, self.backend = sign, int(quality), int(threads), backend
        self.nvjpeg_colour = nvjpeg_colour
        self._pillow = None
        self._gpu = None
        if backend == "nvjpeg":
            self._gpu = NvJpeg(self.quality, nvjpeg_colour)
        elif backend == "torchvision":
            self._gpu = TorchvisionJpeg(self.quality)
        elif backend == "exact":
            self._gpu = ExactJpeg(self.quality, exact_engine)

    def pillow(self) -> PillowJpeg:
        if self._pillow is None:
            self._pillow = PillowJpeg(self.quality, self.threads)
        return self._pillow

    def encoder_for(self, images: torch.Tensor):
        if self.backend in ("nvjpeg", "torchvision", "exact"):
            return self._gpu
        if self.backend == "auto" and images.device.type == "cuda":
            if self._gpu is None:
                self._gpu = self._auto_cuda_encoder(images.device)
            return self._gpu
        return self.pillow()

    def _auto_cuda_encoder(self, device: torch.device):
        """nvJPEG if it starts on `device`, else Pillow with a warning. Starting it is the real test: the
        extension can be built (the build always finds nvjpeg.h) where libnvjpeg is missing or too new
        for the driver."""
        reason = nvjpeg_unavailable_reason()
        if reason is None:
            encoder = NvJpeg(self.quality, self.nvjpeg_colour)
            try:
                encoder._encoder(device)
                return encoder
            except RewardError as exc:
                reason = str(exc)
        warnings.warn(f"jpeg_backend auto: nvJPEG unavailable ({reason}); CUDA images go to Pillow")
        return self.pillow()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        check_reward_inputs(images, prompts)
        rewards = self.sign * self.encoder_for(images).sizes_kb(images)
        # A NaN pixel would become 0 in uint8 and score as black: the image's reward is NaN instead, which the
        # trainer reports as the reward's non-finite value (as the CLIP rewards' NaN is).
        broken = (~torch.isfinite(images.detach())).flatten(1).any(1).cpu().numpy()
        rewards[broken] = np.nan
        return rewards
