"""Mutation-testing round 47d (sampler, fast_sampler, the non-CUDA-graph parts of policy_model), a second round
over the modules of rounds 41b and 43a by another helper with its own mutants: those that survived the modules'
tests (test_sampler, test_fast_sampler and round 43a's for the samplers; the policy-building tests of round 41b,
test_cuda_graphs and test_policy_step for policy_model) are killed here, each test naming its mutant. All are
CPU-only, seeded and fast: the tiny model, policies built without training, and torch.compile recorded, not run."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import LCMScheduler

from rlcm_fast import FastLCMSampler
from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.models import load_pipeline
from rlcm_fast.policy_model import build_policy_model
from rlcm_fast.sampler import LCMSampler, policy_sampler

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


# -- sampler ---------------------------------------------------------------------------------------------------

def test_lcm_samplers_refusal_of_original_inference_steps_names_the_allowed_range(pipe):
    """Mutant: the message's range `{horizon}..` -> `{original_inference_steps}..` ("must be in 3..1000" for the
    3 given). The one line a user sees must name what is allowed: from the horizon (4) to num_train_timesteps."""
    with pytest.raises(ValueError) as caught:
        LCMSampler(pipe, 4, original_inference_steps=3, resolution=16)
    assert str(caught.value) == ("original_inference_steps=3 is invalid: it must be in horizon..num_train_timesteps = "
                                 "4..1000")


def test_building_a_sampler_leaves_the_pipelines_own_scheduler_alone(pipe):
    """Mutant: LCMSampler sets the timesteps on pipe.scheduler itself, not on its own copy. Building a trainer's
    or a FastLCMSampler's sampler must not change the user's pipeline: its scheduler keeps the step count and
    timesteps it had (here those of a 6-step schedule the user set)."""
    pipe.scheduler.set_timesteps(6)
    before = (pipe.scheduler.num_inference_steps, pipe.scheduler.timesteps.clone())
    sampler = LCMSampler(pipe, 3, original_inference_steps=30, resolution=16)
    FastLCMSampler(pipe, batch_size=1, num_inference_steps=2)
    assert pipe.scheduler.num_inference_steps == before[0] == 6
    assert torch.equal(pipe.scheduler.timesteps, before[1])
    own = LCMScheduler.from_config(pipe.scheduler.config)
    own.set_timesteps(3, original_inference_steps=30)
    assert sampler.timesteps.tolist() == own.timesteps.tolist()


def test_policy_sampler_takes_original_inference_steps_from_the_config(pipe):
    """Mutant: policy_sampler passes 50 (the default) for cfg.original_inference_steps. A config's
    original_inference_steps changes the training schedule's timesteps: the sampler must step on the schedule
    LCMScheduler sets for it, not the default one."""
    cfg = resolve_config(model="tiny", overrides={"horizon": 4, "original_inference_steps": 20, "resolution": 16})
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4, original_inference_steps=20)
    default = LCMScheduler.from_config(pipe.scheduler.config)
    default.set_timesteps(4, original_inference_steps=50)
    assert scheduler.timesteps.tolist() != default.timesteps.tolist()
    assert policy_sampler(pipe, cfg).timesteps.tolist() == scheduler.timesteps.tolist()


def test_compile_decode_compiles_the_samplers_decode_with_the_configs_backend(pipe, monkeypatch):
    """Mutant: policy_sampler ignores compile_decode. `compile_decode: true` must put sampling's VAE decode under
    torch.compile (the config's backend, static shapes); recorded here, not run, so the test stays fast."""
    compiled = []

    def record(fn, **kwargs):
        compiled.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    cfg = resolve_config(model="tiny", overrides={"compile_decode": True, "compile_backend": "aot_eager"})
    sampler = policy_sampler(pipe, cfg)
    assert len(compiled) == 1
    fn, kwargs = compiled[0]
    assert fn.__func__ is LCMSampler.decode and fn.__self__ is sampler
    assert kwargs == {"backend": "aot_eager", "dynamic": False}
    compiled.clear()
    policy_sampler(pipe, resolve_config(model="tiny"))
    assert compiled == []


def test_an_lcm_trajectory_says_each_rows_prompt(pipe):
    """Mutant: LCMSampler.sample returns Trajectory(prompts=None). Only a trajectory sampled from given embeddings
    has no prompts (Trajectory's contract): one sampled from prompts lists them, row by row, as a list of its own
    even when the caller passed a tuple."""
    sampler = LCMSampler(pipe, 2, resolution=16)
    trajectory = sampler.sample(pipe.unet, ("a dog", "a cat"), torch.Generator().manual_seed(0), decode=False)
    assert trajectory.prompts == ["a dog", "a cat"] and trajectory.states.shape[0] == 2


def test_a_bf16_samplers_stored_actions_are_rescored_with_a_bf16_guidance_embedding():
    """Mutant: _stored_rows asks for the guidance embedding in float32, not in the prompt embeddings' dtype. A
    bf16 pipeline's training rescoring (action_log_probs, action_means) must feed its UNet what sampling fed it:
    without an autocast a float32 embedding fails in the bf16 UNet's matmul, and the rescored log-probs must be
    the sampled ones."""
    bf16 = load_pipeline("tiny", "cpu", torch.bfloat16)
    sampler = LCMSampler(bf16, 3, resolution=8)
    trajectory = sampler.sample(bf16.unet, PROMPTS, torch.Generator().manual_seed(3), decode=False)
    sample_idx, step_idx = torch.tensor([0, 1]), torch.tensor([1, 0])
    embeds = sampler.prompt_embeddings(PROMPTS)[sample_idx]
    with torch.no_grad():
        log_probs, _, _ = sampler.action_log_probs(bf16.unet, trajectory.states, sample_idx, step_idx, embeds)
        mean, std = sampler.action_means(bf16.unet, trajectory.states, sample_idx, step_idx, embeds)
    torch.testing.assert_close(log_probs, trajectory.log_probs[sample_idx, step_idx], atol=1e-5, rtol=0)
    assert mean.shape == (2, 4, 4, 4) and std.shape == (2,)


# -- fast_sampler ----------------------------------------------------------------------------------------------

def test_an_object_with_only_some_of_a_pipelines_parts_is_refused_in_one_line(pipe):
    """Mutant: `all(hasattr(pipe, ...))` -> `any(...)`. Something with a UNet and an LCMScheduler but no VAE is
    no pipeline: refused naming its type, not an AttributeError from deep inside."""
    half = SimpleNamespace(unet=pipe.unet, scheduler=LCMScheduler.from_config(pipe.scheduler.config))
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(half, batch_size=1, num_inference_steps=1)
    assert str(caught.value) == ("pipe is a SimpleNamespace; FastLCMSampler takes a diffusers "
                                 "LatentConsistencyModelPipeline (its unet, vae and scheduler)")


def test_a_guidance_scale_tensor_without_data_is_refused_in_one_line(pipe):
    """Mutant: `except (TypeError, ValueError, RuntimeError)` -> without RuntimeError. float() of a tensor on the
    meta device (as a model built without its weights hands out) raises RuntimeError in torch: it must be the
    one-line ValueError naming the argument, not a traceback from inside torch."""
    scale = torch.tensor(8.0, device="meta")
    with pytest.raises(ValueError) as caught:
        FastLCMSampler(pipe, batch_size=1, num_inference_steps=1, guidance_scale=scale)
    assert str(caught.value) == f"guidance_scale={scale!r} is invalid: it must be a finite number"
    assert "device='meta'" in str(caught.value)


def test_the_smallest_side_the_error_allows_is_taken(pipe):
    """Mutant: `value < multiple` -> `value <= multiple`. The refusal says "a multiple of 8, at least 8": 8 px (4
    latents at the tiny VAE's factor 2) is a size diffusers' pipeline samples, and the sampler gives its image."""
    fast = FastLCMSampler(pipe, batch_size=1, num_inference_steps=2, height=8, width=8)
    assert fast.shape == (1, 4, 4, 4)
    ours = fast("a cat", generator=torch.Generator().manual_seed(0)).images
    theirs = pipe("a cat", num_inference_steps=2, height=8, width=8, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 8, 8) and (ours - theirs).abs().max().item() < 1e-5


# -- policy_model ----------------------------------------------------------------------------------------------

ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), prepare=lambda module: module,
                              unwrap_model=lambda module, keep_fp32_wrapper: module)


