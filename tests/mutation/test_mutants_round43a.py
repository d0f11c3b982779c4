"""Mutation-testing round 43a (policy_step, sampler, ddpo, fast_sampler): hand-written mutants of those modules
were run against their tests; each test here kills one that survived (named in its docstring). All are CPU-only,
seeded and fast: the step's math on small random tensors, the samplers on the tiny presets at 16-32 px."""

import inspect

import pytest
import torch
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler

from rlcm_fast.ddpo import DDPOSampler, ddim_mean, ddim_row_scalars
from rlcm_fast.fast_sampler import FastLCMSampler
from rlcm_fast.models import load_pipeline
from rlcm_fast.policy_step import (
    consistency_output,
    mean_gaussian_log_prob,
    policy_mean_std,
    policy_step,
    policy_step_reference,
    row_scalars_for_schedule,
)
from rlcm_fast.sampler import LCMSampler
from scheduler_swap import scheduler_swapped


def _lcm_scheduler():
    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading")


def _random_rows(batch, seed, dtype=torch.float32):
    """(model_output, x, noise, scalars) of `batch` rows at distinct LCM timesteps, with every column distinct."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 4, 3, 3)
    model_output, x, noise = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    t = torch.tensor([999, 759, 259, 19][:batch])
    scalars = row_scalars_for_schedule(_lcm_scheduler(), t, torch.tensor([759, 259, 19, 2][:batch]))
    return model_output, x, noise, scalars


# -- policy_step -----------------------------------------------------------------------------------------------

def test_the_boundary_scalings_are_those_of_the_actions_own_timestep_not_the_next():
    """Mutant: c_skip, c_out taken at t_next instead of t. D_k = c_out(t_k) pred_x0 + c_skip(t_k) x_k (DESIGN 3.1):
    the scalings belong to the state's timestep. At large t both mistakes round to c_skip ~ 0, c_out ~ 1, so the
    schedule-level tests miss it; at the small timesteps of long horizons (19, 2) they differ by orders of
    magnitude, and the consistency function would mix x_k in with the wrong weight."""
    t, t_next = torch.tensor([999, 259, 19, 2]), torch.tensor([259, 19, 2, -1])
    scalars = row_scalars_for_schedule(_lcm_scheduler(), t, t_next)
    scaled = 10.0 * t.double()
    torch.testing.assert_close(scalars[:, 2], 0.25 / (scaled**2 + 0.25), rtol=1e-12, atol=0)
    torch.testing.assert_close(scalars[:, 3], scaled / (scaled**2 + 0.25).sqrt(), rtol=1e-12, atol=0)


def test_the_policys_mean_and_std_are_the_ones_its_log_prob_scores_with():
    """Mutants: policy_mean_std reading columns 3:5 (c_out, alpha_next) instead of 4: (alpha_next, sigma_next), or
    returning D without the alpha_next factor. The trainer's KL to the base model is built from this mean and std,
    so they must be the Gaussian the policy samples from: mean alpha_next * D, std sigma_next, and the log-prob of
    a sampled action under them equals the policy step's own log-prob."""
    model_output, x, noise, scalars = _random_rows(4, seed=3)
    denoised, sampled, logp = policy_step(model_output, x, scalars, "epsilon", noise=noise, backend="reference")
    mean, std = policy_mean_std(denoised, scalars)
    assert mean.shape == x.shape and std.shape == (4,) and mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(std, scalars[:, 5].float())
    torch.testing.assert_close(mean, scalars[:, 4].float().view(4, 1, 1, 1) * denoised)
    torch.testing.assert_close(mean_gaussian_log_prob(sampled, mean, std), logp, atol=1e-5, rtol=1e-6)


