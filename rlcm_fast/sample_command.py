"""`rlcm-fast sample`: images from an LCM (or, with --algo ddpo, a Stable Diffusion model), optionally with a
LoRA trained by `rlcm-fast train`, written as PNGs named by prompt and index."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

# cli.main dispatches here; the shared library-bar switch and warning
from .cli import library_bars_hidden_off_terminal, warn_skipped
from .config import resolve_config
from .config_checks import MAX_GUIDANCE_SCALE
from .path_checks import UsageError, check_name_lengths
from .presets import METHODS

# `sample` writes a PNG per image: 1e8 images per prompt ran out of memory listing their paths.
MAX_IMAGES_PER_PROMPT = 10_000
MAX_IMAGES_PER_CALL = 100_000  # over all prompts (a --prompts set of 398 at 10000 each: 4 million paths)


def _check_sample_args(args: argparse.Namespace) -> None:
    """`sample`'s own options, checked before anything is loaded; the model's limits are checked after."""
    import torch

    if args.algo is not None and args.algo not in METHODS:
        raise UsageError(f"--algo {args.algo!r} is invalid; allowed: {', '.join(METHODS)}")
    if not 1 <= args.num_images <= MAX_IMAGES_PER_PROMPT:
        raise UsageError(f"--num-images {args.num_images} is invalid: it must be in 1..{MAX_IMAGES_PER_PROMPT} "
                         "(images per prompt)")
    if not 1 <= args.batch_size <= MAX_IMAGES_PER_PROMPT:
        raise UsageError(f"--batch-size {args.batch_size} is invalid: it must be in 1..{MAX_IMAGES_PER_PROMPT} "
                         "(images per pipeline call)")
    if not args.prompt:
        raise UsageError("no prompt: give --prompt TEXT (repeated for several) or --prompts SET")
    if len(args.prompt) * args.num_images > MAX_IMAGES_PER_CALL:
        raise UsageError(f"--num-images {args.num_images} for {len(args.prompt)} prompts is "
                         f"{len(args.prompt) * args.num_images} images; a call writes at most {MAX_IMAGES_PER_CALL}")
    if args.horizon is not None and args.horizon < 1:
        raise UsageError(f"--horizon {args.horizon} is invalid: it must be >= 1")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution {args.resolution} is invalid: it must be a multiple of 8, at least 8")
    if args.guidance_scale is not None and not (
            math.isfinite(args.guidance_scale) and 1.0 <= args.guidance_scale <= MAX_GUIDANCE_SCALE):
        raise UsageError(f"--guidance-scale {args.guidance_scale} is invalid: it must be in [1, {MAX_GUIDANCE_SCALE:g}] "
                         "(w = guidance_scale - 1)")
    if args.reward is not None:  # its grammar before anything is loaded (the reward itself is built before the model)
        from .rewards import RewardError, check_reward_name

        try:
            check_reward_name(args.reward)
        except RewardError as exc:
            raise UsageError(f"--reward: {exc}") from None
    if not 0 <= args.seed < 2**63:  # torch's seed range, as train's
        raise UsageError(f"--seed {args.seed} is invalid: it must be in 0..2**63-1")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {args.device!r} is invalid; allowed: auto, cpu, cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    out = Path(args.output_dir)
    check_name_lengths(out, "--output-dir")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {args.output_dir!r} is invalid: it is an existing file, not a folder")
    # The names are fixed by prompt and index, so an earlier call's images would be replaced without a word.
    taken = [path for path in _sample_paths(out, args.prompt, args.num_images) if path.exists()]
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise UsageError(f"--output-dir {args.output_dir!r} already holds {taken[0].name}{more}, which this call "
                         f"would overwrite; pick another --output-dir or remove {'them' if more else 'it'}")


def _prompt_text(prompt: str) -> str:
    """A prompt from the command line as text: bytes the locale could not decode (LC_ALL=C) are read as UTF-8,
    and bytes that are not UTF-8 either are refused in one line (the tokenizer would raise a TypeError)."""
    try:
        prompt.encode("utf-8")
        return prompt  # decoded by the locale already (a Latin-1 terminal's é is 0xE9, not UTF-8)
    except UnicodeEncodeError:
        pass
    raw = os.fsencode(prompt)  # the bytes the locale could only escape
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "backslashreplace")
        raise UsageError(f"--prompt '{shown}' is not UTF-8 text: give the prompt in UTF-8") from None


def _sample_paths(out: Path, prompts: list[str], num_images: int) -> list[Path]:
    """Where `sample` writes its images: PP-<prompt slug>-II.png, prompt by prompt (numbers of at least two digits,
    as many as the largest needs, so that the names sort in order)."""
    paths, width, image_width = [], max(2, len(str(len(prompts) - 1))), max(2, len(str(num_images - 1)))
    for p, prompt in enumerate(prompts):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-") or "prompt"
        paths += [out / f"{p:0{width}d}-{slug}-{i:0{image_width}d}.png" for i in range(num_images)]
    return paths


def run_sample(args: argparse.Namespace) -> int:
    args.prompt = [_prompt_text(prompt) for prompt in args.prompt]
    if args.prompts is not None:
        from .prompts import load_prompt_set

        try:
            args.prompt += load_prompt_set(args.prompts, key="--prompts")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    _check_sample_args(args)  # before any model is loaded
    with library_bars_hidden_off_terminal():
        return _load_and_sample(args)


def _load_and_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from safetensors import SafetensorError

    from .checkpoint import LORA_FILE, CheckpointError, resolve_checkpoint, saved_config
    from .faults import ModelLoadError
    from .lora import load_policy_lora
    from .models import ignored_guidance, load_pipeline, slow_on_a_cpu
    from .rewards import checked_rewards

    # A run folder: say which newer checkpoints were passed over (damaged ones), and which one is sampled, as
    # train --resume does, rather than sample an older policy without a word.
    passed_over: list[str] = []

    def warn_and_count(reason: str) -> None:
        passed_over.append(reason)
        warn_skipped(reason)

    checkpoint = resolve_checkpoint(args.lora, what="--lora", warn=warn_and_count) if args.lora else None
    if passed_over:
        print(f"rlcm-fast: sampling {checkpoint.name} of {str(checkpoint.parent)!r}", file=sys.stderr)
    saved = saved_config(checkpoint) if checkpoint else {}
    method = saved.get("method", "rlcm") if checkpoint else (args.algo or "rlcm")
    if checkpoint and args.algo is not None and args.algo != method:
        raise UsageError(f"--algo {args.algo} does not fit --lora {str(checkpoint)!r}: its run trained with "
                         f"--algo {method}; leave --algo out to sample as the run did")
    # The steps and guidance `train` starts from for this model and method (the tiny presets', DDPO's 50 DDIM
    # steps at CFG 5, ...), which a run's own replace.
    untrained = resolve_config(model=saved.get("model", args.model), overrides={"method": method})
    # Before the model: a user reward that cannot be imported, or a scorer that cannot load, fails first.
    reward = _sample_reward(args.reward, {**untrained.to_dict(), **saved}) if args.reward else None
    run = {"horizon": untrained.horizon, "guidance_scale": untrained.guidance_scale, **saved}
    run_model = saved.get("model", untrained.model)
    model = args.model or run_model
    # Named in errors where another --model than the run's cannot take the LoRA.
    other_model = f" (its {method} run trained model {run_model!r})" if checkpoint and model != run_model else ""
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        pipe = load_pipeline(model, device, dtype, lcm_lora=run.get("lcm_lora"), method=method)
    except ModelLoadError as exc:
        if not other_model:
            raise
        raise ModelLoadError(f"--model {model!r} cannot take --lora {str(checkpoint)!r}{other_model}: {exc}") from None
    extra = {"eta": run.get("eta", 1.0)} if method == "ddpo" else {}  # DDPO's policy samples DDIM with its eta
    horizon = args.horizon if args.horizon is not None else run["horizon"]
    # The scheduler's step limit: an LCM's timesteps are drawn from its original_inference_steps (diffusers'
    # pipeline passes strength 1), DDIM's from num_train_timesteps, shifted by its steps_offset.
    if method == "rlcm":  # the timesteps the run trained on: its original_inference_steps, not the scheduler's
        whose = "the run's" if "original_inference_steps" in run else "the scheduler's"
        original_steps = run.get("original_inference_steps", pipe.scheduler.config.original_inference_steps)
        train_steps = pipe.scheduler.config.num_train_timesteps
        if original_steps > train_steps:  # diffusers' LCMScheduler refuses it too, in a traceback
            raise UsageError(f"model {model!r} cannot sample {whose} original_inference_steps={original_steps}: its "
                             f"scheduler has num_train_timesteps={train_steps}")
        extra["original_inference_steps"] = original_steps
        problem = f"it must be in 1..{original_steps} (original_inference_steps)" if horizon > original_steps else None
    else:
        from .ddpo import ddim_horizon_problem

        problem = ddim_horizon_problem(pipe.scheduler.config, horizon)
    if problem:
        source = "the run's" if checkpoint else "the default"
        name = f"--horizon {horizon}" if args.horizon is not None else f"horizon={horizon} ({source}; set --horizon)"
        raise UsageError(f"{name} is invalid: {problem}")
    if checkpoint:
        if not (checkpoint / LORA_FILE).is_file():  # diffusers would take the lost path for a hub id
            raise CheckpointError(f"--lora {str(checkpoint)!r} was removed while the model loaded (a train running in "
                                  "its run folder keeps only the newest keep_checkpoints): run the command again")
        try:
            load_policy_lora(pipe, checkpoint)
        except (ValueError, SafetensorError) as exc:  # SafetensorError: a LoRA file whose header is not one
            raise CheckpointError(f"--lora {str(checkpoint)!r} cannot be loaded into model {model!r}{other_model}: "
                                  f"{exc}") from None
        if other_model:
            print(f"rlcm-fast: warning: sampling the LoRA on --model {model!r}, not its run's {run_model!r}",
                  file=sys.stderr)
    resolution = args.resolution if args.resolution is not None else (
        run.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    guidance = args.guidance_scale if args.guidance_scale is not None else run["guidance_scale"]
    for warning in (slow_on_a_cpu(pipe, device), ignored_guidance(pipe, method, guidance)):
        if warning:
            print(f"rlcm-fast: warning: {warning}", file=sys.stderr)
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output-dir {args.output_dir!r} cannot be created: {exc.strerror or exc}") from None
    generator = torch.Generator(device=device).manual_seed(args.seed)
    paths = iter(_sample_paths(out, args.prompt, args.num_images))
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty())  # in a log file each redraw is another line
    scores = []
    # Each prompt's images in calls of at most --batch-size (a VAE decode of dozens of 768 px images does not fit
    # a GPU), all drawing on from the one seeded generator.
    calls = [(prompt, min(args.batch_size, args.num_images - start))
             for prompt in args.prompt for start in range(0, args.num_images, args.batch_size)]
    for prompt, size in calls:
        prompts = [prompt] * size
        images = _sample_images(pipe, method, prompts, horizon, guidance, resolution, generator, extra)
        # As the trainer scores and checks them: a RewardError names the reward and what it returned.
        values = checked_rewards(args.reward, reward(images, prompts), len(prompts)) if reward else None
        for index, image in enumerate(pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(images))):
            path = next(paths)
            image.save(path)
            print(path if values is None else f"{path}\t{values[index]:.6g}", flush=True)
        scores += [] if values is None else list(values)
    if scores:
        print(f"rlcm-fast: {args.reward}: mean {np.mean(scores):.6g}, std {np.std(scores):.6g} over {len(scores)} "
              f"image{'' if len(scores) == 1 else 's'}", file=sys.stderr)
    return 0


def _sample_reward(spec: str, run: dict):
    """The reward `spec`, built with the reward settings of `run` (a run's config: its scorers' models, JPEG
    encoder and quality, reward server), as its trainer builds it."""
    from types import SimpleNamespace

    from .rewards import make_reward, reward_options, silent_reward_server

    settings = SimpleNamespace(**run)
    if warning := silent_reward_server(spec, settings.reward_server):
        print(f"rlcm-fast: warning: {warning}", file=sys.stderr)
    return make_reward(spec, settings.jpeg_quality, settings.reward_threads, **reward_options(settings))


def _sample_images(pipe, method: str, prompts: list[str], horizon: int, guidance: float, resolution: int, generator,
                   extra: dict) -> list:
    """Images (N, 3, H, W) float32 in [0, 1], decoded as the trainer decodes what it scores (sampler.decode_latents:
    the VAE's bf16 output made float32 before it is scaled, where the pipeline scales it in bf16), from the
    pipeline's own denoising loop, or, for an LCM without a guidance embedding (Stable Diffusion with a fused
    LCM-LoRA, which diffusers' LCM pipeline cannot run), from the sampler its run trained with; both draw the
    generator in the pipeline's order."""
    from .sampler import LCMSampler, decode_latents

    if method == "rlcm" and pipe.unet.config.time_cond_proj_dim is None:
        sampler = LCMSampler(pipe, horizon, guidance, extra["original_inference_steps"], resolution=resolution)
        return sampler.sample(pipe.unet, prompts, generator=generator).images
    latents = pipe(prompt=prompts, num_inference_steps=horizon, guidance_scale=guidance, height=resolution,
                   width=resolution, generator=generator, output_type="latent", **extra).images
    return decode_latents(pipe, latents)
