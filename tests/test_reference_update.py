"""The trainer's RLCM and DDPO epochs against the algorithm (README, "The algorithm" and "The DDPO baseline"),
written again here from its statement alone.

The trainer samples an epoch on the tiny model (tiny-sd for DDPO) and trains it for two inner epochs of
one update each. The reference below then recomputes from the same stored trajectories, with nothing of
the package but the model it loaded: each action's log-prob in float64 (RLCM: LCMScheduler's schedule, the
LCM boundary conditions and guidance embedding, the action's Gaussian; DDPO: DDIMScheduler's schedule,
classifier-free guidance, DDIM's mean and eta-scaled std), the per-prompt advantages (the stat tracker's
rule), the clipped loss over every (sample, step) pair, the clipped gradient norm and AdamW. Each update's
gradient, its logged loss, approx_kl and clipfrac, and the final LoRA weights must agree. The sizes make each rule matter: two
prompts over four samples put one prompt on its own statistics (exactly stat_min_count rewards) and one on
the batch's, the advantage clip and the ratio clip both cut some rows and not others, and the gradient
norm is clipped.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from rlcm_fast.config import resolve_config
from rlcm_fast.trainer import Trainer

SETTINGS = {
    "device": "cpu", "seed": 1, "grid_every": 0,
    # 4 samples; one update of 2 minibatches x 2 samples per inner epoch; two inner epochs, so the second
    # update's ratios are away from 1.
    "batches_per_epoch": 2, "sample_batch_size": 2, "train_batch_size": 2, "gradient_accumulation_steps": 2,
    "num_inner_epochs": 2,
    "stat_min_count": 3, "adv_clip_max": 0.9, "clip_range": 2e-4, "max_grad_norm": 0.01,
}
ANIMALS = ["a cat", "a dog"]


def reference_advantages(prompts, rewards, min_count):
    """Section 3.2 with an empty history: a prompt with fewer than min_count rewards in the batch is
    normalised with the batch's mean and std, else with its own; std + 1e-6 (population std)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(rewards)
    for i, prompt in enumerate(prompts):
        own = rewards[[j for j, p in enumerate(prompts) if p == prompt]]
        pool = own if len(own) >= min_count else rewards
        out[i] = (rewards[i] - pool.mean()) / (pool.std() + 1e-6)
    return out


def predicted_x0(prediction_type, output, x, a):
    """x_0 from the UNet's output at a state x of noise level a = alphas_cumprod[t], per prediction type."""
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "sample":
        return output
    return a.sqrt() * x - (1 - a).sqrt() * output  # v_prediction


def gaussian_log_prob(next_state, mean, std):
    """The mean over the latent's elements of the Gaussian log-density (sections 3.1 and 3.6), float64."""
    elementwise = -((next_state.double() - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return elementwise.mean()


def lcm_log_prob(pipe, cfg, unet, prompt, state, next_state, k):
    """RLCM's log pi(x_{k+1} | x_k): LCMScheduler's schedule, the LCM boundary conditions, the
    guidance embedding w = guidance_scale - 1."""
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.horizon, original_inference_steps=cfg.original_inference_steps)
    t, t_next = scheduler.timesteps[k], scheduler.timesteps[k + 1]
    a, a_next = (scheduler.alphas_cumprod[i].double() for i in (t, t_next))
    embeds = pipe.encode_prompt([prompt], state.device, 1, False)[0]
    w = pipe.get_guidance_scale_embedding(torch.tensor([cfg.guidance_scale - 1.0]),
                                          embedding_dim=unet.config.time_cond_proj_dim)
    output = unet(state[None], t, encoder_hidden_states=embeds, timestep_cond=w).sample[0].double()
    x = state.double()
    pred_x0 = predicted_x0(pipe.scheduler.config.prediction_type, output, x, a)
    scaled = 10.0 * t.double()  # timestep_scaling 10, sigma_data 0.5
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25).sqrt()
    denoised = c_out * pred_x0 + c_skip * x
    return gaussian_log_prob(next_state, a_next.sqrt() * denoised, (1 - a_next).sqrt())


