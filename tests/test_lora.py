"""The policy LoRA: what trains, what is saved, and what a user's diffusers pipeline loads (CPU only)."""

import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from unet_probes import perturb_lora, unet_inputs, unet_output

from rlcm_fast.lora import (add_policy_lora,
                            leave_lora_input_casts_to_autocast, load_lora_into, lora_state_dict, save_lora)
from rlcm_fast.models import load_pipeline
from rlcm_fast.tiny_presets import build_tiny_pipeline
from rlcm_fast.presets import DEFAULT_LORA_TARGETS, TINY_LORA_TARGETS


def test_policy_lora_trains_only_float32_lora_weights_on_a_bf16_base():
    unet = load_pipeline("tiny", dtype=torch.bfloat16).unet
    parameters = add_policy_lora(unet, rank=4, alpha=8, target_modules=TINY_LORA_TARGETS)
    trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    assert [id(p) for p in parameters] == [id(p) for p in trainable.values()]
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in parameters)
    assert all(p.dtype == torch.bfloat16 for name, p in unet.named_parameters() if name not in trainable)
    adapted = [name for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
    assert len(parameters) == 2 * len(adapted)
    assert all(any(name == target or name.endswith("." + target) for name in adapted) for target in TINY_LORA_TARGETS)

    perturb_lora(parameters, seed=1)
    args, kwargs = unet_inputs(unet)
    unet(*args, **kwargs).sample.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in parameters)


def test_the_initial_lora_is_the_seeds_whatever_the_default_dtype():
    """peft draws the gaussian init in torch's default dtype: under float64 the same seed gave weights up to 2.5
    apart (another initial policy)."""
    def initial_lora(default_dtype):
        unet = load_pipeline("tiny").unet
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default_dtype)
        try:
            torch.manual_seed(0)
            parameters = add_policy_lora(unet, rank=2, alpha=2.0, target_modules=["to_q"])
            assert torch.get_default_dtype() == default_dtype  # the caller's, put back
        finally:
            torch.set_default_dtype(previous)
        return [p.detach() for p in parameters]

    for ours, theirs in zip(initial_lora(torch.float64), initial_lora(torch.float32), strict=True):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


class CastCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func.overloadpacket is torch.ops.aten._to_copy
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_input_casts_left_to_autocast_change_no_bit_and_save_casts(dtype):
    """Under autocast, peft's float32 cast of a LoRA layer's input is undone before the matmul: without it
    the output and the LoRA gradients are bitwise the same, with fewer casts (attention and conv targets)."""
    unet = load_pipeline("tiny", dtype=dtype).unet
    parameters = add_policy_lora(unet, rank=4, alpha=8, target_modules=TINY_LORA_TARGETS)
    perturb_lora(parameters, seed=2)
    args, kwargs = unet_inputs(unet)

    def forward_backward():
        for p in parameters:
            p.grad = None
        with torch.autocast("cpu", dtype=dtype), CastCounter() as counter:
            output = unet(*args, **kwargs).sample
            output.float().square().mean().backward()
        return output.detach(), [p.grad.clone() for p in parameters], counter.casts

    output, grads, casts = forward_backward()
    layers = leave_lora_input_casts_to_autocast(unet)
    assert layers == len(parameters) // 2
    left_output, left_grads, left_casts = forward_backward()
    assert output.dtype == dtype and torch.equal(left_output, output)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(left_grads, grads))
    assert any(g.abs().max() > 0 for g in grads)
    # At least the input's cast to float32 and its backward, per layer.
    assert left_casts <= casts - 2 * layers


def test_policy_lora_rejects_bad_arguments():
    unet = build_tiny_pipeline().unet
    with pytest.raises(ValueError, match="rank"):
        add_policy_lora(unet, rank=0, alpha=1, target_modules=DEFAULT_LORA_TARGETS)
    with pytest.raises(ValueError, match="no_such_layer"):
        add_policy_lora(unet, rank=4, alpha=4, target_modules=("to_q", "no_such_layer"))
    assert not getattr(unet, "peft_config", None)
    with pytest.raises(ValueError, match="add_policy_lora"):
        lora_state_dict(unet)


def test_saved_lora_loads_into_a_fresh_pipeline_and_resumes_bitwise(tmp_path):
    trained = load_pipeline("tiny").unet
    base_output = unet_output(trained)
    parameters = add_policy_lora(trained, rank=4, alpha=8, target_modules=TINY_LORA_TARGETS)  # scale alpha/r = 2
    perturb_lora(parameters, seed=2)
    trained_output = unet_output(trained)
    assert (trained_output - base_output).abs().max() > 1e-2
    save_lora(trained, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    # Sorted: peft's set of target modules came out in another order in each process, and so did the bytes.
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as saved:
        config = json.loads(saved.metadata()["lora_adapter_metadata"])
    assert config["unet.target_modules"] == sorted(TINY_LORA_TARGETS)

    user_pipe = load_pipeline("tiny")
    user_pipe.load_lora_weights(tmp_path)  # what a user of the trained policy does
    torch.testing.assert_close(unet_output(user_pipe.unet), trained_output, rtol=1e-5, atol=1e-5)

    resumed = load_pipeline("tiny").unet
    resumed_parameters = add_policy_lora(resumed, rank=4, alpha=8, target_modules=TINY_LORA_TARGETS)
    load_lora_into(resumed, tmp_path)
    assert len(resumed_parameters) == len(parameters)
    assert all(torch.equal(a, b) for a, b in zip(resumed_parameters, parameters))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in resumed_parameters)


def test_load_lora_into_rejects_a_mismatched_file(tmp_path):
    source = load_pipeline("tiny").unet
    add_policy_lora(source, rank=4, alpha=8, target_modules=TINY_LORA_TARGETS)
    save_lora(source, tmp_path)

    other_rank = load_pipeline("tiny").unet
    add_policy_lora(other_rank, rank=2, alpha=8, target_modules=TINY_LORA_TARGETS)
    with pytest.raises(ValueError, match=r"pytorch_lora_weights\.safetensors.*rank"):
        load_lora_into(other_rank, tmp_path)

    other_targets = load_pipeline("tiny").unet
    add_policy_lora(other_targets, rank=4, alpha=8, target_modules=DEFAULT_LORA_TARGETS)
    with pytest.raises(ValueError, match=r"pytorch_lora_weights\.safetensors.*unexpected"):
        load_lora_into(other_targets, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_lora_into(other_targets, tmp_path / "missing")
