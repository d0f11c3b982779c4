"""The policy: a LoRA adapter on the UNet, trained while everything else stays frozen.

The helpers go through diffusers' adapter API on the UNet (peft underneath) and write files that a
user's `pipe.load_lora_weights(directory)` reads, so a trained policy leaves this package as a plain
diffusers LoRA.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from .faults import first_line

# diffusers' default adapter name, spelled out so every helper here addresses the same adapter.
POLICY_ADAPTER = "default"


# The layers peft's LoRA adapts (its transformers Conv1D aside: no UNet has one); subclasses (diffusers' own) included.
_LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding,
                torch.nn.MultiheadAttention)


class LoraRankError(ValueError):
    """A LoRA rank that cannot or need not be: below 1, or above every targeted layer's rank."""


def add_policy_lora(
    unet: UNet2DConditionModel, rank: int, alpha: float, target_modules: Sequence[str]
) -> list[torch.nn.Parameter]:
    """Add the trainable LoRA adapter (gaussian init, B = 0: the adapted UNet starts equal to the base) and return its
    parameters, in module order. Everything else in the UNet is frozen; the LoRA weights are float32
    even on a bf16/fp16 base, so optimiser updates are not lost to rounding. LoraRankError for a rank below 1
    or above every targeted layer's; ValueError for a target that matches no module or names one LoRA
    cannot adapt."""
    if rank < 1:
        raise LoraRankError(f"LoRA rank must be >= 1, got {rank}")
    modules = dict(unet.named_modules())
    # peft's rule for a list of targets: the module's name equals a target or ends with "." + target.
    targeted = {target: [m for name, m in modules.items() if name == target or name.endswith("." + target)]
                for target in target_modules}
    unmatched = [target for target, found in targeted.items() if not found]
    if unmatched:
        raise ValueError(f"LoRA target modules {unmatched} match no module of the UNet")
    # peft's error for a module it cannot adapt (a whole attention block, "attn1") was the module's repr, 9 lines.
    unsupported = [target for target, found in targeted.items() if not all(isinstance(m, _LORA_LAYERS) for m in found)]
    if unsupported:
        kinds = sorted({type(m).__name__ for target in unsupported for m in targeted[target]
                        if not isinstance(m, _LORA_LAYERS)})
        raise ValueError(f"LoRA target modules {unsupported} name {', '.join(kinds)} modules, which LoRA cannot adapt; "
                         "allowed: Linear, Conv1d, Conv2d, Conv3d, Embedding or MultiheadAttention layers")
    # A LoRA update of a layer has at most the rank of its weight, min(fan-out, fan-in); at rank 100000 on the
    # tiny UNet's 32-64 channel layers a run wrote a 15 GB checkpoint for nothing.
    ranks = [min(m.weight.shape[0], m.weight[0].numel()) for found in targeted.values() for m in found
             if isinstance(getattr(m, "weight", None), torch.Tensor)]
    useful = max(ranks, default=rank)  # no weights: peft says what it cannot adapt
    if rank > useful:
        raise LoraRankError(f"LoRA rank {rank} is above the rank of every targeted layer's weight (at most {useful}): "
                            "a larger rank adds parameters, not capacity")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    # peft makes the adapter in torch's default dtype, and its gaussian draws depend on that dtype: a caller's
    # set_default_dtype(torch.float64) gave another initial policy for the same seed.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        unet.add_adapter(config, adapter_name=POLICY_ADAPTER)
    finally:
        torch.set_default_dtype(default_dtype)
    cast_training_params(unet, dtype=torch.float32)
    return [parameter for parameter in unet.parameters() if parameter.requires_grad]


def leave_lora_input_casts_to_autocast(unet: UNet2DConditionModel) -> int:
    """Stop peft from casting each LoRA layer's input to the adapter's float32; return how many layers.

    Only for a UNet that always runs under autocast (the trainer's, with mixed precision): there autocast
    casts that float32 input straight back to bf16/fp16 for the LoRA matmul, a round trip that changes no
    bit and costs two casts per layer in the forward, and two more in the backward where the input needs a
    gradient. On sd15-lcm, with the paper's attention targets, that is 442 of the 3648 ATen ops of a
    training forward+backward (counted on the CPU), and eager training at 768 px looked bound by the
    host's cost per op on an H200. peft keeps the switch for this case
    (`cast_input_dtype_enabled`, which `peft.helpers.disable_input_dtype_casting` sets for a block)."""
    layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The policy adapter's weights, keyed as diffusers' LoRA loader reads them.

    PEFT key format ("....lora_A.weight"), not `convert_state_dict_to_diffusers`'s: that one renames
    only attention keys (to "lora.down"); diffusers 0.42's loader decides from the FIRST key whether to
    convert, so with convolution targets (presets.TINY_LORA_TARGETS) it skips the conversion and silently drops
    the attention weights. PEFT keys load as they are for any targets."""
    _policy_lora_config(unet)
    return get_peft_model_state_dict(unet, adapter_name=POLICY_ADAPTER)


# A checkpoint's LoRA file: a name of its own, so that the checkpoint format does not follow a library's
# default. It is diffusers' default (LORA_WEIGHT_NAME_SAFE), so `pipe.load_lora_weights(folder)` finds it
# without a weight_name (tests/test_lora.py loads it so).
LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(unet: UNet2DConditionModel, directory: str | os.PathLike) -> None:
    """Write the policy adapter as LORA_FILE in `directory`, with its LoRA config (alpha, rank) as
    metadata, so `pipe.load_lora_weights(directory)` reproduces the policy."""
    LatentConsistencyModelPipeline.save_lora_weights(
        directory,
        weight_name=LORA_FILE,
        # safetensors stores contiguous tensors only; channels-last convolution weights are not (channels_last).
        unet_lora_layers={key: tensor.contiguous() for key, tensor in lora_state_dict(unet).items()},
        safe_serialization=True,
        unet_lora_adapter_metadata=_lora_metadata(unet),
    )


def _lora_metadata(unet: UNet2DConditionModel) -> dict:
    """The policy's LoRA config for the file's metadata, its target modules sorted: peft keeps them as a set,
    whose order changes from process to process, and so did the file's bytes and the checkpoint's sha256."""
    config = _policy_lora_config(unet).to_dict()
    if isinstance(config.get("target_modules"), (set, list, tuple)):
        config["target_modules"] = sorted(config["target_modules"])
    return config


class _NoTextEncoderLoraNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not ("No LoRA keys associated to" in record.getMessage() and "text_encoder" in record.getMessage())


class _NoFailedLoadReport(logging.Filter):
    """diffusers logs a failed adapter load's whole error (a line per tensor) before raising it; load_policy_lora
    raises it again as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "was unsuccessful with the following error" not in record.getMessage()


