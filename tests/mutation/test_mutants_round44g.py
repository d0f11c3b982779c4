"""Mutation-testing round 44g (rlcm_fast/trainer.py): hand-written mutants of the training loop's math and
bookkeeping (advantages, the update's gradient accumulation and clipping, skipped steps, which updates a resumed
epoch trains, what an epoch's end evaluates and checkpoints) were run against a fast subset of its tests (the tiny
runs of test_switches); each test here kills the mutants named in its docstring, most of which survived them.
All are CPU-only and fast: no model is built and no run is trained; the Trainer's methods are driven one at a time
with stand-ins for what a built Trainer holds (its accelerator, sampler, optimizer, logger)."""

import math
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlcm_fast import trainer as trainer_module
from rlcm_fast.algorithms import clipped_policy_loss, gaussian_kl, group_advantages
from rlcm_fast.epoch_samples import EpochSamples
from rlcm_fast.faults import NonFiniteSteps, StopTraining
from rlcm_fast.stat_tracker import PerPromptStatTracker
from rlcm_fast.trainer import Trainer


def bare_trainer(**attributes) -> Trainer:
    """A Trainer without its build (no model, no run folder): only the stand-ins a test gives it."""
    trainer = object.__new__(Trainer)
    trainer.__dict__.update(attributes)
    return trainer


# -- compute_advantages: every process's rewards, this process's slice ------------------------------------------

def two_process_trainer(cfg, others_rewards, monkeypatch, others_prompts):
    def gather(local):
        return torch.cat([torch.as_tensor(others_rewards, dtype=local.dtype), local])

    monkeypatch.setattr(trainer_module, "gather_object", lambda prompts: [*others_prompts, *prompts])
    accelerator = SimpleNamespace(gather=gather, num_processes=2, process_index=1)
    return bare_trainer(cfg=cfg, accelerator=accelerator, device=torch.device("cpu"),
                        stat_tracker=PerPromptStatTracker(16, 1))


def local_samples(prompts, rewards) -> EpochSamples:
    return EpochSamples(prompts=prompts, states=torch.zeros(0), log_probs=torch.zeros(0), rewards=np.array(rewards),
                        advantages=torch.empty(0), images=torch.zeros(0))


def test_the_second_process_keeps_its_own_slice_of_advantages_normalised_over_every_processs_rewards(monkeypatch):
    """Mutants: the advantages sliced [:n] (process 1 trained on process 0's advantages: its samples pushed towards
    the other process's rewards), prompts not gathered (the tracker given 3 prompts for 6 rewards), the epoch's
    reward std with ddof=1 and its sample count this process's 3, not the run's 6 (metrics.jsonl's epoch record
    describes every process's samples)."""
    others_prompts, others = ["a", "b", "a"], [1.0, 5.0, 3.0]
    prompts, rewards = ["b", "a", "b"], [2.0, 9.0, 4.0]
    trainer = two_process_trainer(SimpleNamespace(advantages="per_prompt"), others, monkeypatch, others_prompts)
    samples = local_samples(prompts, rewards)
    stats = trainer.compute_advantages(samples)
    everything = np.array(others + rewards)
    expected = PerPromptStatTracker(16, 1).update(others_prompts + prompts, everything)[3:]
    assert samples.advantages.dtype == torch.float32
    assert samples.advantages.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert stats == {"reward_mean": pytest.approx(everything.mean()), "reward_std": pytest.approx(everything.std()),
                     "samples": 6}


def test_group_advantages_are_normalised_within_each_prompts_group_of_every_process(monkeypatch):
    """Mutant: `advantages == "group"` flipped: `advantages: group` (GRPO-style, each prompt's G images against
    each other) used the rolling per-prompt tracker, and `per_prompt` the groups."""
    others, rewards = [0.0, 2.0, 10.0, 30.0], [1.0, 4.0, -3.0, -1.0]
    trainer = two_process_trainer(SimpleNamespace(advantages="group", images_per_prompt=2), others, monkeypatch,
                                  ["a", "a", "b", "b"])
    samples = local_samples(["c", "c", "d", "d"], rewards)
    trainer.compute_advantages(samples)
    expected = group_advantages(np.array(others + rewards), 2)[4:]
    assert samples.advantages.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert samples.advantages.tolist() == pytest.approx([-1, 1, -1, 1], abs=1e-5)


# -- accumulate_update: one update's gradient over minibatches of unequal rows ------------------------------------

