"""Loading the pipeline to fine-tune (an LCM for RLCM, Stable Diffusion for the DDPO baseline), and the
model inputs the samplers derive from it. The LoRA policy on its UNet is in lora.py.

`load_pipeline` accepts a hub id or local diffusers folder (real use) and presets that need no
network: `tiny` and `tiny-sd` (small trained models, cached by tiny_presets.py), `sd15-lcm` and `sd15`
(the SD1.5 architectures with random weights, for timing); architectures.py describes them.

An LCM is told from a Stable Diffusion UNet by its guidance embedding (`time_cond_proj_dim`);
`load_pipeline` refuses a pipeline of the wrong kind for the method with one line (SD1.5 + an LCM-LoRA
adapter is an LCM).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from huggingface_hub import snapshot_download
from safetensors import SafetensorError

from rlcm_fast.architectures import SD15, SD15_LCM, build_random_pipeline
from rlcm_fast.faults import ModelLoadError, load_failure
from rlcm_fast.hub import hub_load_options, reads_cache_only
from rlcm_fast.path_checks import home_expanded
from rlcm_fast.presets import METHODS
from rlcm_fast.tiny_presets import tiny_pipeline_folder, tiny_sd_pipeline_folder

MODEL_CHOICES = "expected 'tiny', 'sd15-lcm', a local diffusers pipeline folder, or a reachable hub id"
SD_MODEL_CHOICES = "expected 'tiny-sd', 'sd15', a local Stable Diffusion pipeline folder, or a reachable hub id"
LCM_PRESETS = ("tiny", "sd15-lcm")
SD_PRESETS = ("tiny-sd", "sd15")


def load_pipeline(
    model: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    lcm_lora: str | None = None,
    method: str = "rlcm",
) -> LatentConsistencyModelPipeline | StableDiffusionPipeline:
    """The pipeline for `model` on `device`, base weights in `dtype`, frozen, in eval mode.

    method "rlcm": an LCM with an `LCMScheduler`. `model` is "tiny", "sd15-lcm", a local diffusers
    pipeline folder or a hub id. `lcm_lora` names an LCM-LoRA adapter (e.g.
    latent-consistency/lcm-lora-sdv1-5 on an SD1.5 model); it is fused into the base weights and
    unloaded, so a fresh policy LoRA can go on top. Such a UNet has no guidance embedding
    (`guidance_embedding` returns None); diffusers' own LatentConsistencyModelPipeline __call__ cannot
    run it, the package's sampler can.

    method "ddpo": a Stable Diffusion pipeline with a `DDIMScheduler`: "tiny-sd", "sd15", a folder or
    a hub id. A pipeline of the other kind raises ModelLoadError (one line).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; allowed: {', '.join(METHODS)}")
    device = torch.device(device)
    if method == "ddpo":
        return _load_sd_pipeline(model, device, dtype, lcm_lora)
    if model in SD_PRESETS:
        raise ModelLoadError(f"model {model!r} is a Stable Diffusion preset (no LCM guidance embedding): "
                             f"use it with --algo ddpo, or pick an LCM: {MODEL_CHOICES}")
    if model == "tiny":
        pipe = _from_pretrained(model, tiny_pipeline_folder(), dtype)
    elif model == "sd15-lcm":
        pipe = build_random_pipeline(SD15_LCM, device, dtype)
    else:
        pipe = _from_pretrained(model, model, dtype)
    if pipe.unet.config.time_cond_proj_dim is None and lcm_lora is None:
        raise ModelLoadError(f"model {model!r} is a Stable Diffusion pipeline (no LCM guidance embedding): use it "
                             "with --algo ddpo, or make it an LCM with --set lcm_lora=<LCM-LoRA adapter>")
    if pipe.unet.config.time_cond_proj_dim is not None and lcm_lora is not None:
        raise ModelLoadError(f"model {model!r} is an LCM already (its UNet has a guidance embedding); lcm_lora "
                             f"{lcm_lora!r} makes a Stable Diffusion model one: drop lcm_lora")
    if not isinstance(pipe.scheduler, LCMScheduler):
        # e.g. a plain SD1.5 folder (PNDM), to be used with the LCM-LoRA adapter.
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    if lcm_lora is not None:
        _fuse_lcm_lora(pipe, lcm_lora)
    _freeze(pipe)
    return pipe


