"""The presets a config is built from (config.py, in order): the paper's task presets, the DDPO
baseline's defaults, and the tiny models' CPU-scale settings, with the names of the methods, algorithms and
advantage estimators a config may choose (config_checks.py checks every value; it and rewards/jpeg.py
list the other options' values). Data only, importing nothing heavy, so that `rlcm-fast --help` starts in
well under a second."""

from __future__ import annotations

from typing import Any

# Names a config may choose, implemented where each comment says.
METHODS = ("rlcm", "ddpo")  # sampler.py: an LCM with consistency sampling | ddpo.py: Stable Diffusion with DDIM
ALGORITHMS = ("ppo", "rebel")  # algorithms.py
ADVANTAGE_ESTIMATORS = ("per_prompt", "group")  # stat_tracker.py | algorithms.py

# The paper's LoRA targets: the attention projections.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The tiny model's calibration run moved the reward with the convolutions adapted too (README, "The tiny model").
TINY_LORA_TARGETS = DEFAULT_LORA_TARGETS + ("conv1", "conv2", "conv_out", "proj_in", "proj_out")

# The paper's Table 1 (per GPU); keys not named keep TrainConfig's defaults.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "compressibility": dict(reward="jpeg_compressibility", prompts="imagenet_animals"),
    "incompressibility": dict(reward="jpeg_incompressibility", prompts="imagenet_animals"),
    "aesthetic": dict(
        reward="aesthetic", prompts="simple_animals", gradient_accumulation_steps=4,
        sample_batch_size=8, stat_buffer_size=32, lora_rank=8, lora_alpha=8.0,
    ),
    "alignment": dict(
        reward="alignment", prompts="alignment", batches_per_epoch=6, gradient_accumulation_steps=20,
        epochs=118, horizon=16, num_sample_iters=5, sample_batch_size=8, stat_buffer_size=32,
    ),
}

# The tiny random model at CPU scale: calibrated so that `rlcm-fast train` visibly learns in minutes on
# 2 cores (README, "The tiny model": sample prediction, wider LoRA targets, larger lr and clip range).
TINY_MODEL_PRESET: dict[str, Any] = dict(
    resolution=32, horizon=4, lora_rank=8, lora_alpha=8.0, lora_targets=list(TINY_LORA_TARGETS),
    epochs=30, batches_per_epoch=2, sample_batch_size=16, train_batch_size=16,
    gradient_accumulation_steps=1, learning_rate=3e-3, clip_range=1e-2, stat_buffer_size=32,
    stat_min_count=8, prompts="simple_animals",
)

# The DDPO baseline's defaults (README, "The DDPO baseline"; ddpo-pytorch's config/base.py: sample/train batch 1,
# 2 sampling batches per epoch, LoRA rank 4 on the attention projections, 512 px, 50 DDIM steps, CFG 5).
DDPO_METHOD_PRESET: dict[str, Any] = dict(
    learning_rate=3e-4, clip_range=1e-4, adv_clip_max=5.0, max_grad_norm=1.0, guidance_scale=5.0, horizon=50,
    eta=1.0, step_fraction=1.0, sample_batch_size=1, batches_per_epoch=2, train_batch_size=1,
    gradient_accumulation_steps=1, lora_rank=4, lora_alpha=4.0, resolution=512,
)

# The tiny SD model at CPU scale, for DDPO: the tiny preset with 10 DDIM steps instead of 50 (so a CPU run
# and a test take seconds per epoch); CFG stays 5. The same 32 samples per epoch, but taken as one
# on-policy update: with two updates per epoch (the second one PPO-clipped, off-policy) JPEG
# incompressibility drifted down on tiny-sd at every lr tried (1e-3 to 1e-2), with one it rises (README).
TINY_SD_MODEL_PRESET: dict[str, Any] = {**TINY_MODEL_PRESET, "horizon": 10, "guidance_scale": 5.0,
                                        "sample_batch_size": 32, "batches_per_epoch": 1, "train_batch_size": 32}
