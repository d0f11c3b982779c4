"""What a run leaves to read (rlcm_fast/run_logging.py): metrics after a resume, TensorBoard after a restart,
the sample grid, the closing summary."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast.checkpoint import remove_leftovers
from rlcm_fast.run_logging import GRID_TILE_PIXELS, RunLogger, save_reward_plot, save_sample_grid, summarize


def log_epochs(logger: RunLogger, epochs: range, steps_per_epoch: int = 2) -> None:
    for epoch in epochs:
        for step in range((epoch - 1) * steps_per_epoch + 1, epoch * steps_per_epoch + 1):
            logger.log("step", epoch, step, {"loss": float(step)})
        logger.log("epoch", epoch, epoch * steps_per_epoch, {"reward_mean": float(epoch), "reward_std": 0.5})


def test_a_resumed_logger_keeps_the_epochs_before_its_checkpoint_and_adds_its_own(tmp_path):
    logger = RunLogger(tmp_path)
    log_epochs(logger, range(1, 4))
    logger.close()  # killed after epoch 3, resumed from epoch 2's checkpoint (4 steps)
    logger = RunLogger(tmp_path, resume_epoch=2, resume_step=4)
    assert [r["epoch"] for r in logger.epoch_records()] == [1, 2]
    log_epochs(logger, range(3, 5))
    in_file = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "epoch"]
    assert logger.epoch_records() == in_file and [r["epoch"] for r in in_file] == [1, 2, 3, 4]
    logger.close()


def test_non_finite_values_are_written_as_null_in_strict_json(tmp_path):
    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    logger = RunLogger(tmp_path)
    logger.log("step", 1, 1, {"loss": float("nan"), "grad_norm": float("inf"), "skipped": 1.0, "skipped_steps": 1})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=strict) == {"kind": "step", "epoch": 1, "step": 1, "loss": None,
                                                        "grad_norm": None, "skipped": 1.0, "skipped_steps": 1}


def test_a_run_started_again_before_its_first_checkpoint_shows_each_step_once_in_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = RunLogger(tmp_path)
    log_epochs(logger, range(1, 2))
    logger.writer.flush()  # killed: no checkpoint, so the next start is a fresh one in the same folder
    again = RunLogger(tmp_path)
    log_epochs(again, range(1, 2))
    again.close()
    logger.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("step/loss")] == [1, 2]


def test_a_run_started_again_shows_its_starting_evaluation_once_in_tensorboard(tmp_path):
    """The evaluation of the starting policy is logged at step 0, which a purge from step 1 kept."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = RunLogger(tmp_path)
    logger.log("eval", 0, 0, {"reward_mean": -1.0, "reward_std": 0.1})
    logger.writer.flush()  # killed before its first checkpoint
    again = RunLogger(tmp_path)
    again.log("eval", 0, 0, {"reward_mean": -1.0, "reward_std": 0.1})
    again.close()
    logger.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("eval/reward_mean")] == [0]


@pytest.mark.parametrize("pixels, tile", [(16, 128), (200, 200), (768, GRID_TILE_PIXELS)])
def test_grid_tiles_are_shown_at_128_to_256_pixels(tmp_path, pixels, tile):
    """Small images are enlarged to be seen; large ones shrunk, as a grid is written every epoch and kept."""
    images = torch.rand(5, 3, pixels, pixels, generator=torch.Generator().manual_seed(0))
    save_sample_grid(tmp_path / "grid.png", images, ["a cat"] * 5, [0.5] * 5)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * tile, 2 * (tile + 24))  # 4 columns; a 24-pixel caption under each row


def test_the_grid_shows_at_most_16_images_four_to_a_row_each_captioned_with_its_reward(tmp_path):
    images = torch.full((20, 3, 16, 16), 0.5)  # alike: only the captions may differ
    save_sample_grid(tmp_path / "grid.png", images, ["a cat"] * 20, [i / 8 for i in range(20)])
    with Image.open(tmp_path / "grid.png") as grid:
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.shape == (4 * (128 + 24), 4 * 128, 3)  # 16 of the 20, in 4 rows
    reward_captions = [pixels[128:140, column * 128:(column + 1) * 128] for column in range(2)]
    assert np.array_equal(pixels[:128, :128], pixels[:128, 128:256])
    assert not np.array_equal(*reward_captions)


