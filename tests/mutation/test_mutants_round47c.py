"""Mutation-testing round 47c (rlcm_fast/trainer.py, a second round after 44g): hand-written mutants of the update's
indexing (old log-probs, prompt embeddings), fp16's loss scaler (unscaling before the clip, its update after a
skipped step, a NaN loss under a loss scale), the skipped step's messages, REBEL's arguments, the config's stat
tracker and sampling rounds, stops while sampling, the reward's failures on several processes, the epoch's timings
and the logs' closing were run against the trainer's tests (test_mutants_round44g, the tiny runs of test_switches,
test_faults, test_evaluation, test_algorithms, test_distributed and others); each test here kills the mutants named
in its docstring, which survived them. All are CPU-only, seeded and fast: no model is built and no run is trained;
the Trainer's methods are driven one at a time with stand-ins for what a built Trainer holds (its accelerator,
sampler, optimizer, reward)."""

import math
from concurrent.futures import Future
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_mutants_round44g import bare_trainer, trainer_whose_reward_fails

from rlcm_fast.algorithms import rebel_loss
from rlcm_fast.faults import NonFiniteSteps, StopTraining
from rlcm_fast.rewards import RewardError


# -- accumulate_update: the rows' own old log-probs and prompts, fp16's unscaling ------------------------------

class Policy:
    """A one-weight policy: log pi(row i, k) = w * coef[i, k]; it records the prompt embeddings each call got."""

    def __init__(self, coef):
        self.coef = coef
        self.w = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.embeds = []

    def action_log_probs(self, unet, states, sample_idx, step_idx, embeds):
        self.embeds.append(embeds.flatten().tolist())
        return (self.w * self.coef[sample_idx, step_idx],)


class Scaler:
    """fp16's loss scaler as accelerate drives it: backward scales the loss by `scale`, unscale_ divides the
    optimizer's gradients by it again."""

    def __init__(self, params, scale):
        self.params, self.scale, self.unscaled = params, scale, []

    def unscale_(self, optimizer):
        self.unscaled.append(optimizer)
        for param in self.params:
            param.grad /= self.scale


def update_trainer(coef, scale=None):
    policy = Policy(coef)
    scaler = None if scale is None else Scaler([policy.w], scale)

    @contextmanager
    def no_sync(model):
        yield

    def backward(loss):  # as accelerate's: the loss scaled by the fp16 loss scale, when there is one
        (loss * (scaler.scale if scaler else 1.0)).backward()

    accelerator = SimpleNamespace(no_sync=no_sync, backward=backward, scaler=scaler, mixed_precision="no")
    cfg = SimpleNamespace(algorithm="ppo", kl_beta=0.0, clip_range=10.0, adv_clip_max=100.0, max_grad_norm=1e9)
    trainer = bare_trainer(cfg=cfg, accelerator=accelerator, sampler=policy, params=[policy.w], train_unet=None,
                           ddp_unet=None, grads_stay_allocated=False, optimizer="the optimizer")
    return trainer, policy


COEF = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=torch.float64)
ADVANTAGES = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
REWARDS = torch.tensor([10.0, 20.0, 40.0], dtype=torch.float64)
EMBEDS = torch.tensor([[100.0], [200.0], [300.0]], dtype=torch.float64)  # one per sample (its prompt's)
# An update of 4 (sample, step) rows in two calls of 3 and 1 rows, shape (rows, 1) as planned.
MINIBATCHES = [(torch.tensor([[0], [1], [2]]), torch.tensor([[1], [0], [1]])),
               (torch.tensor([[1]]), torch.tensor([[1]]))]


def update_rows():
    return (torch.cat([s.flatten() for s, _ in MINIBATCHES]), torch.cat([k.flatten() for _, k in MINIBATCHES]))


def accumulate(trainer, old_log_probs=None):
    old = torch.zeros(3, 2, dtype=torch.float64) if old_log_probs is None else old_log_probs
    return trainer.accumulate_update(MINIBATCHES, torch.zeros(3, 3), old, ADVANTAGES, REWARDS, EMBEDS)


def test_each_rows_ratio_is_against_its_own_stored_log_prob():
    """Mutant: the old log-probs indexed with the minibatch's steps in another order (old_log_probs[sample_idx,
    step_idx.flip(0)]): each (sample, step) row's ratio taken against another action's logp_old, so the ratio,
    approx_kl and clipfrac a user watches, and the clipped loss itself, were those of mismatched actions."""
    old = torch.tensor([[0.1, -0.2], [0.3, 0.05], [-0.4, 0.25]], dtype=torch.float64)
    trainer, _ = update_trainer(COEF)
    means, _ = accumulate(trainer, old)
    sample_idx, step_idx = update_rows()
    row_old = old[sample_idx, step_idx]  # w = 0: logp = 0, ratio = exp(-logp_old)
    assert means["ratio"] == pytest.approx(float(torch.exp(-row_old).mean()), rel=1e-9)
    assert means["approx_kl"] == pytest.approx(float(0.5 * (row_old**2).mean()), rel=1e-9)


