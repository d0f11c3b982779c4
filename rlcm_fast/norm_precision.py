"""Group and layer norms in autocast's half precision (the `half_precision_norms` switch).

CUDA's autocast runs `group_norm` and `layer_norm` in float32: each bf16/fp16 activation entering a norm is
copied to float32, the norm writes float32, the SiLU after a ResNet block's norm runs on float32, and the next
convolution or linear layer copies it back to half precision; the backward pass copies the gradients the same
way, and what autograd keeps for it (the norm's float32 input, the SiLU's float32 input) is twice the size. On
an H200 a 7-row training call of sd15-lcm at 768 px spent 26.6 of its 177 ms of kernels in `aten::copy_`
(benchmarks/results/nvidia-h200/397294b/claims.md); the same call traced on a CPU with CUDA's rule emulated
(fake tensors) copies 19.3 GiB in 1363 casts, and 0.02 GiB in 530 with this switch. PyTorch's norm kernels
take half-precision tensors and accumulate their statistics in float32 themselves (as diffusers' pipelines run
them, in bf16/fp16 without autocast), so the norm's output differs only in being rounded to half precision where
the next layer would round it anyway (a ResNet block's SiLU in between: one rounding more).

`use_half_precision_norms` changes the class of every `nn.GroupNorm` and `nn.LayerNorm` of a model in place to
one whose forward, under autocast, runs the norm in autocast's dtype; outside autocast it is the plain norm.
Parameters and state-dict keys stay as they were. timm's `fast_norm` and MosaicML's `LPLayerNorm` do the same.

`cuda_autocast_norms_on_cpu` makes the CPU's autocast run the two norms in float32 as CUDA's does (the CPU's
keeps them in bf16), so that tests and benchmarks/training_memory.py can see on a CPU what the switch removes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.bfloat16, torch.float16)


def _autocast_half_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype where autocast is on for x's device and casts to a half precision; else None."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in HALF else None


class _NormInAutocastsDtype:
    """The forward both norms share: under a half-precision autocast, `_normalize` with autocast off, on x, the
    weight and the bias in autocast's dtype; otherwise the plain norm's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_half_dtype(x)
        if dtype is None:
            return super().forward(x)
        weight, bias = (None if t is None else t.to(dtype) for t in (self.weight, self.bias))
        with torch.autocast(x.device.type, enabled=False):
            return self._normalize(x.to(dtype), weight, bias)


class HalfPrecisionGroupNorm(_NormInAutocastsDtype, nn.GroupNorm):
    def _normalize(self, x, weight, bias):
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class HalfPrecisionLayerNorm(_NormInAutocastsDtype, nn.LayerNorm):
    def _normalize(self, x, weight, bias):
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


# Exact types only: a subclass of nn.GroupNorm/nn.LayerNorm may compute something else in its forward (diffusers'
# AdaGroupNorm and RMSNorm are not subclasses: they keep autocast's rule).
HALF_PRECISION_CLASS = {nn.GroupNorm: HalfPrecisionGroupNorm, nn.LayerNorm: HalfPrecisionLayerNorm}
PLAIN_CLASS = {half: plain for plain, half in HALF_PRECISION_CLASS.items()}


def use_half_precision_norms(*models: nn.Module, enabled: bool = True) -> int:
    """Give every nn.GroupNorm and nn.LayerNorm in `models` the half-precision forward, in place (with
    enabled=False, the plain one back); return how many norms were changed.

    The class is swapped on the instance (no new modules): the parameters stay the same objects, so an
    optimizer, a DDP wrapper or a LoRA adapter built before keeps them, and a checkpoint's keys do not change."""
    swap = HALF_PRECISION_CLASS if enabled else PLAIN_CLASS
    changed = 0
    for model in models:
        for module in model.modules():
            other = swap.get(type(module))
            if other is not None:
                module.__class__ = other
                changed += 1
    return changed


_emulating = False  # cuda_autocast_norms_on_cpu() is active


def ineffective_half_precision_norms(precision: str, device_type: str) -> str | None:
    """Why half_precision_norms=true changes nothing in this run, or None."""
    if precision == "no":
        return "half_precision_norms=true has no effect without mixed precision (mixed_precision: bf16 or fp16)"
    if device_type == "cpu" and not _emulating:  # within cuda_autocast_norms_on_cpu it has
        return "half_precision_norms=true has no effect on a CPU: its autocast does not cast the norms to float32"
    return None


@contextlib.contextmanager
def cuda_autocast_norms_on_cpu():
    """For measuring on a CPU only: within the block, the CPU's autocast runs group_norm and layer_norm (and
    native_layer_norm) in float32, as CUDA's autocast does: bf16/fp16 inputs cast up, float64 left alone. Its
    other float32 ops, none of which sd15-lcm's UNet spends much in, are left as the CPU's. Process-wide while
    the block runs (not nestable); the CPU's own rule is back after it. Built on torch.library's kernel
    registration at the AutocastCPU dispatch key, which torch has no public switch for."""
    global _emulating
    from torch._C import DispatchKey, DispatchKeySet, _ExcludeDispatchKeyGuard

    if _emulating:
        raise RuntimeError("cuda_autocast_norms_on_cpu() is already active: it does not nest")
    autocast_cpu = DispatchKeySet(DispatchKey.AutocastCPU)  # excluded while the float32 op runs

    def as_float32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF else t

    def float32_op(op):
        def run(*args, **kwargs):
            with _ExcludeDispatchKeyGuard(autocast_cpu):
                return op(*(as_float32(arg) for arg in args), **{k: as_float32(v) for k, v in kwargs.items()})
        return run

    library = torch.library.Library("aten", "IMPL")
    _emulating = True
    try:
        for name in ("group_norm", "layer_norm", "native_layer_norm"):
            library.impl(name, float32_op(getattr(torch.ops.aten, name).default), "AutocastCPU")
        yield
    finally:
        library._destroy()
        _emulating = False
