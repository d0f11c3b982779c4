"""The UNet's batch sizes where the config says `auto`: train_rows_per_call and sample_batches_per_call.

Either size changes no trajectory and no gradient (tests/test_switches.py), only how many rows one UNet call
takes. At the paper's sizes (training calls of train_batch_size = 2 rows, sampling calls of 4 prompts) an
H200 waits on the host's kernel launches: a training call of 2 rows at 768 px kept it busy 27-38% of the
call, one of 7 rows 75-89%; a sampling call of 4 prompts 61-82%, one of 20 83-85% (profiles of the bench_train
rows straightforward and calls_of_20_and_7, benchmarks/results/nvidia-h200/d986b71 and 397294b). So on CUDA
`auto` makes calls of about as many latent pixels as those wide ones, which keep the activation memory about
the same at any resolution (sd15-lcm: 16 GiB kept for the backward of 7 training rows at 768 px, 12 with
half_precision_norms, training_memory.py; the whole run reserved 19.4 GiB), in proportion less on a GPU of
less than 24 GiB; on a CPU, busy at any width, it keeps the paper's loop.
"""

from __future__ import annotations

import dataclasses

from .config import TrainConfig

# Latent pixels per UNet call: 7 training rows and 20 sampling trajectories at 768 px (96 x 96 latents), on a
# GPU of FULL_BUDGET_GIB or more.
TRAIN_LATENT_PIXELS_PER_CALL = 7 * 96 * 96
SAMPLE_LATENT_PIXELS_PER_CALL = 20 * 96 * 96
FULL_BUDGET_GIB = 24.0
AUTO_KEYS = ("train_rows_per_call", "sample_batches_per_call")  # the config keys this module chooses


def unet_rows_per_sample(cfg: TrainConfig) -> int:
    """UNet rows per trajectory row: DDPO's classifier-free guidance doubles the batch (ddpo.DDPOSampler)."""
    return 2 if cfg.method == "ddpo" and cfg.guidance_scale > 1.0 else 1


def auto_train_rows_per_call(cfg: TrainConfig, device_type: str, latent_pixels: int, share: float = 1.0) -> int:
    """train_rows_per_call for `auto`: 0 (train_batch_size rows a call) where wider calls do not apply or
    would not be wider. `share`: of the full budget of latent pixels."""
    if device_type != "cuda" or cfg.train_rows != "flattened" or cfg.algorithm == "rebel":
        return 0
    rows = int(TRAIN_LATENT_PIXELS_PER_CALL * share) // (latent_pixels * unet_rows_per_sample(cfg))
    return rows if rows > cfg.train_batch_size else 0


def auto_sample_batches_per_call(cfg: TrainConfig, device_type: str, latent_pixels: int, share: float = 1.0) -> int:
    """sample_batches_per_call for `auto`: the most sampling batches, dividing the epoch's, whose UNet batch
    stays within `share` of SAMPLE_LATENT_PIXELS_PER_CALL (1 when even two would not)."""
    if device_type != "cuda":
        return 1
    rounds = cfg.batches_per_epoch * cfg.num_sample_iters
    pixels_per_batch = cfg.sample_batch_size * latent_pixels * unet_rows_per_sample(cfg)
    budget = SAMPLE_LATENT_PIXELS_PER_CALL * share
    return max(joined for joined in range(1, rounds + 1)
               if rounds % joined == 0 and (joined == 1 or joined * pixels_per_batch <= budget))


def resolve_call_sizes(cfg: TrainConfig, device_type: str, latent_side: int,
                       device_memory_gib: float | None = None) -> TrainConfig:
    """The config with its `auto` call sizes chosen for this device, its memory and the latent size (the
    others kept as set)."""
    pixels = latent_side * latent_side
    share = 1.0 if device_memory_gib is None else min(1.0, device_memory_gib / FULL_BUDGET_GIB)
    chosen = {}
    if cfg.train_rows_per_call == "auto":
        chosen["train_rows_per_call"] = auto_train_rows_per_call(cfg, device_type, pixels, share)
    if cfg.sample_batches_per_call == "auto":
        chosen["sample_batches_per_call"] = auto_sample_batches_per_call(cfg, device_type, pixels, share)
    return dataclasses.replace(cfg, **chosen)