def test_each_row_is_scored_with_its_own_samples_prompt_embedding():
    """Mutant: the rows' prompt embeddings indexed by their step (embeds[step_idx]): every action's log-prob
    computed under another prompt's conditioning, so the policy was pushed towards the wrong prompt's images."""
    trainer, policy = update_trainer(COEF)
    accumulate(trainer)
    assert policy.embeds == [[100.0, 200.0, 300.0], [200.0]]  # samples 0, 1, 2 then 1


def test_fp16_gradients_are_unscaled_before_the_clip_and_the_logged_norm():
    """Mutant: the loss scaler's unscale_ skipped: under fp16 the gradient was clipped, logged and stepped at
    65536 times its size (max_grad_norm clipped every step, the logged grad_norm meaningless)."""
    trainer, policy = update_trainer(COEF)
    _, plain_norm = accumulate(trainer)
    scaled_trainer, scaled_policy = update_trainer(COEF, scale=65536.0)
    _, grad_norm = accumulate(scaled_trainer)
    assert scaled_trainer.accelerator.scaler.unscaled == ["the optimizer"]
    assert grad_norm == pytest.approx(plain_norm, rel=1e-9)
    assert scaled_policy.w.grad.item() == pytest.approx(policy.w.grad.item(), rel=1e-9)


# -- objective: REBEL's arguments ----------------------------------------------------------------------------

def test_rebels_eta_and_advantage_limit_are_each_passed_as_themselves():
    """Mutant: rebel_eta and adv_clip_max swapped in the REBEL objective: a run's `rebel_eta` became the
    advantages' clamp and adv_clip_max the regression's scale (loss and gradients of another objective)."""
    trainer = bare_trainer(cfg=SimpleNamespace(algorithm="rebel", rebel_eta=2.0, adv_clip_max=0.5))
    log_probs = torch.tensor([[0.3, -0.1], [0.2, 0.4], [-0.5, 0.1], [0.0, 0.2]])
    old = torch.zeros(4, 2)
    advantages = torch.tensor([1.0, -0.25, 3.0, -3.0])[:, None].expand(4, 2)
    loss, _ = trainer.objective(log_probs, old, advantages)
    want, _ = rebel_loss(log_probs, old, advantages[:, 0], 2.0, 0.5)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    swapped, _ = rebel_loss(log_probs, old, advantages[:, 0], 0.5, 2.0)
    assert swapped.item() != pytest.approx(want.item(), rel=1e-3)


# -- finish_update: fp16's scaler, skipped steps' messages ---------------------------------------------------

def finishing_trainer(scale=None, limit=1, grads_stay_allocated=False, accelerator=None):
    calls = {"step": 0, "scheduler": 0, "zero_grad": [], "scaler_update": 0}
    logged = []

    def count(name):
        calls[name] += 1

    scaler = None if scale is None else SimpleNamespace(get_scale=lambda: scale,
                                                        update=lambda: count("scaler_update"))
    trainer = bare_trainer(
        cfg=SimpleNamespace(max_nonfinite_steps=limit),
        accelerator=accelerator or SimpleNamespace(num_processes=1, scaler=scaler),
        stop=SimpleNamespace(received=None), is_main=True, global_step=0,
        grads_stay_allocated=grads_stay_allocated, nonfinite=NonFiniteSteps(limit),
        optimizer=SimpleNamespace(step=lambda: count("step"),
                                  zero_grad=lambda set_to_none: calls["zero_grad"].append(set_to_none)),
        lr_scheduler=SimpleNamespace(step=lambda: count("scheduler")))
    trainer.log_step = lambda epoch, values, grad_norm: logged.append(values)
    return trainer, calls, logged


def test_a_nan_loss_under_an_fp16_loss_scale_is_a_fault_not_an_overflow(capsys):
    """Mutant: `not loss_nonfinite` dropped from the overflow test: under fp16 a NaN loss (a reward or ratio gone
    NaN) was taken for the loss scaler's routine overflow, never counted as a fault, so a run whose loss stays
    NaN skipped every step for ever instead of stopping at max_nonfinite_steps with a checkpoint."""
    trainer, calls, _ = finishing_trainer(scale=65536.0, limit=1)
    trainer.finish_update(0, {"loss": math.nan}, math.nan, done=1, total=4)
    err = capsys.readouterr().err
    assert "warning: non-finite loss, grad norm at step 1 (loss nan, grad norm nan)" in err
    assert "overflowed" not in err
    with pytest.raises(StopTraining, match=r"^2 optimizer steps in a row had a non-finite"):
        trainer.finish_update(0, {"loss": math.nan}, math.nan, done=2, total=4)
    assert calls["step"] == 0