def test_the_summary_names_the_first_and_last_epochs_as_logged():
    records = [{"epoch": 1, "reward_mean": 0.25}, {"epoch": 2, "reward_mean": 0.5}, {"epoch": 3, "reward_mean": 1.0}]
    assert summarize(records) == "reward mean +0.2500 (epoch 1) -> +1.0000 (epoch 3)"
    assert summarize([]) == "no epochs were run"
    assert summarize(records[1:2]) == "reward mean +0.5000 (epoch 2)"  # one epoch: nothing to compare
    evals = [{"epoch": 0, "reward_mean": -1.5}, {"epoch": 2, "reward_mean": 0.75}, {"epoch": 3, "reward_mean": 1.25}]
    assert summarize(records, evals) == ("reward mean +0.2500 (epoch 1) -> +1.0000 (epoch 3); evaluation -1.5000 "
                                         "(after 0 epochs) -> +1.2500 (after 3)")
    assert summarize(records, evals[:1]) == summarize(records)  # one evaluation: no change to tell


def test_evaluations_of_other_settings_are_not_compared():
    """A resume that changed the evaluation's settings (other images) starts another run of evaluations: the plot
    draws it as another line, and the summary compares the last run's first and last evaluations only."""
    from rlcm_fast.run_logging import same_settings_runs

    records = [{"epoch": 1, "reward_mean": 0.25}, {"epoch": 4, "reward_mean": 1.0}]
    evals = [{"epoch": epoch, "reward_mean": mean, "settings": settings} for epoch, mean, settings in (
        (0, -1.5, "a"), (1, -1.0, "a"), (2, 0.5, "b"), (3, 0.75, "b"), (4, 1.25, "b"))]
    assert [[r["epoch"] for r in run] for run in same_settings_runs(evals)] == [[0, 1], [2, 3, 4]]
    assert summarize(records, evals) == ("reward mean +0.2500 (epoch 1) -> +1.0000 (epoch 4); evaluation with the "
                                         "settings of its last resume +0.5000 (after 2 epochs) -> +1.2500 (after 4)")
    assert summarize(records, evals[:3]) == summarize(records)  # the last settings evaluated once: nothing to compare
    # Records written before evaluations named their settings are one run, as they were drawn, and belong to the run
    # of the same images logged after them (a resume of an older run changed nothing).
    assert same_settings_runs([{"epoch": 0}, {"epoch": 1}]) == [[{"epoch": 0}, {"epoch": 1}]]
    older = [{"epoch": 0}, {"epoch": 5}] + [{"epoch": e, "settings": "a"} for e in (10, 15)]
    assert same_settings_runs(older) == [older]
    assert [len(run) for run in same_settings_runs(older + [{"epoch": 20, "settings": "b"}])] == [4, 1]


def test_the_reward_plot_draws_a_line_per_evaluation_settings(tmp_path, monkeypatch):
    import matplotlib.axes

    from rlcm_fast import run_logging

    lines = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: lines.append((list(x), kw["label"]))
                        or real_plot(self, x, y, **kw))
    records = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.1} for e in (1, 2, 3)]
    evals = [{"epoch": e, "reward_mean": 0.1 * e, "settings": "a" if e < 2 else "b"} for e in (0, 1, 2, 3)]
    run_logging.save_reward_plot(tmp_path / "reward.png", records, "aesthetic", eval_records=evals)
    assert lines == [([1, 2, 3], "epoch's samples"), ([0, 1], "evaluation (fixed prompts and noise)"),
                     ([2, 3], "evaluation (fixed prompts and noise, other images from epoch 2)")]
    assert (tmp_path / "reward.png").is_file()


