"""Mutation-testing round 49b (policy_step, ddpo; a second round after 43a): hand-written mutants of those modules were
run against their tests (test_policy_step, test_policy_step_contract, test_native_step, test_ddpo, and rounds 43a and
44e); each test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast: the step's
math and the DDIM step on small random tensors, the DDPO sampler on the tiny-sd preset at 16 px."""

import pytest
import torch
from diffusers import LCMScheduler

from rlcm_fast.ddpo import DDIM_SCALARS, DDPOSampler, ddim_mean, ddim_step
from rlcm_fast.models import load_pipeline
from rlcm_fast.policy_step import (
    PREDICTION_TYPES,
    check_prediction_type,
    consistency_output,
    fused_step_missing,
    policy_step,
    policy_step_reference,
    row_scalars_for_schedule,
)
from test_mutants_round43a import assert_bfloat16_latents_give_a_float32_trajectory


def _rows(batch, seed):
    """(model_output, x, noise, scalars) of `batch` rows at distinct LCM timesteps."""
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             timestep_spacing="leading")
    generator = torch.Generator().manual_seed(seed)
    model_output, x, noise = (torch.randn(batch, 4, 3, 3, generator=generator) for _ in range(3))
    t = torch.tensor([999, 759, 259, 19][:batch])
    return model_output, x, noise, row_scalars_for_schedule(scheduler, t, torch.tensor([759, 259, 19, 2][:batch]))


# -- policy_step: prediction types -----------------------------------------------------------------------------

def test_an_unknown_prediction_type_names_every_allowed_one():
    """Mutant: the error's list of allowed prediction types cut to its first two. A user whose scheduler predicts
    the sample must read that "sample" is allowed, not be told only epsilon and v_prediction exist."""
    with pytest.raises(ValueError, match=r"^prediction_type 'flow' is not supported; allowed: epsilon, "
                                         r"v_prediction, sample$"):
        check_prediction_type("flow")
    for prediction_type in PREDICTION_TYPES:
        check_prediction_type(prediction_type)


@pytest.mark.parametrize("call", ["reference", "consistency_output"])
def test_the_reference_and_consistency_output_refuse_an_unknown_prediction_type_in_one_line(call):
    """Mutant: predicted_original without its final check_prediction_type (it returns None for an unknown type).
    policy_step_reference and consistency_output are called directly (the tests' definition, the sampler's last
    UNet call); a typo such as "v-prediction" must be the one-line error naming the allowed types, not a TypeError
    about multiplying a Tensor by None from deep inside the arithmetic."""
    model_output, x, noise, scalars = _rows(2, seed=1)
    with pytest.raises(ValueError, match=r"^prediction_type 'v-prediction' is not supported; allowed: "):
        if call == "reference":
            policy_step_reference(model_output, x, scalars, "v-prediction", noise=noise)
        else:
            consistency_output(model_output, x, scalars, "v-prediction")


# -- policy_step: the C++ op's backward ------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_loss_on_the_sampled_next_state_alone_gets_its_gradient_from_the_cpp_step(prediction_type):
    """Mutant: the native backward's early return (no incoming gradient at all) tested without grad_next, so a
    loss on the sampled x_next alone (D and the log-prob unused: their incoming gradients are None) came back as no
    gradient for model_output and x. Pathwise objectives through the sampled chain (x_next = alpha_next D +
    sigma_next z) need exactly this gradient; it must be the reference's, not silently missing."""
    model_output, x, noise, scalars = _rows(3, seed=2)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    grads = {}
    for backend in ("native", "reference"):
        leaves = [model_output.clone().requires_grad_(True), x.clone().requires_grad_(True)]
        _, sampled, _ = policy_step(*leaves, scalars, prediction_type, noise=noise, backend=backend)
        grads[backend] = torch.autograd.grad((sampled * weights).sum(), leaves, allow_unused=True)
    for ours, reference in zip(grads["native"], grads["reference"]):
        assert ours is not None
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


# -- policy_step: why the trainer runs the reference ------------------------------------------------------------

def test_a_device_without_a_fused_step_is_named_in_the_reason():
    """Mutant: fused_step_missing's last message without the device's type. The trainer warns with it that the
    policy step runs in plain PyTorch; on an MPS (or meta) device the warning must say which device has no fused
    step, not "these tensors"."""
    assert fused_step_missing(torch.device("meta")) == "no fused step runs on meta tensors"
    assert fused_step_missing(torch.device("mps")) == "no fused step runs on mps tensors"


# -- policy_step: its arguments --------------------------------------------------------------------------------

def test_an_unknown_backend_is_refused_with_the_allowed_ones_rather_than_run_as_the_reference():
    """Mutant: policy_step without its `backend not in BACKENDS` check. A misspelt backend ("trition", "cpp") fell
    through to the plain-PyTorch reference: the run was silently slower, and a benchmark of the misspelt fused step
    measured the reference. It must be a one-line error naming the allowed backends."""
    model_output, x, noise, scalars = _rows(2, seed=4)
    with pytest.raises(ValueError, match=r"^backend 'trition' is unknown; allowed: auto, triton, native, reference$"):
        policy_step(model_output, x, scalars, "epsilon", noise=noise, backend="trition")


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_a_float32_row_table_is_taken_as_the_float64_one(backend):
    """Mutant: policy_step moving the scalars to the tensors' device without making them float64. The table may
    come in any floating dtype and on any device (it is moved); a float32 table must give the step of the same
    values in float64 on the C++ backend too, not the C++ wrapper's "scalars must be float64" error on CPU while
    the reference takes it."""
    model_output, x, noise, scalars = _rows(3, seed=5)
    low = scalars.float()
    expected = policy_step(model_output, x, low.double(), "v_prediction", noise=noise, backend=backend)
    got = policy_step(model_output, x, low, "v_prediction", noise=noise, backend=backend)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