def test_consistency_output_comes_back_in_xs_dtype_as_the_policy_steps_d_does():
    """Mutant: consistency_output without its final `.to(x.dtype)`. The last UNet call's D (the latent the image
    is decoded from) must be the same tensor, dtype included, as the D policy_step returns for the same inputs:
    for bfloat16 latents both are bfloat16, not a float32 D from one path and a bfloat16 D from the other."""
    model_output, x, noise, scalars = _random_rows(3, seed=4, dtype=torch.bfloat16)
    alone = consistency_output(model_output, x, scalars, "v_prediction")
    stepped, _, _ = policy_step(model_output, x, scalars, "v_prediction", noise=noise, backend="reference")
    assert alone.dtype == torch.bfloat16
    assert torch.equal(alone, stepped)


def test_the_reference_step_refuses_noise_and_a_next_state_together():
    """Mutant: policy_step_reference's check reduced to `noise is None and next_state is None`. The reference is
    the definition the C++ and Triton steps are tested against and is called directly; given both a noise and a
    stored next state, it must refuse rather than silently score the next state and ignore the noise."""
    model_output, x, noise, scalars = _random_rows(2, seed=5)
    with pytest.raises(ValueError, match="^give exactly one of noise"):
        policy_step_reference(model_output, x, scalars, "epsilon", noise=noise, next_state=x.clone())


# -- sampler ---------------------------------------------------------------------------------------------------

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def tiny_lcm():
    return load_pipeline("tiny")


@pytest.mark.parametrize("horizon, original_inference_steps", [(4, 4), (4, 1000)])
def test_original_inference_steps_may_be_the_horizon_or_num_train_timesteps(tiny_lcm, horizon,
                                                                           original_inference_steps):
    """Mutants: `horizon <= original_inference_steps <= num_train_timesteps` with either `<=` made `<`. Both ends
    are schedules diffusers' LCMScheduler sets (and its pipeline samples): refusing them would refuse a valid
    config. The sampler's timesteps must be the scheduler's own for them."""
    sampler = LCMSampler(tiny_lcm, horizon, original_inference_steps=original_inference_steps, resolution=16)
    scheduler = LCMScheduler.from_config(tiny_lcm.scheduler.config)
    scheduler.set_timesteps(horizon, original_inference_steps=original_inference_steps)
    assert sampler.timesteps.tolist() == scheduler.timesteps.tolist()
    with pytest.raises(ValueError, match=f"^original_inference_steps={horizon - 1} is invalid"):
        LCMSampler(tiny_lcm, horizon, original_inference_steps=horizon - 1, resolution=16)
    with pytest.raises(ValueError, match="^original_inference_steps=1001 is invalid"):
        LCMSampler(tiny_lcm, horizon, original_inference_steps=1001, resolution=16)


def test_training_rescoring_of_mixed_steps_gives_back_the_sampled_log_probs_and_their_gaussian(tiny_lcm):
    """Mutants in LCMSampler's training path: the next state read at step k instead of k + 1, one timestep or one
    row of scalars for the whole minibatch instead of each row's own, action_means / with_mean built from the raw
    UNet output instead of D (and the resolution argument ignored). A minibatch mixes steps of several
    trajectories: rescoring each stored action with the same weights must give exactly its sampling-time log-prob
    (PPO's ratio 1), and the returned mean and std must be the Gaussian that log-prob is of. Read as epsilon
    prediction: the tiny model predicts the sample, and at these timesteps D is then within 1e-6 of the raw
    output, which would hide the with_mean mutants."""
    with scheduler_swapped(tiny_lcm, LCMScheduler, prediction_type="epsilon"):
        sampler = LCMSampler(tiny_lcm, horizon=4, guidance_scale=8.0, resolution=16)
    trajectory = sampler.sample(tiny_lcm.unet, PROMPTS, torch.Generator().manual_seed(7), decode=False)
    assert trajectory.states.shape == (2, 4, 4, 8, 8)  # 16 px at the tiny VAE's factor 2, not its native 32 px
    sample_idx, step_idx = torch.tensor([1, 0, 1, 0]), torch.tensor([2, 0, 0, 1])
    embeds = sampler.prompt_embeddings(PROMPTS)[sample_idx]
    with torch.no_grad():
        log_probs, mean, std = sampler.action_log_probs(tiny_lcm.unet, trajectory.states, sample_idx, step_idx,
                                                        embeds, with_mean=True)
        means, stds = sampler.action_means(tiny_lcm.unet, trajectory.states, sample_idx, step_idx, embeds)
    torch.testing.assert_close(log_probs, trajectory.log_probs[sample_idx, step_idx], atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, means, atol=1e-6, rtol=0)
    torch.testing.assert_close(std, stds, atol=0, rtol=0)
    torch.testing.assert_close(std, sampler.action_scalars[step_idx, 5].float())
    rescored = mean_gaussian_log_prob(trajectory.states[sample_idx, step_idx + 1], mean, std)
    torch.testing.assert_close(rescored, log_probs, atol=1e-5, rtol=0)


