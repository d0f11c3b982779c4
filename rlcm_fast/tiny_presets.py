"""The tiny presets' weights and their cache (README, "The tiny model").

`tiny` and `tiny-sd` (architectures.TINY and TINY_SD) load through the same `from_pretrained` path as a
user's folder: built here once from the weights shipped in rlcm_fast/data, and cached in diffusers format
under $RLCM_FAST_CACHE (default ~/.cache/rlcm_fast), in a folder named by what its weights are
(`preset_weights_id`). Their VAE and text encoder are random, shipped as one seed initialised them; their
UNets are the shipped denoisers of synthetic textures that tiny_pretraining.py trained, so that samples
differ in what the JPEG rewards measure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from rlcm_fast.architectures import INIT_SEED, RANDOM_COMPONENTS, TINY, TINY_SD, build_random_pipeline
from rlcm_fast.faults import ModelLoadError

TINY_PRESET_VERSION = 2  # bump when the tiny weights change without a change to TINY's configs
_DATA = Path(__file__).resolve().parent / "data"
# The tiny presets' trained UNets (rlcm_fast/tiny_pretraining.py wrote them).
TINY_UNET_WEIGHTS = _DATA / "tiny_unet.safetensors"
TINY_SD_UNET_WEIGHTS = _DATA / "tiny_sd_unet.safetensors"
# Their random VAEs and text encoders, as INIT_SEED initialised them (keys "vae.*", "text_encoder.*";
# `python -m rlcm_fast.tiny_pretraining --write-random-components` wrote them). Shipped, not rebuilt from
# the seed: the same seed and config give other weights under other library releases (transformers' CLIP
# text encoder changed between 5.12 and 5.13), and the trained UNets, the README's figures and the tests
# were made with these.
TINY_RANDOM_COMPONENTS = _DATA / "tiny_vae_text_encoder.safetensors"
TINY_SD_RANDOM_COMPONENTS = _DATA / "tiny_sd_vae_text_encoder.safetensors"


def build_tiny_pipeline() -> LatentConsistencyModelPipeline:
    """The tiny preset in memory (float32, CPU), identical on every call: the shipped random VAE and text
    encoder and the shipped trained UNet (a denoiser of synthetic textures, see tiny_pretraining.py).
    `load_pipeline("tiny")` loads the cached copy of exactly these weights."""
    return _with_shipped_unet(build_untrained_tiny_pipeline(), TINY_UNET_WEIGHTS)


def build_untrained_tiny_pipeline() -> LatentConsistencyModelPipeline:
    """The tiny architecture with the shipped random VAE and text encoder and a UNet random from a fixed
    seed: the starting point of the tiny UNet's pretraining."""
    return _with_shipped_random_components(build_random_pipeline(TINY, torch.device("cpu"), torch.float32),
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
    return _with_shipped_random_components(build_random_pipeline(TINY_SD, torch.device("cpu"), torch.float32),
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


def tiny_pipeline_folder() -> Path:
    return _preset_folder("tiny", _tiny_id(), build_tiny_pipeline)


def tiny_sd_pipeline_folder() -> Path:
    return _preset_folder("tiny-sd", _tiny_sd_id(), build_tiny_sd_pipeline)


def _tiny_id() -> str:
    return _preset_id("tiny", [dataclasses.asdict(TINY), _digest(TINY_UNET_WEIGHTS), _digest(TINY_RANDOM_COMPONENTS)])


def _tiny_sd_id() -> str:
    return _preset_id("tiny-sd", [dataclasses.asdict(TINY_SD), _digest(TINY_SD_UNET_WEIGHTS),
                                  _digest(TINY_SD_RANDOM_COMPONENTS)])


def _preset_id(name: str, key: list) -> str:
    """"<name>-v<version>-<12 hex digits>": what a small preset's weights are (`key` names its contents)."""
    key = [TINY_PRESET_VERSION, INIT_SEED, *key]
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
        tiny_pipeline_folder()
    elif method == "ddpo" and model == "tiny-sd":
        tiny_sd_pipeline_folder()


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
                "group starts, e.g. with rlcm_fast.tiny_presets.prepare_preset_cache)")
        os.rename(staging, folder)
    except OSError:
        if not folder.is_dir():  # a real failure, not a lost race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