def test_the_loss_scaler_is_updated_after_every_step_skipped_or_not():
    """Mutant: scaler.update() only after a step taken: after an fp16 overflow the loss scale was never halved,
    so every later step overflowed again at the same scale and the run never trained."""
    trainer, calls, _ = finishing_trainer(scale=65536.0)
    trainer.finish_update(0, {"loss": 0.5}, math.inf, done=1, total=3)
    assert (calls["step"], calls["scaler_update"]) == (0, 1)
    trainer.finish_update(0, {"loss": 0.5}, 2.0, done=2, total=3)
    assert (calls["step"], calls["scaler_update"]) == (1, 2)


@pytest.mark.parametrize("stay", [False, True])
def test_gradients_are_zeroed_in_place_only_when_they_stay_allocated(stay):
    """Mutant: zero_grad's set_to_none inverted: a run whose gradients must stay allocated (compiled or CUDA-graphed
    training, which reads them at fixed addresses) had them freed after every step, and every other run kept
    a zeroed gradient buffer it need not."""
    trainer, calls, _ = finishing_trainer(grads_stay_allocated=stay)
    trainer.finish_update(0, {"loss": 0.5}, 1.0, done=1, total=2)
    assert calls["zero_grad"] == [not stay]


def test_the_stop_message_counts_the_faults_in_a_row_not_in_the_whole_run():
    """Mutant: the stop's message gave the run's total of non-finite steps as the count "in a row": after an
    earlier fault and a good step, 2 faults in a row were reported as "3 optimizer steps in a row", which the
    limit max_nonfinite_steps=1 does not explain."""
    trainer, _, _ = finishing_trainer(limit=1)
    trainer.finish_update(0, {"loss": math.nan}, 1.0, done=1, total=9)
    trainer.finish_update(0, {"loss": 0.5}, 1.0, done=2, total=9)
    trainer.finish_update(0, {"loss": math.nan}, 1.0, done=3, total=9)
    with pytest.raises(StopTraining) as stop:
        trainer.finish_update(0, {"loss": math.nan}, 1.0, done=4, total=9)
    assert stop.value.fault.startswith("2 optimizer steps in a row had a non-finite loss, gradient or logged value "
                                       "(max_nonfinite_steps=1)")
    assert trainer.nonfinite.total == 3


def test_a_step_skipped_for_another_processs_values_says_so(capsys):
    """Mutant: the "values on another process" fallback dropped: on a process whose own values were finite, a
    step skipped because another process's were not was reported as "non-finite  at step 1", naming nothing."""
    def reduce(values, reduction):  # another process found a non-finite gradient: skip, but no NaN loss
        return values + torch.tensor([0, 1, 0])

    accelerator = SimpleNamespace(num_processes=2, scaler=None, device=torch.device("cpu"), reduce=reduce)
    trainer, calls, logged = finishing_trainer(accelerator=accelerator)
    trainer.finish_update(0, {"loss": 0.5}, 1.0, done=1, total=2)
    err = capsys.readouterr().err
    assert "warning: non-finite values on another process at step 1 (loss 0.5, grad norm 1.0)" in err
    assert calls["step"] == 0 and logged[0]["skipped"] == 1.0


# -- sample_call and collect_rewards: a reward that exits ----------------------------------------------------

def test_a_reward_that_calls_sys_exit_is_a_reward_error_naming_it():
    """Mutant: sample_call's wait on the score catching only Exception: a user reward that called sys.exit()
    (with reward_overlap off) ended the run from inside sampling with a bare exit, instead of collect_rewards'
    RewardError naming the reward that the run checkpoints on and reports in one line."""
    def submit(images, prompts):
        future = Future()
        future.set_exception(SystemExit(3))
        return future

    sampler = SimpleNamespace(sample=lambda unet, prompts, **kw: SimpleNamespace(denoised=torch.zeros(len(prompts), 1)),
                              decode=lambda denoised: torch.zeros(len(denoised), 3, 2, 2))
    cfg = SimpleNamespace(sample_batch_size=2, reward_device="cpu", reward_overlap=False, reward="my_rewards:score")
    trainer = bare_trainer(cfg=cfg, sampler=sampler, sample_unet=None, reward=SimpleNamespace(submit=submit),
                           accelerator=SimpleNamespace(mixed_precision="no", num_processes=1, process_index=0),
                           is_main=True)
    pending = []
    trajectory = trainer.sample_call(["a", "a", "b", "b"], torch.zeros(4, 1), [], pending)
    assert len(pending) == 2 and trajectory.images.shape == (4, 3, 2, 2)
    with pytest.raises(RewardError, match=r"^reward 'my_rewards:score' raised SystemExit: 3$"):
        trainer.collect_rewards(pending)


# -- _train_epochs: the starting policy's evaluation, decided by the main process ----------------------------