def _load_sd_pipeline(model: str, device: torch.device, dtype: torch.dtype, lcm_lora: str | None):
    if lcm_lora is not None:
        raise ModelLoadError(f"lcm_lora {lcm_lora!r} makes an LCM; the DDPO baseline trains the Stable Diffusion model "
                             "itself: drop lcm_lora or use --algo rlcm")
    if model in LCM_PRESETS:
        raise ModelLoadError(f"model {model!r} is an LCM preset; --algo ddpo needs a Stable Diffusion pipeline: "
                             f"{SD_MODEL_CHOICES}")
    if model == "tiny-sd":
        pipe = _from_pretrained(model, tiny_sd_pipeline_folder(), dtype, StableDiffusionPipeline)
    elif model == "sd15":
        pipe = build_random_pipeline(SD15, device, dtype)
    else:
        pipe = _from_pretrained(model, model, dtype, StableDiffusionPipeline)
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise ModelLoadError(f"model {model!r} is an LCM (its UNet has a guidance embedding); --algo ddpo needs a "
                             f"Stable Diffusion pipeline: {SD_MODEL_CHOICES}")
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # DDPO samples with DDIM
    pipe.to(device)
    _freeze(pipe)
    return pipe


def _freeze(pipe) -> None:
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.requires_grad_(False).eval()


def set_channels_last(pipe, enabled: bool = True) -> None:
    """The UNet's and the VAE's 4-D weights (LoRA's convolutions too) in channels-last memory format, in
    place (back to NCHW with enabled=False): a convolution with channels-last weights gives channels-last
    activations, so the whole model runs in NHWC. The Parameters stay the same objects (an optimizer built
    on them still holds them)."""
    memory_format = torch.channels_last if enabled else torch.contiguous_format
    for model in (pipe.unet, pipe.vae):
        model.to(memory_format=memory_format)


def _missing_local_path(location: str) -> bool:
    # Only a relative name like "org/model" can be a hub id; say so plainly for a missing path.
    return (os.path.isabs(location) or location.startswith((".", "~"))) and not os.path.exists(location)


_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _pickle_hint(location: str) -> str:
    """Why a local folder or file of pickled weights was refused, or "" (a hub id cannot be looked into)."""
    path = Path(location)  # its ~ expanded by the callers
    found = [path] if path.is_file() else list(path.rglob("*")) if path.is_dir() else []
    if any(f.suffix in _PICKLE_SUFFIXES for f in found):
        return "; it holds pickled weights, which are never loaded: convert them to safetensors"
    return ""


@contextlib.contextmanager
def library_logs_held_until_loaded(libraries=("diffusers", "transformers")):
    """The loading libraries' log records, held while a model loads: printed after it loaded, dropped if it failed.
    Before raising, diffusers logs its own account of the failure ("An error occurred while trying to fetch ...",
    "Couldn't connect to the Hub ..."), which printed lines above the one-line ModelLoadError that names the cause.
    Held at the libraries' own handlers (each has one, and does not propagate)."""
    held: list[tuple[logging.Handler, logging.LogRecord]] = []
    handlers = [handler for name in libraries for handler in logging.getLogger(name).handlers]

    def holder(handler):
        def hold(record):
            held.append((handler, record))
            return False  # not emitted now
        return hold

    holds = [(handler, holder(handler)) for handler in handlers]
    for handler, hold in holds:
        handler.addFilter(hold)
    try:
        yield
    finally:
        for handler, hold in holds:
            handler.removeFilter(hold)
    for handler, record in held:  # only after a load that did not raise
        handler.handle(record)


def _from_pretrained(model: str, location: str | Path, dtype: torch.dtype,
                     pipeline_class=LatentConsistencyModelPipeline):
    location = home_expanded(str(location))  # a load_pipeline("~/model") in code; the messages quote `model`
    choices = MODEL_CHOICES if pipeline_class is LatentConsistencyModelPipeline else SD_MODEL_CHOICES
    if _missing_local_path(location):
        raise ModelLoadError(f"model {model!r} could not be loaded (no such folder): {choices}")
    if "/" not in location and not os.path.exists(location):
        # A pipeline's hub id is org/name: a bare name that is no folder here is a mistyped preset or folder, and
        # the hub client's error for it (offline: several sentences) said neither.
        hint = ""
        if close := difflib.get_close_matches(model, LCM_PRESETS + SD_PRESETS, n=1):
            # The nearest may be the other method's preset ('tiny_sd' is 'tiny-sd', a DDPO model).
            algo = "ddpo" if close[0] in SD_PRESETS else "rlcm"
            wanted = "rlcm" if pipeline_class is LatentConsistencyModelPipeline else "ddpo"
            hint = f"; did you mean {close[0]!r}{'' if algo == wanted else f' (with --algo {algo})'}?"
        raise ModelLoadError(f"model {model!r} is no preset, no folder here and no hub id (those are org/name): "
                             f"{choices}{hint}")
    try:
        # use_safetensors=True: diffusers would otherwise fall back to unpickling .bin weights.
        with library_logs_held_until_loaded():
            return pipeline_class.from_pretrained(
                location, dtype=dtype, use_safetensors=True,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                **hub_load_options(location),
            )
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(
            f"model {model!r} could not be loaded ({load_failure(error)}){_pickle_hint(location)}: {choices}"
        ) from error


