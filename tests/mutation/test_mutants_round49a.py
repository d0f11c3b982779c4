"""Mutation-testing round 49a (lora, attention), a second round over the two modules after 41b: hand-written mutants
of rlcm_fast/lora.py and rlcm_fast/attention.py were run against their tests (test_lora, test_attention,
test_bench_attention, test_launch, the LoRA tests of test_sample_command, test_train and test_models, and the lora
and attention tests of rounds 41b, 46b and 47d); each test here kills one that survived (named in its docstring).
All are CPU-only, seeded and fast: the tiny preset's UNet, single attention layers, and a faked xformers
where a backend's refusal is tested."""

import importlib.machinery
import importlib.util
import logging
import shutil
import warnings

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend

from rlcm_fast.attention import CudnnFirstAttnProcessor, check_attention_backend
from rlcm_fast.lora import (LORA_FILE, LoraRankError, add_policy_lora, load_lora_into, load_policy_lora,
                            lora_state_dict, save_lora)
from rlcm_fast.models import load_pipeline, set_channels_last


def saved_policy(folder, targets, rank=2, seed=0):
    """A tiny UNet's policy LoRA on `targets`, its B made nonzero, saved with save_lora in `folder`."""
    unet = load_pipeline("tiny").unet
    torch.manual_seed(seed)
    for parameter in add_policy_lora(unet, rank=rank, alpha=rank, target_modules=targets):
        torch.nn.init.normal_(parameter.data, std=0.1)
    save_lora(unet, folder)
    return unet


# -- lora: ranks and targets -----------------------------------------------------------------------------------

def test_rank_one_is_the_smallest_lora_and_rank_zero_is_refused():
    """Mutant: `rank < 1` -> `rank <= 1`. Rank 1, the smallest LoRA (the error itself says ">= 1"), was refused;
    rank 0 is refused either way."""
    parameters = add_policy_lora(load_pipeline("tiny").unet, rank=1, alpha=1, target_modules=["to_q"])
    assert parameters and {min(p.shape) for p in parameters} == {1}
    with pytest.raises(LoraRankError, match=r"^LoRA rank must be >= 1, got 0$"):
        add_policy_lora(load_pipeline("tiny").unet, rank=0, alpha=1, target_modules=["to_q"])


def test_a_target_without_a_weight_is_not_called_a_rank_problem():
    """Mutant: `max(ranks, default=rank)` -> `default=0`. A target that names a whole attention block ("attn1", no
    weight of its own) was refused as "LoRA rank 2 is above ... (at most 0)", which the CLI turns into "lora_rank=2
    is invalid": the user would lower a rank that is not the problem."""
    with pytest.raises(ValueError) as info:
        add_policy_lora(load_pipeline("tiny").unet, rank=2, alpha=2, target_modules=["attn1"])
    assert not isinstance(info.value, LoraRankError)
    assert "rank" not in str(info.value)


def test_a_target_lora_cannot_adapt_is_refused_in_one_line_naming_it():
    """Found with the mutant `default=0` above: `--set lora_targets=[attn1]` printed "rlcm-fast: error:
    lora_targets=['attn1']: Target module Attention(" and the block's repr over 8 more lines. The error should name
    the target and what LoRA can adapt, in one line (mended in add_policy_lora)."""
    with pytest.raises(ValueError) as info:
        add_policy_lora(load_pipeline("tiny").unet, rank=2, alpha=2, target_modules=["to_q", "attn1"])
    assert str(info.value) == ("LoRA target modules ['attn1'] name Attention modules, which LoRA cannot adapt; allowed: "
                               "Linear, Conv1d, Conv2d, Conv3d, Embedding or MultiheadAttention layers")


# -- lora: loading a policy into a pipeline ----------------------------------------------------------------------

def test_load_policy_lora_takes_a_folder_whose_only_lora_file_has_another_name(tmp_path):
    """Mutant: load_policy_lora's `if saved is None: return` dropped. diffusers loads a folder's only .safetensors
    file whatever its name (a policy file renamed by a user); its keys are not checked here, and the mutant's
    TypeError (`None - set`) refused a file diffusers had loaded."""
    unet = saved_policy(tmp_path / "run", ["to_q"])
    (tmp_path / "renamed").mkdir()
    shutil.copy(tmp_path / "run" / LORA_FILE, tmp_path / "renamed" / "my_policy.safetensors")
    pipe = load_pipeline("tiny")
    load_policy_lora(pipe, tmp_path / "renamed")
    (adapter,) = pipe.unet.peft_config
    loaded = {key: value for key, value in pipe.unet.state_dict().items() if f".{adapter}." in key}
    theirs = lora_state_dict(unet)
    assert len(loaded) == len(theirs) > 0
    assert all(torch.equal(loaded[key.replace(".weight", f".{adapter}.weight")], value)
               for key, value in theirs.items())


