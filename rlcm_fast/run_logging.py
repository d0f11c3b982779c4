"""What a run leaves for people to read: metrics (JSONL + TensorBoard), sample grids, a reward plot; and the
trainer's side of it (LoggedRun)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .faults import TrainingFault, is_finite_number

GRID_IMAGES = 16  # the most images an epoch's sample grid shows
GRID_TILE_PIXELS = 256  # the largest side of an image in the grid

METRICS_FILE = "metrics.jsonl"
REWARD_KEYS = ("reward_mean", "reward_std")  # an epoch record's, which the reward plot draws
PICTURE_TMP = ".tmp-"  # in a picture's name while it is written (".reward.png.tmp-<pid>.png"); leftovers are swept
# reward.png is redrawn after an epoch at most this often, and at the run's end: matplotlib takes 0.13-0.27 s
# a plot, 4% of the default 30-epoch CPU run when drawn every epoch (measured on an Intel Xeon, 2 cores).
REWARD_PLOT_SECONDS = 30.0


def write_run_config(run_dir: Path, config: dict) -> None:
    """RUN/config.yaml, written whole or not at all (a full disk left a truncated one and a traceback)."""
    config_file = run_dir / "config.yaml"
    partial = config_file.with_name(f".config.yaml.tmp-{os.getpid()}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(yaml.safe_dump(config, sort_keys=False))
        partial.replace(config_file)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise TrainingFault(f"could not write {str(config_file)!r}: {exc.strerror or exc}; the checkpoints "
                            "written before are intact") from None


class RunLogger:
    """Main-process logging. Records are JSON lines with "kind": "step" (one per optimizer step), "epoch" (one
    per epoch) or "eval" (config eval_every: "epoch" counts the epochs trained before it, 0 for the policy the run
    started from); the same scalars go to TensorBoard under run_dir/tensorboard."""

    def __init__(self, run_dir: Path, resume_epoch: int = 0, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE
        # The epoch and eval records, kept here: the file grows by a step record per update.
        self._kept: dict[str, list[dict]] = {"epoch": [], "eval": []}
        self._drop_records_after(resume_epoch, resume_step)
        # purge_step hides events a killed run logged past the checkpoint this run starts from (also none: a
        # run killed before its first checkpoint and started again would show its first steps twice, and its
        # starting policy's evaluation, at step 0).
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else 0)
        with self._writing():
            self.metrics_file = open(self.metrics_path, "a", encoding="utf-8")

    @contextmanager
    def _writing(self):
        """An OSError writing the metrics (a full disk) stops the run with one line (exit 1): the metrics are the
        run's record, unlike the pictures. The checkpoints written before are intact."""
        try:
            yield
        except OSError as exc:
            raise TrainingFault(f"could not write {METRICS_FILE} in {str(self.run_dir)!r}: {exc.strerror or exc}; "
                                "the checkpoints written before are intact") from None

    def _drop_records_after(self, epoch: int, step: int) -> None:
        """On resume, forget what was logged after the checkpoint (`epoch` epochs and `step` optimizer
        steps done, possibly mid-epoch): those steps and epochs run again."""
        if not self.metrics_path.exists():
            return

        def record_before_checkpoint(line: str) -> dict | None:
            try:
                record = json.loads(line)
                before = record["step"] <= step and (record["kind"] == "step" or record["epoch"] <= epoch)
                # The evaluation of the starting policy, at step 0, runs again unless the run resumes past it.
                before = before and not (record["kind"] == "eval" and step == 0)
                plotted = record["kind"] == "step" or all(is_finite_number(record[k]) for k in REWARD_KEYS)
            # The half-written last line of a killed run, or a line that is not a record of ours (an edited or
            # damaged file: a list, a record without its step, bytes that are not UTF-8) is dropped.
            except (ValueError, TypeError, KeyError, RecursionError):
                return None
            return record if before and plotted else None

        text = self.metrics_path.read_text(encoding="utf-8", errors="replace")
        kept = [(line, record) for line in text.splitlines()
                if line and (record := record_before_checkpoint(line)) is not None]
        for kind, records in self._kept.items():
            records.extend(record for _, record in kept if record["kind"] == kind)
        tmp = self.metrics_path.with_suffix(".tmp")
        try:
            with self._writing():
                tmp.write_text("".join(line + "\n" for line, _ in kept))
                tmp.replace(self.metrics_path)
        finally:
            tmp.unlink(missing_ok=True)  # gone after the replace; a partial one is removed

    def log(self, kind: str, epoch: int, step: int, values: dict[str, float]) -> None:
        # Strict JSON: a skipped step's non-finite loss or gradient norm is null (its "skipped" says why), not a
        # bare NaN that jq and JavaScript refuse; TensorBoard below gets the value itself.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        record = {"kind": kind, "epoch": epoch, "step": step, **finite}
        with self._writing():
            self.metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
            self.metrics_file.flush()
        if kind in self._kept:
            self._kept[kind].append(record)
        for name, value in values.items():
            if not isinstance(value, str):  # an evaluation's settings are said in words
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def epoch_records(self) -> list[dict]:
        """Every epoch record of the run, resumed ones included, as metrics.jsonl holds them."""
        return list(self._kept["epoch"])

    def eval_records(self) -> list[dict]:
        """Every eval record of the run, resumed ones included."""
        return list(self._kept["eval"])

    def close(self) -> None:
        self.metrics_file.close()
        self.writer.close()