def test_bfloat16_initial_latents_give_a_float32_trajectory(tiny_lcm):
    """Mutant: rollout without its `x = x.float()`. Under bf16 mixed precision x_0 and the noises are drawn in the
    embeddings' dtype (bfloat16); the trajectory must still be computed and stored in float32 (Trajectory.states
    is float32), not every action rounded to bfloat16, which would change the log-probs the trainer replays."""
    sampler = LCMSampler(tiny_lcm, horizon=3, guidance_scale=8.0, resolution=16)
    assert_bfloat16_latents_give_a_float32_trajectory(sampler, tiny_lcm.unet, PROMPTS, seed=8)


def assert_bfloat16_latents_give_a_float32_trajectory(sampler, unet, prompts, seed):
    """The sampler's trajectory from bfloat16 initial latents: float32, and equal to the one from the same values
    given in float32."""
    generator = torch.Generator().manual_seed(seed)
    latents = sampler.draw_latents(len(prompts), generator, torch.bfloat16)
    noises = sampler.draw_noises(len(prompts), generator, torch.float32)
    low = sampler.sample(unet, prompts, latents=latents, noises=noises, decode=False)
    full = sampler.sample(unet, prompts, latents=latents.float(), noises=noises, decode=False)
    assert low.states.dtype == low.log_probs.dtype == torch.float32
    torch.testing.assert_close(low.states, full.states, atol=0, rtol=0)
    torch.testing.assert_close(low.log_probs, full.log_probs, atol=0, rtol=0)


