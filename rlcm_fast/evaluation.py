"""The run's evaluation (config keys eval_every, eval_images, eval_prompts): the same images of the same prompts,
sampled from the same initial latents and noises at every evaluation, so that their mean reward follows the
policy alone, not the epochs' draws of prompts and noise. Here: which images a process samples, in which calls,
from which random stream, and the evaluation itself, through the trainer's sampling call and reward
(Trainer.sample_call, Trainer.collect_rewards); Trainer.evaluate logs it."""

from __future__ import annotations

import time

import numpy as np
import torch
from accelerate.utils import gather_object

from .config import TrainConfig
from .epoch_samples import seeded_generator

# In each image's seed: no epoch's stream (epoch_samples.epoch_generator: 4 numbers) draws the same numbers.
_EVAL_STREAM = 0x65_76_61_6C  # "eval"


def unused_evaluation_settings(cfg: TrainConfig) -> str | None:
    """What a run that does not evaluate (eval_every=0, the default) was told of its evaluations anyway: an
    eval_every left out, say."""
    if cfg.eval_every:
        return None
    given = [f"{key}={getattr(cfg, key)!r}" for key in ("eval_images", "eval_prompts")
             if getattr(cfg, key) != getattr(TrainConfig, key)]
    verb = "has" if len(given) == 1 else "have"
    return f"{' and '.join(given)} {verb} no effect with eval_every=0: set eval_every=N to evaluate" if given else None


def evaluation_settings(cfg: TrainConfig) -> str:
    """What chooses the evaluation's images, in words (each eval record's "settings"): evaluations with other
    settings sample other images, and are not compared with these (run_logging.same_settings_runs)."""
    return f"{cfg.eval_images} images of {cfg.eval_prompts or cfg.prompts}, seed {cfg.seed}"


def eval_image_generator(seed: int, image: int, device="cpu") -> torch.Generator:
    """The random stream of evaluation image `image`: its x_0 and noises, whatever the process count or call
    size that samples it."""
    return seeded_generator([seed, _EVAL_STREAM, image], device)


def process_share(images: int, processes: int, process: int) -> range:
    """The evaluation images one process samples: a contiguous share, the last ones shorter (or empty)."""
    per_process = -(-images // processes)
    return range(min(images, process * per_process), min(images, (process + 1) * per_process))


def padded_calls(share: range, call_size: int) -> list[tuple[list[int], int]]:
    """`share`'s images in sampling calls of exactly `call_size` rows, as the epochs' calls (a captured or compiled
    sampling loop is not traced again for another batch), each with its count of real images: the last call is
    filled up with repeats of the share's last image, which are sampled but not scored. An empty share: no call."""
    indices = list(share)
    calls = []
    for start in range(0, len(indices), call_size):
        real = indices[start:start + call_size]
        calls.append((real + [real[-1]] * (call_size - len(real)), len(real)))
    return calls


def evaluate_policy(trainer) -> dict[str, float]:
    """The trainer's policy samples the config's eval_images images, each process its share in calls of the
    epochs' size, decoded and scored as the epochs' are; the rewards' mean and std over every process. Draws
    nothing from the epochs' random streams and changes nothing the run trains on."""
    cfg, accelerator, sampler, started = trainer.cfg, trainer.accelerator, trainer.sampler, time.perf_counter()
    share = process_share(cfg.eval_images, accelerator.num_processes, accelerator.process_index)
    prompt_set, noise_dtype = trainer.eval_prompt_set, trainer.pipe.text_encoder.dtype
    pending = []
    trainer.unet.eval()  # as sample_epoch's sampling (train_epoch switches back)
    for images, real in padded_calls(share, cfg.sample_batch_size * cfg.sample_batches_per_call):
        generators = [eval_image_generator(cfg.seed, i, trainer.device) for i in images]
        latents = torch.cat([sampler.draw_latents(1, g, noise_dtype) for g in generators])
        noises = [torch.cat(step) for step in zip(*(sampler.draw_noises(1, g, noise_dtype) for g in generators))]
        trainer.sample_call([prompt_set[i % len(prompt_set)] for i in images], latents, noises, pending,
                            scored=real)
    rewards = trainer.collect_rewards(pending)  # every process, with images or none (it agrees on failures)
    if accelerator.num_processes > 1:
        rewards = np.concatenate(gather_object([rewards]))
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), "images": len(rewards),
            "eval_seconds": time.perf_counter() - started}