def test_a_second_policy_loaded_into_the_same_pipeline_is_checked_against_its_own_adapter(tmp_path):
    """Mutant: the adapters the load added found without `- before` (the pipeline's first adapter taken). A user
    combining two policies (to_q and to_k) in one pipeline got "does not fit this UNet: 16 of its 16 LoRA tensors
    have no module", from comparing the second file with the first adapter."""
    saved_policy(tmp_path / "q", ["to_q"])
    saved_policy(tmp_path / "k", ["to_k"], seed=1)
    pipe = load_pipeline("tiny")
    load_policy_lora(pipe, tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's note that the UNet now has two adapters
        load_policy_lora(pipe, tmp_path / "k")
    assert len(pipe.unet.peft_config) == 2


def test_load_policy_lora_never_loads_a_pickled_lora(tmp_path):
    """Mutant: `use_safetensors=True` dropped from the load. A folder holding only a pickled
    pytorch_lora_weights.bin (which torch.load may run code from) is refused, not loaded as a policy."""
    pipe = load_pipeline("tiny")
    add_policy_lora(pipe.unet, rank=2, alpha=2, target_modules=["to_q"])
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=lora_state_dict(pipe.unet), safe_serialization=False)
    assert [path.name for path in tmp_path.iterdir()] == ["pytorch_lora_weights.bin"]
    fresh = load_pipeline("tiny")
    with pytest.raises(OSError, match=f"no file named {LORA_FILE}"):
        load_policy_lora(fresh, tmp_path)
    assert not getattr(fresh.unet, "peft_config", None)


def test_a_channels_last_policy_is_saved_and_loads_back_bitwise(tmp_path):
    """Mutant: save_lora without `.contiguous()`. With channels_last (a config switch for speed) a convolution
    target's LoRA weights are not contiguous and safetensors refused to write them: a run died at its first
    checkpoint. The file holds the same weights, and a resume loads them bitwise."""
    pipe = load_pipeline("tiny")
    torch.manual_seed(0)
    parameters = add_policy_lora(pipe.unet, rank=2, alpha=2, target_modules=["conv_in", "to_q"])
    for parameter in parameters:
        torch.nn.init.normal_(parameter.data, std=0.1)
    set_channels_last(pipe)
    assert not all(p.is_contiguous() for p in parameters)  # else the test could not tell
    save_lora(pipe.unet, tmp_path)
    resumed = load_pipeline("tiny").unet
    add_policy_lora(resumed, rank=2, alpha=2, target_modules=["conv_in", "to_q"])
    load_lora_into(resumed, tmp_path)
    ours, theirs = lora_state_dict(resumed), lora_state_dict(pipe.unet)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_a_load_error_without_tensor_shapes_is_one_line(tmp_path, monkeypatch):
    """Mutant: the error for a RuntimeError of another kind than size mismatches quotes the whole error, not its
    first line. torch's load_state_dict errors list a line per key: the message is the file and that first line."""
    saved_policy(tmp_path, ["to_q"])
    pipe = load_pipeline("tiny")

    def failing_load(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for UNet2DConditionModel:\n\tUnexpected key(s) in "
                           "state_dict: \"a.lora_A.weight\", \"b.lora_A.weight\"")

    monkeypatch.setattr(pipe, "load_lora_weights", failing_load)
    with pytest.raises(ValueError) as info:
        load_policy_lora(pipe, tmp_path)
    assert str(info.value) == (f"{tmp_path / LORA_FILE} does not fit this UNet: Error(s) in loading state_dict for "
                               "UNet2DConditionModel:")