def ddim_log_prob(pipe, cfg, unet, prompt, state, next_state, k):
    """DDPO's log pi(x_{k+1} | x_k): DDIMScheduler's schedule, classifier-free guidance with the empty
    prompt, DDIM's mean and std = eta sigma_t (Song et al.'s variance)."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.horizon)
    t = scheduler.timesteps[k]
    previous = t - scheduler.config.num_train_timesteps // cfg.horizon
    a = scheduler.alphas_cumprod[t].double()
    a_prev = scheduler.alphas_cumprod[previous].double() if previous >= 0 else scheduler.final_alpha_cumprod.double()
    embeds = torch.cat([pipe.encode_prompt([text], state.device, 1, False)[0] for text in ("", prompt)])
    uncond, cond = unet(torch.stack([state, state]), t, encoder_hidden_states=embeds).sample.double()
    output = uncond + cfg.guidance_scale * (cond - uncond)
    x = state.double()
    prediction = pipe.scheduler.config.prediction_type
    pred_x0 = predicted_x0(prediction, output, x, a)
    eps = {"epsilon": output, "sample": (x - a.sqrt() * output) / (1 - a).sqrt(),
           "v_prediction": a.sqrt() * output + (1 - a).sqrt() * x}[prediction]
    std = cfg.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    mean = a_prev.sqrt() * pred_x0 + (1 - a_prev - std**2).sqrt() * eps
    return gaussian_log_prob(next_state, mean, std)


METHODS = {
    "rlcm": ({"model": "tiny"}, lcm_log_prob),
    # DDPO's first update moves its ratios further: a wider clip leaves some rows unclipped.
    "ddpo": ({"model": "tiny-sd", "method": "ddpo", "horizon": 3, "clip_range": 2e-2}, ddim_log_prob),
}


@pytest.fixture(scope="module", params=sorted(METHODS))
def trained(request, tmp_path_factory):
    """The trainer's epoch: its samples, the LoRA before and after, and per update the gradient it stepped
    with and the values it logged."""
    folder = tmp_path_factory.mktemp("reference")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(ANIMALS) + "\n")
    overrides = {**SETTINGS, **METHODS[request.param][0], "prompts": str(prompts)}
    trainer = Trainer(resolve_config(overrides=overrides), folder / "run")
    initial = [p.detach().clone() for p in trainer.params]
    updates = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: updates.append({"grads": [p.grad.detach().clone() for p in trainer.params]}))
    logged = []
    trainer.log_step = lambda epoch, sums, grad_norm: logged.append({**sums, "grad_norm": grad_norm})
    samples = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    trainer.train_epoch(0, samples)
    for update, values in zip(updates, logged):
        update.update(values)
    final = [p.detach().clone() for p in trainer.params]
    return trainer, samples, initial, final, updates, METHODS[request.param][1]


def test_the_trainers_epoch_equals_the_written_algorithm(trained):
    trainer, samples, initial, final, updates, reference_log_prob = trained
    cfg, pipe, unet = trainer.cfg, trainer.pipe, trainer.unet
    assert len(updates) == 2
    counts = sorted(samples.prompts.count(p) for p in set(samples.prompts))
    assert counts == [1, cfg.stat_min_count]  # one prompt on the batch's statistics, one on exactly enough of its own

    advantages = reference_advantages(samples.prompts, samples.rewards, cfg.stat_min_count)
    np.testing.assert_allclose(samples.advantages.numpy(), advantages, rtol=1e-6, atol=1e-6)
    clipped_advantages = torch.as_tensor(advantages).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
    assert (clipped_advantages.abs() < torch.as_tensor(advantages).abs()).any()  # the advantage clip cuts

    states, old_log_probs = samples.states, samples.log_probs.double()
    n, steps = old_log_probs.shape
    # RLCM: H UNet calls, H - 1 trained actions (train_final_step off); DDPO: every DDIM step is an action.
    assert steps == (cfg.horizon if cfg.method == "ddpo" else cfg.horizon - 1)
    with torch.no_grad():
        for p, value in zip(trainer.params, initial):
            p.copy_(value)
    optimizer = torch.optim.AdamW(trainer.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    unet.train()
    clipped_rows = []
    for number, update in enumerate(updates):
        optimizer.zero_grad(set_to_none=True)
        log_probs = torch.stack([
            torch.stack([reference_log_prob(pipe, cfg, unet, samples.prompts[i], states[i, k], states[i, k + 1], k)
                         for k in range(steps)])
            for i in range(n)])
        if number == 0:  # the policy that sampled: its log-probs are the stored ones
            torch.testing.assert_close(log_probs.detach(), old_log_probs, atol=1e-5, rtol=0)
        ratio = torch.exp(log_probs - old_log_probs)
        a = clipped_advantages[:, None]
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainer.params, cfg.max_grad_norm)
        assert norm > cfg.max_grad_norm  # the norm clip acts
        assert update["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-8)
        # rel 1e-3, as the gradients below: float32 sums in another order (batched rows here, one row at a time
        # in the reference) put DDPO's norm 1.02e-4 apart with one thread on an AMD EPYC.
        assert update["grad_norm"] == pytest.approx(norm.item(), rel=1e-3)
        log_ratio = (log_probs - old_log_probs).detach()
        assert update["approx_kl"] == pytest.approx(0.5 * (log_ratio**2).mean().item(), rel=1e-3, abs=1e-12)
        clipfrac = ((ratio.detach() - 1).abs() > cfg.clip_range).double().mean().item()
        assert update["clipfrac"] == pytest.approx(clipfrac, abs=1e-9)
        clipped_rows.append(clipfrac)
        largest = max(p.grad.abs().max().item() for p in trainer.params)
        for p, theirs in zip(trainer.params, update["grads"]):
            torch.testing.assert_close(theirs, p.grad, atol=1e-4 * largest, rtol=1e-3)
            # Stepped with the trainer's gradient, so that both sides go on from the same weights: AdamW's
            # step divides by each gradient's running size, which turns float32 noise in a near-zero entry
            # into a good part of a step (13% of one, measured, when stepped with the reference's own).
            p.grad = theirs.clone()
        optimizer.step()
    assert clipped_rows[0] == 0 and 0 < clipped_rows[1] < 1  # the ratio clip cuts some rows of the second update
    # The same AdamW (learning rate, betas, weight decay, epsilon), stepped once per update.
    for ours, theirs in zip(trainer.params, final):
        torch.testing.assert_close(theirs, ours.detach(), atol=1e-7, rtol=1e-6)
    assert any((f - i).abs().max() > 0 for f, i in zip(final, initial))
