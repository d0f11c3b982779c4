"""The built-in models' architectures, as diffusers and transformers constructor arguments, and the
pipeline they make with weights initialised from a fixed seed (README, "The tiny model"):

- `TINY`: a ~1.5M-parameter LCM (32 px images, 16x16x4 latents). Its scheduler predicts the sample, not
  epsilon: a random epsilon-predictor's pred_x0 = (x - sqrt(1 - a) eps) / sqrt(a) explodes at t=999, a
  sample-predictor stays bounded (and the pretraining started from one). Its shipped weights are in
  tiny_presets.py.
- `SD15_LCM`: the exact architecture of SimianLuo/LCM_Dreamshaper_v7 (~1.07B parameters); the speed
  benchmarks build it with random weights, directly on the target device and dtype.
- `TINY_SD`, `SD15`: the same two without the guidance embedding (`time_cond_proj_dim`), i.e. Stable
  Diffusion pipelines with a DDIM scheduler, for the DDPO baseline (README, "The DDPO baseline").
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel

from rlcm_fast.tiny_tokenizer import CLIP_MAX_TOKENS, build_clip_tokenizer

INIT_SEED = 0  # every random initialisation of a built-in model
RANDOM_COMPONENTS = ("vae", "text_encoder")  # the components the tiny presets keep as initialised


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
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

SD15_LCM = ArchitectureSpec(
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

TINY = ArchitectureSpec(
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


def _without_guidance_embedding(spec: ArchitectureSpec, scheduler: dict) -> ArchitectureSpec:
    unet = {key: value for key, value in spec.unet.items() if key != "time_cond_proj_dim"}
    return dataclasses.replace(spec, unet=unet, scheduler=scheduler)


# SD1.5's architecture: LCM_Dreamshaper_v7's without the guidance projection (the DDPO paper's model).
SD15 = _without_guidance_embedding(SD15_LCM, SD_SCHEDULER_CONFIG)
# The tiny LCM without its guidance input; sample prediction for the same reason as `tiny`.
TINY_SD = _without_guidance_embedding(TINY, {**SD_SCHEDULER_CONFIG, "prediction_type": "sample"})


def initialised_random_components(spec: ArchitectureSpec) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The VAE and text encoder of `spec` as the installed torch, diffusers and transformers initialise
    them from INIT_SEED (float32, keys "vae.*" and "text_encoder.*"), and their provenance: the seed and
    those libraries' versions."""
    pipe = build_random_pipeline(spec, torch.device("cpu"), torch.float32)
    weights = {f"{name}.{key}": tensor.contiguous() for name in RANDOM_COMPONENTS
               for key, tensor in getattr(pipe, name).state_dict().items()}
    versions = {package: importlib.metadata.version(package) for package in ("torch", "diffusers", "transformers")}
    provenance = {"seed": str(INIT_SEED), **versions}
    return weights, provenance


def build_random_pipeline(
    spec: ArchitectureSpec, device: torch.device, dtype: torch.dtype
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
        torch.random.default_generator.manual_seed(INIT_SEED)
        if on_accelerator:
            device_module = torch.get_device_module(device.type)
            with device_module.device(device):
                device_module.manual_seed(INIT_SEED)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(previous_dtype)