@pytest.mark.parametrize("main_logged, evaluated", [(True, []), (False, [3])])
def test_only_the_main_processs_log_decides_whether_the_starting_policy_is_evaluated(main_logged, evaluated):
    """Mutant: `self.is_main and not logged` -> `not logged`: a process other than the main one (which holds no
    log, so never finds the evaluation logged) always asked for it, so a resumed multi-process run evaluated its
    starting checkpoint again although metrics.jsonl already had that evaluation (minutes of sampling, and a
    second eval record for the same epoch)."""
    from contextlib import nullcontext

    def reduce(values, reduction):  # the main process's flag added to this (second) process's
        return values + torch.tensor([0 if main_logged else 1])

    cfg = SimpleNamespace(eval_every=1, epochs=3, eval_images=8, eval_prompts=None, prompts="simple_animals", seed=0)
    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)
    trainer = bare_trainer(cfg=cfg, accelerator=accelerator, is_main=False, logger=None, stop=nullcontext(),
                           resumed_epoch=None, start_epoch=3)
    done = []
    trainer.evaluate = done.append
    trainer._train_epochs()
    assert done == evaluated


# -- _build: what the config asks for, with the model, reward and sampler stood in for -------------------------

def built_trainer(monkeypatch, overrides, sampler=None):
    """A Trainer's _build on a real config, every heavy part (accelerator, model, reward, prompts) a stand-in;
    a process other than the main one, so no run folder is written."""
    from rlcm_fast import trainer as trainer_module
    from rlcm_fast.config import resolve_config

    cfg = resolve_config(overrides={"device": "cpu", **overrides})
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=False, mixed_precision="no")
    policy = SimpleNamespace(pipe=SimpleNamespace(unet=None, vae_scale_factor=8), params=[], optimizer=None,
                             lr_scheduler=None, ddp_unet=None, sample_unet=None, train_unet=None,
                             grads_stay_allocated=False, warnings=[])
    monkeypatch.setattr(trainer_module, "start_accelerator", lambda cfg: (accelerator, "no"))
    monkeypatch.setattr(trainer_module, "make_reward", lambda *args, **kwargs: None)
    monkeypatch.setattr(trainer_module, "AsyncReward", lambda name, reward: None)
    monkeypatch.setattr(trainer_module, "build_policy_model", lambda cfg, accelerator, precision: policy)
    monkeypatch.setattr(trainer_module, "policy_sampler", sampler or (lambda pipe, cfg: SimpleNamespace(resolution=64)))
    monkeypatch.setattr(trainer_module, "load_prompt_set", lambda source: ["a cat", "a dog"])
    trainer = bare_trainer(cfg=cfg)
    trainer._build(None, False)
    return trainer


def test_the_stat_tracker_keeps_stat_buffer_size_rewards_and_needs_stat_min_count(monkeypatch):
    """Mutant: stat_buffer_size and stat_min_count swapped when the Trainer builds its tracker: with the paper's
    aesthetic settings (buffer 32, min count 16) a prompt needed 32 rewards, which its 32-reward buffer only just
    holds, before its own statistics were used, so for many epochs every prompt was normalised by the batch's."""
    trainer = built_trainer(monkeypatch, {"stat_buffer_size": 32, "stat_min_count": 16})
    rng = np.random.default_rng(0)
    prompts = ["a cat"] * 16 + ["a dog"] * 16
    rewards = np.concatenate([rng.normal(0.0, 1.0, 16), rng.normal(100.0, 1.0, 16)])
    advantages = trainer.stat_tracker.update(prompts, rewards)
    # 16 rewards each: both prompts have their own statistics, so each prompt's advantages are centred
    assert advantages[:16].mean() == pytest.approx(0.0, abs=1e-9)
    assert advantages[16:].mean() == pytest.approx(0.0, abs=1e-9)
    for _ in range(2):  # 48 rewards of each prompt seen: only the last 32 kept
        trainer.stat_tracker.update(prompts, rewards)
    assert [len(trainer.stat_tracker.history[p]) for p in ("a cat", "a dog")] == [32, 32]



def test_a_horizon_the_scheduler_refuses_is_a_config_error(monkeypatch):
    """Mutant: the sampler's ValueError re-raised as it is, not as a ConfigError: a horizon beyond the model's
    training timesteps ended a run in code with a bare ValueError and the command line with a traceback instead of
    its one-line config error (cli reports ConfigError as such)."""
    from rlcm_fast.config import ConfigError

    def refuse(pipe, cfg):
        raise ValueError("horizon=2000 is invalid: the model was trained on 1000 timesteps")

    with pytest.raises(ConfigError, match=r"^horizon=2000 is invalid: the model was trained on 1000 timesteps$"):
        built_trainer(monkeypatch, {}, sampler=refuse)


@pytest.mark.parametrize("precision, autocast", [("no", False), ("bf16", True)])
def test_training_runs_under_autocast_exactly_when_mixed_precision_is_asked_for(precision, autocast):
    """Mutant: `mixed_precision != "no"` flipped: a bf16 run sampled and trained in full precision (twice the
    memory and time the user chose bf16 to save) and a full-precision run under the accelerator's autocast."""
    accelerator = SimpleNamespace(mixed_precision=precision, autocast=lambda: "the accelerator's autocast")
    context = bare_trainer(accelerator=accelerator).autocast()
    assert (context == "the accelerator's autocast") is autocast


