"""Mutation-testing round 51a (rlcm_fast/trainer.py, a third round after 44g and 47c): hand-written mutants of the
epoch loop (the UNet's mode while sampling, the rewards' device and waits, the random streams, the minibatch plan,
the gradients that must stay allocated, the run-once and cleanup of train(), what an epoch's end logs, prints,
evaluates and checkpoints, and on which processes) were run against the trainer's tests (test_mutants_round44g,
test_mutants_round47c, test_trainer_in_code, test_reference_update, test_switches, and for the survivors the
matching parts of test_train, test_resume, test_evaluation and test_algorithms); each test here kills the mutants
named in its docstring, which survived them. All are CPU-only, seeded and fast: no model is built and no run is
trained; the Trainer's methods are driven one at a time with stand-ins for what a built Trainer holds."""

from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_mutants_round44g import ADVANTAGES, COEF, accumulate, bare_trainer, update_rows, update_trainer

from rlcm_fast import trainer as trainer_module
from rlcm_fast.epoch_samples import EpochSamples


# -- sample_epoch and sample_call: the UNet's mode, where and when the rewards are scored -----------------------

def test_an_epochs_sampling_runs_the_unet_in_eval_mode():
    """Mutant: `self.unet.eval()` dropped from sample_epoch: after an epoch's training (which sets training mode)
    the next epoch sampled in training mode, so a model with dropout (a UNet whose diffusers config sets
    `dropout`) sampled with it on: the stored actions and log-probs were not those of the policy the first
    update's ratio compares against."""
    cfg = SimpleNamespace(seed=0, batches_per_epoch=2, num_sample_iters=1, sample_batches_per_call=1,
                          sample_batch_size=2)
    unet = torch.nn.Linear(1, 1).train()
    modes = []
    trainer = bare_trainer(cfg=cfg, accelerator=SimpleNamespace(process_index=0, num_processes=1),
                           device=torch.device("cpu"),
                           pipe=SimpleNamespace(text_encoder=SimpleNamespace(dtype=torch.float32)),
                           unet=unet, hide_progress=True, stop=SimpleNamespace(received=None))
    trainer.draw_sampling_batch = lambda prompt_gen, noise_gen, dtype: (["a", "b"], torch.zeros(2, 1), [])

    def sample_call(prompts, latents, noises, pending):
        modes.append(unet.training)
        pending.append(np.zeros(2))
        return SimpleNamespace(prompts=prompts, states=torch.zeros(2, 3), log_probs=torch.zeros(2, 2),
                               images=torch.zeros(2, 1))

    trainer.sample_call = sample_call
    trainer.collect_rewards = lambda pending: np.concatenate(pending)
    trainer.sample_epoch(0)
    assert modes == [False, False]


class DeviceImages:
    """A batch of decoded images on `device`, standing in for a GPU tensor: `.cpu()` moves it."""

    def __init__(self, n, device):
        self.n, self.device = n, device

    def __len__(self):
        return self.n

    def __getitem__(self, rows):
        return DeviceImages(len(range(self.n)[rows]), self.device)

    def cpu(self):
        return DeviceImages(self.n, "cpu")


def scoring_trainer(reward_device, reward_overlap, events):
    """A Trainer whose sampler decodes on "cuda" and whose reward records the device of what it is given; decodes,
    submissions and waits for a score are recorded in `events`."""
    def decode(denoised):
        events.append("decode")
        return DeviceImages(len(denoised), "cuda")

    def submit(images, prompts):
        events.append(f"submit {images.device}")
        future = Future()
        future.set_result(np.zeros(len(images)))
        result = future.result
        future.result = lambda *args: events.append("wait") or result(*args)
        return future

    sampler = SimpleNamespace(sample=lambda unet, prompts, **kw: SimpleNamespace(denoised=torch.zeros(len(prompts), 1)),
                              decode=decode)
    cfg = SimpleNamespace(sample_batch_size=2, reward_device=reward_device, reward_overlap=reward_overlap,
                          reward="jpeg_compressibility")
    return bare_trainer(cfg=cfg, sampler=sampler, sample_unet=None, reward=SimpleNamespace(submit=submit),
                        accelerator=SimpleNamespace(mixed_precision="no"))