# -- ddpo ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_each_ddim_action_is_ddim_scheduler_steps_gaussian_down_to_a_previous_timestep_of_0(prediction_type):
    """Mutant: `prev >= 0` -> `prev > 0` in ddim_row_scalars. With steps_offset=0 and set_alpha_to_one=True (a
    config diffusers allows) the timesteps are 750, 500, 250, 0, and the action at t=250 steps to timestep 0,
    whose alpha is alphas_cumprod[0], not the final alpha 1. Each action's mean and std must be those of
    DDIMScheduler.step (mean: its output with zero noise; std: the step's response to unit noise), in float64
    for float64 latents."""
    eta = 0.7
    scheduler = DDIMScheduler(steps_offset=0, set_alpha_to_one=True, timestep_spacing="leading", clip_sample=False,
                              prediction_type=prediction_type)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [750, 500, 250, 0]
    scalars = ddim_row_scalars(scheduler, eta)
    generator = torch.Generator().manual_seed(9)
    x, model_output = (torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    for k, t in enumerate(scheduler.timesteps.tolist()[:3]):  # the last action (to alpha 1) has no variance
        mean, std = ddim_mean(model_output, x, scalars[k].expand(2, -1), prediction_type)
        assert mean.dtype == std.dtype == torch.float64 and std.shape == (2,)
        zero = scheduler.step(model_output, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        unit = scheduler.step(model_output, t, x, eta=eta, variance_noise=torch.ones_like(x)).prev_sample
        torch.testing.assert_close(mean, zero, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(std.view(2, 1, 1, 1).expand_as(x), unit - zero, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_sd():
    return load_pipeline("tiny-sd", method="ddpo")


def test_a_ddpo_trajectorys_denoised_latent_is_its_last_state_the_image_is_decoded_from(tiny_sd):
    """Mutant: Trajectory(denoised=states[-2]) in DDPOSampler.sample. The trainer decodes trajectory.denoised for
    the rewards: it must be x_S, the latent the sample's own image comes from, not the state one step before."""
    sampler = DDPOSampler(tiny_sd, num_steps=2, guidance_scale=5.0, resolution=16)
    trajectory = sampler.sample(tiny_sd.unet, PROMPTS, torch.Generator().manual_seed(10))
    assert trajectory.states.shape[1] == 3
    torch.testing.assert_close(trajectory.denoised, trajectory.states[:, -1], atol=0, rtol=0)
    torch.testing.assert_close(sampler.decode(trajectory.denoised), trajectory.images, atol=0, rtol=0)


# -- fast_sampler ----------------------------------------------------------------------------------------------

def test_a_scheduler_config_of_original_inference_steps_equal_to_num_train_timesteps_is_taken(tiny_lcm):
    """Mutant: `original_inference_steps > num_train_timesteps` -> `>=` for the scheduler config's value. A config
    with original_inference_steps = num_train_timesteps = 1000 is one diffusers' pipeline samples with; the fast
    sampler must take it (and step on its schedule) rather than refuse it and ask for an argument."""
    with scheduler_swapped(tiny_lcm, LCMScheduler, original_inference_steps=1000) as scheduler:
        fast = FastLCMSampler(tiny_lcm, batch_size=1, num_inference_steps=2)
        scheduler.set_timesteps(2)
        assert fast.sampler.timesteps.tolist() == scheduler.timesteps.tolist()


def test_original_inference_steps_given_equal_to_the_horizon_is_taken(tiny_lcm):
    """Mutant: `num_inference_steps <= original_inference_steps` -> `<` for the argument. pipe(...,
    num_inference_steps=4, original_inference_steps=4) is valid in diffusers (every step of the original schedule
    is taken); the fast sampler must sample it on that schedule, and refuse only one step fewer."""
    fast = FastLCMSampler(tiny_lcm, batch_size=1, num_inference_steps=4, original_inference_steps=4)
    scheduler = LCMScheduler.from_config(tiny_lcm.scheduler.config)
    scheduler.set_timesteps(4, original_inference_steps=4)
    assert fast.sampler.timesteps.tolist() == scheduler.timesteps.tolist()
    with pytest.raises(ValueError, match=r"^original_inference_steps=3 is invalid: it must be an int in "
                                         r"num_inference_steps\.\.num_train_timesteps = 4\.\.1000$"):
        FastLCMSampler(tiny_lcm, batch_size=1, num_inference_steps=4, original_inference_steps=3)


class _PipelineWithoutNumericDefault(LatentConsistencyModelPipeline):
    """A wrapping pipeline class whose guidance_scale defaults to None (resolved inside its own __call__)."""

    def __call__(self, prompt=None, guidance_scale=None, **kwargs):
        return super().__call__(prompt, guidance_scale=8.5 if guidance_scale is None else guidance_scale, **kwargs)


def test_a_pipeline_class_without_a_numeric_guidance_default_gets_the_lcm_pipelines_default(tiny_lcm):
    """Mutant: `parameter is None or not isinstance(parameter.default, numbers.Real)` -> `parameter is None`. A
    pipeline subclass or wrapper whose guidance_scale defaults to None must be guided as
    LatentConsistencyModelPipeline's own default says, not fail with float(None) when no guidance_scale is given."""
    wrapped = _PipelineWithoutNumericDefault(**tiny_lcm.components)
    default = inspect.signature(LatentConsistencyModelPipeline.__call__).parameters["guidance_scale"].default
    assert FastLCMSampler(wrapped, batch_size=1, num_inference_steps=1).sampler.guidance_scale == default
