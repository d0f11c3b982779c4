"""Loading the pipeline to fine-tune (an LCM for RLCM, Stable Diffusion for the DDPO baseline), and the
model inputs the samplers derive from it. The LoRA policy on its UNet is in lora.py.

`load_pipeline` accepts a hub id or local diffusers folder (real use) and presets that need no
network (README, "The tiny model"):

- `tiny`: a ~1.5M-parameter LCM (32 px images, 16x16x4 latents) built deterministically in code and
  cached in diffusers format, so it loads through the same `from_pretrained` path as a user's folder.
  VAE and text encoder are random, shipped as one seed initialised them; the UNet is the shipped
  denoiser of synthetic textures that tiny_pretraining.py trained, so that samples differ in what the JPEG
  rewards measure. Its scheduler predicts the sample, not epsilon: a random epsilon-predictor's
  pred_x0 = (x - sqrt(1 - a) eps) / sqrt(a) explodes at t=999, a sample-predictor stays bounded (and the
  pretraining started from one).
- `sd15-lcm`: the exact architecture of SimianLuo/LCM_Dreamshaper_v7 (~1.07B parameters), built in
  memory directly on the target device and dtype; the speed benchmarks use it.
- `tiny-sd`, `sd15`: the same two without the guidance embedding (`time_cond_proj_dim`), i.e. Stable
  Diffusion pipelines with a DDIM scheduler, for the DDPO baseline (README, "The DDPO baseline"). tiny-sd's
  UNet is trained by the same recipe as tiny's and shipped beside it.

An LCM is told from a Stable Diffusion UNet by that guidance embedding; `load_pipeline` refuses a
pipeline of the wrong kind for the method with one line (SD1.5 + an LCM-LoRA adapter is an LCM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from rlcm_fast.faults import one_line
from rlcm_fast.presets import METHODS
from rlcm_fast.tiny_tokenizer import CLIP_MAX_TOKENS, build_clip_tokenizer

MODEL_CHOICES = "expected 'tiny', 'sd15-lcm', a local diffusers pipeline folder, or a reachable hub id"
SD_MODEL_CHOICES = "expected 'tiny-sd', 'sd15', a local Stable Diffusion pipeline folder, or a reachable hub id"
LCM_PRESETS = ("tiny", "sd15-lcm")
SD_PRESETS = ("tiny-sd", "sd15")
TINY_PRESET_VERSION = 2  # bump when the tiny weights change without a change to TINY's configs
_INIT_SEED = 0
_DATA = Path(__file__).resolve().parent / "data"
# The tiny presets' trained UNets (rlcm_fast/tiny_pretraining.py wrote them).
TINY_UNET_WEIGHTS = _DATA / "tiny_unet.safetensors"
TINY_SD_UNET_WEIGHTS = _DATA / "tiny_sd_unet.safetensors"
# Their random VAEs and text encoders, as _INIT_SEED initialised them (keys "vae.*", "text_encoder.*";
# `python -m rlcm_fast.tiny_pretraining --write-random-components` wrote them). Shipped, not rebuilt from
# the seed: the same seed and config give other weights under other library releases (transformers' CLIP
# text encoder changed between 5.12 and 5.13), and the trained UNets, the README's figures and the tests
# were made with these.
TINY_RANDOM_COMPONENTS = _DATA / "tiny_vae_text_encoder.safetensors"
TINY_SD_RANDOM_COMPONENTS = _DATA / "tiny_sd_vae_text_encoder.safetensors"
RANDOM_COMPONENTS = ("vae", "text_encoder")


class ModelLoadError(ValueError):
    """A model or adapter argument that names nothing loadable."""


@dataclasses.dataclass(frozen=True)
class _ArchitectureSpec:
    """Constructor arguments of the pipeline's components; the text encoder's special-token ids come
    from the tokenizer."""

    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict


# SimianLuo/LCM_Dreamshaper_v7's scheduler_config.json.
LCM_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    original_inference_steps=50,
    prediction_type="epsilon",
    set_alpha_to_one=True,
    steps_offset=1,
    timestep_scaling=10.0,
    clip_sample=False,
    thresholding=False,
)

SD15_LCM = _ArchitectureSpec(
    unet=dict(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        time_cond_proj_dim=256,
    ),
    vae=dict(
        sample_size=768,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=CLIP_MAX_TOKENS,
        hidden_act="quick_gelu",
    ),
    scheduler=LCM_SCHEDULER_CONFIG,
)

TINY = _ArchitectureSpec(
    unet=dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers reads this legacy name as the number of heads
        norm_num_groups=8,  # divides every width the blocks see: 32, 64, 96, 128
        time_cond_proj_dim=32,  # takes the guidance embedding, as the real LCM does
    ),
    vae=dict(
        sample_size=32,
        block_out_channels=(32, 64),  # two blocks: vae_scale_factor 2
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    ),
    text_encoder=dict(
        vocab_size=514,  # the tiny tokenizer's vocabulary
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_TOKENS,
        hidden_act="quick_gelu",
    ),
    scheduler={**LCM_SCHEDULER_CONFIG, "prediction_type": "sample"},
)

# Stable Diffusion v1.5's scheduler_config.json, as read by DDIMScheduler (its PNDM-only keys dropped).
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
    thresholding=False,
)


def _without_guidance_embedding(spec: _ArchitectureSpec, scheduler: dict) -> _ArchitectureSpec:
    unet = {key: value for key, value in spec.unet.items() if key != "time_cond_proj_dim"}
    return dataclasses.replace(spec, unet=unet, scheduler=scheduler)


# SD1.5's architecture: LCM_Dreamshaper_v7's without the guidance projection (the DDPO paper's model).
SD15 = _without_guidance_embedding(SD15_LCM, SD_SCHEDULER_CONFIG)
# The tiny LCM without its guidance input; sample prediction for the same reason as `tiny`.
TINY_SD = _without_guidance_embedding(TINY, {**SD_SCHEDULER_CONFIG, "prediction_type": "sample"})


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
        pipe = _from_pretrained(model, _tiny_pipeline_folder(), dtype)
    elif model == "sd15-lcm":
        pipe = _build_random_pipeline(SD15_LCM, device, dtype)
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
        pipe = _from_pretrained(model, _tiny_sd_pipeline_folder(), dtype, StableDiffusionPipeline)
    elif model == "sd15":
        pipe = _build_random_pipeline(SD15, device, dtype)
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


def build_tiny_pipeline() -> LatentConsistencyModelPipeline:
    """The tiny preset in memory (float32, CPU), identical on every call: the shipped random VAE and text
    encoder and the shipped trained UNet (a denoiser of synthetic textures, see tiny_pretraining.py).
    `load_pipeline("tiny")` loads the cached copy of exactly these weights."""
    return _with_shipped_unet(build_untrained_tiny_pipeline(), TINY_UNET_WEIGHTS)


def build_untrained_tiny_pipeline() -> LatentConsistencyModelPipeline:
    """The tiny architecture with the shipped random VAE and text encoder and a UNet random from a fixed
    seed: the starting point of the tiny UNet's pretraining."""
    return _with_shipped_random_components(_build_random_pipeline(TINY, torch.device("cpu"), torch.float32),
                                           TINY_RANDOM_COMPONENTS)