def save_sample_grid(
    path: Path, images: torch.Tensor, prompts: Sequence[str], rewards: Sequence[float], max_images: int = GRID_IMAGES
) -> None:
    """A PNG grid of images, each captioned with its reward and the start of its prompt."""
    count = min(len(images), max_images)
    pixels = (images[:count].float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    # Small images are upscaled (nearest) so they can be seen; large ones shrunk, since a grid is written every
    # epoch and kept: 16 full 768 px images made a 20 MB PNG (`rlcm-fast sample` draws full-size ones).
    size = min(max(128, pixels.shape[1]), GRID_TILE_PIXELS)
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    caption = 24
    grid = Image.new("RGB", (columns * size, rows * (size + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(count):
        tile = Image.fromarray(pixels[i]).resize((size, size), Image.NEAREST if size >= pixels.shape[1] else Image.BOX)
        x, y = (i % columns) * size, (i // columns) * (size + caption)
        grid.paste(tile, (x, y))
        draw.text((x + 2, y + size + 1), f"{rewards[i]:.3f}", fill="black")
        draw.text((x + 2, y + size + 12), prompts[i][: size // 6], fill="gray")
    _write_or_warn(path, "sample grid", grid.save)


def _write_or_warn(path: Path, what: str, write, quiet: bool = False) -> None:
    """Write a picture for people to look at, through `write(file)`; an OSError (a full disk) is a one-line warning
    (none if `quiet`: a run ending on an error reports that one) and the run goes on: a checkpoint written next
    reports a full disk itself. The picture is written beside
    `path` and renamed over it: a symbolic link at `path` (a run folder from elsewhere) is replaced, not written
    through, and a partly written file never takes the name."""
    partial = path.with_name(f".{path.name}{PICTURE_TMP}{os.getpid()}{path.suffix}")  # suffix: the format
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        partial.replace(path)
    except OSError as exc:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        if not quiet:
            print(f"rlcm-fast: warning: could not write the {what} {str(path)!r}: {exc.strerror or exc}; "
                  "training goes on", file=sys.stderr, flush=True)


def save_reward_plot(path: Path, epoch_records: list[dict], reward_name: str, quiet: bool = False,
                     eval_records: Sequence[dict] = ()) -> None:
    """Mean reward (with +- one std band) against epoch, and the evaluations' mean reward against the epochs
    trained before them; `quiet`: no warning if it cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = np.array([r["epoch"] for r in epoch_records])
    mean = np.array([r["reward_mean"] for r in epoch_records])
    std = np.array([r["reward_std"] for r in epoch_records])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, mean, marker="o", markersize=3, label="epoch's samples")
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    for index, evaluations in enumerate(same_settings_runs(eval_records)):
        since = f", other images from epoch {evaluations[0]['epoch']}" if index else ""
        ax.plot([r["epoch"] for r in evaluations], [r["reward_mean"] for r in evaluations], marker="s",
                markersize=3, label=f"evaluation (fixed prompts and noise{since})")
    if eval_records:
        ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # no epoch 1.25
    ax.set_ylabel(f"{reward_name} (mean +- std)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        _write_or_warn(path, "reward plot", fig.savefig, quiet)
    finally:
        plt.close(fig)


def same_settings_runs(eval_records: Sequence[dict]) -> list[list[dict]]:
    """The evaluations in runs of consecutive records with the same settings (their images: evaluation.py's
    evaluation_settings): a resume that changed them starts another run, not comparable with the one before.
    Records written before evaluations named their settings belong to the run after them."""
    runs: list[list[dict]] = []
    for record in eval_records:
        settings = {r.get("settings") for r in runs[-1]} - {None} if runs else set()
        if runs and (record.get("settings") is None or not settings or record["settings"] in settings):
            runs[-1].append(record)
        else:
            runs.append([record])
    return runs


def summarize(records: list[dict], eval_records: Sequence[dict] = ()) -> str:
    """One line on a finished run: its first and last epochs' mean reward, and the first and last evaluations'
    of the last settings it evaluated with."""
    if not records:
        return "no epochs were run"
    first, last = records[0], records[-1]
    line = f"reward mean {first['reward_mean']:+.4f} (epoch {first['epoch']})"
    if last["epoch"] != first["epoch"]:  # a run of one epoch has nothing to compare
        line += f" -> {last['reward_mean']:+.4f} (epoch {last['epoch']})"
    runs = same_settings_runs(eval_records)
    if runs and len(runs[-1]) > 1:
        first, last = runs[-1][0], runs[-1][-1]
        changed = " with the settings of its last resume" if len(runs) > 1 else ""
        line += (f"; evaluation{changed} {first['reward_mean']:+.4f} (after {first['epoch']} epochs) -> "
                 f"{last['reward_mean']:+.4f} (after {last['epoch']})")
    return line


class LoggedRun:
    """The Trainer's logging (it inherits this, as it does run_checkpoints.CheckpointedRun): its run folder's
    config and logger, the step and evaluation records, and the reward plot. Every process calls log_step (its
    values are averaged over them); the main process alone holds a logger and writes."""

    def _start_run_folder(self) -> RunLogger:
        """config.yaml and the run's logger (main process only)."""
        from .checkpoint import remove_leftovers

        remove_leftovers(self.run_dir)  # a new run's folder may not exist yet: then there is nothing to find
        write_run_config(self.run_dir, self.config_to_save())
        return RunLogger(self.run_dir, resume_epoch=self.start_epoch, resume_step=self.global_step)

    def log_step(self, epoch: int, sums: dict[str, float], grad_norm: float) -> None:
        names = sorted(sums)
        # float64: float32 would round the mean square (1.6e5 for rewards near -400 kB) by more than the variance.
        averaged = self.accelerator.reduce(torch.tensor([sums[k] for k in names], dtype=torch.float64,
                                                        device=self.device), "mean")
        values = dict(zip(names, averaged.tolist()))
        mean_square = values.pop("reward_mean_square")
        variance = mean_square - values["reward_mean"] ** 2
        # Within float64 rounding of the mean square it is zero: equal rewards logged a std of ~1e-8, not 0 (and
        # rounding can leave a tiny negative).
        values["reward_std"] = math.sqrt(variance) if variance > 64 * sys.float_info.epsilon * mean_square else 0.0
        values.update(grad_norm=grad_norm, learning_rate=self.lr_scheduler.get_last_lr()[0],
                      skipped_steps=self.nonfinite.total)
        if self.logger:
            self.logger.log("step", epoch + 1, self.global_step, values)

    def log_evaluation(self, epochs_trained: int, stats: dict[str, float]) -> None:
        from .evaluation import evaluation_settings  # here: evaluation imports epoch_samples, which imports this

        if self.logger:
            settings = evaluation_settings(self.cfg)
            self.logger.log("eval", epochs_trained, self.global_step, {**stats, "settings": settings})
            tqdm.write(f"eval after {epochs_trained} epoch{'s' * (epochs_trained != 1)}  reward "
                       f"{stats['reward_mean']:+.4f} +- {stats['reward_std']:.4f}  ({stats['images']} images, "
                       f"{stats['eval_seconds']:.1f}s)")

    def _close_logs(self, quiet: bool = False) -> None:
        if self.logger:
            try:
                self.plot_rewards(quiet)
            finally:
                self.logger.close()

    def plot_rewards(self, quiet: bool = False, at_most_every: float = 0.0) -> None:
        """reward.png, unless it already shows every epoch and evaluation logged, or was drawn less than
        `at_most_every` seconds ago (main process); `quiet`: no warning if it cannot be written."""
        if time.monotonic() - self.plotted[1] < at_most_every:
            return
        records, evals = self.logger.epoch_records(), self.logger.eval_records()
        if records and self.plotted[0] != (len(records), len(evals)):
            save_reward_plot(self.run_dir / "reward.png", records, self.cfg.reward, quiet=quiet, eval_records=evals)
            self.plotted = ((len(records), len(evals)), time.monotonic())
