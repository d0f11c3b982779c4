"""Algorithms beyond PPO: REBEL, group-relative advantages, KL to the base model, step subsampling."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlcm_fast.algorithms import (
    choose_trained_steps, clipped_policy_loss, gaussian_kl, group_advantages, rebel_loss, trained_step_count,
)
from rlcm_fast.cli import main
from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.trainer import Trainer
from stops import sigterm_during_update

SMALL = {"device": "cpu", "batches_per_epoch": 1, "sample_batch_size": 8, "train_batch_size": 8, "grid_every": 0}


# -- the formulas, on fixed inputs ----------------------------------------------------------------------

def rebel_by_hand(log_probs, old_log_probs, advantages, eta, adv_clip_max):
    """The REBEL loss written out pair by pair in float64 Python."""
    terms = []
    for p in range(len(advantages) // 2):
        y, y_prime = 2 * p, 2 * p + 1
        ratio_y = sum(float(a) - float(b) for a, b in zip(log_probs[y], old_log_probs[y]))
        ratio_y_prime = sum(float(a) - float(b) for a, b in zip(log_probs[y_prime], old_log_probs[y_prime]))
        adv = [min(max(float(a), -adv_clip_max), adv_clip_max) for a in (advantages[y], advantages[y_prime])]
        terms.append((eta * (ratio_y - ratio_y_prime) - (adv[0] - adv[1])) ** 2)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("eta, adv_clip_max", [(1.0, 10.0), (0.3, 1.5)])
def test_rebel_loss_equals_the_formula(eta, adv_clip_max):
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    old = log_probs + 0.1 * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    advantages = 2 * torch.randn(6, generator=gen, dtype=torch.float64)
    loss, stats = rebel_loss(log_probs, old, advantages, eta, adv_clip_max)
    assert loss.item() == pytest.approx(rebel_by_hand(log_probs, old, advantages, eta, adv_clip_max), rel=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * ((log_probs - old) ** 2).mean().item())
    # The logged ratio is per trained step, as approx_kl: the mean over all (2P, K) entries.
    assert stats["ratio"].item() == pytest.approx(torch.exp(log_probs - old).mean().item(), rel=1e-12)


def test_rebel_gradient_vanishes_when_the_log_ratio_difference_matches_the_advantages():
    eta = 0.5
    old = torch.tensor([[-1.0, -2.0], [-1.5, -0.5], [0.2, 0.1], [0.0, -0.3]], dtype=torch.float64)
    advantages = torch.tensor([0.8, -0.4, 1.0, 1.0], dtype=torch.float64)
    # Choose log-probs so that eta * (log-ratio(y) - log-ratio(y')) == A(y) - A(y') for both pairs.
    shift = torch.zeros_like(old)
    shift[0, 0] = (0.8 - (-0.4)) / eta
    log_probs = (old + shift).requires_grad_()
    loss, _ = rebel_loss(log_probs, old, advantages, eta, adv_clip_max=10.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    assert log_probs.grad.abs().max().item() == 0.0
    # Any other log-probs give a non-zero gradient.
    log_probs = (old + 0.5 * shift).requires_grad_()
    rebel_loss(log_probs, old, advantages, eta, adv_clip_max=10.0)[0].backward()
    assert log_probs.grad.abs().max().item() > 0.1


def test_rebel_loss_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="pairs"):
        rebel_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), 1.0, 10.0)


def test_clipped_policy_loss_clips_the_ratio():
    log_probs = torch.log(torch.tensor([1.5, 0.5, 1.001]))
    loss, stats = clipped_policy_loss(log_probs, torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]), 0.01, 10.0)
    # max(-A r, -A clip(r)): row 0 -> -1.01, row 1 -> +0.99 (clipped: 0.99 > 0.5), row 2 -> -1.001
    assert loss.item() == pytest.approx((-1.01 + 0.99 - 1.001) / 3, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.001) / 3, rel=1e-6)  # the mean, as logged
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (log_probs**2).mean().item(), rel=1e-6)


def test_group_advantages_are_zero_mean_unit_std_per_group():
    rewards = np.random.default_rng(0).normal(3.0, 2.0, size=24)
    advantages = group_advantages(rewards, 4).reshape(6, 4)
    np.testing.assert_allclose(advantages.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(advantages.std(axis=1), 1.0, atol=1e-5)
    # Each group is normalised by its own statistics, not the batch's.
    group = rewards[4:8]
    np.testing.assert_allclose(advantages[1], (group - group.mean()) / (group.std() + 1e-6))
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    denoised = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    base = denoised + 0.2 * torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    alpha_next = torch.tensor([0.3, 0.7, 0.95], dtype=torch.float64)
    sigma_next = (1 - alpha_next**2).sqrt()
    shape = (3, 1, 1, 1)
    policy = torch.distributions.Normal(alpha_next.view(shape) * denoised, sigma_next.view(shape))
    reference = torch.distributions.Normal(alpha_next.view(shape) * base, sigma_next.view(shape))
    expected = torch.distributions.kl_divergence(policy, reference).flatten(1).mean(dim=1)
    kl = gaussian_kl(alpha_next.view(shape) * denoised, alpha_next.view(shape) * base, sigma_next)
    torch.testing.assert_close(kl, expected)
    assert gaussian_kl(denoised, denoised, sigma_next).abs().max().item() == 0.0


def test_choose_trained_steps():
    gen = torch.Generator().manual_seed(0)
    assert [trained_step_count(7, f) for f in (1.0, 0.5, 0.01, 0.3)] == [7, 3, 1, 2]
    assert trained_step_count(50, 0.27) == 13  # ddpo-pytorch's int(num_steps * timestep_fraction), not 14
    chosen = choose_trained_steps(50, 7, 0.5, gen)
    assert chosen.shape == (50, 3)
    for row in chosen.tolist():
        assert row == sorted(set(row)) and all(0 <= k < 7 for k in row)
    assert len({tuple(r) for r in chosen.tolist()}) > 10  # each trajectory gets its own subset
    torch.testing.assert_close(choose_trained_steps(3, 5, 1.0, gen), torch.arange(5).expand(3, 5))


# -- inside the trainer ------------------------------------------------------------------------------------

def independent_kl_to_base(trainer, samples) -> float:
    """The mean KL over every action, in float64 from the LCM step's formula (the tiny UNet predicts the sample):
    both policies are N(sqrt(a_next) D, 1 - a_next), D = c_out x0 + c_skip x."""
    sampler, unet = trainer.sampler, trainer.unet
    alphas = trainer.pipe.scheduler.alphas_cumprod.double()
    embeds = sampler.prompt_embeddings(samples.prompts)
    w = sampler.guidance(len(samples.prompts), embeds.dtype)
    kls = []
    for k in range(samples.log_probs.shape[1]):
        t, t_next = int(sampler.timesteps[k]), int(sampler.timesteps[k + 1])
        x = samples.states[:, k]
        with torch.no_grad():
            x0 = unet(x, t, encoder_hidden_states=embeds, timestep_cond=w).sample.double()
            unet.disable_adapters()
            try:
                x0_base = unet(x, t, encoder_hidden_states=embeds, timestep_cond=w).sample.double()
            finally:
                unet.enable_adapters()
        c_out = 10 * t / math.sqrt((10 * t) ** 2 + 0.25)  # c_skip x is the same in both means
        mean_gap = alphas[t_next].sqrt() * c_out * (x0 - x0_base)
        kls.append(0.5 * (mean_gap**2).flatten(1).mean(1) / (1 - alphas[t_next]))
    return torch.stack(kls).mean().item()


def test_kl_to_the_base_model_is_zero_with_a_zero_lora_and_positive_otherwise(tmp_path):
    trainer = Trainer(resolve_config(overrides=SMALL), tmp_path / "run")
    samples = trainer.sample_epoch(0)
    assert trainer.kl_to_base(samples) == 0.0  # gaussian LoRA init: B = 0, the policy is the base model
    with torch.no_grad():
        for name, parameter in trainer.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    kl = trainer.kl_to_base(samples)
    assert kl > 1e-6
    assert kl == pytest.approx(independent_kl_to_base(trainer, samples), rel=1e-4)
    # The training path computes the same KL (and gradients flow through it).
    idx = torch.arange(len(samples.prompts))
    steps = torch.zeros_like(idx)
    trainer.cfg.kl_beta = 1.0
    _, kl = trainer.policy_log_probs(samples.states, idx, steps, trainer.sampler.prompt_embeddings(samples.prompts))
    assert kl.shape == (len(idx),) and kl.requires_grad and (kl > 0).all()


def recorded_training_rows(monkeypatch, trainer, samples):
    """Run one train_epoch and record every (sample, step) row the UNet was trained on."""
    rows = []
    original = trainer.policy_log_probs

    def recording(states, sample_idx, step_idx, embeds):
        rows.extend(zip(sample_idx.tolist(), step_idx.tolist()))
        return original(states, sample_idx, step_idx, embeds)

    monkeypatch.setattr(trainer, "policy_log_probs", recording)
    trainer.train_epoch(0, samples)
    return rows


@pytest.mark.parametrize("fraction, expected_steps", [(0.34, 1), (0.67, 2), (1.0, 3)])
def test_step_subsampling_trains_exactly_the_requested_steps(tmp_path, monkeypatch, fraction, expected_steps):
    cfg = resolve_config(overrides={**SMALL, "step_fraction": fraction, "train_batch_size": 4})
    trainer = Trainer(cfg, tmp_path / "run")
    samples = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    rows = recorded_training_rows(monkeypatch, trainer, samples)
    per_sample: dict[int, list[int]] = {}
    for sample, step in rows:
        per_sample.setdefault(sample, []).append(step)
    assert sorted(per_sample) == list(range(8))
    for steps in per_sample.values():
        assert len(steps) == expected_steps == len(set(steps))  # each trained step exactly once
    assert trainer.global_step == 2  # 8 samples / train_batch_size 4: subsampling keeps the update count


def test_rebel_trains_pairs_of_one_prompt_with_all_their_steps(tmp_path, monkeypatch):
    cfg = resolve_config(overrides={**SMALL, "algorithm": "rebel", "images_per_prompt": 2, "train_batch_size": 2})
    trainer = Trainer(cfg, tmp_path / "run")
    samples = trainer.sample_epoch(0)
    assert samples.prompts[0::2] == samples.prompts[1::2]  # [p0, p0, p1, p1, ...]
    trainer.compute_advantages(samples)
    rows = recorded_training_rows(monkeypatch, trainer, samples)
    assert sorted(rows) == [(i, k) for i in range(8) for k in range(3)]  # every trajectory, every step, once
    assert trainer.global_step == 2  # 4 pairs / (2 pairs per minibatch)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(s["loss"]) and s["loss"] >= 0 for s in steps)


def test_group_advantages_inside_the_trainer(tmp_path):
    cfg = resolve_config(overrides={**SMALL, "advantages": "group", "images_per_prompt": 4})
    trainer = Trainer(cfg, tmp_path / "run")
    samples = trainer.sample_epoch(0)
    assert samples.prompts[:4] == [samples.prompts[0]] * 4 and samples.prompts[4:] == [samples.prompts[4]] * 4
    epoch_stats = trainer.compute_advantages(samples)
    # The epoch's reward statistics as logged: over all its samples, the population std (as each step's).
    rewards = np.asarray(samples.rewards, dtype=np.float64)
    assert epoch_stats == {"reward_mean": pytest.approx(rewards.mean(), rel=1e-12),
                           "reward_std": pytest.approx(rewards.std(ddof=0), rel=1e-12), "samples": 8}
    assert rewards.std() > 0
    np.testing.assert_allclose(samples.advantages.view(2, 4).mean(dim=1).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(samples.advantages.view(2, 4).std(dim=1, unbiased=False).numpy(), 1.0, atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm": "dpo"}, "algorithm 'dpo' is unknown; allowed: ppo, rebel"),
    ({"advantages": "batch"}, "advantages 'batch' is unknown; allowed: per_prompt, group"),
    ({"images_per_prompt": 3}, "images_per_prompt=3 does not divide sample_batch_size=16"),
    ({"advantages": "group"}, "needs images_per_prompt >= 2"),
    ({"algorithm": "rebel"}, "images_per_prompt=1 must be even"),
    ({"algorithm": "rebel", "images_per_prompt": 2, "train_batch_size": 32}, "pairs per epoch (16"),
    ({"kl_beta": -0.1}, "kl_beta=-0.1 is invalid"),
    ({"step_fraction": 0}, "step_fraction=0.0 is invalid: it must be in (0, 1]"),
    ({"step_fraction": 1.5}, "step_fraction=1.5 is invalid"),
    ({"rebel_eta": 0}, "rebel_eta=0.0 is invalid"),
    ({"algorithm": "rebel", "images_per_prompt": 2, "step_fraction": 0.5},
     "algorithm='rebel' with step_fraction=0.5 is refused: REBEL regresses each trajectory's whole log-ratio"),
    ({"algorithm": "rebel", "images_per_prompt": 2, "advantages": "group"},
     "algorithm='rebel' with advantages='group' needs images_per_prompt >= 4: a group of 2 normalises to -1 and +1"),
])
def test_bad_algorithm_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        resolve_config(overrides={"device": "cpu", **overrides})
    assert message in str(error.value)


def test_bad_algorithm_setting_from_the_cli_exits_2(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--set", "algorithm=rebel"]) == 2
    assert "must be even" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- learning, seeded, on the tiny model -------------------------------------------------------------------

def epoch_rewards(run_dir: Path) -> np.ndarray:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return np.array([r["reward_mean"] for r in map(json.loads, lines) if r["kind"] == "epoch"])


@pytest.mark.parametrize("name, extra", [
    # Measured with seed 0 on 2 CPU cores (mean of epochs 5-7 minus mean of epochs 1-3; the first 7 epochs of
    # benchmarks/results/amd-epyc/ablation_algorithms.json's runs, which use the same settings):
    ("rebel", ["algorithm=rebel", "images_per_prompt=2", "train_batch_size=4"]),  # +0.184 kB
    ("group_ppo", ["advantages=group", "images_per_prompt=4"]),  # +0.243 kB
])
def test_each_algorithm_raises_the_compressibility_reward(tmp_path, name, extra):
    run_dir = tmp_path / name
    sets = [arg for pair in extra for arg in ("--set", pair)]
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--seed", "0", "--set", "epochs=7",
                 "--set", "grid_every=0", *sets]) == 0
    rewards = epoch_rewards(run_dir)
    assert len(rewards) == 7
    assert rewards[-3:].mean() - rewards[:3].mean() > 0.1, rewards


def test_kl_regularisation_keeps_the_policy_closer_to_the_base_model(tmp_path):
    # Measured with seed 0, 3 epochs on 2 CPU cores: KL to the base model 0.0163 without the penalty,
    # 0.0059 with kl_beta=0.1 (after 5 epochs: 0.0212 and 0.0034).
    kls = {}
    for beta in (0.0, 0.1):
        cfg = resolve_config(overrides={"device": "cpu", "epochs": 3, "grid_every": 0, "kl_beta": beta, "seed": 0})
        trainer = Trainer(cfg, tmp_path / f"beta-{beta}")
        trainer.train()
        kls[beta] = trainer.kl_to_base(trainer.sample_epoch(cfg.epochs))
    assert kls[0.0] > 0 and kls[0.1] < 0.6 * kls[0.0], kls


@pytest.mark.parametrize("options", [
    ["advantages=group", "images_per_prompt=2", "step_fraction=0.67", "kl_beta=0.1"],
    ["algorithm=rebel", "images_per_prompt=2", "train_batch_size=1", "kl_beta=0.1"],
])
def test_a_run_stopped_mid_epoch_resumes_exactly_with_each_option(tmp_path, monkeypatch, options):
    """SIGTERM after the first of an epoch's two updates, then --resume: the metrics equal an uninterrupted
    run's (the resumed epoch redraws the same step subsets and shuffles)."""
    args = ["--device", "cpu", "--set", "batches_per_epoch=1", "--set", "sample_batch_size=4",
            "--set", "train_batch_size=2", "--set", "epochs=1", "--set", "grid_every=0",
            *[arg for option in options for arg in ("--set", option)]]

    def metrics(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")} for line in lines]

    assert main(["train", "--output-dir", str(tmp_path / "whole"), *args]) == 0
    original = sigterm_during_update(monkeypatch, 0)
    assert main(["train", "--output-dir", str(tmp_path / "stopped"), *args]) == 0
    assert (tmp_path / "stopped" / "checkpoint-0-1").is_dir()
    monkeypatch.setattr(Trainer, "finish_update", original)
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    whole = metrics(tmp_path / "whole")
    assert len([r for r in whole if r["kind"] == "step"]) == 2
    assert metrics(tmp_path / "stopped") == whole


def test_the_kl_term_enters_the_gradient_scaled_by_kl_beta(tmp_path):
    """g(beta) = g_ppo + beta g_kl, so g(0.2) - g(0) = 2 (g(0.1) - g(0)). Taken at the epoch's second update:
    the first starts at the base model, where the KL and its gradient are 0, so both see the same weights."""
    grads, logged = {}, {}
    for beta in (0.0, 0.1, 0.2):
        cfg = resolve_config(overrides={"device": "cpu", "batches_per_epoch": 1, "sample_batch_size": 4,
                                        "train_batch_size": 2, "gradient_accumulation_steps": 1, "grid_every": 0,
                                        "seed": 3, "kl_beta": beta, "max_grad_norm": 1e9})  # no clipping
        trainer = Trainer(cfg, tmp_path / f"beta-{beta}")
        captured, sums = [], []
        trainer.optimizer.register_step_pre_hook(
            lambda *_: captured.append([p.grad.detach().clone() for p in trainer.params]))
        finish_update = trainer.finish_update
        trainer.finish_update = lambda epoch, update_sums, *rest: (sums.append(update_sums),
                                                                   finish_update(epoch, update_sums, *rest))
        samples = trainer.sample_epoch(0)
        trainer.compute_advantages(samples)
        trainer.train_epoch(0, samples)
        assert len(captured) == 2
        grads[beta], logged[beta] = captured[1], sums[1]
    # The logged loss holds the term too: beta times the logged KL, a mean over the rows as the loss's other part.
    assert logged[0.1]["kl"] > 0
    assert logged[0.1]["loss"] - logged[0.0]["loss"] == pytest.approx(0.1 * logged[0.1]["kl"], rel=1e-5)
    kl_part = [g1 - g0 for g0, g1 in zip(grads[0.0], grads[0.1])]
    largest = max(d.abs().max().item() for d in kl_part)
    assert largest > 0
    for g0, g2, d in zip(grads[0.0], grads[0.2], kl_part):
        torch.testing.assert_close(g2 - g0, 2 * d, atol=1e-3 * largest, rtol=0)