def test_a_file_of_other_shapes_is_refused_without_diffusers_report_of_each_tensor(tmp_path):
    """Mutant: the filter of diffusers' "was unsuccessful with the following error" report lets it through.
    diffusers logs torch's whole error (a line per tensor of another shape, over 100 for a policy of another
    model) before raising it; load_policy_lora says it in one line, and the report is not shown besides."""
    saved_policy(tmp_path, ["to_q"])
    path = tmp_path / LORA_FILE
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    # Each A of rank 4 where the file's config and its Bs say 2: torch's size mismatch for every A.
    save_file({key: torch.cat([value, value]) if ".lora_A." in key else value for key, value in tensors.items()},
              path, metadata=metadata)
    logger = logging.getLogger("diffusers.loaders.peft")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with pytest.raises(ValueError, match=r"does not fit this UNet: \d+ LoRA tensors have other shapes \(e\.g\. "
                                             r"\S+\.lora_A is \[4, \d+\] in the file, \[2, \d+\] in the UNet\)$"):
            load_policy_lora(load_pipeline("tiny"), tmp_path)
    finally:
        logger.removeHandler(handler)
    assert not [line for line in seen if "was unsuccessful" in line]


def test_load_policy_lora_leaves_diffusers_log_lines_to_later_loads(tmp_path):
    """Mutant: the log filters are not removed after the load. Its notices are dropped for this load only: a
    later diffusers notice of no text-encoder keys or of a failed load (the user's own load_lora_weights) is kept."""
    saved_policy(tmp_path, ["to_q"])
    load_policy_lora(load_pipeline("tiny"), tmp_path)
    lines = {"diffusers.loaders.lora_base": "No LoRA keys associated to CLIPTextModel found with the "
                                            "prefix='text_encoder'.",
             "diffusers.loaders.peft": "Loading adapter weights from state_dict led to unexpected keys: the load "
                                       "was unsuccessful with the following error: size mismatch"}
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, line in lines.items():
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(line)
        finally:
            logger.removeHandler(handler)
    assert seen == list(lines.values())


# -- attention ---------------------------------------------------------------------------------------------------

def test_the_cudnn_processor_puts_cudnn_first_and_keeps_the_default_order_and_every_kernel_behind_it(monkeypatch):
    """Mutants: MATH or EFFICIENT_ATTENTION dropped from CUDNN_FIRST (a shape neither cuDNN nor flash takes, e.g.
    float32 on a GPU, found no memory-efficient kernel, or none at all), and the fallbacks behind cuDNN put in
    another order. The module doc: "falls through to flash, memory-efficient, then math, as by default"."""
    default = list(torch._C._get_sdp_priority_order())
    cudnn = int(SDPBackend.CUDNN_ATTENTION)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        backends = torch.backends.cuda
        seen.append((list(torch._C._get_sdp_priority_order()), backends.flash_sdp_enabled(),
                     backends.mem_efficient_sdp_enabled(), backends.math_sdp_enabled(), backends.cudnn_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    layer = Attention(query_dim=32, heads=4, dim_head=8, processor=CudnnFirstAttnProcessor())
    layer(torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1)))
    assert seen == [([cudnn] + [backend for backend in default if backend != cudnn], True, True, True, True)]


def test_the_cudnn_processor_computes_cross_attention_with_a_mask_as_diffusers_does():
    """Mutants: CudnnFirstAttnProcessor passes encoder_hidden_states=None (the UNet's cross-attention to the prompt
    became self-attention) or attention_mask=None (masked tokens attended to) on to diffusers' processor. On the CPU
    it must compute exactly what diffusers' SDPA processor does."""
    torch.manual_seed(0)
    layer = Attention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=16, processor=AttnProcessor2_0())
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 6, 32, generator=generator), torch.randn(2, 5, 16, generator=generator)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    with torch.no_grad():
        theirs = layer(x, context, attention_mask=mask)
        assert not torch.allclose(theirs, layer(x, context))  # else the mask would not show
        layer.set_processor(CudnnFirstAttnProcessor())
        ours = layer(x, context, attention_mask=mask)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend", ["cudnn", "xformers"])
def test_a_backend_on_a_device_other_than_cuda_is_refused_naming_it(monkeypatch, backend):
    """Mutant: `device.type != "cuda"` -> `== "cpu"`. cuDNN's and xformers' attention run on CUDA only: an Apple GPU
    (mps) is refused as the CPU is, naming the device, not let through (or refused for a want of cuDNN)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        importlib.machinery.ModuleSpec(name, None) if name == "xformers" else find_spec(name, *args)))
    with pytest.raises(ValueError, match=f"^attention_backend={backend} needs a CUDA device, not mps; use "
                                         "attention_backend=sdpa$"):
        check_attention_backend(backend, torch.device("mps"))

