"""Mutation-testing round 49e (run_logging, run_checkpoints): a second round of hand-written mutants of those
modules was run against their tests (run_logging: test_run_logging, test_mutants_round44d and
test_edges_found_by_mutation, the survivors also against the metrics and config.yaml tests of
test_damaged_checkpoints and test_resume's schedule test; run_checkpoints: test_mutants_round42, test_mutants_round43b
and test_mutants_round48b); each test here kills one that survived (named in its docstring). All are CPU-only,
seeded and fast: no run is trained (the Trainer's logging and checkpoint sides run on stand-ins)."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import rlcm_fast.run_checkpoints as run_checkpoints
from rlcm_fast import run_logging
from rlcm_fast.checkpoint import CheckpointWriteError, checkpoint_name
from rlcm_fast.faults import NonFiniteSteps, reported_by_main_process
from rlcm_fast.run_checkpoints import CheckpointedRun
from rlcm_fast.run_logging import LoggedRun, RunLogger, save_sample_grid, write_run_config


# -- run_logging: what the run writes for people to read --------------------------------------------------------

def test_config_yaml_keeps_the_configs_own_order(tmp_path):
    """Mutant: `sort_keys=False` -> `True`. config.yaml is read by people beside the documented config, whose keys
    come in the order TrainConfig gives them (model before reward before epochs...), not alphabetically."""
    write_run_config(tmp_path / "run", {"model": "tiny", "reward": "aesthetic", "epochs": 3})
    assert (tmp_path / "run" / "config.yaml").read_text() == "model: tiny\nreward: aesthetic\nepochs: 3\n"


def test_a_run_started_again_before_its_first_checkpoint_drops_the_killed_runs_starting_evaluation(tmp_path):
    """Mutant: the `kind == "eval" and step == 0` rule dropped. A run killed before its first checkpoint starts
    again from its config: the killed run's evaluation of the starting policy must go (the Trainer sees none logged
    and evaluates again, logging it once, also in TensorBoard, which purges from step 0); kept, the Trainer skips
    the evaluation and TensorBoard loses it. A resume past step 0 keeps it."""
    logger = RunLogger(tmp_path)
    logger.log("eval", 0, 0, {"reward_mean": -1.0, "reward_std": 0.1, "settings": "a"})
    logger.log("step", 1, 1, {"loss": 0.5})
    logger.close()
    logger = RunLogger(tmp_path)
    logger.close()
    assert logger.eval_records() == [] and (tmp_path / "metrics.jsonl").read_text() == ""
    logger = RunLogger(tmp_path / "resumed")
    logger.log("eval", 0, 0, {"reward_mean": -1.0, "reward_std": 0.1, "settings": "a"})
    logger.close()
    logger = RunLogger(tmp_path / "resumed", resume_epoch=1, resume_step=2)
    logger.close()
    assert [r["epoch"] for r in logger.eval_records()] == [0]


def grid_tile(tmp_path, value: float) -> np.ndarray:
    """The first tile's pixels of a sample grid of two 16 px images of `value` everywhere."""
    save_sample_grid(tmp_path / "grid.png", torch.full((2, 3, 16, 16), value), ["a cat"] * 2, [0.5] * 2)
    with Image.open(tmp_path / "grid.png") as grid:
        return np.asarray(grid.convert("RGB"))[:128, :128]


def test_grid_pixels_are_rounded_not_cut_down(tmp_path):
    """Mutant: the `.round()` dropped before the conversion to bytes. An image value of 0.999 is 254.7 of 255: shown
    as 255 (rounded), not 254; every pixel of every grid was one level darker than the image it shows."""
    assert np.unique(grid_tile(tmp_path, 0.999)).tolist() == [255]


@pytest.mark.parametrize("value, shown", [(1.5, 255), (-0.5, 0)])
def test_grid_pixels_past_the_image_range_are_shown_white_or_black_not_wrapped(tmp_path, value, shown):
    """Mutant: the `.clamp(0, 255)` dropped. A decoded image may overshoot [0, 1] a little (the VAE's output is not
    clipped everywhere): such a pixel is white or black, not wrapped round to a mid grey (1.5 -> 126, -0.5 -> 129)."""
    assert np.unique(grid_tile(tmp_path, value)).tolist() == [shown]


