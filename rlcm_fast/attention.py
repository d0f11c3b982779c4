"""Which kernel the pipeline's attention layers (UNet and VAE) run on: config key `attention_backend`.

- `sdpa` (default): diffusers' own processor, on PyTorch's `scaled_dot_product_attention`, which picks
  its backend by its own rules (torch 2.11 on the H200 chose cuDNN's kernel at the sd15 UNet's shapes).
- `cudnn`: the same processor and the same call, with cuDNN's fused attention put first in SDPA's
  priority order for the call; a shape cuDNN does not take falls through to flash, memory-efficient, then
  math, as by default. Why an option: at 768 px most of the UNet's attention FLOPs are in the 9216-token
  layers with 40-wide heads, which flash attention runs in its 64-wide kernel; where SDPA already
  chooses cuDNN, it should change nothing. CUDA only.
- `xformers`: xformers' memory-efficient attention, through diffusers. CUDA only, where installed.

Each is refused in one line, before any model is loaded, where it cannot run (`check_attention_backend`).
`set_attention_backend` also works on any diffusers LCM pipeline, e.g. before `FastLCMSampler(pipe, ...)`.
"""

from __future__ import annotations

import importlib.util

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config_checks import ATTENTION_BACKENDS

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


class CudnnFirstAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor with cuDNN first in SDPA's backend priority, for its call only.

    Written here because diffusers' `set_attention_backend("_native_cudnn")` reaches only processors built
    on its attention dispatcher, and the UNet2DConditionModel's and AutoencoderKL's are not. The priority is
    set inside the processor, not around the model call, so that torch.compile traces it into the graph
    (dynamo supports `sdpa_kernel`) and the previous order is restored on the way out."""

    # The parent's parameters by name: diffusers' Attention passes a processor only the keyword arguments its
    # signature names, and warned at every VAE decode that `temb` was dropped (with *args, **kwargs alone).
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def check_attention_backend(backend: str, device: torch.device) -> None:
    """Refuse, in one line and before any model is loaded, an attention backend this machine cannot run."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} is invalid; allowed: {', '.join(ATTENTION_BACKENDS)}")
    if backend == "sdpa":
        return
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ValueError("attention_backend=xformers needs the xformers package, which is not installed "
                         "(pip install xformers, or use attention_backend=sdpa)")
    if device.type != "cuda":
        raise ValueError(f"attention_backend={backend} needs a CUDA device, not {device.type}; "
                         "use attention_backend=sdpa")
    if backend == "cudnn" and not torch.backends.cudnn.is_available():
        raise ValueError("attention_backend=cudnn needs cuDNN, which this PyTorch build does not have; "
                         "use attention_backend=sdpa")


def set_attention_backend(pipe, backend: str) -> None:
    """Put every attention layer of the pipeline's UNet and VAE on `backend` (see the module doc). On a CPU,
    `cudnn` computes as `sdpa` does (SDPA has no cuDNN kernel there)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} is invalid; allowed: {', '.join(ATTENTION_BACKENDS)}")
    if not all(hasattr(pipe, name) for name in ("unet", "vae")):
        raise TypeError(f"pipe is a {type(pipe).__name__}; set_attention_backend takes a diffusers pipeline (its unet "
                        "and vae)")
    if backend == "xformers":
        check_attention_backend(backend, torch.device("cuda"))  # one line where xformers is not installed
        pipe.enable_xformers_memory_efficient_attention()
        return
    processor = CudnnFirstAttnProcessor() if backend == "cudnn" else AttnProcessor2_0()
    for model in (pipe.unet, pipe.vae):
        model.set_attn_processor(processor)