def test_an_epoch_samples_batches_per_epoch_times_num_sample_iters_batches():
    """Mutant: the epoch's sampling rounds without `* num_sample_iters`: the alignment task's 5 sample inner
    iterations (the paper's Table 1) drew a fifth of the samples each epoch, so every epoch trained a fifth of
    its updates."""
    cfg = SimpleNamespace(seed=0, batches_per_epoch=2, num_sample_iters=3, sample_batches_per_call=1,
                          sample_batch_size=2)
    calls = []
    trainer = bare_trainer(cfg=cfg, accelerator=SimpleNamespace(process_index=0, num_processes=1),
                           device=torch.device("cpu"),
                           pipe=SimpleNamespace(text_encoder=SimpleNamespace(dtype=torch.float32)),
                           unet=SimpleNamespace(eval=lambda: None), hide_progress=True,
                           stop=SimpleNamespace(received=None))
    trainer.draw_sampling_batch = lambda prompt_gen, noise_gen, dtype: (["a", "b"], torch.zeros(2, 1), [])

    def sample_call(prompts, latents, noises, pending):
        calls.append(prompts)
        pending.append(np.arange(2.0) + len(calls))
        return SimpleNamespace(prompts=prompts, states=torch.zeros(2, 3), log_probs=torch.zeros(2, 2),
                               images=torch.zeros(2, 1))

    trainer.sample_call = sample_call
    trainer.collect_rewards = lambda pending: np.concatenate(pending)
    samples = trainer.sample_epoch(0)
    assert len(calls) == 6
    assert len(samples.prompts) == samples.log_probs.shape[0] == len(samples.rewards) == 12


# -- sample_epoch and collect_rewards: a stop while sampling, a process with nothing to score ------------------

def test_a_stop_signal_during_sampling_stops_before_the_next_sampling_call():
    """Mutant: the stop check in the sampling loop dropped: a SIGTERM (a cluster's preemption notice) received while
    an epoch sampled was only seen after the whole epoch had been sampled and scored and its first update
    trained, minutes later than the grace period a scheduler allows."""
    cfg = SimpleNamespace(seed=0, batches_per_epoch=4, num_sample_iters=1, sample_batches_per_call=1,
                          sample_batch_size=2)
    trainer = bare_trainer(cfg=cfg, accelerator=SimpleNamespace(process_index=0, num_processes=1),
                           device=torch.device("cpu"), pipe=SimpleNamespace(text_encoder=SimpleNamespace(dtype=None)),
                           unet=SimpleNamespace(eval=lambda: None), hide_progress=True,
                           stop=SimpleNamespace(received="SIGTERM"))
    calls = []
    trainer.draw_sampling_batch = lambda *generators: calls.append("draw")
    with pytest.raises(StopTraining) as stop:
        trainer.sample_epoch(0)
    assert stop.value.updates_done == 0 and stop.value.fault is None and calls == []


def test_a_process_with_no_evaluation_image_has_no_rewards_and_no_error():
    """Mutant: the empty case `or [np.zeros(0)]` dropped from collect_rewards: a process whose share of the
    evaluation images is empty (eval_images smaller than the process count) raised numpy's "need at least one
    array to concatenate" instead of taking part in the evaluation with no rewards."""
    trainer = bare_trainer(cfg=SimpleNamespace(reward="jpeg_compressibility"),
                           accelerator=SimpleNamespace(num_processes=1, process_index=0), is_main=True)
    rewards = trainer.collect_rewards([])
    assert isinstance(rewards, np.ndarray) and rewards.shape == (0,)


# -- run_epoch and train_epoch: the epoch's timings, the UNet's training mode --------------------------------

def test_an_epochs_sampling_and_training_seconds_are_timed_apart(monkeypatch):
    """Mutant: train_seconds measured from the epoch's start: the epoch record's training time included the
    sampling time (a 3 s sampling and 6.5 s training epoch logged train 9.5 s), so the sampling-versus-training
    split a user reads to choose what to speed up was wrong."""
    from rlcm_fast import trainer as trainer_module

    clock = iter([10.0, 13.0, 13.5, 20.0])
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    ended = []
    trainer = bare_trainer(cfg=SimpleNamespace(), resumed_epoch=None, epochs_trained=0)
    trainer.sample_epoch = lambda epoch: "samples"
    trainer.compute_advantages = lambda samples: {"reward_mean": 1.0}
    trainer.train_epoch = lambda epoch, samples, start: None
    trainer.end_epoch = lambda epoch, samples, stats: ended.append(stats)
    trainer.run_epoch(0)
    assert ended == [{"reward_mean": 1.0, "sample_seconds": 3.0, "train_seconds": 6.5}]