def built(precision="no", model="tiny", **overrides):
    """build_policy_model on the CPU with a stand-in accelerator (one process, no wrapping)."""
    cfg = resolve_config(model=model, overrides={"device": "cpu", **overrides})
    return build_policy_model(cfg, ACCELERATOR, precision)


@pytest.fixture(scope="module")
def default_policy():
    """The default config's policy, without mixed precision: every switch below off."""
    return built()


def test_fp16_mixed_precision_loads_the_base_in_float16():
    """Mutant: build_policy_model's base dtype for "fp16" -> bfloat16. fp16 runs keep the frozen base in float16
    (its precision, and the GradScaler's case), the LoRA in float32."""
    policy = built("fp16")
    trained = {id(p) for p in policy.params}
    assert policy.params and all(p.dtype == torch.float32 for p in policy.params)
    assert {p.dtype for p in policy.pipe.unet.parameters() if id(p) not in trained} == {torch.float16}


def lora_a(policy):
    return torch.cat([p.detach().flatten() for name, p in policy.pipe.unet.named_parameters() if ".lora_A." in name])


def test_the_loras_initialisation_is_the_configs_seed(default_policy):
    """Mutant: build_policy_model's torch.manual_seed(cfg.seed) dropped. The LoRA's random A is drawn from the
    run's seed, whatever the global generator's state: the same seed builds the same policy (a run is
    reproducible, and every process of a run starts from the same weights), another seed another one."""
    torch.manual_seed(456)
    assert torch.equal(lora_a(built(seed=0)), lora_a(default_policy))
    assert not torch.equal(lora_a(built(seed=1)), lora_a(default_policy))