def build_tiny_sd_pipeline() -> StableDiffusionPipeline:
    """The tiny-sd preset in memory: `tiny`'s architecture without the guidance embedding (tiny's VAE,
    text encoder and tokenizer architectures, with random weights of its own), a DDIM scheduler, and its own
    shipped UNet trained by the same recipe.
    `load_pipeline("tiny-sd", method="ddpo")` loads its cached copy."""
    return _with_shipped_unet(build_untrained_tiny_sd_pipeline(), TINY_SD_UNET_WEIGHTS)


def build_untrained_tiny_sd_pipeline() -> StableDiffusionPipeline:
    """tiny-sd with its shipped random VAE and text encoder and a UNet random from a fixed seed: the
    starting point of its UNet's pretraining."""
    return _with_shipped_random_components(_build_random_pipeline(TINY_SD, torch.device("cpu"), torch.float32),
                                           TINY_SD_RANDOM_COMPONENTS)


def _with_shipped_unet(pipe, weights: Path):
    # Shipped in float16 to halve the file; the presets run in float32.
    pipe.unet.load_state_dict({name: tensor.float() for name, tensor in load_file(weights).items()})
    return pipe


def _with_shipped_random_components(pipe, weights: Path):
    shipped = load_file(weights)
    for name in RANDOM_COMPONENTS:
        prefix = f"{name}."
        getattr(pipe, name).load_state_dict({key[len(prefix):]: tensor for key, tensor in shipped.items()
                                             if key.startswith(prefix)})
    return pipe


