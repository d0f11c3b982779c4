"""Benchmark of the rewards: JPEG size through each backend, and the aesthetic scorer's throughput.

JPEG rows: images of 512 and 768 px, batches of 8 and 32, natural-looking (smooth gradients, soft blobs,
texture of increasing strength). Each row times one full reward call, from float images on the
training device to one float per image: for CUDA images the Pillow rows include the rounding on the
GPU and the device-to-host copy, the nvJPEG row copies nothing but byte counts. Backends: nvjpeg,
torchvision (if importable), pillow with 1 thread and with one thread per core this process may run on,
and on a GPU exact (Pillow's byte counts computed there: its mean size equals pillow's), once with tensor ops and
once with the Triton kernels (rows with "engine": tensor_ops or triton).

Aesthetic rows: the aesthetic reward (preprocessing, CLIP ViT-L/14 image tower, LAION head) on 768 px
images. Real weights cannot be downloaded on these machines, so the tower is ViT-L/14's exact
architecture with random weights (same FLOPs; the score values are meaningless, the speed is not).

Each JPEG row records its chroma subsampling: 4:2:0 for pillow, nvjpeg and torchvision on CPU images,
4:4:4 for torchvision on CUDA images (torchvision's nvJPEG encoder fixes it), whose sizes are therefore
larger and not comparable with the others'.

With nvJPEG, `nvjpeg_vs_pillow` compares the two encoders' per-image sizes on the same images (largest
relative difference, Spearman rank correlation), and says why they differ: whether nvJPEG's files carry
Pillow's quantization tables and chroma sampling, and each file's PSNR against the original pixels.
Both `nvjpeg_colour` settings are compared: nvJPEG converting the RGB itself, and nvJPEG given planes
made as libjpeg makes them.

Rows that cannot run here (no GPU, no torchvision) or that fail (a backend that cannot start or
encode, the agreement check) are listed under "skipped" with a one-line reason; the others still run.
Writes benchmarks/results/bench_rewards-<device>.json (or DIR/bench_rewards.json with --out-dir DIR),
again after every row with "complete": false, so a run cut short keeps what it measured.
Usage: python benchmarks/bench_rewards.py [--quick] [--sizes 512,768] [--batches 8,32] [--no-aesthetic] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import description, int_list, output_folder  # noqa: E402

SIZES = (512, 768)
BATCHES = (8, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    # At least 8 px: the test images' coarse texture is drawn at an eighth of their size.
    parser.add_argument("--sizes", type=int_list(8), default=SIZES,
                        help="JPEG image sizes, comma-separated (default 512,768)")
    parser.add_argument("--batches", type=int_list(), default=BATCHES,
                        help="JPEG batch sizes, comma-separated (default 8,32)")
    parser.add_argument("--no-aesthetic", action="store_true", help="skip the aesthetic scorer's rows")
    parser.add_argument("--out-dir", type=output_folder, default=None,
                        help="write DIR/bench_rewards.json instead of benchmarks/results/")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load torch (seconds)
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, JpegImagePlugin  # noqa: E402

from common import environment, write_result  # noqa: E402
from rlcm_fast.faults import one_line  # noqa: E402
from rlcm_fast.launch import usable_cpu_cores  # noqa: E402
from rlcm_fast.rewards import JpegSizeReward, RewardError, to_uint8_images  # noqa: E402
from rlcm_fast.rewards.jpeg import EXACT_ENGINES, NVJPEG_COLOURS, nvjpeg_unavailable_reason  # noqa: E402


def natural_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        busy = i / max(n - 1, 1)
        image = torch.stack([xs, ys, 1 - xs * ys]) * torch.rand(3, 1, 1, generator=g)
        for _ in range(4):
            cx, cy, r = torch.rand(3, generator=g)
            image = image + torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (0.02 + 0.1 * r)) * (
                torch.rand(3, 1, 1, generator=g) - 0.5)
        coarse = torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g),
                                                 size=(size, size), mode="bilinear", align_corners=False)[0]
        image = image + 0.3 * busy * coarse + 0.06 * busy**2 * torch.rand(3, size, size, generator=g)
        out.append(image.clamp(0, 1))
    return torch.stack(out)


def time_call(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up: thread pools, encoder states, lazy model moves
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def chroma_subsampling(backend: str, device: torch.device) -> str:
    return "4:4:4" if backend == "torchvision" and device.type == "cuda" else "4:2:0"


def jpeg_rows(device: torch.device, repeats: int, skipped: list, sizes=SIZES, batches=BATCHES,
              rows: list | None = None, on_row=lambda: None) -> list[dict]:
    """Appends one row per (size, batch, backend) to `rows` and calls `on_row` after each; a backend that
    fails (to start, to encode) is recorded in `skipped` and the other rows still run."""
    rows = [] if rows is None else rows
    threads_all = usable_cpu_cores()  # the cores this process may run on (its affinity), as reward_threads 0
    backends = [("pillow", 1, None), ("pillow", threads_all, None)]
    try:
        import torchvision.io  # noqa: F401

        backends.append(("torchvision", 0, None))
    except ImportError as exc:
        skipped.append({"row": "jpeg torchvision", "reason": f"torchvision cannot be imported ({exc})"})
    reason = nvjpeg_unavailable_reason()
    if reason is None:
        backends.append(("nvjpeg", 0, None))
    else:
        skipped.append({"row": "jpeg nvjpeg", "reason": reason})
    if device.type == "cuda":  # Pillow's sizes computed on the GPU (on a CPU about 90x slower than Pillow), by
        # tensor ops and by the Triton kernels
        backends += [("exact", 0, engine) for engine in EXACT_ENGINES]
    # One reward per backend for all rows: the encoders (nvJPEG states, thread pools) are meant to be reused.
    rewards = {}
    for backend, threads, engine in backends:
        name = backend if engine is None else f"{backend}/{engine}"
        try:
            engine_arg = {} if engine is None else {"exact_engine": engine}
            rewards[backend, threads, engine] = JpegSizeReward(1.0, 95, threads, backend, **engine_arg)
        except RewardError as exc:
            skipped.append({"row": f"jpeg {name}", "reason": one_line(exc, limit=300)})
    for size in sizes:
        for batch in batches:
            images = natural_images(batch, size).to(device)
            for (backend, threads, engine), reward in rewards.items():
                chroma = chroma_subsampling(backend, device)
                name = backend if engine is None else f"{backend}/{engine}"
                label = f"jpeg {name:16s} threads={threads or '-':>2} {size}px batch {batch:2d}"
                try:
                    kb = reward(images, [""] * batch)
                    times = time_call(lambda: reward(images, [""] * batch), device, repeats)
                except Exception as exc:  # one backend's failure must not cost the other rows
                    skipped.append({"row": f"jpeg {name} threads={threads or '-'} {size}px batch {batch}",
                                    "reason": one_line(exc, limit=300)})
                    print(f"{label}: failed ({one_line(exc, limit=300)})", flush=True)
                    continue
                median = statistics.median(times)
                rows.append({
                    "backend": backend, "threads": threads or None, "resolution": size, "batch": batch,
                    "images_on": str(device), "chroma_subsampling": chroma, "median_s": median,
                    "min_s": min(times), "repeats": repeats, "images_per_s": batch / median,
                    "mean_size_kb": float(kb.mean()), **({} if engine is None else {"engine": engine}),
                })
                note = "  (4:4:4: sizes not comparable with pillow/nvjpeg)" if chroma == "4:4:4" else ""
                print(f"{label}: {median * 1e3:8.1f} ms  {batch / median:8.1f} img/s  mean {kb.mean():.1f} kB{note}",
                      flush=True)
                on_row()
    return rows


def jpeg_file_facts(file: bytes, original: np.ndarray) -> dict:
    """What a JPEG file's encoder chose (quantization tables, chroma sampling) and its fidelity: PSNR of
    the decoded pixels against the original uint8 pixels."""
    decoded = Image.open(io.BytesIO(file))
    error = np.asarray(decoded.convert("RGB"), dtype=np.float64) - original
    return {"tables": {k: list(v) for k, v in decoded.quantization.items()},
            "sampling": JpegImagePlugin.get_sampling(decoded),
            "psnr_db": float(10 * np.log10(255.0**2 / max((error**2).mean(), 1e-12)))}


def encoder_comparison(nvjpeg, images: torch.Tensor) -> dict:
    """Why sizes differ: nvJPEG's and Pillow's files of the same images compared for their quantization
    tables, chroma sampling and PSNR (a smaller file at a lower PSNR quantised harder)."""
    same_tables, same_sampling, psnr = True, True, {"nvjpeg": [], "pillow": []}
    for image, pixels in zip(images, to_uint8_images(images.cpu())):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        theirs, ours = (jpeg_file_facts(f, pixels.astype(np.float64))
                        for f in (buffer.getvalue(), nvjpeg.encode_file(image)))
        same_tables &= theirs["tables"] == ours["tables"]
        same_sampling &= theirs["sampling"] == ours["sampling"]
        psnr["pillow"].append(theirs["psnr_db"])
        psnr["nvjpeg"].append(ours["psnr_db"])
    return {"same_quantization_tables": same_tables, "same_chroma_sampling": same_sampling,
            "psnr_db_nvjpeg": psnr["nvjpeg"], "psnr_db_pillow": psnr["pillow"]}


def nvjpeg_agreement(device: torch.device, sizes, batches, skipped: list, rows: list | None = None,
                     on_row=lambda: None) -> list[dict]:
    """Per-image JPEG sizes from nvJPEG against Pillow's on the same natural-looking images: the largest
    relative difference and the rank correlation (Spearman, no ties expected) over each set. A failure is
    recorded in `skipped`."""
    rows = [] if rows is None else rows
    batch = max(batches)
    if batch < 2:  # one image per set: no rank correlation (numpy's would be NaN)
        skipped.append({"row": "nvjpeg_vs_pillow",
                        "reason": f"a rank correlation needs at least 2 images per set; the largest of --batches is "
                                  f"{batch}"})
        return rows
    try:
        pillow = JpegSizeReward(1.0, 95, 0, "pillow")
        for colour, size in itertools.product(NVJPEG_COLOURS, sizes):
            nvjpeg = JpegSizeReward(1.0, 95, 0, "nvjpeg", nvjpeg_colour=colour)
            images = natural_images(batch, size, seed=1).to(device)
            gpu, cpu = nvjpeg(images, [""] * batch), pillow(images, [""] * batch)  # kB per image (numpy)
            ranks = [v.argsort().argsort() for v in (gpu, cpu)]
            rows.append({
                "nvjpeg_colour": colour,
                "resolution": size, "images": batch, "mean_size_kb_nvjpeg": float(gpu.mean()),
                "mean_size_kb_pillow": float(cpu.mean()),
                "max_relative_difference": float((abs(gpu - cpu) / cpu).max()),
                "spearman": float(np.corrcoef(*ranks)[0, 1]),
                "relative_difference": ((gpu - cpu) / cpu).tolist(),  # per image, smoothest first
                # encode_file is RGB in (nvJPEG's colour conversion) only
                **(encoder_comparison(nvjpeg.encoder_for(images), images) if colour == "nvjpeg" else {}),
            })
            print(f"nvjpeg ({colour} colour) vs pillow {size}px x{batch}: max relative difference "
                  f"{rows[-1]['max_relative_difference']:.2%}, Spearman {rows[-1]['spearman']:.4f}", flush=True)
            on_row()
    except Exception as exc:  # the speed rows already measured stay valid
        skipped.append({"row": "nvjpeg_vs_pillow", "reason": one_line(exc, limit=300)})
        print(f"nvjpeg vs pillow: failed ({one_line(exc, limit=300)})", flush=True)
    return rows


def vit_l14_folder(folder: Path) -> Path:
    """openai/clip-vit-large-patch14's image tower architecture with random weights, saved as a CLIPModel
    would be (so the reward loads it through its normal path)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def aesthetic_rows(device: torch.device, batches: tuple[int, ...], repeats: int, rows: list | None = None,
                   on_row=lambda: None) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from rlcm_fast.rewards import AestheticReward

    rows = [] if rows is None else rows
    with tempfile.TemporaryDirectory() as tmp:
        reward = AestheticReward(str(vit_l14_folder(Path(tmp))))
        with FlopCounterMode(display=False) as counter:
            reward(natural_images(1, 224).to(device), [""])
        flops_per_image = counter.get_total_flops()
        for batch in batches:
            images = natural_images(batch, 768).to(device)
            times = time_call(lambda: reward(images, [""] * batch), device, repeats)
            median = statistics.median(times)
            rows.append({
                "model": "CLIP ViT-L/14 image tower (random weights) + LAION head", "resolution": 768,
                "batch": batch, "images_on": str(device), "tower_dtype": str(reward.tower_dtype).replace("torch.", ""),
                "median_s": median, "min_s": min(times), "repeats": repeats, "images_per_s": batch / median,
                "flops_per_image": flops_per_image, "achieved_tflops": flops_per_image * batch / median / 1e12,
            })
            print(f"aesthetic batch {batch:2d}: {median:8.3f} s  {batch / median:8.2f} img/s  "
                  f"({flops_per_image / 1e9:.1f} GFLOP/image)", flush=True)
            on_row()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes, batches = args.sizes, args.batches
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    repeats = 2 if args.quick else 5
    skipped: list[dict] = []
    if not cuda:
        skipped.append({"row": "jpeg on CUDA images (nvjpeg, torchvision-cuda, pillow incl. device-to-host copy)",
                        "reason": "CUDA is not available: every row runs on CPU images"})
    result = {
        "benchmark": "bench_rewards",
        **environment(),
        "cuda": torch.version.cuda,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Other work on the machine skews CPU figures; the load average says how much there was.
        "load_average_at_start": os.getloadavg(),
        "jpeg_quality": 95,
        "jpeg": [],
        "skipped": skipped,
    }

    def save_partial():  # after every row: a run killed by a time limit keeps what it measured
        write_result("bench_rewards", result, args.out_dir, complete=False)

    jpeg_rows(device, repeats, skipped, sizes, batches, rows=result["jpeg"], on_row=save_partial)
    if cuda and nvjpeg_unavailable_reason() is None:
        result["nvjpeg_vs_pillow"] = []
        nvjpeg_agreement(device, sizes, batches, skipped, rows=result["nvjpeg_vs_pillow"], on_row=save_partial)
    # On a CPU a ViT-L/14 forward takes seconds per image: batch 8 only, fewer repeats.
    result["aesthetic"] = []
    if args.no_aesthetic:
        skipped.append({"row": "aesthetic", "reason": "--no-aesthetic"})
    else:
        if not cuda:
            skipped.append({"row": "aesthetic batch 32", "reason": "CPU run: batch 8 only"})
        aesthetic_rows(device, BATCHES if cuda else (8,), repeats if cuda else 2, rows=result["aesthetic"],
                       on_row=save_partial)
    result["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result('bench_rewards', result, args.out_dir, complete=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