# -- ddpo ------------------------------------------------------------------------------------------------------

PROMPTS = ["a cat"]


@pytest.fixture(scope="module")
def tiny_sd():
    return load_pipeline("tiny-sd", method="ddpo")


def _ddim_rows(batch, seed):
    """(model_output, x, noise, DDIM scalars) of `batch` rows of one action (sqrt(a_t) 0.5, sqrt(a_prev) 0.75)."""
    generator = torch.Generator().manual_seed(seed)
    model_output, x, noise = (torch.randn(batch, 4, 3, 3, generator=generator) for _ in range(3))
    row = torch.tensor([[0.5, 0.75**0.5, 0.75, 0.5, 0.25]], dtype=torch.float64)
    return model_output, x, noise, row.expand(batch, len(DDIM_SCALARS))


@pytest.mark.parametrize("call", ["ddim_mean", "ddim_step"])
def test_the_ddim_step_refuses_an_unknown_prediction_type_in_one_line(call):
    """Mutant: ddim_mean without the check_prediction_type of its last branch. DDPO's step is called directly
    (benchmarks, tests) with a prediction type read from a scheduler config; an unknown one must be the one-line
    error naming the allowed types, not an UnboundLocalError about `pred_x0` from inside the step."""
    model_output, x, noise, scalars = _ddim_rows(2, seed=11)
    with pytest.raises(ValueError, match=r"^prediction_type 'flow' is not supported; allowed: epsilon, "):
        if call == "ddim_mean":
            ddim_mean(model_output, x, scalars, "flow")
        else:
            ddim_step(model_output, x, scalars, "flow", noise=noise)


def test_a_sampled_ddim_state_is_stored_in_xs_dtype_and_its_log_prob_is_of_that_state():
    """Mutant: ddim_step without the `.to(x.dtype)` of the sampled next state. For bfloat16 latents the next state
    must come back bfloat16 (the dtype of the trajectory it is stored in), and its log-prob must be of that
    rounded state, so that training, which rescores the stored state, gets the same log-prob (PPO's ratio 1)."""
    model_output, x, noise, scalars = _ddim_rows(3, seed=12)
    x = x.to(torch.bfloat16)
    _, sampled, logp = ddim_step(model_output, x, scalars, "epsilon", noise=noise)
    assert sampled.dtype == torch.bfloat16
    _, stored, rescored = ddim_step(model_output, x, scalars, "epsilon", next_state=sampled)
    assert stored is sampled
    torch.testing.assert_close(rescored, logp, atol=0, rtol=0)


def test_every_ddpo_action_is_trained(tiny_sd):
    """Mutant: DDPOSampler.trained_steps = horizon - 1 (the LCM sampler's count). DDPO trains each of its S DDIM
    actions (timestep_fraction 1.0); the benchmarks count trained rows per epoch from trained_steps for the speed
    comparison with RLCM, so it must be the number of actions: one per DDIM timestep, each with its noise."""
    sampler = DDPOSampler(tiny_sd, num_steps=3, resolution=16)
    assert sampler.trained_steps == 3 == len(sampler.timesteps) == len(sampler.action_scalars)
    assert len(sampler.draw_noises(1, torch.Generator().manual_seed(13), torch.float32)) == sampler.trained_steps


def test_the_default_resolution_is_the_unets_sample_size_in_pixels(tiny_sd):
    """Mutant: the default resolution without the VAE's scale factor (the UNet's sample_size in latent pixels read
    as image pixels). Without a resolution the sampler must make images of the pipeline's own default size, as
    StableDiffusionPipeline does (sample_size * vae_scale_factor), with latents of sample_size."""
    sampler = DDPOSampler(tiny_sd, num_steps=1)
    size = tiny_sd.unet.config.sample_size
    assert sampler.resolution == size * tiny_sd.vae_scale_factor
    latents = sampler.draw_latents(1, torch.Generator().manual_seed(14), torch.float32)
    assert latents.shape == (1, tiny_sd.unet.config.in_channels, size, size)


def test_bfloat16_initial_latents_give_a_float32_ddpo_trajectory(tiny_sd):
    """Mutant: DDPOSampler.sample without the float32 of `x = latents.to(self.device, torch.float32)`. Under bf16
    mixed precision x_0 and the noises are drawn in the embeddings' dtype (bfloat16); the trajectory must still be
    computed and stored in float32, as for float32 latents of the same values, not every action rounded to
    bfloat16, which would change the log-probs the trainer replays."""
    sampler = DDPOSampler(tiny_sd, num_steps=2, guidance_scale=1.0, resolution=16)
    assert_bfloat16_latents_give_a_float32_trajectory(sampler, tiny_sd.unet, PROMPTS, seed=15)


def test_the_ddpo_sampler_refuses_an_eta_beyond_1_as_the_config_does(tiny_sd):
    """Found with mutant `max(1 - a_prev - std**2, 0)` -> `abs(...)` (equivalent for eta in (0, 1], where the term
    is positive). DDIM's eta lies in (0, 1] (the config refuses others: "eta=1.5 is invalid"); beyond 1 the
    variance eta^2 sigma_t^2 exceeds 1 - a_prev at the last step (and DDIMScheduler.step gives NaN there), so the
    clamp makes a policy that is not DDIM's. DDPOSampler is public: it must refuse such an eta in one line
    (mended in DDPOSampler)."""
    with pytest.raises(ValueError, match=r"^eta=1\.5 is invalid: DDPO's DDIM eta must be in \(0, 1\]"):
        DDPOSampler(tiny_sd, num_steps=2, eta=1.5)