class Policy:
    """A one-weight policy: log pi(row i, k) = w * coef[i, k] (old log-probs 0: the ratio is 1 at w = 0), and with
    with_mean its Gaussian mean w * coef + 1 against a base mean of 0 (std 0.5)."""

    def __init__(self, coef):
        self.coef, self.w = coef, torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.adapters = []

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds, with_mean=False):
        log_probs = self.w * self.coef[sample_idx, step_idx]
        if not with_mean:
            return (log_probs,)
        mean = (log_probs + 1.0)[:, None]
        return log_probs, mean, torch.full_like(mean, 0.5)

    def action_means(self, unet, states, sample_idx, step_idx, embeds):
        return (torch.zeros(len(sample_idx), 1, dtype=torch.float64),)


def update_trainer(coef, kl_beta=0.0, max_grad_norm=1e9):
    policy, calls = Policy(coef), []
    state = {"synced": True}

    @contextmanager
    def no_sync(model):
        state["synced"] = False
        try:
            yield
        finally:
            state["synced"] = True

    def backward(loss):
        calls.append(state["synced"])
        loss.backward()

    accelerator = SimpleNamespace(no_sync=no_sync, backward=backward, scaler=None, mixed_precision="no")
    unet = SimpleNamespace(disable_adapters=lambda: None, enable_adapters=lambda: None)
    cfg = SimpleNamespace(algorithm="ppo", kl_beta=kl_beta, clip_range=10.0, adv_clip_max=100.0,
                          max_grad_norm=max_grad_norm)
    trainer = bare_trainer(cfg=cfg, accelerator=accelerator, sampler=policy, params=[policy.w], unet=unet,
                           train_unet=unet, ddp_unet=unet, grads_stay_allocated=False)
    return trainer, policy, calls


COEF = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
REWARDS = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)
# An update of 4 (sample, step) rows in two calls of 3 and 1 rows (train_rows_per_call), shape (rows, 1) as planned.
MINIBATCHES = [(torch.tensor([[0], [1], [2]]), torch.tensor([[1], [0], [1]])),
               (torch.tensor([[1]]), torch.tensor([[1]]))]


def update_rows():
    sample_idx = torch.cat([s.flatten() for s, _ in MINIBATCHES])
    step_idx = torch.cat([k.flatten() for _, k in MINIBATCHES])
    return sample_idx, step_idx


def accumulate(trainer):
    return trainer.accumulate_update(MINIBATCHES, torch.zeros(3, 3), torch.zeros(3, 2, dtype=torch.float64),
                                     ADVANTAGES, REWARDS, torch.zeros(3, 1))


def test_an_updates_gradient_and_logged_means_weigh_each_row_once_whatever_its_calls_size():
    """Mutants: each call's loss weighted 1 / calls (not by its share of the rows), the loss backpropagated
    unweighted, the logged means summed over the calls unweighted, each row given the advantage of its step index
    (not of its sample), the rewards' mean square taken as their variance, and the DDP gradient sync done on the
    first call (the others' gradients never all-reduced across processes). The update must be that of one call
    over all 4 rows: a user's train_rows_per_call changes memory, not the training."""
    trainer, policy, synced = update_trainer(COEF)
    means, grad_norm = accumulate(trainer)
    sample_idx, step_idx = update_rows()
    row_advantages, row_coef = ADVANTAGES[sample_idx], COEF[sample_idx, step_idx]
    expected_grad = float((-row_advantages * row_coef).mean())
    assert policy.w.grad.item() == pytest.approx(expected_grad, rel=1e-9)
    assert grad_norm == pytest.approx(abs(expected_grad), rel=1e-9)
    assert synced == [False, True]
    update_rewards = REWARDS[sample_idx]
    assert means == pytest.approx({
        "approx_kl": 0.0, "clipfrac": 0.0, "loss": float(-row_advantages.mean()), "ratio": 1.0,
        "reward_mean": float(update_rewards.mean()), "reward_mean_square": float(update_rewards.square().mean())})


@pytest.mark.parametrize("beta", [0.25, 1e-3])
def test_the_kl_penalty_is_added_to_the_loss_and_logged_as_its_mean(beta):
    """Mutants: the KL to the base model subtracted (kl_beta pushed the policy away from the base model it is meant
    to stay near), logged as its sum over the rows (a kl that grows with train_batch_size), and a small kl_beta
    (1e-3) taken for 0 (`kl_beta <= 1e-3`: the penalty the config asks for silently not applied)."""
    trainer, policy, _ = update_trainer(COEF, kl_beta=beta)
    means, _ = accumulate(trainer)
    sample_idx, step_idx = update_rows()
    kl = gaussian_kl(torch.ones(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64),
                     torch.full((4, 1), 0.5, dtype=torch.float64))
    assert float(kl.mean()) == pytest.approx(2.0)  # (1 - 0)^2 / (2 * 0.5^2)
    assert means["kl"] == pytest.approx(float(kl.mean()))
    assert means["loss"] == pytest.approx(float(-ADVANTAGES[sample_idx].mean()) + beta * float(kl.mean()))
    # d/dw of beta * (w c + 1)^2 / (2 * 0.25) at w = 0 is 2 beta c per row; the PPO part's is -A c
    row_coef = COEF[sample_idx, step_idx]
    expected = float((-ADVANTAGES[sample_idx] * row_coef + 2 * beta * 2 * row_coef).mean())
    assert policy.w.grad.item() == pytest.approx(expected, rel=1e-9)