def initialised_random_components(spec: _ArchitectureSpec) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The VAE and text encoder of `spec` as the installed torch, diffusers and transformers initialise
    them from _INIT_SEED (float32, keys "vae.*" and "text_encoder.*"), and their provenance: the seed and
    those libraries' versions."""
    pipe = _build_random_pipeline(spec, torch.device("cpu"), torch.float32)
    weights = {f"{name}.{key}": tensor.contiguous() for name in RANDOM_COMPONENTS
               for key, tensor in getattr(pipe, name).state_dict().items()}
    versions = {package: importlib.metadata.version(package) for package in ("torch", "diffusers", "transformers")}
    provenance = {"seed": str(_INIT_SEED), **versions}
    return weights, provenance


def _build_random_pipeline(
    spec: _ArchitectureSpec, device: torch.device, dtype: torch.dtype
) -> LatentConsistencyModelPipeline | StableDiffusionPipeline:
    """An LCM pipeline when the UNet spec has a guidance embedding, else Stable Diffusion with DDIM."""
    tokenizer = build_clip_tokenizer()
    text_encoder_config = CLIPTextConfig(
        **spec.text_encoder,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _deterministic_init(device, dtype):
        unet = UNet2DConditionModel(**spec.unet)
        vae = AutoencoderKL(**spec.vae)
        text_encoder = CLIPTextModel(text_encoder_config)
    # The scheduler is built outside that context: its tables must stay float32 on the CPU.
    is_lcm = spec.unet.get("time_cond_proj_dim") is not None
    pipeline_class = LatentConsistencyModelPipeline if is_lcm else StableDiffusionPipeline
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=(LCMScheduler if is_lcm else DDIMScheduler)(**spec.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@contextlib.contextmanager
def _deterministic_init(device: torch.device, dtype: torch.dtype):
    """Modules created inside are allocated on `device` in `dtype` directly (no float32 copy to
    cast) and initialised from a fixed seed; the caller's RNG states and default dtype are restored."""
    on_accelerator = device.type not in ("cpu", "meta")
    forked_devices = [device] if on_accelerator else []
    with torch.random.fork_rng(devices=forked_devices, device_type=device.type if on_accelerator else "cpu"):
        torch.random.default_generator.manual_seed(_INIT_SEED)
        if on_accelerator:
            device_module = torch.get_device_module(device.type)
            with device_module.device(device):
                device_module.manual_seed(_INIT_SEED)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _tiny_pipeline_folder() -> Path:
    return _preset_folder("tiny", _tiny_id(), build_tiny_pipeline)


def _tiny_sd_pipeline_folder() -> Path:
    return _preset_folder("tiny-sd", _tiny_sd_id(), build_tiny_sd_pipeline)


def _tiny_id() -> str:
    return _preset_id("tiny", [dataclasses.asdict(TINY), _digest(TINY_UNET_WEIGHTS), _digest(TINY_RANDOM_COMPONENTS)])


def _tiny_sd_id() -> str:
    return _preset_id("tiny-sd", [dataclasses.asdict(TINY_SD), _digest(TINY_SD_UNET_WEIGHTS),
                                  _digest(TINY_SD_RANDOM_COMPONENTS)])


def _preset_id(name: str, key: list) -> str:
    """"<name>-v<version>-<12 hex digits>": what a small preset's weights are (`key` names its contents)."""
    key = [TINY_PRESET_VERSION, _INIT_SEED, *key]
    return f"{name}-v{TINY_PRESET_VERSION}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


def preset_weights_id(model: str, method: str = "rlcm") -> str | None:
    """Which weights a tiny preset has in this rlcm-fast (`_preset_id`; also its cache folder's name), or None
    for any other model. A checkpoint records it, so that a LoRA trained on the preset's earlier weights is
    refused instead of resumed or sampled on other ones. None for a user's model (the user's to keep) and for
    sd15-lcm and sd15 (random weights, for timing only)."""
    if method == "rlcm" and model == "tiny":
        return _tiny_id()
    if method == "ddpo" and model == "tiny-sd":
        return _tiny_sd_id()
    return None


def _digest(weights: Path) -> str:
    # In the cache key: a changed weights file must not load a stale cached folder.
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def prepare_preset_cache(model: str, method: str) -> None:
    """Write the cached folder of a built-in preset that loads from one ("tiny", "tiny-sd"), if missing.
    Call it before torch.distributed starts: in a process group transformers writes weights on rank 0 only."""
    if method == "rlcm" and model == "tiny":
        _tiny_pipeline_folder()
    elif method == "ddpo" and model == "tiny-sd":
        _tiny_sd_pipeline_folder()


# The components of a preset folder that hold weights: a folder without them cannot be loaded.
_WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")


def _components_without_weights(folder: Path) -> list[str]:
    return [name for name in _WEIGHTED_COMPONENTS if not any((folder / name).glob("*.safetensors"))]


def _preset_folder(name: str, preset_id: str, build) -> Path:
    """The cached diffusers folder of a small preset (`build()` makes it; `preset_id` names its contents),
    written once and atomically (concurrent writers race on a rename; the loser uses the winner's folder)."""
    cache_root = Path(os.environ.get("RLCM_FAST_CACHE") or Path.home() / ".cache" / "rlcm_fast")
    folder = cache_root / preset_id
    if folder.is_dir():
        if missing := _components_without_weights(folder):
            raise ModelLoadError(f"model {name!r} could not be loaded: its cached folder {str(folder)!r} has no "
                                 f"weights in {', '.join(missing)}; delete that folder and it is built again")
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build().save_pretrained(staging)
        if missing := _components_without_weights(staging):  # never publish a folder that cannot load
            raise ModelLoadError(
                f"model {name!r} could not be built: no weights were written for {', '.join(missing)} (in a "
                "torch.distributed process group transformers saves on rank 0 only; build the preset before the "
                "group starts, e.g. with rlcm_fast.models.prepare_preset_cache)")
        os.rename(staging, folder)
    except OSError:
        if not folder.is_dir():  # a real failure, not a lost race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _missing_local_path(location: str) -> bool:
    # Only a relative name like "org/model" can be a hub id; say so plainly for a missing path.
    return (os.path.isabs(location) or location.startswith((".", "~"))) and not os.path.exists(location)


_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _pickle_hint(location: str) -> str:
    """Why a local folder or file of pickled weights was refused, or "" (a hub id cannot be looked into)."""
    path = Path(location).expanduser()
    found = [path] if path.is_file() else list(path.rglob("*")) if path.is_dir() else []
    if any(f.suffix in _PICKLE_SUFFIXES for f in found):
        return "; it holds pickled weights, which are never loaded: convert them to safetensors"
    return ""


def _from_pretrained(model: str, location: str | Path, dtype: torch.dtype,
                     pipeline_class=LatentConsistencyModelPipeline):
    location = str(location)
    choices = MODEL_CHOICES if pipeline_class is LatentConsistencyModelPipeline else SD_MODEL_CHOICES
    if _missing_local_path(location):
        raise ModelLoadError(f"model {model!r} could not be loaded (no such folder): {choices}")
    try:
        # use_safetensors=True: diffusers would otherwise fall back to unpickling .bin weights.
        return pipeline_class.from_pretrained(
            location, dtype=dtype, use_safetensors=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(
            f"model {model!r} could not be loaded ({one_line(error)}){_pickle_hint(location)}: {choices}"
        ) from error


def _fuse_lcm_lora(pipe: LatentConsistencyModelPipeline, lcm_lora: str) -> None:
    if _missing_local_path(lcm_lora):
        raise ModelLoadError(f"lcm_lora {lcm_lora!r} could not be loaded (no such file or folder): "
                             "expected a local LoRA folder or safetensors file, or a reachable hub id")
    try:
        pipe.load_lora_weights(lcm_lora, use_safetensors=True)  # never the pickled .bin fallback
    # Exception: for a hub id diffusers lets the hub client's own errors through (httpx's, whose module
    # differs between huggingface_hub releases), and a LoRA of other shapes is a RuntimeError.
    except Exception as error:
        raise ModelLoadError(
            f"lcm_lora {lcm_lora!r} could not be loaded ({one_line(error)}){_pickle_hint(lcm_lora)}: "
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
