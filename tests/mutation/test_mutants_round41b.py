"""Mutation-testing round 41b (lora, policy_model, models, attention): hand-written mutants of those four modules
were run against their tests; each test here kills one that survived (named in its docstring). All run on the
CPU with the tiny preset, seeded and fast."""

import importlib.machinery
import importlib.util
import logging
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from unet_probes import perturb_lora, unet_output

from rlcm_fast.attention import CudnnFirstAttnProcessor, set_attention_backend
from rlcm_fast.lora import LoraRankError, add_policy_lora, load_lora_into, load_policy_lora, save_lora
from rlcm_fast.models import load_pipeline


# -- lora ------------------------------------------------------------------------------------------------------

def test_a_target_that_is_only_the_tail_of_a_module_name_matches_nothing():
    """Mutant: `name.endswith("." + target)` -> `name.endswith(target)`. peft matches "q" to no module ("to_q" does
    not end with ".q"), so it would adapt to_q alone and silently drop "q": refused, naming it."""
    unet = load_pipeline("tiny").unet
    with pytest.raises(ValueError, match=r"\['q'\] match no module"):
        add_policy_lora(unet, rank=2, alpha=2, target_modules=("to_q", "q"))


def test_a_convolutions_rank_counts_its_kernel_not_only_its_input_channels():
    """Mutant: a layer's rank min(out, in * kh * kw) -> min(out, in). conv_in maps 4 channels x 3 x 3 to 32: its
    weight has rank up to 32, so rank 32 is allowed there and 33 is refused."""
    torch.manual_seed(0)
    parameters = add_policy_lora(load_pipeline("tiny").unet, rank=32, alpha=32, target_modules=["conv_in"])
    assert sorted(tuple(p.shape) for p in parameters) == [(32, 4, 3, 3), (32, 32, 1, 1)]
    with pytest.raises(LoraRankError, match="at most 32"):
        add_policy_lora(load_pipeline("tiny").unet, rank=33, alpha=33, target_modules=["conv_in"])


def test_the_initial_lora_is_gaussian_a_and_zero_b():
    """Mutant: init_lora_weights="gaussian" -> True (peft's Kaiming-uniform A). The docstring's gaussian init:
    A ~ N(0, 1/rank) (std 1/rank), B = 0, so the adapted UNet starts equal to the base."""
    pipe = load_pipeline("tiny")
    base = unet_output(pipe.unet)
    torch.manual_seed(0)
    rank = 4
    add_policy_lora(pipe.unet, rank=rank, alpha=8, target_modules=["to_q", "to_k", "to_v"])
    named = dict(pipe.unet.named_parameters())
    a = torch.cat([p.detach().flatten() for name, p in named.items() if ".lora_A." in name])
    b = torch.cat([p.detach().flatten() for name, p in named.items() if ".lora_B." in name])
    assert torch.count_nonzero(b) == 0 and torch.equal(unet_output(pipe.unet), base)
    assert a.numel() > 1000 and a.std().item() == pytest.approx(1 / rank, rel=0.1)
    assert a.abs().max().item() > 0.5  # beyond any Kaiming-uniform bound of these 32-64 wide layers