def test_an_epochs_training_puts_the_unet_in_training_mode():
    """Mutant: `self.unet.train()` dropped from train_epoch: after sampling (which sets eval mode) the updates ran
    in eval mode, so LoRA dropout was off and diffusers' gradient checkpointing (active only in training mode)
    silently did nothing: gradient_checkpointing's memory saving lost."""
    cfg = SimpleNamespace(seed=3, step_fraction=1.0, algorithm="ppo", train_rows="flattened", train_rows_per_call=0,
                          train_batch_size=1, gradient_accumulation_steps=1, num_inner_epochs=1)
    unet = torch.nn.Linear(1, 1).eval()
    modes = []
    trainer = bare_trainer(cfg=cfg, device=torch.device("cpu"), accelerator=SimpleNamespace(process_index=0),
                           sampler=SimpleNamespace(prompt_embeddings=lambda prompts: torch.zeros(len(prompts), 1)),
                           unet=unet, hide_progress=True)
    trainer.accumulate_update = lambda minibatches, *rest: modes.append(unet.training) or ({}, 0.0)
    trainer.finish_update = lambda *args: None
    samples = SimpleNamespace(prompts=list("ab"), states=torch.zeros(2, 3), log_probs=torch.zeros(2, 2),
                              rewards=np.zeros(2), advantages=torch.zeros(2))
    trainer.train_epoch(0, samples)
    assert modes == [True, True]  # two updates of one sample each


def failed_future(error):
    future = Future()
    future.set_exception(error)
    return future


@pytest.mark.parametrize("error, said", [
    (ValueError("shape mismatch\n  in layer 3\n  (batch 4)"), "ValueError: shape mismatch"),
    (KeyError(), "KeyError: no message"),
], ids=["several lines", "no message"])
def test_a_reward_that_raised_is_said_in_one_line_naming_the_reward(error, said):
    """Mutant: the reward's exception put in the message whole (f"{exc}") rather than its first line: a library
    error spanning many lines made the run's one-line error a paragraph, and one with no message ended in
    "raised KeyError: " saying nothing."""
    trainer = bare_trainer(cfg=SimpleNamespace(reward="my_rewards:score"),
                           accelerator=SimpleNamespace(num_processes=1, process_index=0), is_main=True)
    with pytest.raises(RewardError) as raised:
        trainer.collect_rewards([failed_future(error)])
    assert str(raised.value) == f"reward 'my_rewards:score' raised {said}"


def three_process_trainer(process, failing):
    """A trainer on process `process` of 3, whose gather reports the processes in `failing` as failed."""
    def gather(flag):
        return torch.tensor([int(p in failing) for p in range(3)])

    accelerator = SimpleNamespace(num_processes=3, process_index=process, device=torch.device("cpu"), gather=gather)
    return bare_trainer(cfg=SimpleNamespace(reward="my_rewards:score"), accelerator=accelerator, is_main=process == 0)


def test_the_main_process_names_every_process_whose_reward_failed():
    """Mutant: only the first failed process named: with the reward failing on processes 1 and 2 the main process
    said "failed on process 1", and a user looked for the fault on one machine of two."""
    main = three_process_trainer(0, failing={1, 2})
    ok = np.zeros(2)
    future = Future()
    future.set_result(ok)
    with pytest.raises(RewardError) as raised:
        main.collect_rewards([future])
    assert str(raised.value) == "reward 'my_rewards:score' failed on process 1, 2"
    assert getattr(raised.value, "reported_by_main_process", False) is False  # the main process prints it


def test_when_the_main_process_did_not_fail_the_first_failed_process_prints_the_rewards_error():
    """Mutants: the speaking process taken as the last failed one, or as the main process alone: the reward's own
    error (its traceback's one line) was printed by process 2 rather than 1, or by no process at all, since the
    main process only knows that another failed, not why."""
    quiet = {}
    for process in (1, 2):
        trainer = three_process_trainer(process, failing={1, 2})
        with pytest.raises(RewardError, match=r"^reward 'my_rewards:score' raised OSError: disk gone$") as raised:
            trainer.collect_rewards([failed_future(OSError("disk gone"))])
        quiet[process] = getattr(raised.value, "reported_by_main_process", False)
    assert quiet == {1: False, 2: True}


# -- train: a run that ends in an error still closes its logs, quietly ------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError("a fault"), KeyboardInterrupt()], ids=["fault", "second ctrl-c"])
def test_a_run_ended_by_an_error_closes_its_logs_quietly_and_raises_its_own_error(error):
    """Mutant: only Exception caught around the epochs: a second Ctrl-C (a KeyboardInterrupt) left metrics.jsonl
    unclosed and reward.png without the epochs logged. Also kills the logs closed with quiet=False after an error
    (a full disk's fault followed by a second warning about the plot), which test_faults' full-disk test kills."""
    from contextlib import nullcontext

    closed = []
    trainer = bare_trainer(started=False, resumed_from=None, cfg=SimpleNamespace(epochs=1), is_main=True,
                           run_folder_hold=nullcontext())
    trainer._close_logs = lambda quiet=False: closed.append(quiet)

    def train_epochs():
        raise error

    trainer._train_epochs = train_epochs
    with pytest.raises(type(error)):
        trainer.train()
    assert closed == [True]