def test_the_gradient_is_clipped_to_max_grad_norm_and_the_unclipped_norm_logged():
    """Mutant: the gradient clipped at another norm than max_grad_norm (the config's limit on a step's size)."""
    trainer, policy, _ = update_trainer(COEF, max_grad_norm=0.125)
    _, grad_norm = accumulate(trainer)
    assert grad_norm > 0.125
    assert abs(policy.w.grad.item()) == pytest.approx(0.125, rel=1e-6)


def test_ppos_clip_range_and_advantage_limit_are_each_passed_as_themselves():
    """Mutant: clip_range and adv_clip_max swapped in the PPO objective (advantages clamped at 1e-4, the ratio
    clipped at 1 +- 10: a policy gradient with no trust region and no signal)."""
    trainer = bare_trainer(cfg=SimpleNamespace(algorithm="ppo", clip_range=0.2, adv_clip_max=3.0))
    log_probs, old = torch.tensor([0.5, -0.5, 0.0]), torch.zeros(3)
    advantages = torch.tensor([5.0, 1.0, -1.0])
    loss, stats = trainer.objective(log_probs, old, advantages)
    want_loss, want_stats = clipped_policy_loss(log_probs, old, advantages, 0.2, 3.0)
    assert loss.item() == pytest.approx(want_loss.item())
    assert {k: v.item() for k, v in stats.items()} == pytest.approx({k: v.item() for k, v in want_stats.items()})
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)


# -- finish_update: the optimizer step, skipped steps and stops -----------------------------------------------

def finishing_trainer(scale=None, limit=1, stop=False):
    counts = {"step": 0, "scheduler": 0, "zero_grad": 0}
    logged = []

    def count(name):
        counts[name] += 1

    scaler = None if scale is None else SimpleNamespace(get_scale=lambda: scale, update=lambda: None)
    trainer = bare_trainer(
        cfg=SimpleNamespace(max_nonfinite_steps=limit), accelerator=SimpleNamespace(num_processes=1, scaler=scaler),
        stop=SimpleNamespace(received=stop), is_main=True, global_step=0, grads_stay_allocated=False,
        nonfinite=NonFiniteSteps(limit),
        optimizer=SimpleNamespace(step=lambda: count("step"), zero_grad=lambda set_to_none: count("zero_grad")),
        lr_scheduler=SimpleNamespace(step=lambda: count("scheduler")))
    trainer.log_step = lambda epoch, values, grad_norm: logged.append((epoch, trainer.global_step, values, grad_norm))
    return trainer, counts, logged


def test_a_non_finite_gradient_skips_the_step_logs_it_and_stops_the_run_past_the_limit(capsys):
    """Mutants: a non-finite gradient norm (with a finite loss) not skipped (the optimizer stepped on NaN gradients:
    every LoRA weight NaN from then on), the skip left out of the step's record, the learning-rate schedule not
    stepped with the optimizer, and the step count advanced by 2."""
    trainer, counts, logged = finishing_trainer(limit=1)
    trainer.finish_update(0, {"loss": 0.5}, 1.5, done=1, total=4)
    assert counts == {"step": 1, "scheduler": 1, "zero_grad": 1}
    trainer.finish_update(0, {"loss": 0.5}, math.nan, done=2, total=4)
    assert counts == {"step": 1, "scheduler": 1, "zero_grad": 2}
    assert "non-finite grad norm at step 2" in capsys.readouterr().err
    assert [(step, values["skipped"]) for _, step, values, _ in logged] == [(1, 0.0), (2, 1.0)]
    with pytest.raises(StopTraining, match=r"^2 optimizer steps in a row had a non-finite") as stop:
        trainer.finish_update(0, {"loss": 0.5}, math.inf, done=3, total=4)
    assert stop.value.updates_done == 3 and counts["step"] == 1 and trainer.global_step == 3