def test_the_optimizer_is_adamw_with_the_configs_hyperparameters():
    """Mutants: AdamW's betas swapped (beta2, beta1) and its eps dropped (torch's 1e-8 default). Every optimizer
    setting of the config reaches the optimizer of the LoRA parameters."""
    policy = built(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.02, adam_epsilon=1e-6)
    assert type(policy.optimizer) is torch.optim.AdamW and len(policy.optimizer.param_groups) == 1
    group = policy.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-4, (0.8, 0.95), 0.02, 1e-6)
    assert [id(p) for p in group["params"]] == [id(p) for p in policy.params]


def test_gradient_checkpointing_is_switched_on_by_the_config(default_policy):
    """Mutant: the gradient_checkpointing switch ignored. `gradient_checkpointing: true` is the documented way to
    train in less memory: the UNet must recompute its activations, and not without it."""
    assert built(gradient_checkpointing=True).pipe.unet.is_gradient_checkpointing
    assert not default_policy.pipe.unet.is_gradient_checkpointing


def lora_input_casts(policy):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {m.cast_input_dtype_enabled for m in policy.pipe.unet.modules() if isinstance(m, BaseTunerLayer)}


def test_lora_input_casts_are_left_to_autocast_only_under_mixed_precision(default_policy):
    """Mutant: `precision != "no"` -> `== "no"`. Without mixed precision there is no autocast to cast a LoRA
    layer's input to float32: peft must keep its own cast there (else a bf16 input meets float32 weights), and
    only under bf16/fp16 is it left to autocast."""
    assert lora_input_casts(default_policy) == {True}
    assert lora_input_casts(built("bf16")) == {False}


def test_the_policy_warns_of_a_guidance_scale_its_unet_ignores(monkeypatch):
    """Mutant: ignored_guidance dropped from the policy's warnings. An LCM without a guidance embedding (SD1.5 +
    LCM-LoRA, stood in for by the tiny SD pipeline with an LCMScheduler) samples unguided: a guidance_scale of 5 in
    the config must be warned of, not silently ignored."""
    def lcm_lora_like(*args, **kwargs):
        sd = load_pipeline("tiny-sd", method="ddpo")
        sd.scheduler = LCMScheduler.from_config(sd.scheduler.config)
        return sd

    monkeypatch.setattr("rlcm_fast.policy_model.load_pipeline", lcm_lora_like)
    warning = ("guidance_scale=5 has no effect: this UNet has no guidance embedding (an LCM-LoRA model), so it "
               "samples unguided, as at guidance_scale=1")
    assert warning in built(guidance_scale=5.0).warnings


def test_the_ddpo_baseline_is_not_warned_of_the_lcm_policy_step(monkeypatch):
    """Mutant: the slower-policy-step warning without its `method == "rlcm"` condition. DDPO's DDIM step never
    runs the LCM policy step, fused or not: telling its user the step "runs in plain PyTorch" is false."""
    monkeypatch.setattr("rlcm_fast.policy_model.fused_step_missing", lambda device: "no fused step here")
    warning = "the policy step runs in plain PyTorch (slower, same results): no fused step here"
    assert warning not in built(model="tiny-sd", method="ddpo").warnings
    assert warning in built().warnings


def test_a_lora_rank_too_large_for_the_model_names_the_rank_and_the_model():
    """Mutant: the ConfigError without the rank and the model. The one line must say which value is bad and for
    which model it is too large."""
    with pytest.raises(ConfigError, match=r"^lora_rank=100000 is invalid for model 'tiny': "):
        built(lora_rank=100000, lora_alpha=1.0)


def test_channels_last_puts_the_unets_and_vaes_convolutions_in_channels_last(default_policy):
    """Mutant: the channels_last switch ignored. `channels_last: true` (README, "Speed") must convert the UNet's
    and the VAE's convolution weights, the LoRA's among them; by default they stay NCHW."""
    def convolutions(policy):
        return [m.weight for model in (policy.pipe.unet, policy.pipe.vae) for m in model.modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]

    weights = convolutions(built(channels_last=True))
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in weights)
    assert all(w.is_contiguous() for w in convolutions(default_policy))


def test_half_precision_norms_swap_the_norms_and_are_warned_of_only_when_asked_for(default_policy):
    """Mutants: the half_precision_norms switch ignored, and its no-effect warning given whatever the switch.
    With the switch the UNet's and VAE's norms get the half-precision forward (and, without mixed precision, the
    warning that it changes nothing); without it the norms stay plain and nothing is said."""
    from rlcm_fast.norm_precision import HALF_PRECISION_CLASS

    def half_norms(policy):
        return [m for model in (policy.pipe.unet, policy.pipe.vae) for m in model.modules()
                if type(m) in HALF_PRECISION_CLASS.values()]

    switched = built(half_precision_norms=True)
    assert half_norms(switched)
    assert [w for w in switched.warnings if w.startswith("half_precision_norms=true has no effect")]
    assert not half_norms(default_policy)
    assert not [w for w in default_policy.warnings if w.startswith("half_precision_norms")]