def test_a_run_resumed_mid_epoch_does_not_evaluate_its_partly_trained_policy():
    """Mutant: `and self.resumed_epoch is None` dropped: a run stopped in the middle of its third epoch (eval_every
    3, so no evaluation after 2 epochs) evaluated on resume the policy of 2 epochs plus some updates and logged it
    as the evaluation "after 2 epochs", a point on the evaluation curve that no run state had."""
    from contextlib import nullcontext

    cfg = SimpleNamespace(eval_every=3, epochs=2, eval_images=8, eval_prompts=None, prompts="simple_animals", seed=0)
    logger = SimpleNamespace(eval_records=lambda: [{"epoch": 0, "settings": "8 images of simple_animals, seed 0"}])
    trainer = bare_trainer(cfg=cfg, accelerator=SimpleNamespace(num_processes=1), is_main=True, logger=logger,
                           stop=nullcontext(), resumed_epoch=("samples", {}, 3), start_epoch=2)
    done = []
    trainer.evaluate = done.append
    trainer._train_epochs()
    assert done == []


@pytest.mark.parametrize("record, evaluated", [
    ({"epoch": 2}, []),
    ({"epoch": 2, "settings": "8 images of simple_animals, seed 0"}, []),
    ({"epoch": 2, "settings": "8 images of simple_animals, seed 1"}, [2]),
], ids=["older record without settings", "same settings", "other images"])
def test_a_resume_evaluates_its_start_unless_that_evaluation_is_logged(record, evaluated):
    """Mutant: a record without settings (written by a release before evaluations recorded them) taken as one of
    other settings: resuming such a run evaluated its starting checkpoint a second time and logged a duplicate
    eval record for the same epoch."""
    from contextlib import nullcontext

    cfg = SimpleNamespace(eval_every=1, epochs=2, eval_images=8, eval_prompts=None, prompts="simple_animals", seed=0)
    logger = SimpleNamespace(eval_records=lambda: [{"epoch": 1}, record])
    trainer = bare_trainer(cfg=cfg, accelerator=SimpleNamespace(num_processes=1), is_main=True, logger=logger,
                           stop=nullcontext(), resumed_epoch=None, start_epoch=2)
    done = []
    trainer.evaluate = done.append
    trainer._train_epochs()
    assert done == evaluated


def test_a_stop_signal_ends_the_run_at_the_checkpoint_it_wrote(tmp_path):
    """Mutant: `break` after a stop's checkpoint made `continue`: a run stopped (SIGTERM) after 3 updates of its
    first epoch of 3 went on to the next epochs, whose sampling stopped again at once and checkpointed "epoch 2, 0
    updates done", a state claiming an epoch it never finished, and the resume hint pointed at it."""
    from contextlib import nullcontext

    ran, saved = [], []
    trainer = bare_trainer(cfg=SimpleNamespace(eval_every=0, epochs=3), stop=nullcontext(), resumed_epoch=None,
                           start_epoch=0, epochs_trained=0, is_main=True, stopped_at=None)

    def run_epoch(epoch):
        ran.append(epoch)
        raise StopTraining(3 if epoch == 0 else 0)

    trainer.run_epoch = run_epoch
    trainer.save_position = lambda epoch, updates: saved.append((epoch, updates)) or tmp_path / f"checkpoint-{epoch}"
    trainer._train_epochs()
    assert ran == [0] and saved == [(0, 3)]
    assert trainer.stopped_at == tmp_path / "checkpoint-0"


def test_grid_every_0_saves_no_sample_grid(tmp_path, monkeypatch):
    """Mutant: the `cfg.grid_every and` guard dropped (grid_every read as at least 1): a run that switched sample
    grids off (grid_every: 0) still wrote samples/epoch-NNNN.png every epoch, a PNG of every sample each time."""
    from rlcm_fast import trainer as trainer_module

    grids = []
    monkeypatch.setattr(trainer_module, "save_sample_grid", lambda path, *rest: grids.append(path.name))
    cfg = SimpleNamespace(epochs=3, eval_every=0, checkpoint_every=5, grid_every=0)
    trainer = bare_trainer(cfg=cfg, is_main=True, run_dir=tmp_path, global_step=0,
                           logger=SimpleNamespace(log=lambda *a: None),
                           accelerator=SimpleNamespace(wait_for_everyone=lambda: None))
    trainer.plot_rewards = lambda at_most_every: None
    trainer.save_checkpoint = lambda done: None
    samples = SimpleNamespace(images=None, prompts=[], rewards=np.zeros(0))
    for epoch in range(2):
        trainer.end_epoch(epoch, samples, {"reward_mean": 0.0, "reward_std": 0.0, "sample_seconds": 0.0,
                                           "train_seconds": 0.0})
    assert grids == []