def test_the_lora_update_is_scaled_by_alpha_over_rank():
    """Mutant: lora_alpha=alpha -> lora_alpha=rank (scale 1). A targeted layer computes base(x) + alpha / rank *
    B(A(x)): with alpha 8 at rank 2 its update is 4 times B A x."""
    unet = load_pipeline("tiny").unet
    torch.manual_seed(0)
    perturb_lora(add_policy_lora(unet, rank=2, alpha=8, target_modules=["to_q"]), seed=1)
    layer = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    weight_a, weight_b = (p.detach() for name, p in layer.named_parameters() if "lora_" in name)
    base_weight = layer.get_parameter("base_layer.weight").detach()
    x = torch.randn(3, base_weight.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = x @ base_weight.T + 4.0 * (x @ weight_a.T @ weight_b.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_load_lora_into_names_the_keys_a_file_lacks(tmp_path):
    """Mutant: `if missing or unexpected` -> `if unexpected`. A file of a policy on fewer targets than the UNet's
    adapter is refused in one ValueError that counts the missing keys (the mutant's KeyError named one key)."""
    source = load_pipeline("tiny").unet
    torch.manual_seed(0)
    add_policy_lora(source, rank=2, alpha=2, target_modules=["to_q"])
    save_lora(source, tmp_path)
    wider = load_pipeline("tiny").unet
    add_policy_lora(wider, rank=2, alpha=2, target_modules=["to_q", "to_k"])
    with pytest.raises(ValueError, match=r"does not match the UNet's LoRA adapter: 16 keys missing .*0 unexpected"):
        load_lora_into(wider, tmp_path)


def test_load_policy_lora_drops_only_diffusers_notice_of_no_text_encoder_keys(tmp_path, monkeypatch):
    """Mutant: the notice filter's `and` -> `or`. Only "No LoRA keys associated to" the text encoder is dropped:
    such a notice for the UNet (a policy that changes nothing), or another line naming the text encoder, is kept."""
    source = load_pipeline("tiny").unet
    torch.manual_seed(0)
    add_policy_lora(source, rank=2, alpha=2, target_modules=["to_q"])
    save_lora(source, tmp_path)
    pipe = load_pipeline("tiny")
    logger = logging.getLogger("diffusers.loaders.lora_base")
    lines = ["No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.",
             "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'.",
             "the text_encoder was given another scale"]
    real_load = pipe.load_lora_weights

    def load_and_log(*args, **kwargs):
        for line in lines:
            logger.warning(line)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipe, "load_lora_weights", load_and_log)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        load_policy_lora(pipe, tmp_path)
    finally:
        logger.removeHandler(handler)
    assert [line for line in seen if line in lines] == lines[1:]


# -- attention -------------------------------------------------------------------------------------------------

def test_set_attention_backend_refuses_an_object_without_a_vae_in_one_line():
    """Mutant: `all(hasattr(pipe, ...))` -> `any(...)`. Something with a UNet but no VAE is refused as not a
    pipeline (TypeError, one line), not left to an AttributeError from inside."""
    with pytest.raises(TypeError, match=r"^pipe is a SimpleNamespace; set_attention_backend takes a diffusers"):
        set_attention_backend(SimpleNamespace(unet=load_pipeline("tiny").unet), "sdpa")


def test_the_cudnn_processor_hands_temb_on_to_a_spatial_norm():
    """Mutant: CudnnFirstAttnProcessor passes temb=None on. An attention layer with a spatial norm (diffusers'
    MoVQ-style decoders) normalises by temb: on the CPU the processor computes exactly what diffusers' does."""
    torch.manual_seed(0)
    layer = Attention(query_dim=32, heads=4, dim_head=8, spatial_norm_dim=16, processor=AttnProcessor2_0())
    generator = torch.Generator().manual_seed(1)
    x, temb = torch.randn(2, 32, 4, 4, generator=generator), torch.randn(2, 16, 2, 2, generator=generator)
    with torch.no_grad():
        theirs = layer(x, temb=temb)
        layer.set_processor(CudnnFirstAttnProcessor())
        ours = layer(x, temb=temb)
    assert torch.equal(ours, theirs)


def test_xformers_backend_keeps_the_processors_xformers_set(monkeypatch):
    """Mutant: set_attention_backend does not return after enabling xformers, so every layer is put back on
    SDPA. With xformers found (faked) and its switch stubbed, the layers keep the processor the switch set."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        importlib.machinery.ModuleSpec(name, None) if name == "xformers" else find_spec(name, *args)))
    pipe = load_pipeline("tiny")

    def enable_xformers():
        for model in (pipe.unet, pipe.vae):
            model.set_attn_processor(AttnProcessor())

    monkeypatch.setattr(pipe, "enable_xformers_memory_efficient_attention", enable_xformers)
    set_attention_backend(pipe, "xformers")
    assert {type(p) for m in (pipe.unet, pipe.vae) for p in m.attn_processors.values()} == {AttnProcessor}


# -- models ----------------------------------------------------------------------------------------------------

def test_set_channels_last_disabled_puts_the_weights_back_in_nchw():
    """Mutant: set_channels_last ignores enabled=False (channels-last either way). The benchmark's switch off
    must give the plain NCHW weights back, the same Parameters and values."""
    pipe = load_pipeline("tiny")
    convolutions = [m for model in (pipe.unet, pipe.vae) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                    and m.kernel_size != (1, 1)]
    before = [(m.weight, m.weight.detach().clone()) for m in convolutions]
    from rlcm_fast.models import set_channels_last

    set_channels_last(pipe)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in convolutions)
    set_channels_last(pipe, enabled=False)
    assert all(m.weight.is_contiguous() for m in convolutions)
    assert all(m.weight is weight and torch.equal(m.weight, value) for m, (weight, value) in zip(convolutions, before))


def test_guidance_scale_is_not_called_ignored_for_the_ddpo_baseline():
    """Mutant: ignored_guidance without its `method == "rlcm"` condition. A Stable Diffusion UNet has no guidance
    embedding, but DDPO does classifier-free guidance: its guidance_scale is used, not ignored."""
    from rlcm_fast.models import ignored_guidance

    sd_pipe = load_pipeline("tiny-sd", method="ddpo")
    assert ignored_guidance(sd_pipe, "ddpo", 5.0) is None
    assert ignored_guidance(sd_pipe, "rlcm", 5.0).startswith("guidance_scale=5 has no effect")
    assert ignored_guidance(sd_pipe, "rlcm", 1.0) is None
    assert ignored_guidance(load_pipeline("tiny"), "rlcm", 5.0) is None  # an LCM's guidance embedding takes it


def test_a_stable_diffusion_folder_with_another_scheduler_gets_ddim_for_ddpo(tmp_path):
    """Mutant: _load_sd_pipeline keeps a folder's own scheduler. DDPO samples with DDIM: a folder saved with PNDM
    (a plain SD1.5 folder's) is loaded with a DDIMScheduler of the same configuration."""
    from diffusers import DDIMScheduler, PNDMScheduler

    pipe = load_pipeline("tiny-sd", method="ddpo")
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), method="ddpo")
    assert type(loaded.scheduler) is DDIMScheduler
    assert loaded.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps


def test_an_lcm_folder_is_refused_for_ddpo_in_one_line(tmp_path):
    """Mutant: _load_sd_pipeline's guidance-embedding check dropped. A folder of an LCM (not one of the presets,
    refused by name) is no Stable Diffusion pipeline for the DDPO baseline: ModelLoadError, one line."""
    from rlcm_fast.faults import ModelLoadError

    load_pipeline("tiny").save_pretrained(tmp_path)
    message = r"is an LCM \(its UNet has a guidance embedding\); --algo ddpo needs"
    with pytest.raises(ModelLoadError, match=message) as info:
        load_pipeline(str(tmp_path), method="ddpo")
    assert "\n" not in str(info.value)


# -- policy_model ----------------------------------------------------------------------------------------------

def policy_trainer(tmp_path, name, **overrides):
    from rlcm_fast.config import resolve_config
    from rlcm_fast.trainer import Trainer

    cfg = resolve_config(overrides={"device": "cpu", "epochs": 1, "grid_every": 0, **overrides})
    return Trainer(cfg, tmp_path / name)


def test_bf16_mixed_precision_loads_the_base_in_bfloat16_and_trains_float32_lora(tmp_path):
    """Mutant: build_policy_model's base dtype for "bf16" -> float16. The frozen base is in the precision the
    config names (bf16: bfloat16's range), the LoRA in float32."""
    trainer = policy_trainer(tmp_path, "bf16", mixed_precision="bf16")
    trained = {id(p) for p in trainer.params}
    assert trainer.params and all(p.dtype == torch.float32 for p in trainer.params)
    frozen = {p.dtype for model in (trainer.pipe.unet, trainer.pipe.vae, trainer.pipe.text_encoder)
              for p in model.parameters() if id(p) not in trained}
    assert frozen == {torch.bfloat16}


def test_a_train_cuda_graph_on_the_cpu_is_ignored(tmp_path):
    """Mutant: the CUDA-graphed training UNet built whatever the device (`and device.type == "cuda"` dropped).
    On a CPU train_cuda_graph is ignored, as sample_cuda_graph is: training calls the eager UNet and lets its
    gradients be freed (also kills grads_stay_allocated=True)."""
    trainer = policy_trainer(tmp_path, "graphed", train_cuda_graph=True)
    assert trainer.train_unet is trainer.ddp_unet
    assert not trainer.grads_stay_allocated  # the graphed backward's need only (mutant: grads_stay_allocated=True)


@pytest.mark.parametrize("backend, warned", [("auto", True), ("reference", False)])
def test_only_an_auto_policy_step_without_a_fused_step_is_warned_of(tmp_path, monkeypatch, capsys, backend, warned):
    """Mutant: `policy_step_backend == "auto"` -> `!= "auto"`. Where no fused step runs, auto falls back to the
    plain-PyTorch step and says so once; a config that asks for that reference step is told nothing."""
    monkeypatch.setattr("rlcm_fast.policy_model.fused_step_missing", lambda device: "no fused step here")
    policy_trainer(tmp_path, backend, policy_step_backend=backend)
    warning = "rlcm-fast: warning: the policy step runs in plain PyTorch (slower, same results): no fused step here"
    assert capsys.readouterr().err.count(warning) == (1 if warned else 0)


def test_build_policy_model_puts_the_attention_on_the_configs_backend():
    """Mutant: build_policy_model's set_attention_backend call dropped (every layer stays on diffusers' default
    SDPA processor). Built directly (the CPU refusal of cudnn is launch's), attention_backend=cudnn puts every UNet
    and VAE attention layer on the cuDNN-first processor."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.policy_model import build_policy_model

    accelerator = SimpleNamespace(device=torch.device("cpu"), prepare=lambda module: module,
                                  unwrap_model=lambda module, keep_fp32_wrapper: module)
    cfg = resolve_config(overrides={"device": "cpu", "attention_backend": "cudnn"})
    pipe = build_policy_model(cfg, accelerator, "no").pipe
    processors = [p for model in (pipe.unet, pipe.vae) for p in model.attn_processors.values()]
    assert processors and all(type(p) is CudnnFirstAttnProcessor for p in processors)


def test_the_training_unet_computes_what_the_bare_unet_does_under_the_trainers_autocast(tmp_path):
    """Mutant: accelerate's unwrap_model(ddp_unet, keep_fp32_wrapper=False) dropped (its autocast and float32
    output wrapper stay on the training UNet). Under bf16 the training forward is the bare UNet's under
    Trainer.autocast(): the same bfloat16 output, bitwise."""
    from unet_probes import unet_inputs

    trainer = policy_trainer(tmp_path, "bf16", mixed_precision="bf16")
    args, kwargs = unet_inputs(trainer.unet)
    with torch.no_grad(), trainer.autocast():
        ours, theirs = trainer.train_unet(*args, **kwargs).sample, trainer.unet(*args, **kwargs).sample
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