def test_an_fp16_overflow_is_a_fault_only_at_a_loss_scale_of_1(capsys):
    """Mutants: an overflow at a loss scale of exactly 1 taken for the scaler's routine probe (a run whose
    gradients overflow at scale 1 skipped steps for ever instead of stopping), and the probe's overflows counted
    as faults in a row (a run stopped while fp16's loss scale was still being found)."""
    probing, _, _ = finishing_trainer(scale=65536.0, limit=1)
    for done in (1, 2, 3):
        probing.finish_update(0, {"loss": 0.5}, math.inf, done=done, total=4)
    assert (probing.nonfinite.total, probing.nonfinite.in_a_row) == (3, 0)
    assert "fp16 loss scale 65536 overflowed" in capsys.readouterr().err
    at_one, _, _ = finishing_trainer(scale=1.0, limit=1)
    at_one.finish_update(0, {"loss": 0.5}, math.inf, done=1, total=4)
    with pytest.raises(StopTraining, match="optimizer steps in a row"):
        at_one.finish_update(0, {"loss": 0.5}, math.inf, done=2, total=4)


def test_a_stop_signal_stops_after_an_update_but_lets_the_epochs_last_update_end_the_epoch():
    """Mutant: `done < total` as `<=`: a stop during the epoch's last update checkpointed a position "4 of 4 updates
    done" inside the epoch instead of letting it end (its log record, grid, evaluation and checkpoint)."""
    trainer, _, _ = finishing_trainer(stop=True)
    with pytest.raises(StopTraining) as stop:
        trainer.finish_update(0, {"loss": 0.5}, 1.0, done=3, total=4)
    assert stop.value.updates_done == 3 and stop.value.fault is None
    trainer.finish_update(0, {"loss": 0.5}, 1.0, done=4, total=4)


# -- train_epoch: which updates a resumed epoch trains ---------------------------------------------------------

def epoch_updates(start_update: int) -> list[tuple[int, int, list]]:
    cfg = SimpleNamespace(seed=3, step_fraction=1.0, algorithm="ppo", train_rows="flattened", train_rows_per_call=0,
                          train_batch_size=1, gradient_accumulation_steps=1, num_inner_epochs=2)
    updates = []
    trainer = bare_trainer(cfg=cfg, device=torch.device("cpu"), accelerator=SimpleNamespace(process_index=0),
                           sampler=SimpleNamespace(prompt_embeddings=lambda prompts: torch.zeros(len(prompts), 1)),
                           unet=SimpleNamespace(train=lambda: None), hide_progress=True)
    trainer.accumulate_update = lambda minibatches, *rest: (minibatches, 0.0)
    trainer.finish_update = lambda epoch, minibatches, grad_norm, done, total: updates.append(
        (done, total, [(s.tolist(), k.tolist()) for s, k in minibatches]))
    samples = EpochSamples(prompts=list("abcd"), states=torch.zeros(4, 3), log_probs=torch.zeros(4, 2),
                           rewards=np.zeros(4), advantages=torch.zeros(4), images=torch.zeros(0))
    trainer.train_epoch(0, samples, start_update)
    return updates


def test_a_resumed_epoch_trains_exactly_the_updates_an_uninterrupted_epoch_had_left():
    """Mutants: the finished updates counted `<=` (a resume after 3 updates skipped the 4th), an update's number
    taken as inner + update (the second inner epoch's updates renumbered: the wrong ones skipped), the update
    passed to finish_update as done (not done + 1: a stop checkpointed one update too few, retrained on resume),
    and the total as one pass (a stop in the last update of the first of 2 inner epochs ignored)."""
    whole = epoch_updates(0)
    assert [(done, total) for done, total, _ in whole] == [(d, 8) for d in range(1, 9)]
    assert len({str(m) for _, _, m in whole[:4]}) == 4  # each update of a pass its own sample
    for start in (3, 5):
        assert epoch_updates(start) == whole[start:]


# -- end_epoch and run_epoch: what an epoch's end logs, evaluates and checkpoints ------------------------------