@pytest.mark.parametrize("reward_device", ["cpu", "cuda"])
def test_the_reward_is_given_the_images_on_its_reward_device(reward_device):
    """Mutant: `reward_device == "cpu"` flipped: a CPU reward (JPEG sizes, `reward_device: cpu`) was handed the
    images on the GPU and a GPU reward (CLIP, aesthetic) had every batch copied to the host and back."""
    events = []
    trainer = scoring_trainer(reward_device, True, events)
    trainer.sample_call(["a", "b", "c", "d"], torch.zeros(4, 1), [], [], scored=4)
    assert events == ["decode", f"submit {reward_device}"] * 2


@pytest.mark.parametrize("overlap, waited", [(False, True), (True, False)])
def test_without_reward_overlap_each_batch_is_scored_before_the_next_decodes(overlap, waited):
    """Mutant: `not cfg.reward_overlap` flipped: `reward_overlap: false` (the straightforward path a user picks to
    rule the reward thread out, or to keep a GPU reward off the sampler's memory) scored on the thread while
    sampling went on, and the default overlapped run waited for every score before decoding the next batch."""
    events = []
    trainer = scoring_trainer("cuda", overlap, events)
    trainer.sample_call(["a", "b", "c", "d"], torch.zeros(4, 1), [], [], scored=4)
    per_batch = ["decode", "submit cuda"] + (["wait"] if waited else [])
    assert events == per_batch * 2


# -- train_epoch: a resumed epoch's progress bar, the size of each training call ------------------------------

def epoch_trainer(monkeypatch, bars, handed):
    """A Trainer training an epoch of 4 samples, one per update, in 2 passes (8 updates): its progress bars are
    recorded in `bars` and each update's rewards in `handed`."""
    class Bar:
        def __init__(self, total, initial, **options):
            self.total, self.n = total, initial
            bars.append(self)

        def update(self):
            self.n += 1

        def close(self):
            pass

    monkeypatch.setattr(trainer_module, "tqdm", Bar)
    cfg = SimpleNamespace(seed=3, step_fraction=1.0, algorithm="ppo", train_rows="flattened", train_rows_per_call=0,
                          train_batch_size=1, gradient_accumulation_steps=1, num_inner_epochs=2)
    trainer = bare_trainer(cfg=cfg, device=torch.device("cpu"), accelerator=SimpleNamespace(process_index=0),
                           sampler=SimpleNamespace(prompt_embeddings=lambda prompts: torch.zeros(len(prompts), 1)),
                           unet=SimpleNamespace(train=lambda: None), hide_progress=True)
    trainer.accumulate_update = lambda minibatches, states, old, advantages, rewards, embeds: (
        handed.append(rewards) or ({}, 0.0))
    trainer.finish_update = lambda *args: None
    return trainer


def test_a_resumed_epochs_training_bar_counts_the_updates_done_before_the_stop(monkeypatch):
    """Mutant: the training bar of a resumed epoch started at 0: after a stop 3 updates into an epoch of 8 the
    resumed run's bar ended at 5/8, telling the user the epoch had not finished when it had."""
    bars, handed = [], []
    trainer = epoch_trainer(monkeypatch, bars, handed)
    samples = EpochSamples(prompts=list("abcd"), states=torch.zeros(4, 3), log_probs=torch.zeros(4, 2),
                           rewards=np.zeros(4), advantages=torch.zeros(4), images=torch.zeros(0))
    trainer.train_epoch(0, samples, 3)
    assert len(handed) == 5 and [(bar.total, bar.n) for bar in bars] == [(8, 8)]


def test_each_training_call_holds_train_batch_size_rows_and_an_update_accumulates_the_configs_count():
    """Mutant: train_batch_size and gradient_accumulation_steps swapped when the epoch's minibatches are planned: an
    update covered the same samples (so the gradient was the same), but in UNet calls of
    gradient_accumulation_steps rows: a user's train_batch_size=3 with accumulation 2 trained in calls of 2 rows
    (slower), and one with accumulation 8 in calls of 8 (out of memory at a batch size the user had sized)."""
    cfg = SimpleNamespace(seed=5, step_fraction=1.0, algorithm="ppo", train_rows="flattened", train_rows_per_call=0,
                          train_batch_size=3, gradient_accumulation_steps=2, num_inner_epochs=1)
    updates = []
    trainer = bare_trainer(cfg=cfg, device=torch.device("cpu"), accelerator=SimpleNamespace(process_index=0),
                           sampler=SimpleNamespace(prompt_embeddings=lambda prompts: torch.zeros(len(prompts), 1)),
                           unet=SimpleNamespace(train=lambda: None), hide_progress=True)
    trainer.accumulate_update = lambda minibatches, *rest: updates.append(minibatches) or ({}, 0.0)
    trainer.finish_update = lambda *args: None
    samples = EpochSamples(prompts=list("abcdefg"), states=torch.zeros(7, 3), log_probs=torch.zeros(7, 2),
                           rewards=np.zeros(7), advantages=torch.zeros(7), images=torch.zeros(0))
    trainer.train_epoch(0, samples)
    assert len(updates) == 1  # 7 samples: one update of 3 x 2, the 7th left out
    assert [len(sample_idx) for sample_idx, _ in updates[0]] == [3] * 4  # 2 accumulated x 2 trained steps
    rows = {(s, k) for sample_idx, step_idx in updates[0] for s, k in zip(sample_idx.flatten().tolist(),
                                                                          step_idx.flatten().tolist())}
    assert len(rows) == 12 and {k for _, k in rows} == {0, 1}