def test_pythons_memory_error_while_training_is_the_one_line_out_of_memory_fault():
    """Mutant: run_epoch catching RuntimeError only: Python's MemoryError (a CPU run whose batch does not fit)
    ended the run with a bare MemoryError traceback instead of the out-of-memory fault naming the sizes in use
    and the settings that lower memory."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.faults import TrainingFault

    cfg = resolve_config(overrides={"device": "cpu", "train_batch_size": 2})
    trainer = bare_trainer(cfg=cfg, accelerator=SimpleNamespace(num_processes=1), resumed_epoch=None,
                           epochs_trained=0)
    trainer.sample_epoch = lambda epoch: "samples"
    trainer.compute_advantages = lambda samples: {}

    def train_epoch(epoch, samples, start):
        raise MemoryError()

    trainer.train_epoch = train_epoch
    with pytest.raises(TrainingFault, match=r"^out of CPU memory while training \(per process: sample_batch_size="):
        trainer.run_epoch(0)


def test_a_reward_failing_before_any_epoch_trained_writes_no_checkpoint(tmp_path):
    """Mutant: the `epochs_trained == 0` early raise dropped: a reward failing on the first epoch's samples wrote a
    checkpoint-0 of the untrained initial state (the config's own, nothing to keep) and sent the user to resume it
    ("checkpoint-0 holds the state before epoch 1") rather than simply to fix the reward and start again."""
    saved = []
    trainer = trainer_whose_reward_fails(tmp_path, saved, epochs_trained=0)
    with pytest.raises(RewardError, match=r"^reward 'jpeg_compressibility' returned NaN$"):
        trainer._train_epochs()
    assert saved == []


def test_an_evaluation_call_decodes_and_scores_only_the_batches_holding_real_images():
    """Mutant: sample_call's loop over every batch of a padded evaluation call (not only up to `scored`): with one
    real image in a call of two sampling batches, the second, all-padding batch was decoded too and submitted to
    the reward as one image with no prompt (a wasted VAE decode, and a reward call with mismatched lengths)."""
    submitted, decoded = [], []

    def submit(images, prompts):
        submitted.append((len(images), list(prompts)))
        future = Future()
        future.set_result(np.zeros(len(images)))
        return future

    def decode(denoised):
        decoded.append(len(denoised))
        return torch.zeros(len(denoised), 3, 2, 2)

    sampler = SimpleNamespace(sample=lambda unet, prompts, **kw: SimpleNamespace(denoised=torch.zeros(len(prompts), 1)),
                              decode=decode)
    cfg = SimpleNamespace(sample_batch_size=2, reward_device="cpu", reward_overlap=True, reward="jpeg_compressibility")
    trainer = bare_trainer(cfg=cfg, sampler=sampler, sample_unet=None, reward=SimpleNamespace(submit=submit),
                           accelerator=SimpleNamespace(mixed_precision="no"))
    trajectory = trainer.sample_call(["a", "a", "a", "a"], torch.zeros(4, 1), [], [], scored=1)
    assert decoded == [2] and submitted == [(1, ["a"])]
    assert trajectory.images is None


def test_a_reward_error_keeps_its_message_and_its_mark_of_who_reports_it(tmp_path):
    """Mutants: collect_rewards' own RewardError (a reward that returned NaN or the wrong count) caught as any
    exception and wrapped again ("reward 'x' raised RewardError: reward 'x' returned ..."), and the error
    _train_epochs raises after checkpointing always marked as reported by the main process, so the process that
    was meant to print the reward's error (the main one, or the first that failed) printed nothing."""
    from contextlib import nullcontext

    error = RewardError("reward 'jpeg_compressibility' returned 3 values for 4 images")
    trainer = bare_trainer(cfg=SimpleNamespace(reward="jpeg_compressibility", eval_every=0, epochs=3),
                           accelerator=SimpleNamespace(num_processes=1, process_index=0), is_main=True,
                           stop=nullcontext(), resumed_epoch=None, start_epoch=1, epochs_trained=1)
    with pytest.raises(RewardError) as raised:
        trainer.collect_rewards([failed_future(error)])
    assert raised.value is error

    def run_epoch(epoch):
        raise error

    trainer.run_epoch = run_epoch
    trainer.save_position = lambda epoch, updates: tmp_path / f"checkpoint-{epoch}"
    with pytest.raises(RewardError) as raised:
        trainer._train_epochs()
    assert str(raised.value) == f"{error}; checkpoint-1 holds the state before epoch 2"
    assert getattr(raised.value, "reported_by_main_process", False) is False


def test_a_resumed_epoch_is_continued_once_and_the_next_epoch_samples_afresh():
    """Mutant: the resumed epoch not cleared after use: every epoch after a mid-epoch resume trained again on the
    resumed epoch's samples (skipping its finished updates) instead of sampling its own, so the rest of the run
    never saw a new sample."""
    trained = []
    trainer = bare_trainer(cfg=SimpleNamespace(), resumed_epoch=("resumed samples", {"reward_mean": 1.0}, 2),
                           epochs_trained=0)
    trainer.sample_epoch = lambda epoch: f"samples of epoch {epoch}"
    trainer.compute_advantages = lambda samples: {}
    trainer.train_epoch = lambda epoch, samples, start: trained.append((epoch, samples, start))
    trainer.end_epoch = lambda epoch, samples, stats: None
    trainer.run_epoch(4)
    trainer.run_epoch(5)
    assert trained == [(4, "resumed samples", 2), (5, "samples of epoch 5", 0)]