def test_the_reward_plot_marks_whole_epochs_only(tmp_path, monkeypatch):
    """Two epochs were ticked 1.00, 1.25, ... 2.00."""
    from rlcm_fast import run_logging

    ticks = []
    monkeypatch.setattr(run_logging, "_write_or_warn", lambda path, what, write, *quiet: ticks.append(
        [t for t in write.__self__.axes[0].get_xticks() if 1 <= t <= 2]))
    records = [{"epoch": 1, "reward_mean": -1.3, "reward_std": 0.1}, {"epoch": 2, "reward_mean": -1.2, "reward_std": 0.1}]
    run_logging.save_reward_plot(tmp_path / "reward.png", records, "jpeg_compressibility")
    assert ticks == [[1.0, 2.0]]


def test_closing_a_logger_stops_its_tensorboard_writer(tmp_path):
    """Each SummaryWriter runs a thread until closed: a process making Trainers one after another gathered them."""
    def writer_threads() -> set:  # TensorBoard's event-file writers only: other threads may come and go meanwhile
        return {thread for thread in threading.enumerate() if type(thread).__name__ == "_AsyncWriterThread"}

    before = writer_threads()
    for run in range(3):
        logger = RunLogger(tmp_path / f"run-{run}")
        log_epochs(logger, range(1, 2))
        assert len(writer_threads() - before) == 1  # the probe sees a writer's thread while it is open
        logger.close()
    assert writer_threads() <= before


def test_the_reward_plot_closes_its_figure(tmp_path):
    """pyplot keeps every open figure: a plot per epoch, never closed, grew the run's memory."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    records = [{"epoch": 1, "reward_mean": 0.5, "reward_std": 0.1}, {"epoch": 2, "reward_mean": 0.7, "reward_std": 0.1}]
    save_reward_plot(tmp_path / "reward.png", records, "aesthetic")
    assert (tmp_path / "reward.png").is_file() and plt.get_fignums() == before


def test_the_reward_plot_draws_the_mean_at_the_records_epochs_in_a_band_of_one_std(tmp_path, monkeypatch):
    """A resumed run's records need not start at epoch 1."""
    from rlcm_fast import run_logging

    axes = []
    monkeypatch.setattr(run_logging, "_write_or_warn", lambda path, what, write, *quiet: axes.append(
        write.__self__.axes[0]))
    records = [{"epoch": 3, "reward_mean": 1.0, "reward_std": 0.5},
               {"epoch": 4, "reward_mean": 2.0, "reward_std": 0.25}]
    save_reward_plot(tmp_path / "reward.png", records, "aesthetic")
    [line], [band] = axes[0].get_lines(), axes[0].collections
    assert list(line.get_xdata()) == [3, 4] and list(line.get_ydata()) == [1.0, 2.0]
    corners = {tuple(vertex) for path in band.get_paths() for vertex in path.vertices}
    assert corners == {(3.0, 0.5), (3.0, 1.5), (4.0, 1.75), (4.0, 2.25)}


class Killed(BaseException):
    """The process killed mid-write: no `except Exception` (nor OSError) tidies up after it."""


def test_a_picture_whose_writer_was_killed_leaves_only_what_the_leftover_sweep_removes(tmp_path, monkeypatch):
    """The partial file takes no picture's name, and the next start's sweep of the run folder finds it."""
    from matplotlib.figure import Figure

    def killed_midway(self, file, *args, **kwargs):
        with open(file, "wb") as partial:
            partial.write(b"\x89PNG\r\n")
        raise Killed

    monkeypatch.setattr(Image.Image, "save", killed_midway)
    monkeypatch.setattr(Figure, "savefig", killed_midway)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(Killed):
        save_sample_grid(tmp_path / "samples" / "epoch-0001.png", images, ["a cat"] * 2, [0.5] * 2)
    with pytest.raises(Killed):
        save_reward_plot(tmp_path / "reward.png", [{"epoch": 1, "reward_mean": 0.5, "reward_std": 0.1}], "aesthetic")
    assert not (tmp_path / "samples" / "epoch-0001.png").exists() and not (tmp_path / "reward.png").exists()
    assert len(list(tmp_path.rglob("*.png"))) == 2  # the partial files
    remove_leftovers(tmp_path)
    assert list((tmp_path / "samples").iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["samples"]