# -- accumulate_update: gradients that must stay allocated ------------------------------------------------------

def test_gradients_that_stay_allocated_exist_before_the_first_backward():
    """Mutant: the zero-filling of a gradient left None dropped: with a CUDA-graphed training UNet
    (grads_stay_allocated), a parameter whose .grad someone's zero_grad(set_to_none=True) had freed took the
    graph's static buffer as its .grad, which the update's next backward overwrote: an update accumulated over
    several minibatches kept only the last one's gradient (cuda_graphs.py; the same tensor must hold them all)."""
    trainer, policy, _ = update_trainer(COEF)
    trainer.grads_stay_allocated = True
    seen = []
    backward = trainer.accelerator.backward

    def recording_backward(loss):
        seen.append(None if policy.w.grad is None else id(policy.w.grad))
        backward(loss)

    trainer.accelerator.backward = recording_backward
    assert policy.w.grad is None
    accumulate(trainer)
    assert seen[0] is not None and seen == [id(policy.w.grad)] * 2
    sample_idx, step_idx = update_rows()  # both calls' gradients, summed in the tensor that was there
    assert policy.w.grad.item() == pytest.approx(float((-ADVANTAGES[sample_idx] * COEF[sample_idx, step_idx]).mean()))


# -- end_epoch: what an epoch's end prints, saves, evaluates and checkpoints, on every process ---------------------

def ending_trainer(tmp_path, monkeypatch, is_main=True, **cfg):
    """A Trainer at an epoch's end whose evaluation, checkpoint, grid, plot and wait are recorded in order."""
    calls = []
    monkeypatch.setattr(trainer_module, "save_sample_grid",
                        lambda path, images, prompts, rewards: calls.append(("grid", path.name, prompts, rewards)))
    config = dict(epochs=5, eval_every=0, checkpoint_every=100, grid_every=0) | cfg
    trainer = bare_trainer(cfg=SimpleNamespace(**config), is_main=is_main, run_dir=tmp_path, global_step=7,
                           logger=SimpleNamespace(log=lambda *record: calls.append(("log", *record))),
                           accelerator=SimpleNamespace(wait_for_everyone=lambda: calls.append(("wait",))))
    trainer.plot_rewards = lambda at_most_every: calls.append(("plot",))
    trainer.evaluate = lambda done: calls.append(("eval", done))
    trainer.save_checkpoint = lambda done: calls.append(("checkpoint", done))
    return trainer, calls


STATS = {"reward_mean": 1.5, "reward_std": 0.25, "samples": 4, "sample_seconds": 3.04, "train_seconds": 6.5}


def test_an_epochs_record_and_line_give_its_number_counted_from_1_and_the_rewards_std(tmp_path, monkeypatch, capsys):
    """Mutants: the epoch record logged under the epoch's 0-based index (metrics.jsonl's epoch 1 record holding
    epoch 2's rewards, one epoch off the step records and evaluations logged with it, and reward.png's curve
    shifted), and the printed line giving the reward's mean after `+-` in place of its std (the one line a user
    watches to see the spread of the rewards, and whether the advantages have any signal left)."""
    trainer, calls = ending_trainer(tmp_path, monkeypatch)
    trainer.end_epoch(1, SimpleNamespace(), dict(STATS))
    assert capsys.readouterr().out == "epoch 2/5  reward +1.5000 +- 0.2500  sample 3.0s  train 6.5s\n"
    assert calls[0] == ("log", "epoch", 2, 7, STATS)