def test_the_last_epoch_is_always_evaluated_and_checkpointed_and_grids_follow_grid_every(tmp_path, monkeypatch):
    """Mutants: `or done == cfg.epochs` dropped from the evaluation and from the checkpoint (a 5-epoch run with
    eval_every and checkpoint_every 2 ended without evaluating or saving its trained policy), and the grids'
    `done % grid_every == 0` test shifted (grids of the wrong epochs)."""
    done = {"eval": [], "checkpoint": [], "grid": []}
    monkeypatch.setattr(trainer_module, "save_sample_grid", lambda path, *rest: done["grid"].append(path.name))
    cfg = SimpleNamespace(epochs=5, eval_every=2, checkpoint_every=2, grid_every=2)
    trainer = bare_trainer(cfg=cfg, is_main=True, run_dir=tmp_path, global_step=0,
                           logger=SimpleNamespace(log=lambda *a: None),
                           accelerator=SimpleNamespace(wait_for_everyone=lambda: None))
    trainer.plot_rewards = lambda at_most_every: None
    trainer.evaluate = done["eval"].append
    trainer.save_checkpoint = done["checkpoint"].append
    samples = SimpleNamespace(images=None, prompts=[], rewards=np.zeros(0))
    stats = {"reward_mean": 0.0, "reward_std": 0.0, "sample_seconds": 0.0, "train_seconds": 0.0}
    for epoch in range(5):
        trainer.end_epoch(epoch, samples, dict(stats))
    assert done == {"eval": [2, 4, 5], "checkpoint": [2, 4, 5], "grid": ["epoch-0002.png", "epoch-0004.png"]}


def test_an_epoch_that_trained_counts_as_trained():
    """Mutant: epochs_trained left at the epoch's 0-based index: a reward that failed in the next epoch's sampling
    checkpointed the state as one epoch short (a resume retrained an epoch on already-trained weights), and one that
    failed in the first epoch's evaluation raised without checkpointing the trained epoch at all."""
    trainer = bare_trainer(cfg=SimpleNamespace(), resumed_epoch=None, epochs_trained=0)
    trainer.sample_epoch = lambda epoch: "samples"
    trainer.compute_advantages = lambda samples: {}
    trainer.train_epoch = lambda epoch, samples, start: None
    trainer.end_epoch = lambda epoch, samples, stats: None
    trainer.run_epoch(0)
    assert trainer.epochs_trained == 1
    trainer.run_epoch(1)
    assert trainer.epochs_trained == 2 and trainer.epoch_in_progress is None


# -- draw_sampling_batch: each prompt's images side by side -----------------------------------------------------

def test_each_sampled_prompts_images_are_side_by_side():
    """Mutant: the prompts laid out [p0, p1, p0, p1] instead of [p0, p0, p1, p1]: group advantages and REBEL pairs
    compare consecutive images as one prompt's, so each group mixed two prompts' rewards."""
    cfg = SimpleNamespace(sample_batch_size=6, images_per_prompt=2)
    sampler = SimpleNamespace(draw_latents=lambda n, gen, dtype: torch.zeros(n),
                              draw_noises=lambda n, gen, dtype: [torch.zeros(n)])
    trainer = bare_trainer(cfg=cfg, sampler=sampler, prompt_set=[f"prompt {i}" for i in range(50)])
    prompts, latents, _ = trainer.draw_sampling_batch(torch.Generator().manual_seed(0), None, torch.float32)
    assert len(prompts) == 6 == len(latents)
    assert [prompts[i] == prompts[i + 1] for i in range(0, 6, 2)] == [True] * 3
    assert len(set(prompts)) == 3


def trainer_whose_reward_fails(tmp_path, saved: list, epochs_trained: int) -> Trainer:
    """A Trainer `epochs_trained` epochs in whose every epoch fails in its reward; the checkpoints it writes are
    recorded in `saved` as (epoch, updates)."""
    from contextlib import nullcontext

    from rlcm_fast.rewards import RewardError

    trainer = bare_trainer(cfg=SimpleNamespace(eval_every=0, epochs=3), stop=nullcontext(), resumed_epoch=None,
                           start_epoch=epochs_trained, epochs_trained=epochs_trained, is_main=True)

    def run_epoch(epoch):
        raise RewardError("reward 'jpeg_compressibility' returned NaN")

    trainer.run_epoch = run_epoch
    trainer.save_position = lambda epoch, updates: saved.append((epoch, updates)) or tmp_path / f"checkpoint-{epoch}"
    return trainer


def test_a_reward_failing_in_an_epochs_sampling_names_the_state_before_that_epoch(tmp_path):
    """Mutant: `trained > epoch` as `>=`: a reward that failed scoring epoch 2's samples was reported as failing
    "in the evaluation after epoch 1", sending the user to look at the evaluation, not the epoch's samples."""
    from rlcm_fast.rewards import RewardError

    saved = []
    trainer = trainer_whose_reward_fails(tmp_path, saved, epochs_trained=1)
    with pytest.raises(RewardError) as error:
        trainer._train_epochs()
    assert str(error.value) == "reward 'jpeg_compressibility' returned NaN; checkpoint-1 holds the state before epoch 2"
    assert saved == [(1, 0)]