def _fuse_lcm_lora(pipe: LatentConsistencyModelPipeline, lcm_lora: str) -> None:
    location = home_expanded(lcm_lora)
    if _missing_local_path(location):
        raise ModelLoadError(f"lcm_lora {lcm_lora!r} could not be loaded (no such file or folder): "
                             "expected a local LoRA folder or safetensors file, or a reachable hub id")
    try:
        source = location
        if reads_cache_only(location):
            # Offline, diffusers wants the weight file's name for a hub id; the cached snapshot's folder has it.
            source = snapshot_download(location, local_files_only=True)
        with library_logs_held_until_loaded():
            pipe.load_lora_weights(source, use_safetensors=True)  # never the pickled .bin fallback
    # Exception: for a hub id diffusers lets the hub client's own errors through (httpx's, whose module
    # differs between huggingface_hub releases), and a LoRA of other shapes is a RuntimeError.
    except Exception as error:
        raise ModelLoadError(
            f"lcm_lora {lcm_lora!r} could not be loaded ({load_failure(error)}){_pickle_hint(location)}: "
            "expected a local LoRA folder or safetensors file, or a reachable hub id"
        ) from error
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers


def latent_shape(pipe: LatentConsistencyModelPipeline, batch: int, resolution: int) -> tuple[int, int, int, int]:
    """(B, C, h, w) of the latents for square `resolution` px images, as the pipeline prepares them."""
    if resolution % pipe.vae_scale_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's scale factor {pipe.vae_scale_factor}")
    side = resolution // pipe.vae_scale_factor
    return (batch, pipe.unet.config.in_channels, side, side)


def ignored_guidance(pipe, method: str, guidance_scale: float) -> str | None:
    """Why `guidance_scale` changes nothing for this pipeline, or None. An LCM UNet without a guidance embedding
    (SD1.5 + LCM-LoRA) gets no guidance input, and the LCM samplers do no classifier-free guidance."""
    if method == "rlcm" and pipe.unet.config.time_cond_proj_dim is None and guidance_scale != 1.0:
        return (f"guidance_scale={guidance_scale:g} has no effect: this UNet has no guidance embedding (an "
                "LCM-LoRA model), so it samples unguided, as at guidance_scale=1")
    return None


def oversized_resolution(pipe, resolution: int) -> str | None:
    """Why `resolution` may make a run far slower than the user expects, or None: twice the model's own side or
    more (a local folder trains at the config's 768 px default whatever size its UNet was made for)."""
    side = pipe.unet.config.sample_size
    if not isinstance(side, int) or isinstance(side, bool):  # None, or (height, width): no one own size to compare
        return None
    own = side * pipe.vae_scale_factor
    if resolution < 2 * own:
        return None
    return (f"resolution={resolution} is {resolution / own:g}x the side of the model's own {own} px images (its "
            f"UNet's sample_size x the VAE's scale factor): a UNet call costs {(resolution / own) ** 2:g}x as many "
            f"pixels or more; resolution={own} (--set resolution={own}) trains at the model's size")


# A UNet past this many parameters is made for a GPU: sd15-lcm's 860M took over a minute a call at 768 px on 2 CPU
# cores (README, "Training a real model"), and the run printed nothing for as long as its first epoch took.
CPU_SIZED_UNET_PARAMETERS = 100_000_000


def slow_on_a_cpu(pipe, device_type: str) -> str | None:
    """A warning, or None: a UNet of a real model's size runs on the CPU (`--device cpu`, or no GPU found)."""
    if device_type != "cpu":
        return None
    count = sum(p.numel() for p in pipe.unet.parameters())
    if count < CPU_SIZED_UNET_PARAMETERS:
        return None
    return (f"the model's UNet has {count / 1e6:.0f}M parameters and runs on the CPU, where each of its calls is slow "
            "(README, \"Training a real model\", times one): it is made for a GPU; the tiny model (--model tiny, or "
            "tiny-sd with --algo ddpo) trains and samples on a CPU in minutes")


def guidance_embedding(
    pipe: LatentConsistencyModelPipeline,
    guidance_scale: float,
    batch: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The LCM's guidance input (`timestep_cond`), as the pipeline computes it: w = guidance_scale - 1.
    None for a UNet without a guidance embedding (SD1.5 + LCM-LoRA)."""
    embedding_dim = pipe.unet.config.time_cond_proj_dim
    if embedding_dim is None:
        return None
    w = torch.full((batch,), guidance_scale - 1.0)
    return pipe.get_guidance_scale_embedding(w, embedding_dim=embedding_dim).to(device=device, dtype=dtype)