def test_a_resumed_run_folder_keeps_the_records_up_to_its_checkpoint_and_loses_the_leftovers(tmp_path):
    """Mutants: the logger started at the checkpoint's epoch count as its step (checkpoint-2 after 4 steps dropped
    steps 3 and 4 and epoch 2's record: the plot and metrics.jsonl lost an epoch the weights hold), and the sweep of
    a killed writer's leftovers dropped (a half-written `.reward.png.tmp-*` and `.config.yaml.tmp-*` left in the
    run folder for good)."""
    logger = RunLogger(tmp_path)
    for epoch in (1, 2, 3):
        for step in (2 * epoch - 1, 2 * epoch):
            logger.log("step", epoch, step, {"loss": float(step)})
        logger.log("epoch", epoch, 2 * epoch, {"reward_mean": float(epoch), "reward_std": 0.5})
    logger.close()
    (tmp_path / ".reward.png.tmp-99.png").write_bytes(b"\x89PNG")
    (tmp_path / ".config.yaml.tmp-99").write_text("model: ti")
    run = type("Run", (LoggedRun,), {})()
    run.__dict__.update(run_dir=tmp_path, start_epoch=2, global_step=4, config_to_save=lambda: {"epochs": 5})
    logger = run._start_run_folder()
    logger.close()
    assert [r["epoch"] for r in logger.epoch_records()] == [1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 2, 3, 4, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.jsonl", "tensorboard"]
    assert (tmp_path / "config.yaml").read_text() == "epochs: 5\n"


def logged_run(run_dir: Path) -> LoggedRun:
    """The Trainer's logging side (LoggedRun) on one process, with stand-ins for what the Trainer holds."""
    run = type("Run", (LoggedRun,), {})()
    run.__dict__.update(run_dir=run_dir, logger=RunLogger(run_dir), global_step=7, plotted=((0, 0), -math.inf),
                        cfg=SimpleNamespace(reward="aesthetic"))
    return run


def test_the_closing_reward_plot_is_drawn_even_if_the_clock_has_not_moved(tmp_path, monkeypatch):
    """Mutant: `time since the last plot < at_most_every` -> `<=`. The close draws with no limit (0 s): on a clock
    that has not ticked since the last drawing (Windows' monotonic clock moves every 15 ms; a tiny run's epoch is
    quicker) the mutant skipped it, and reward.png lacked the run's last epoch."""
    drawn = []
    monkeypatch.setattr(run_logging, "time", SimpleNamespace(monotonic=lambda: 100.0))
    monkeypatch.setattr(run_logging, "save_reward_plot", lambda path, records, reward, quiet=False, eval_records=(): (
        drawn.append([r["epoch"] for r in records])))
    run = logged_run(tmp_path)
    run.logger.log("epoch", 1, 2, {"reward_mean": 0.5, "reward_std": 0.1})
    run.plot_rewards(at_most_every=30.0)
    run.logger.log("epoch", 2, 4, {"reward_mean": 0.6, "reward_std": 0.1})
    run._close_logs()
    assert drawn == [[1], [1, 2]]


def test_the_starting_policys_evaluation_is_said_to_be_after_0_epochs(tmp_path, monkeypatch, capsys):
    """Mutant: the plural's `epochs_trained != 1` -> `> 1`. The evaluation every run with eval_every starts with
    printed "eval after 0 epoch"."""
    monkeypatch.setitem(sys.modules, "rlcm_fast.evaluation", SimpleNamespace(evaluation_settings=lambda cfg: "a"))
    run = logged_run(tmp_path)
    run.log_evaluation(0, {"reward_mean": 0.5, "reward_std": 0.25, "images": 8, "eval_seconds": 1.5})
    run.logger.close()
    assert capsys.readouterr().out == "eval after 0 epochs  reward +0.5000 +- 0.2500  (8 images, 1.5s)\n"


# -- run_checkpoints: writing a checkpoint and resuming from one -------------------------------------------------

def checkpointed_run(tmp_path, monkeypatch, saved_state: dict | None = None, is_main: bool = True,
                     cfg: dict | None = None):
    """A CheckpointedRun over stand-ins (one process): checkpoint.save_checkpoint records what it would write (or
    raises `run.write_error`), load_checkpoint returns `saved_state`, a stopped epoch's record names its updates."""
    run = CheckpointedRun()
    settings = {"prompts": "simple_animals", "eval_prompts": "", "train_rows_per_call": 4, **(cfg or {})}
    run.cfg = SimpleNamespace(to_dict=lambda: dict(settings), keep_checkpoints=0, **settings)
    run.auto_keys, run.global_step, run.is_main, run.run_dir, run.last_saved = [], 7, is_main, tmp_path, None
    run.accelerator = SimpleNamespace(scaler=None, num_processes=1)
    run.nonfinite = NonFiniteSteps(limit=3)
    run.unet = run.optimizer = run.lr_scheduler = run.stat_tracker = None
    run.prompt_set, run.eval_prompt_set = ("a cat",), ("an owl",)
    run.epoch_in_progress = ("samples", "stats")
    run.written, run.write_error, run.resumed_epoch = [], None, None

    def save(run_dir, epoch, *models, update=0, **kwargs):
        if run.write_error:
            raise run.write_error
        run.written.append({"epoch": epoch, "update": update, "state": models[-1], **kwargs})
        return run_dir / checkpoint_name(epoch, update)

    monkeypatch.setattr(run_checkpoints, "save_checkpoint", save)
    monkeypatch.setattr(run_checkpoints, "load_checkpoint", lambda *args: dict(saved_state or {}))
    monkeypatch.setattr(run_checkpoints, "stopped_epoch_record", lambda samples, stats, updates_done, accelerator: (
        {"rows": torch.arange(3)}, {"updates_done": updates_done}))
    monkeypatch.setattr(run_checkpoints, "restore_stopped_epoch", lambda path, state, accelerator: (
        "samples", "stats", state["update"]))
    return run


def test_a_checkpoint_keeps_the_skipped_step_counts_and_a_resume_takes_them_back(tmp_path, monkeypatch):
    """Mutants: the non-finite counts left out of the saved state, and not loaded on resume. A run that skipped 2
    steps (the last one in a row) must go on from those counts: its log's skipped_steps keeps counting from 2, and
    the limit of non-finite steps in a row is not reset by a resume."""
    run = checkpointed_run(tmp_path, monkeypatch)
    run.nonfinite.total, run.nonfinite.in_a_row = 2, 1
    run.save_checkpoint(3)
    [written] = run.written
    assert written["state"]["nonfinite"] == {"total": 2, "in_a_row": 1}
    resumed = checkpointed_run(tmp_path, monkeypatch, saved_state={**written["state"], "epoch": 3})
    resumed._resume(tmp_path / "checkpoint-3")
    assert (resumed.nonfinite.total, resumed.nonfinite.in_a_row) == (2, 1)
    assert (resumed.start_epoch, resumed.epochs_trained, resumed.global_step) == (3, 3, 7)


def test_a_mid_epoch_resume_continues_that_epoch_and_a_stop_right_after_writes_nothing_again(tmp_path, monkeypatch):
    """Mutants: the stopped epoch's samples not restored (`if state.get("update")` never true: the resume samples
    epoch 4 afresh, and its first 2 updates run twice), and last_saved recording (3, 0) for checkpoint-3-2 (a stop
    before the next update wrote a second copy of the checkpoint it resumed from)."""
    run = checkpointed_run(tmp_path, monkeypatch, saved_state={"epoch": 3, "update": 2, "global_step": 9})
    run._resume(tmp_path / "checkpoint-3-2")
    assert run.resumed_epoch == ("samples", "stats", 2)
    assert run.save_position(3, 2) == tmp_path / "checkpoint-3-2" and run.written == []


def test_a_checkpoint_at_an_epochs_end_holds_no_stopped_epoch(tmp_path, monkeypatch):
    """Mutant: save_position's `if not updates_done` branch dropped. A stop between epochs is an ordinary
    checkpoint-3: no stopped-epoch record, no samples; with them, a resume would "continue" an epoch with no update
    done from samples it never trained on."""
    run = checkpointed_run(tmp_path, monkeypatch)
    assert run.save_position(3, 0) == tmp_path / "checkpoint-3"
    [written] = run.written
    assert (written["update"], written["extra_tensors"], "stopped_epoch" in written["state"]) == (0, None, False)


def test_a_mid_epoch_checkpoint_holds_the_epochs_samples(tmp_path, monkeypatch):
    """Mutant: `extra_tensors=extra` -> None. A mid-epoch checkpoint without the epoch's samples and advantages
    cannot continue the epoch: the resume refuses it as damaged, and the stop's work is lost."""
    run = checkpointed_run(tmp_path, monkeypatch)
    run.save_position(3, 2)
    [written] = run.written
    assert written["extra_tensors"]["rows"].tolist() == [0, 1, 2]
    assert written["state"]["stopped_epoch"] == {"updates_done": 2}


def test_a_run_without_a_loss_scaler_resumes_from_an_fp16_checkpoint(tmp_path, monkeypatch):
    """Mutant: `self.accelerator.scaler is not None` dropped. A checkpoint written under fp16 (it holds
    grad_scaler) resumed under bf16 or on a CPU (no scaler) must resume, not stop on `None.load_state_dict`."""
    run = checkpointed_run(tmp_path, monkeypatch, saved_state={"epoch": 2, "global_step": 4,
                                                               "grad_scaler": {"scale": 1024.0}})
    run._resume(tmp_path / "checkpoint-2")
    assert (run.start_epoch, run.global_step, run.accelerator.scaler) == (2, 4, None)


def test_only_the_main_process_writes_a_checkpoint(tmp_path, monkeypatch):
    """Mutant: `if self.is_main` dropped. Every process writing the same checkpoint folder at once (a multi-GPU
    run) races on its files and its `latest` pointer; the others only agree on the outcome and name the path."""
    run = checkpointed_run(tmp_path, monkeypatch, is_main=False)
    assert run.save_checkpoint(3) == tmp_path / "checkpoint-3" and run.written == []


def test_a_checkpoint_that_cannot_be_written_is_reported_with_its_own_error(tmp_path, monkeypatch):
    """Mutant: the write's own error replaced by the generic "the main process could not write a checkpoint". The
    main process must report what went wrong (a full disk, and which file), and report it itself (not marked as
    left to another process, which would print nothing)."""
    run = checkpointed_run(tmp_path, monkeypatch)
    run.write_error = CheckpointWriteError("could not write 'run/checkpoint-3': No space left on device")
    with pytest.raises(CheckpointWriteError, match="^could not write 'run/checkpoint-3': No space left on device$") \
            as raised:
        run.save_checkpoint(3)
    assert not reported_by_main_process(raised.value)


def test_another_process_stops_quietly_when_the_main_one_could_not_write(tmp_path, monkeypatch):
    """Mutant: the generic error not marked as left to the main process. In a multi-GPU run the main process prints
    the write's own error; every other process must stop with a marked error (printed by no one) rather than each
    printing a second, vaguer line."""
    run = checkpointed_run(tmp_path, monkeypatch, is_main=False)
    run.accelerator = SimpleNamespace(scaler=None, num_processes=2, device="cpu",
                                      reduce=lambda values, reduction: torch.ones_like(values))  # the main one failed
    with pytest.raises(CheckpointWriteError, match="^the main process could not write a checkpoint$") as raised:
        run.save_checkpoint(3)
    assert reported_by_main_process(raised.value)


def test_config_yaml_says_auto_where_the_config_did(tmp_path, monkeypatch):
    """Mutant: the run's own values laid over the `auto` keys. A checkpoint's config must say `auto` where the user
    said it, so that the run resumed on another machine chooses again for that machine, not keep this one's 4."""
    run = checkpointed_run(tmp_path, monkeypatch)
    run.auto_keys = ["train_rows_per_call"]
    assert run.config_to_save()["train_rows_per_call"] == "auto"


def test_the_checkpoint_copies_each_prompts_file_with_its_own_prompts(tmp_path, monkeypatch):
    """Mutants: the eval prompts' copy given the training prompts, and a named prompt set (or eval_prompts' "", the
    run's own) copied as if it were a file. A resume reads the copy when the file has changed or gone: the
    evaluation must get the prompts it evaluated, and a named set is read from the package, never a copy."""
    run = checkpointed_run(tmp_path, monkeypatch, cfg={"prompts": "mine.txt", "eval_prompts": "eval.txt"})
    assert run.prompt_files() == {"prompts": ("a cat",), "eval_prompts": ("an owl",)}
    run = checkpointed_run(tmp_path, monkeypatch, cfg={"prompts": "simple_animals", "eval_prompts": ""})
    assert run.prompt_files() == {}