# torch's load_state_dict line for one tensor, e.g. "size mismatch for a.lora_A.default_0.weight: copying a param
# with shape torch.Size([8, 32]) from checkpoint, the shape in current model is torch.Size([8, 16])."
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?)(?:\.[^.\s]+)?\.weight: copying a param with shape "
                            r"torch\.Size\((\[.*?\])\) from checkpoint, the shape in current model is "
                            r"torch\.Size\((\[.*?\])\)")


def load_policy_lora(pipe: LatentConsistencyModelPipeline, directory: str | os.PathLike) -> None:
    """`pipe.load_lora_weights(directory)` for a `save_lora` folder, as a user would load it, without
    diffusers' notice that the file has no text-encoder weights: a policy adapts only the UNet.

    ValueError (one line) where the file does not fit the UNet: a tensor of another shape, or one whose
    module the UNet lacks (diffusers drops those without a word, leaving part of the policy unapplied)."""
    path = Path(directory) / LORA_FILE
    unet_prefix = LatentConsistencyModelPipeline.unet_name + "."
    saved = None  # the file's UNet keys; unchecked where diffusers finds a file of another name in the folder
    if path.is_file():
        with safe_open(path, framework="pt") as handle:
            saved = {key.removeprefix(unet_prefix) for key in handle.keys() if key.startswith(unet_prefix)}
    before = set(getattr(pipe.unet, "peft_config", None) or {})
    filters = ((logging.getLogger("diffusers.loaders.lora_base"), _NoTextEncoderLoraNotice()),
               (logging.getLogger("diffusers.loaders.peft"), _NoFailedLoadReport()))
    for logger, quiet in filters:
        logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            # peft lists every module the UNet has and the file lacks (8 kB for sd15-lcm): adapters that stay zero
            # and change nothing. What matters, each file tensor loaded at its shape, is checked here, in one line.
            if saved is not None:
                warnings.filterwarnings("ignore", "While injecting the PEFT adapters", RuntimeWarning)
            pipe.load_lora_weights(str(directory), use_safetensors=True)  # never a pickled .bin in the folder
    except RuntimeError as exc:  # torch's load_state_dict: a line per tensor of another shape
        mismatches = _SIZE_MISMATCH.findall(str(exc))
        if not mismatches:
            raise ValueError(f"{path} does not fit this UNet: {first_line(exc)}") from None
        name, in_file, in_unet = mismatches[0]
        raise ValueError(f"{path} does not fit this UNet: {len(mismatches)} LoRA tensors have other shapes (e.g. "
                         f"{name} is {in_file} in the file, {in_unet} in the UNet)") from None
    finally:
        for logger, quiet in filters:
            logger.removeFilter(quiet)
    if saved is None:
        return
    added = sorted(set(getattr(pipe.unet, "peft_config", None) or {}) - before)
    loaded = set(get_peft_model_state_dict(pipe.unet, adapter_name=added[0])) if added else set()
    dropped = sorted(saved - loaded)
    if dropped:
        raise ValueError(f"{path} does not fit this UNet: {len(dropped)} of its {len(saved)} LoRA tensors have no "
                         f"module in it (e.g. {dropped[0]})")


def load_lora_into(unet: UNet2DConditionModel, directory: str | os.PathLike) -> None:
    """Load a `save_lora` file into the UNet's existing policy adapter, bitwise (to resume training)."""
    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights file at {path}")
    unet_prefix = LatentConsistencyModelPipeline.unet_name + "."
    saved = {key.removeprefix(unet_prefix): tensor for key, tensor in load_file(path).items()}
    expected = lora_state_dict(unet)
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the UNet's LoRA adapter: {len(missing)} keys missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for key, tensor in expected.items():
        if saved[key].shape != tensor.shape:
            raise ValueError(
                f"{path} does not match the UNet's LoRA adapter: {key} has shape {tuple(saved[key].shape)} in the "
                f"file, {tuple(tensor.shape)} in the adapter (a different LoRA rank?)"
            )
    set_peft_model_state_dict(unet, saved, adapter_name=POLICY_ADAPTER)


def _policy_lora_config(unet: UNet2DConditionModel) -> LoraConfig:
    configs = getattr(unet, "peft_config", None) or {}
    if POLICY_ADAPTER not in configs:
        raise ValueError("the UNet has no policy LoRA adapter; add one with add_policy_lora first")
    return configs[POLICY_ADAPTER]
