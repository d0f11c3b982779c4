"""RLCM training (README, "The algorithm"), top to bottom: sample, score, normalise, clipped policy gradient.

The same loop trains the DDPO baseline (`method: ddpo`, README, "The DDPO baseline"): only the policy differs,
and it is chosen in one place (sampler.policy_sampler): `LCMSampler` or `DDPOSampler`, same interface.

Runs unchanged on one CPU, one GPU, or several processes under `accelerate launch` / torchrun: each
process samples and scores its own trajectories, rewards and prompts are gathered so that every process
computes the same advantages, and DDP averages the LoRA gradients.

Randomness is derived from (seed, epoch, process index) at the start of each epoch, so a run resumed
from a checkpoint draws exactly the prompts, noises and shuffles an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from contextlib import nullcontext, suppress
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .algorithms import (
    choose_trained_steps, clipped_policy_loss, gaussian_kl, group_advantages, rebel_loss,
)
from .call_sizes import AUTO_KEYS, resolve_call_sizes
from .config import ConfigError, TrainConfig
from .epoch_samples import EpochSamples, epoch_generator
from .evaluation import evaluate_policy, evaluation_settings, unused_evaluation_settings
from .faults import (NonFiniteSteps, StopSignals, StopTraining, TrainingFault, agree, first_line,
                     left_to_the_main_process, out_of_memory_fault, processes_where, reported_by_main_process)
from .launch import start_accelerator
from .minibatches import minibatch_plan, updates_per_pass
from .policy_model import build_policy_model
from .prompts import load_prompt_set
from .resume import held_start, nothing_left_to_train, prompt_source
from .rewards import AsyncReward, RewardError, make_reward, reward_options, silent_reward_server
from .run_checkpoints import CheckpointedRun
from .run_logging import REWARD_PLOT_SECONDS, LoggedRun, save_sample_grid
from .sampler import Trajectory, policy_sampler
from .stat_tracker import PerPromptStatTracker


class Trainer(CheckpointedRun, LoggedRun):
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume_from: Path | None = None, progress_bars: bool = True):
        # The arguments' types, in one line each: pathlib's TypeError named no argument, and "no" drew the bars.
        for name, path, allowed in (("run_dir", run_dir, (str, os.PathLike)),
                                    ("resume_from", resume_from, (str, os.PathLike, type(None)))):
            if not isinstance(path, allowed):
                raise TypeError(f"{name}={path!r} is not a folder's path: a Trainer takes a str or pathlib.Path"
                                + (", or None" if name == "resume_from" else ""))
        if not isinstance(progress_bars, bool):
            raise TypeError(f"progress_bars={progress_bars!r} is invalid: it must be True or False")
        # The command line's checks of the config, the run folder and the resume, for a Trainer made in code too,
        # and the run folder's lock, held until train() ends: nothing else may write the folder meanwhile.
        hold, self.cfg, self.run_dir, resume_from = held_start(cfg, run_dir, resume_from)
        with hold:  # released at once if the Trainer cannot be built
            self._build(resume_from, progress_bars)
            self.run_folder_hold = hold.pop_all()

    def _build(self, resume_from: Path | None, progress_bars: bool) -> None:
        cfg = self.cfg
        # The device settings are checked first, before any model loads.
        self.accelerator, precision = start_accelerator(cfg)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.hide_progress = not (self.is_main and progress_bars)

        # The reward before the model: a user reward that cannot be imported fails before minutes of loading.
        self.reward = AsyncReward(cfg.reward, make_reward(cfg.reward, cfg.jpeg_quality, cfg.reward_threads,
                                                              **reward_options(cfg)))
        # A resume may switch its evaluations off: their settings come from its checkpoint, not from the user.
        for warning in ((silent_reward_server(cfg.reward, cfg.reward_server),
                         None if resume_from else unused_evaluation_settings(cfg)) if self.is_main else ()):
            if warning:
                print(f"rlcm-fast: warning: {warning}", file=sys.stderr)
        policy = build_policy_model(cfg, self.accelerator, precision)
        self.pipe, self.unet, self.params = policy.pipe, policy.pipe.unet, policy.params
        self.optimizer, self.lr_scheduler = policy.optimizer, policy.lr_scheduler
        self.ddp_unet, self.sample_unet, self.train_unet = policy.ddp_unet, policy.sample_unet, policy.train_unet
        self.grads_stay_allocated = policy.grads_stay_allocated

        # The policy, the only part RLCM and DDPO do not share (timesteps, per-action scalars, guidance).
        try:  # the scheduler refuses step counts beyond the model's training timesteps
            self.sampler = policy_sampler(self.pipe, cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # The UNet's batch sizes where the config says auto, for this device, its memory and the latent size.
        # Saved as auto (config.yaml, checkpoints): a resume on another machine chooses again.
        self.auto_keys = [key for key in AUTO_KEYS if getattr(cfg, key) == "auto"]
        memory = (torch.cuda.get_device_properties(self.device).total_memory / 2**30
                  if self.device.type == "cuda" else None)
        latent_side = self.sampler.resolution // self.pipe.vae_scale_factor
        self.cfg = cfg = resolve_call_sizes(cfg, self.device.type, latent_side, memory)
        for warning in policy.warnings if self.is_main else ():
            print(f"rlcm-fast: warning: {warning}", file=sys.stderr)
        self.prompt_set = load_prompt_set(prompt_source(cfg.prompts, resume_from))
        self.eval_prompt_set = (load_prompt_set(prompt_source(cfg.eval_prompts, resume_from, "eval_prompts"))
                                if cfg.eval_prompts else self.prompt_set)
        self.stat_tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)

        self.start_epoch, self.global_step, self.started = 0, 0, False
        self.epochs_trained = 0  # the epochs whose updates the weights hold (set again by a resume)
        self.resumed_from = resume_from  # the checkpoint (held_start found the newest intact one in a run folder)
        self.nonfinite = NonFiniteSteps(cfg.max_nonfinite_steps)
        self.stop = StopSignals(announce=self.is_main)
        self.stopped_at: Path | None = None  # the checkpoint written when a signal stopped the run
        self.resumed_epoch: tuple[EpochSamples, dict, int] | None = None  # samples, stats, updates done
        self.epoch_in_progress: tuple[EpochSamples, dict] | None = None
        self.last_saved: tuple[int, int] | None = None  # (epoch, update) of the newest checkpoint of this state
        # (epoch and eval records, time.monotonic()) of the last reward.png
        self.plotted: tuple[tuple[int, int], float] = ((0, 0), -math.inf)
        if resume_from is not None:
            self._resume(resume_from)
        self.logger = self._start_run_folder() if self.is_main else None

    # -- sampling and rewards ---------------------------------------------------------------------------

    def autocast(self):
        return self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else nullcontext()

    def sample_epoch(self, epoch: int) -> EpochSamples:
        cfg, process = self.cfg, self.accelerator.process_index
        prompt_gen = epoch_generator(cfg.seed, epoch, process, stream=0)
        noise_gen = epoch_generator(cfg.seed, epoch, process, stream=1, device=self.device)
        rounds = cfg.batches_per_epoch * cfg.num_sample_iters
        joined = cfg.sample_batches_per_call  # sampling batches per UNet batch (same trajectories, wider calls)
        # The dtype sample() draws noise in: its prompt embeddings' (encode_prompt casts them to the text encoder's).
        noise_dtype = self.pipe.text_encoder.dtype
        trajectories: list[Trajectory] = []
        pending = []
        self.unet.eval()
        for _ in tqdm(range(rounds // joined), desc=f"epoch {epoch + 1} sampling", disable=self.hide_progress,
                      leave=False):
            if agree(self.accelerator, self.stop.received)[0]:
                raise StopTraining(0)  # nothing of this epoch is kept: it is redrawn identically on resume
            batches = [self.draw_sampling_batch(prompt_gen, noise_gen, noise_dtype) for _ in range(joined)]
            prompts = [p for batch_prompts, _, _ in batches for p in batch_prompts]
            trajectory = self.sample_call(prompts, torch.cat([latents for _, latents, _ in batches]),
                                          [torch.cat(step) for step in zip(*(noises for _, _, noises in batches))],
                                          pending)
            trajectories.append(trajectory)
        rewards = self.collect_rewards(pending)
        prompts = [p for t in trajectories for p in t.prompts]
        return EpochSamples(
            prompts=prompts,
            states=torch.cat([t.states for t in trajectories]),
            log_probs=torch.cat([t.log_probs for t in trajectories]),
            rewards=rewards,
            advantages=torch.empty(0),
            images=torch.cat([t.images for t in trajectories]),
        )

    def sample_call(self, prompts: list[str], latents: torch.Tensor, noises: list[torch.Tensor], pending: list,
                    scored: int | None = None) -> Trajectory:
        """One UNet sampling call; its images decoded and scored batch by batch (sample_batch_size), each batch's
        reward future appended to `pending`, and kept on the CPU (the sample grid's). `scored`: only the first
        `scored` images are decoded (in whole batches) and scored, none kept (the evaluation's padded calls)."""
        cfg = self.cfg
        with self.autocast():
            trajectory = self.sampler.sample(self.sample_unet, prompts, latents=latents, noises=noises, decode=False)
        images, keep = [], scored is None
        for start in range(0, len(prompts) if keep else scored, cfg.sample_batch_size):
            batch = slice(start, start + cfg.sample_batch_size)
            with self.autocast():
                batch_images = self.sampler.decode(trajectory.denoised[batch])
            if not keep:
                batch = slice(start, min(start + cfg.sample_batch_size, scored))
                batch_images = batch_images[:batch.stop - start]
            # Scored on a worker thread while the next batch decodes or samples, on the training device (GPU
            # rewards read them there; CPU rewards copy what they need).
            if cfg.reward_device == "cpu":
                batch_images = batch_images.cpu()
            pending.append(self.reward.submit(batch_images, prompts[batch]))
            if not cfg.reward_overlap:
                try:  # straightforward path: the score before the next batch samples
                    pending[-1].result()
                except BaseException:  # what the reward raised: collect_rewards reports it, naming the reward
                    pass
            if keep:
                images.append(batch_images.cpu())  # no copy when already there
        trajectory.images = torch.cat(images) if keep else None
        return trajectory

    def draw_sampling_batch(self, prompt_gen, noise_gen, noise_dtype) -> tuple[list[str], torch.Tensor, list]:
        """One sampling batch's prompts, x_0 and step noises, drawn as sampling it alone would draw them."""
        cfg = self.cfg
        # G images of each prompt, side by side: [p0 x G, p1 x G, ...] (group advantages, REBEL pairs).
        picks = torch.randint(len(self.prompt_set), (cfg.sample_batch_size // cfg.images_per_prompt,),
                              generator=prompt_gen)
        prompts = [self.prompt_set[i] for i in picks.tolist() for _ in range(cfg.images_per_prompt)]
        latents = self.sampler.draw_latents(len(prompts), noise_gen, noise_dtype)
        return prompts, latents, self.sampler.draw_noises(len(prompts), noise_gen, noise_dtype)

    def collect_rewards(self, pending) -> np.ndarray:
        """The scored rewards; a reward that raised or returned unusable values is a RewardError naming it,
        raised on every process (agreed) so that all of them stop and checkpoint together. One process prints
        the reward's own error: the main one, or the first that failed when the main one did not (the main
        one then names it)."""
        error = None
        try:
            rewards = np.concatenate([future.result() for future in pending] or [np.zeros(0)])
        except RewardError as exc:
            error = exc
        # The user's reward code: anything it raised is its failure, sys.exit() too (a future re-raises what the
        # worker's call raised; a Ctrl-C reaches the main thread's stop handler, never a future).
        except BaseException as exc:
            error = RewardError(f"reward {self.cfg.reward!r} raised {type(exc).__name__}: "
                                f"{first_line(exc, empty='no message')}")
        if failed := processes_where(self.accelerator, error is not None):
            if error is None:
                error = RewardError(f"reward {self.cfg.reward!r} failed on process {', '.join(map(str, failed))}")
            speaks = self.is_main or (0 not in failed and self.accelerator.process_index == failed[0])
            raise left_to_the_main_process(error, quiet=not speaks)
        return rewards

    def evaluate(self, epochs_trained: int) -> None:
        """The evaluation after `epochs_trained` epochs (evaluation.py), logged as an "eval" record."""
        try:
            stats = evaluate_policy(self)
        except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            # Its sampling calls are the epochs' (the same advice); only their number grows with eval_images.
            if (fault := out_of_memory_fault(exc, self.cfg, "evaluating", self.accelerator.num_processes)) is None:
                raise
            raise fault from None
        self.log_evaluation(epochs_trained, stats)

    def compute_advantages(self, samples: EpochSamples) -> dict[str, float]:
        """Gather every process's rewards and prompts, normalise (per prompt, or per group of one prompt's
        images in one round), keep this process's slice."""
        local = torch.as_tensor(samples.rewards, dtype=torch.float64, device=self.device)
        all_rewards = self.accelerator.gather(local).cpu().numpy()
        if self.cfg.advantages == "group":
            advantages = group_advantages(all_rewards, self.cfg.images_per_prompt)
        else:
            all_prompts = gather_object(samples.prompts) if self.accelerator.num_processes > 1 else samples.prompts
            advantages = self.stat_tracker.update(all_prompts, all_rewards)
        n, process = len(samples.prompts), self.accelerator.process_index
        samples.advantages = torch.as_tensor(advantages[process * n : (process + 1) * n], dtype=torch.float32)
        return {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
                "samples": len(all_rewards)}

    # -- training ---------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, samples: EpochSamples, start_update: int = 0) -> None:
        """num_inner_epochs passes over the epoch's trained (sample, step) pairs, one optimizer step per
        `gradient_accumulation_steps` minibatches' worth of samples (each covering all their trained steps).

        `start_update` > 0 continues an epoch stopped after that many updates: every shuffle is redrawn
        and the finished updates are skipped, so the random streams stay those of an uninterrupted run.
        """
        cfg = self.cfg
        n, total_steps = samples.log_probs.shape
        embeds = self.sampler.prompt_embeddings(samples.prompts)
        states = samples.states.to(self.device)
        old_log_probs = samples.log_probs.to(self.device)
        advantages = samples.advantages.to(self.device)
        rewards = torch.as_tensor(samples.rewards, dtype=torch.float64, device=self.device)
        shuffle_gen = epoch_generator(cfg.seed, epoch, self.accelerator.process_index, stream=2)
        trained = choose_trained_steps(n, total_steps, cfg.step_fraction, shuffle_gen).to(self.device)  # (n, K)
        self.unet.train()
        plan = minibatch_plan(cfg.algorithm, cfg.train_rows, cfg.train_rows_per_call)
        updates = updates_per_pass(cfg.algorithm, n, cfg.train_batch_size, cfg.gradient_accumulation_steps)
        bar = tqdm(total=cfg.num_inner_epochs * updates, initial=start_update, desc=f"epoch {epoch + 1} training",
                   disable=self.hide_progress, leave=False)
        for inner in range(cfg.num_inner_epochs):
            for update, minibatches in enumerate(
                plan(trained, shuffle_gen, cfg.train_batch_size, cfg.gradient_accumulation_steps)
            ):
                done = inner * updates + update  # updates of this epoch finished before this one
                if done < start_update:
                    continue
                means, grad_norm = self.accumulate_update(minibatches, states, old_log_probs, advantages, rewards,
                                                          embeds)
                bar.update()
                self.finish_update(epoch, means, grad_norm, done + 1, cfg.num_inner_epochs * updates)
        bar.close()

    def accumulate_update(self, minibatches, states, old_log_probs, advantages, rewards, embeds):
        """One update's gradient, accumulated over its minibatches and clipped; returns the update's logged
        means (loss, the objective's stats, KL, rewards) and the gradient norm, with one host sync."""
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}  # on the device: one host sync per update, not per minibatch
        for param in self.params if self.grads_stay_allocated else ():  # also after anyone's set_to_none
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        rows = sum(len(sample_idx) for sample_idx, _ in minibatches)
        for micro, (sample_idx, step_idx) in enumerate(minibatches):
            # Each minibatch's mean weighted by its share of the update's rows (exactly
            # 1 / len(minibatches) when they are equal, as without train_rows_per_call).
            parts = rows / len(sample_idx)
            sync = micro == len(minibatches) - 1
            context = nullcontext() if sync else self.accelerator.no_sync(self.ddp_unet)
            with context, self.autocast():
                log_probs, kl = self.policy_log_probs(states, sample_idx.flatten(), step_idx.flatten(),
                                                      embeds[sample_idx.flatten()])
                loss, stats = self.objective(log_probs.view(step_idx.shape),
                                             old_log_probs[sample_idx, step_idx], advantages[sample_idx])
                if kl is not None:
                    stats["kl"] = kl.detach().mean()
                    loss = loss + cfg.kl_beta * kl.mean()
                self.accelerator.backward(loss / parts)
            for name, value in {"loss": loss.detach(), **stats}.items():
                sums[name] = sums.get(name, 0.0) + value.double() / parts
        # The rewards of the update's samples (each appears once per trained step: the same mean and std).
        # Their mean square, not their std: averaged over the processes (each trains as many samples),
        # it gives the std of all the update's samples (log_step).
        update_rewards = torch.cat([rewards[sample_idx.flatten()] for sample_idx, _ in minibatches])
        sums.update(reward_mean=update_rewards.mean(), reward_mean_square=update_rewards.square().mean())
        if self.accelerator.scaler is not None:
            # fp16 on a GPU: accelerate's backward scaled the loss; clip and log the true gradient.
            self.accelerator.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        names = sorted(sums)
        *means, grad_norm = torch.stack([*(sums[k] for k in names), grad_norm.double()]).tolist()
        return dict(zip(names, means)), grad_norm

    def objective(self, log_probs, old_log_probs, advantages):
        """The configured loss on (B, K) log-probs: PPO, B (sample, step) rows and K = 1; REBEL, B trajectories
        and their K trained steps."""
        cfg = self.cfg
        if cfg.algorithm == "rebel":
            return rebel_loss(log_probs, old_log_probs, advantages[:, 0], cfg.rebel_eta, cfg.adv_clip_max)
        return clipped_policy_loss(log_probs, old_log_probs, advantages, cfg.clip_range, cfg.adv_clip_max)

    def finish_update(self, epoch: int, sums: dict[str, float], grad_norm: float, done: int, total: int) -> None:
        """The optimizer step, unless a logged value (loss, ratio, ...) or the gradient is non-finite (then the
        step is skipped and counted); then the stop decisions, agreed across processes."""
        nonfinite = [name for name, value in sorted(sums.items()) if not math.isfinite(value)]
        stop, skip, loss_nonfinite = agree(self.accelerator, self.stop.received,
                                           bool(nonfinite) or not math.isfinite(grad_norm), bool(nonfinite))
        scaler = self.accelerator.scaler
        # fp16: a finite loss whose scaled gradient overflowed is the loss scaler's routine probe, not a
        # fault: it halves its scale and the next step goes on. Only at a scale of 1 or less is an
        # overflowing gradient non-finite in its own right.
        overflow = skip and not loss_nonfinite and scaler is not None and scaler.get_scale() > 1.0
        if overflow:
            if self.is_main:
                tqdm.write(f"rlcm-fast: fp16 loss scale {scaler.get_scale():g} overflowed at step "
                           f"{self.global_step + 1}; optimizer step skipped, the scale is halved", file=sys.stderr)
        elif skip:
            if self.is_main:
                what = nonfinite + ([] if math.isfinite(grad_norm) else ["grad norm"]) or ["values on another process"]
                tqdm.write(f"rlcm-fast: warning: non-finite {', '.join(what)} at step {self.global_step + 1} "
                           f"(loss {sums.get('loss')}, grad norm {grad_norm}); optimizer step skipped", file=sys.stderr)
        else:  # with fp16 the gradients are unscaled already (accumulate_update), and an overflow was skipped above
            self.optimizer.step()
            self.lr_scheduler.step()
        if scaler is not None:
            scaler.update()  # a smaller loss scale after an overflow, a larger one after a run without
        self.optimizer.zero_grad(set_to_none=not self.grads_stay_allocated)
        self.nonfinite.record(not skip, is_fault=not overflow)
        self.global_step += 1
        self.log_step(epoch, {**sums, "skipped": float(skip)}, grad_norm)
        if self.nonfinite.exceeded:
            raise StopTraining(done, fault=(
                f"{self.nonfinite.in_a_row} optimizer steps in a row had a non-finite loss, gradient or logged value "
                f"(max_nonfinite_steps={self.cfg.max_nonfinite_steps}); lower learning_rate or max_grad_norm, "
                "or check the reward"))
        if stop and done < total:  # a stop after the epoch's last update lets the epoch end first
            raise StopTraining(done)

    def policy_log_probs(self, states, sample_idx, step_idx, embeds):
        """log pi_theta of the stored actions states[i, k] -> states[i, k+1] for rows (i, k); any k mix.
        With kl_beta > 0 also the per-row KL to the base model (LoRA off) at the same states, else None."""
        if self.cfg.kl_beta == 0:
            return self.sampler.action_log_probs(self.train_unet, states, sample_idx, step_idx, embeds)[0], None
        base_mean = self.base_action_means(states, sample_idx, step_idx, embeds)
        log_probs, mean, std = self.sampler.action_log_probs(
            self.train_unet, states, sample_idx, step_idx, embeds, with_mean=True
        )
        return log_probs, gaussian_kl(mean, base_mean, std)

    def base_action_means(self, states, sample_idx, step_idx, embeds) -> torch.Tensor:
        """The base model's (policy LoRA switched off) Gaussian mean at states[i, k]."""
        self.unet.disable_adapters()
        try:
            return self.sampler.action_means(self.unet, states, sample_idx, step_idx, embeds)[0]
        finally:
            self.unet.enable_adapters()

    def kl_to_base(self, samples: EpochSamples) -> float:
        """Mean KL of the current policy to the base model over every trained action of `samples`."""
        n, total_steps = samples.log_probs.shape
        states = samples.states.to(self.device)
        sample_idx = torch.arange(n).repeat_interleave(total_steps).to(self.device)
        step_idx = torch.arange(total_steps).repeat(n).to(self.device)
        embeds = self.sampler.prompt_embeddings(samples.prompts)[sample_idx]
        with torch.no_grad(), self.autocast():
            base_mean = self.base_action_means(states, sample_idx, step_idx, embeds)
            mean, std = self.sampler.action_means(self.unet, states, sample_idx, step_idx, embeds)
        return float(gaussian_kl(mean, base_mean, std).mean())

    # -- the loop ----------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Trainer.train() under torch.inference_mode(): training needs autograd")
        if self.started:  # its logs are closed, and its epochs would start over from start_epoch
            raise RuntimeError("Trainer.train() runs once: make another Trainer, resuming this run's checkpoint")
        self.started = True
        if self.resumed_from is not None and self.start_epoch >= self.cfg.epochs and self.is_main:
            warnings.warn(nothing_left_to_train(self.resumed_from, self.start_epoch, self.cfg.epochs, "epochs=N"),
                          stacklevel=2)
        with self.run_folder_hold:  # released as train() ends, however it ends
            try:
                with torch.enable_grad():  # a notebook's torch.no_grad() around it: the update needs its gradients
                    self._train_epochs()
            except BaseException:  # a fault or a second interrupt: the plot and logs still get every epoch logged
                with suppress(Exception):  # but the run's own error is the one reported (a full disk's among them)
                    self._close_logs(quiet=True)
                raise
            self._close_logs()
            return self.logger.epoch_records() if self.logger else []

    def _train_epochs(self) -> None:
        with self.stop:
            if self.cfg.eval_every and self.resumed_epoch is None:
                # The policy the run starts from, unless its evaluation with these settings is logged already: a
                # resume evaluates the checkpoint whose evaluation failed, that was written before evaluations were
                # switched on, or whose evaluation sampled other images (a record without settings is older).
                settings = evaluation_settings(self.cfg)
                logged = self.logger and any(r["epoch"] == self.start_epoch and r.get("settings", settings) == settings
                                             for r in self.logger.eval_records())
                if agree(self.accelerator, self.is_main and not logged)[0]:
                    self.evaluate(self.start_epoch)
            for epoch in range(self.start_epoch, self.cfg.epochs):
                try:
                    self.run_epoch(epoch)
                except StopTraining as stop:
                    checkpoint = self.save_position(epoch, stop.updates_done)
                    if stop.fault:  # agreed: every process stops with it
                        fault = TrainingFault(f"{stop.fault}; {checkpoint.name} holds the last good state")
                        raise left_to_the_main_process(fault, quiet=not self.is_main) from None
                    self.stopped_at = checkpoint
                    break
                except RewardError as exc:  # scoring the samples of epoch + 1, or the evaluation after epoch
                    if self.epochs_trained == 0:  # nothing to keep: the initial state is the config's
                        raise
                    trained = self.epochs_trained
                    checkpoint = self.save_position(trained, 0)
                    if trained > epoch:  # the evaluation after the epoch (the reward's own error says which reward)
                        where = (f" (in the evaluation after epoch {trained}); {checkpoint.name} holds the state it "
                                 "evaluated, which a resume evaluates first")
                        if trained == self.cfg.epochs:
                            where = (f" (in the evaluation after the last epoch); {checkpoint.name} holds the "
                                     "trained run")
                    else:
                        where = f"; {checkpoint.name} holds the state before epoch {trained + 1}"
                    raise left_to_the_main_process(RewardError(f"{exc}{where}"),
                                                   quiet=reported_by_main_process(exc)) from None

    def run_epoch(self, epoch: int) -> None:
        phase = "sampling"
        try:
            started = time.perf_counter()
            start_update = 0
            if self.resumed_epoch is not None:  # continue the epoch a stopped run checkpointed
                samples, epoch_stats, start_update = self.resumed_epoch
                self.resumed_epoch = None
            else:
                samples = self.sample_epoch(epoch)
                epoch_stats = self.compute_advantages(samples)
                epoch_stats.update(sample_seconds=time.perf_counter() - started)
            self.epoch_in_progress = (samples, epoch_stats)
            phase = "training"
            trained = time.perf_counter()
            self.train_epoch(epoch, samples, start_update)
            self.epochs_trained = epoch + 1
            epoch_stats.update(train_seconds=time.perf_counter() - trained)
            self.epoch_in_progress = None  # a stop from here on is at an epoch boundary; free the samples
        except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if (fault := out_of_memory_fault(exc, self.cfg, phase, self.accelerator.num_processes)) is None:
                raise
            raise fault from None
        self.end_epoch(epoch, samples, epoch_stats)

    def end_epoch(self, epoch: int, samples: EpochSamples, stats: dict[str, float]) -> None:
        cfg, done = self.cfg, epoch + 1
        if self.is_main:
            self.logger.log("epoch", done, self.global_step, stats)
            tqdm.write(
                f"epoch {done}/{cfg.epochs}  reward {stats['reward_mean']:+.4f} +- {stats['reward_std']:.4f}  "
                f"sample {stats['sample_seconds']:.1f}s  train {stats['train_seconds']:.1f}s"
            )
            if cfg.grid_every and done % cfg.grid_every == 0:
                save_sample_grid(self.run_dir / "samples" / f"epoch-{done:04d}.png", samples.images,
                                 samples.prompts, samples.rewards.tolist())
            self.plot_rewards(at_most_every=REWARD_PLOT_SECONDS)
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.epochs):
            self.evaluate(done)  # before the checkpoint: a run that stops in it evaluates again on resume
        if done % cfg.checkpoint_every == 0 or done == cfg.epochs:
            self.save_checkpoint(done)
        self.accelerator.wait_for_everyone()
