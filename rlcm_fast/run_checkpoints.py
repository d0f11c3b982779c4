"""The Trainer's checkpoints: what one holds, writing one, and resuming from one (README, "Faults").

Every process calls these (a write is agreed on by all of them); the main process writes. Apart from
trainer.py so that the training loop reads top to bottom there; `Trainer` inherits `CheckpointedRun`, whose
methods read the trainer's state (its config, model, optimizer, stat tracker and counters).
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointWriteError, checkpoint_name, load_checkpoint, save_checkpoint
from .epoch_samples import restore_stopped_epoch, stopped_epoch_record
from .faults import agree, left_to_the_main_process
from .prompts import is_prompts_file


class CheckpointedRun:
    def _resume(self, resume_from: Path) -> None:
        """The checkpoint's weights, optimizer, schedule, stat tracker and counters; a mid-epoch one's samples."""
        state = load_checkpoint(resume_from, self.unet, self.optimizer, self.lr_scheduler, self.stat_tracker)
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        self.epochs_trained = self.start_epoch
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.last_saved = (state["epoch"], state.get("update", 0))
        if state.get("update"):
            self.resumed_epoch = restore_stopped_epoch(resume_from, state, self.accelerator)

    def config_to_save(self) -> dict:
        """The run's config, with `auto` where the config said it (not what it chose on this machine)."""
        return {**self.cfg.to_dict(), **{key: "auto" for key in self.auto_keys}}

    def prompt_files(self) -> dict[str, tuple[str, ...]]:
        """The prompts the run read from files (config key -> prompts), which its checkpoints keep a copy of."""
        read = {"prompts": (self.cfg.prompts, self.prompt_set),
                "eval_prompts": (self.cfg.eval_prompts, self.eval_prompt_set)}
        return {key: prompts for key, (name, prompts) in read.items() if is_prompts_file(name)}

    def save_checkpoint(self, epoch: int, update: int = 0, extra: dict | None = None, stopped: dict | None = None) -> Path:
        state = {"global_step": self.global_step, "config": self.config_to_save(),
                 "nonfinite": self.nonfinite.state_dict()}
        if self.accelerator.scaler is not None:
            state["grad_scaler"] = self.accelerator.scaler.state_dict()  # numbers only: the loss scale and its counter
        if stopped:
            state["stopped_epoch"] = stopped
        error, self.last_saved = None, (epoch, update)
        if self.is_main:
            try:
                save_checkpoint(self.run_dir, epoch, self.unet, self.optimizer, self.lr_scheduler, self.stat_tracker,
                                state, update=update, extra_tensors=extra, keep=self.cfg.keep_checkpoints,
                                prompt_files=self.prompt_files())
            except CheckpointWriteError as exc:
                error = exc
        if agree(self.accelerator, error is not None)[0]:  # also the barrier after the write
            raise error or left_to_the_main_process(CheckpointWriteError("the main process could not write a checkpoint"))
        return self.run_dir / checkpoint_name(epoch, update)

    def save_position(self, epoch: int, updates_done: int) -> Path:
        """Checkpoint `epoch` epochs plus `updates_done` updates of the next; mid-epoch, with that epoch's
        samples and advantages (all processes', gathered) so the resume continues at the next update."""
        if self.last_saved == (epoch, updates_done):  # e.g. stopped right after a scheduled checkpoint
            return self.run_dir / checkpoint_name(epoch, updates_done)
        if not updates_done:
            return self.save_checkpoint(epoch)
        extra, stopped = stopped_epoch_record(*self.epoch_in_progress, updates_done, self.accelerator)
        return self.save_checkpoint(epoch, updates_done, extra, stopped)