def test_the_sample_grid_labels_each_image_with_its_own_reward(tmp_path, monkeypatch):
    """Mutant: the grid's rewards given in another order than the images (sorted): samples/epoch-0002.png labelled
    each image with another image's reward, so what a user reads off the grid as scoring well was not."""
    trainer, calls = ending_trainer(tmp_path, monkeypatch, grid_every=2)
    samples = SimpleNamespace(images=torch.zeros(3, 3, 2, 2), prompts=["b", "a", "c"],
                              rewards=np.array([3.0, -1.0, 2.0]))
    trainer.end_epoch(1, samples, dict(STATS))
    assert ("grid", "epoch-0002.png", ["b", "a", "c"], [3.0, -1.0, 2.0]) in calls


def test_every_process_evaluates_checkpoints_and_waits_at_an_epochs_end(tmp_path, monkeypatch, capsys):
    """Mutants: the closing wait_for_everyone dropped (survived: a process started the next epoch while the main
    one still wrote the checkpoint), and the evaluation run on the main process only (under `accelerate launch`
    the others, which sample their share of the evaluation images and gather the rewards with it, went on to the
    next epoch and the run hung: test_distributed saw it only as its two-process run's 400 s timeout; this fails at
    once). A process other than the main one logs and prints nothing."""
    trainer, calls = ending_trainer(tmp_path, monkeypatch, is_main=False, eval_every=1, checkpoint_every=1,
                                    grid_every=1)
    trainer.end_epoch(0, SimpleNamespace(), dict(STATS))
    assert calls == [("eval", 1), ("checkpoint", 1), ("wait",)]
    assert capsys.readouterr().out == ""


# -- kl_to_base and base_action_means: every action averaged, the LoRA switched back on ----------------------

def test_the_policys_lora_is_switched_back_on_when_the_base_models_pass_fails():
    """Mutant: enable_adapters outside a `finally`: a KL pass that raised (out of memory in `kl_to_base`, in a
    notebook that then carries on) left the LoRA switched off, so every later sample and update used the base
    model, silently."""
    enabled = [True]
    unet = SimpleNamespace(disable_adapters=lambda: enabled.__setitem__(0, False),
                           enable_adapters=lambda: enabled.__setitem__(0, True))

    def action_means(*args):
        assert enabled == [False]  # the base model: the LoRA switched off
        raise RuntimeError("CUDA out of memory")

    trainer = bare_trainer(unet=unet, sampler=SimpleNamespace(action_means=action_means))
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.base_action_means(torch.zeros(1, 2, 1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 1))
    assert enabled == [True]


def test_the_kl_to_the_base_model_averages_every_sample_at_every_step():
    """Mutant: the samples' index repeated (not repeat_interleave'd) beside the steps' repeat: kl_to_base (the
    ablation benchmark's `final_kl_to_base`) paired sample i with step i mod K only; with 4 samples of 2 steps it
    averaged 4 of the 8 actions (every sample at one step), a KL that was not the policy's."""
    coef = torch.tensor([[1.0, 3.0], [0.0, 2.0], [4.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    lora = [True]
    unet = SimpleNamespace(disable_adapters=lambda: lora.__setitem__(0, False),
                           enable_adapters=lambda: lora.__setitem__(0, True))

    def action_means(unet, states, sample_idx, step_idx, embeds):
        assert embeds.flatten().tolist() == sample_idx.double().tolist()  # each row its own sample's prompt
        mean = coef[sample_idx, step_idx][:, None] if lora[0] else torch.zeros(len(sample_idx), 1, dtype=coef.dtype)
        return mean, torch.ones_like(mean)

    sampler = SimpleNamespace(action_means=action_means,
                              prompt_embeddings=lambda prompts: torch.tensor([[float(p)] for p in prompts]))
    trainer = bare_trainer(unet=unet, sampler=sampler, device=torch.device("cpu"),
                           accelerator=SimpleNamespace(mixed_precision="no"))
    samples = EpochSamples(prompts=["0", "1", "2", "3"], states=torch.zeros(4, 3, 1), log_probs=torch.zeros(4, 2),
                           rewards=np.zeros(4), advantages=torch.zeros(4), images=torch.zeros(0))
    assert trainer.kl_to_base(samples) == pytest.approx(float((coef**2 / 2).mean()))  # 31.25 / 16
