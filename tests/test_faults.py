"""Faults a run survives (issue 6): stop signals, SIGKILL at random points, non-finite steps, failing
rewards, damaged checkpoints, a full disk, out-of-memory, and invalid configs. Every case checks its
one-line error and that no earlier checkpoint is lost."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rlcm_fast
from rlcm_fast import checkpoint as ckpt_module
from rlcm_fast import run_logging
from rlcm_fast import trainer as trainer_module
from rlcm_fast.checkpoint import find_resumable, verify_checkpoint
from rlcm_fast.cli import main
from rlcm_fast.epoch_samples import SAMPLES_FILE
from rlcm_fast.faults import is_out_of_memory, load_failure, one_line
from rlcm_fast.presets import TINY_LORA_TARGETS
from rlcm_fast.sampler import LCMSampler
from rlcm_fast.trainer import Trainer
from stops import sigterm_during_update

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(rlcm_fast.__file__).resolve().parents[1]  # the rlcm_fast this process imported (installed in CI)
# Two optimizer updates per epoch (4 samples, minibatches of 2), so a run can stop mid-epoch.
ARGS = ["--device", "cpu", "--set", "batches_per_epoch=1", "--set", "sample_batch_size=4",
        "--set", "train_batch_size=2", "--set", "epochs=2", "--set", "checkpoint_every=1"]
TIMINGS = ("sample_seconds", "train_seconds")


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def train(run_dir: Path, *extra) -> int:
    return main(["train", "--output-dir", str(run_dir), *ARGS, *extra])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rlcm-fast: error")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run: 2 epochs x 2 updates, a checkpoint per epoch."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert train(run_dir) == 0
    return run_dir


def copy_at_checkpoint_1(reference: Path, run_dir: Path) -> Path:
    """The reference run as a kill after epoch 1's checkpoint would leave it (epoch 2 logged, not saved)."""
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoint-2")
    (run_dir / "latest").write_text("checkpoint-1\n")
    return run_dir


def test_reference_run_writes_checkpoints_with_manifests_and_a_latest_pointer(reference):
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (reference / "latest").read_text().strip() == "checkpoint-2"
    for checkpoint in reference.glob("checkpoint-*"):
        verify_checkpoint(checkpoint)
    steps = [r for r in records(reference) if r["kind"] == "step"]
    assert len(steps) == 4 and all(r["skipped"] == 0 and r["skipped_steps"] == 0 for r in steps)
    assert not list(reference.glob(".*checkpoint*"))  # no temporary folders left


def test_keep_checkpoints_prunes_older_ones_and_leftovers_of_killed_writers(tmp_path):
    # Leftovers named with this process's PID too: a restarted container's process often has the killed one's.
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-2-1", "checkpoint-3", "checkpoint-5",
                 ".checkpoint-4.tmp-1", ".checkpoint-2.trash-1", f".checkpoint-6.tmp-{os.getpid()}"):
        (tmp_path / name).mkdir()
    (tmp_path / "samples").mkdir()
    for name in (f".latest.tmp-{os.getpid()}", ".config.yaml.tmp-7", ".reward.png.tmp-7.png",
                 "samples/.epoch-0002.png.tmp-7.png"):
        (tmp_path / name).write_text("half")
    ckpt_module.prune_checkpoints(tmp_path, keep=0, current=tmp_path / "checkpoint-3")  # 0: every checkpoint stays
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")]) == 5
    ckpt_module.prune_checkpoints(tmp_path, keep=2, current=tmp_path / "checkpoint-3")
    # The 2 newest up to the one just written stay, not counting checkpoint-2-1, which the run went on past;
    # checkpoint-5 (after it: an older history) is left alone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-5", "samples"]
    assert list((tmp_path / "samples").iterdir()) == []
    (tmp_path / "checkpoint-3-2").mkdir()  # a stop in epoch 4: the epoch checkpoints before it stay
    ckpt_module.prune_checkpoints(tmp_path, keep=3, current=tmp_path / "checkpoint-3-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2", "checkpoint-3", "checkpoint-3-2", "checkpoint-5", "samples"]


def test_a_run_started_again_removes_the_leftovers_of_the_killed_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    leftovers = [run_dir / f".checkpoint-3.tmp-{os.getpid()}", run_dir / f".latest.tmp-{os.getpid()}",
                 run_dir / ".config.yaml.tmp-1"]
    leftovers[0].mkdir()
    for path in leftovers[1:]:
        path.write_text("half")
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=3"]) == 0
    assert not any(path.exists() for path in leftovers)


@pytest.mark.parametrize("epochs", [2, 1])
def test_resuming_a_run_that_has_its_epochs_says_there_is_nothing_to_train(reference, tmp_path, capsys, epochs):
    """It was a silent no-op that ended with "done", leaving a user who forgot --set epochs to wonder."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    assert main(["train", "--resume", str(run_dir), "--set", f"epochs={epochs}"]) == 0
    assert capsys.readouterr().err == (f"rlcm-fast: checkpoint-2 has trained 2 epoch(s), and epochs={epochs}: nothing "
                                       "to train; --set epochs=N with N > 2 trains on\n")
    assert records(run_dir) == records(reference)


def test_sigterm_finishes_the_step_checkpoints_mid_epoch_and_resume_matches(reference, tmp_path, monkeypatch, capsys):
    original = sigterm_during_update(monkeypatch, 2)  # in the first update of epoch 2
    run_dir = copy_at_checkpoint_1(reference, tmp_path / "run")
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "SIGTERM received" in err and f"Resume with: rlcm-fast train --resume {run_dir}" in err
    assert (run_dir / "latest").read_text().strip() == "checkpoint-1-1"  # 1 epoch + 1 update
    assert (run_dir / "checkpoint-1-1" / SAMPLES_FILE).exists()
    monkeypatch.setattr(Trainer, "finish_update", original)
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir)]) == 0
    assert records(run_dir) == records(reference)


def start_run(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}  # the thread count of this process: bitwise-equal sums
    return subprocess.Popen([sys.executable, "-m", "rlcm_fast", "train", "--output-dir", str(run_dir), *ARGS,
                             "--resume", "auto"], env=env, cwd=run_dir.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(run_dir: Path, count: int, child: subprocess.Popen, timeout: float = 120) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        assert child.poll() is None, child.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run logged nothing in time"
        time.sleep(0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_point_always_resumes_to_the_same_metrics(reference, tmp_path, seed):
    """Killed after a random number of logged lines plus a random delay (during training, logging or
    a checkpoint write), `--resume auto` finishes the run with exactly the uninterrupted run's metrics."""
    rng = np.random.default_rng(seed)
    total = len(records(reference))  # 6 lines: 2 epochs x (2 steps + 1 epoch)
    run_dir = tmp_path / "run"
    child = start_run(run_dir)
    wait_for_lines(run_dir, int(rng.integers(1, total)), child)
    time.sleep(float(rng.uniform(0, 1.0)))
    child.kill()
    child.communicate()
    found, skipped = find_resumable(run_dir)
    assert not skipped  # the kill left no damaged checkpoint under a checkpoint's name
    assert train(run_dir, "--resume", "auto") == 0  # the same command again, as a restart script would
    assert records(run_dir) == records(reference), f"killed with {found} as the newest checkpoint"


def nan_loss_from(step: int, until: int = 10**9):
    original = trainer_module.clipped_policy_loss

    def patched(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        return loss * float("nan") if step <= patched.trainer.global_step + 1 <= until else loss, stats

    return patched


def use_loss(monkeypatch, patched) -> None:
    """The trainer's PPO loss replaced by `patched`, which reads the Trainer being built as `patched.trainer`."""
    monkeypatch.setattr(trainer_module, "clipped_policy_loss", patched)
    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        patched.trainer = self

    monkeypatch.setattr(Trainer, "__init__", init)


def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights(tmp_path, monkeypatch, capsys):
    patched = nan_loss_from(1, until=1)
    use_loss(monkeypatch, patched)
    original, snapshots = Trainer.finish_update, {}

    def finish_update(self, *args):
        patched.trainer = self
        before = [p.detach().clone() for p in self.params]
        original(self, *args)
        snapshots[self.global_step] = all(torch.equal(a, p) for a, p in zip(before, self.params))

    monkeypatch.setattr(Trainer, "finish_update", finish_update)
    run_dir = tmp_path / "run"
    assert train(run_dir, "--set", "epochs=1") == 0
    assert "non-finite loss, grad norm at step 1 (loss nan, grad norm nan)" in capsys.readouterr().err
    steps = [r for r in records(run_dir) if r["kind"] == "step"]
    assert [r["skipped"] for r in steps] == [1, 0] and [r["skipped_steps"] for r in steps] == [1, 1]
    assert snapshots == {1: True, 2: False}  # the skipped step left the weights as they were, the next one trained


def test_a_step_with_a_finite_loss_but_an_infinite_ratio_is_skipped_and_says_which_value(tmp_path, monkeypatch,
                                                                                         capsys):
    """PPO's clip keeps the loss finite where a row's ratio overflowed (A > 0): the step is still skipped, and
    the warning names the ratio, not the finite loss or gradient."""
    original = trainer_module.clipped_policy_loss

    def infinite_ratio_at_step_1(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        if infinite_ratio_at_step_1.trainer.global_step == 0:
            stats = {**stats, "ratio": stats["ratio"] * float("inf")}
        return loss, stats

    use_loss(monkeypatch, infinite_ratio_at_step_1)
    run_dir = tmp_path / "run"
    assert train(run_dir, "--set", "epochs=1") == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "non-finite" in line)
    values = warning.split("(")[1]  # the loss and the gradient norm, both finite
    assert "non-finite ratio at step 1 (loss " in warning and "nan" not in values and "inf" not in values
    steps = [r for r in records(run_dir) if r["kind"] == "step"]
    assert [r["skipped"] for r in steps] == [1, 0]


def test_too_many_non_finite_steps_stop_with_a_checkpoint_of_the_last_good_state(tmp_path, monkeypatch, capsys):
    use_loss(monkeypatch, nan_loss_from(3))
    run_dir = tmp_path / "run"
    assert train(run_dir, "--set", "max_nonfinite_steps=1") == 1
    line = one_error_line(capsys)
    assert "2 optimizer steps in a row had a non-finite loss, gradient or logged value (max_nonfinite_steps=1)" in line
    assert "checkpoint-1-2 holds the last good state" in line
    verify_checkpoint(run_dir / "checkpoint-1")  # the earlier checkpoint is intact
    state = json.loads((run_dir / "checkpoint-1-2" / "training_state.json").read_text())
    assert state["nonfinite"] == {"total": 2, "in_a_row": 2} and state["global_step"] == 4
    # The stop checkpoint is the state after the last good step: resuming it (the fault gone) finishes.
    monkeypatch.setattr(trainer_module, "clipped_policy_loss", nan_loss_from(10**9))
    assert main(["train", "--resume", str(run_dir / "checkpoint-1-2"), "--set", "max_nonfinite_steps=5"]) == 0
    assert [r["epoch"] for r in records(run_dir) if r["kind"] == "epoch"] == [1, 2]


REWARD_FAULTS = {
    "raises": ("    raise ValueError('the scorer crashed')\n", "raised ValueError: the scorer crashed"),
    "nan": ("    return np.full(len(prompts), np.nan)\n", "returned non-finite values (nan at index 0)"),
    "short": ("    return np.zeros(len(prompts) - 1)\n", "returned shape (3,), expected (4,)"),
    # sys.exit() in the reward ended the run with its exit code, no message and no checkpoint
    "exits": ("    import sys; sys.exit(5)\n", "raised SystemExit: 5"),
}


@pytest.mark.parametrize("fault", sorted(REWARD_FAULTS))
def test_a_failing_reward_is_named_after_saving_the_state_before_the_epoch(reference, tmp_path, capsys, fault):
    body, message = REWARD_FAULTS[fault]
    module = f"faulty_reward_{fault}"
    (tmp_path / f"{module}.py").write_text(  # epoch 1's one reward call is good, epoch 2's fails
        "import numpy as np\nCALLS = []\ndef reward(images, prompts):\n    CALLS.append(1)\n"
        "    if len(CALLS) <= 1:\n        return -images.mean(dim=(1, 2, 3)).numpy()\n" + body)
    sys.path.insert(0, str(tmp_path))
    run_dir = tmp_path / "run"
    if fault in ("raises", "exits"):  # a fresh run: epoch 1 is not due a checkpoint, so the failure path writes it
        assert train(run_dir, "--set", f"reward={module}:reward", "--set", "checkpoint_every=5") == 2
    else:  # resumed from checkpoint-1 (the module stays imported): nothing new to save, it stays as it was
        assert train(run_dir, "--set", f"reward={module}:reward", "--set", "epochs=1") == 0
        capsys.readouterr()
        assert main(["train", "--resume", "auto", "--output-dir", str(run_dir), "--set", "epochs=2",
                     "--reward", f"{module}:reward"]) == 2
    line = one_error_line(capsys)
    assert f"reward '{module}:reward' {message}" in line and "checkpoint-1 holds the state before epoch 2" in line
    verify_checkpoint(run_dir / "checkpoint-1")
    assert json.loads((run_dir / "checkpoint-1" / "training_state.json").read_text())["global_step"] == 2
    assert (run_dir / "latest").read_text().strip() == "checkpoint-1"


def test_a_run_ended_by_a_fault_plots_and_closes_every_epoch_it_logged(tmp_path, capsys, monkeypatch):
    """The plot is redrawn at most every 30 s during a run: one ended by a fault kept a plot missing its last
    epochs, and its TensorBoard writer was not closed."""
    module = "reward_failing_in_epoch_3"
    (tmp_path / f"{module}.py").write_text(
        "import numpy as np\nCALLS = []\ndef reward(images, prompts):\n    CALLS.append(1)\n"
        "    if len(CALLS) <= 2:\n        return -images.mean(dim=(1, 2, 3)).numpy()\n"
        "    raise ValueError('the scorer crashed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plotted, closed = [], []
    monkeypatch.setattr(run_logging, "save_reward_plot", lambda path, records, reward, **options: plotted.append(
        [r["epoch"] for r in records]))
    close = run_logging.RunLogger.close
    monkeypatch.setattr(run_logging.RunLogger, "close", lambda self: (closed.append(True), close(self)))
    assert train(tmp_path / "run", "--set", f"reward={module}:reward", "--set", "epochs=3") == 2
    assert "raised ValueError: the scorer crashed" in one_error_line(capsys)
    assert plotted[-1] == [1, 2] and closed == [True]


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no manifest"])
def test_a_damaged_checkpoint_is_refused_and_auto_resume_takes_the_previous_one(reference, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoint-2"
    target = newest / ("manifest.json" if damage == "no manifest" else "optimizer.safetensors")
    data = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        target.unlink()
    assert main(["train", "--resume", str(newest), "--set", "epochs=3"]) == 2
    expected = {"truncated": f"optimizer.safetensors has {len(data) // 2} bytes, the manifest says {len(data)}",
                "flipped byte": "optimizer.safetensors does not match its sha256", "no manifest": "has no manifest.json"}
    assert expected[damage] in one_error_line(capsys)
    found, skipped = find_resumable(run_dir)
    assert found.name == "checkpoint-1" and expected[damage] in skipped[0]
    verify_checkpoint(run_dir / "checkpoint-1")
    if damage != "no manifest":  # auto, or the run folder, skips it (with a warning) and redoes epoch 2
        how = ["--resume", "auto", "--output-dir", str(run_dir)] if damage == "truncated" else ["--resume", str(run_dir)]
        assert main(["train", *how]) == 0
        (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert warning.startswith(f"rlcm-fast: warning: checkpoint {str(newest)!r} is damaged: {expected[damage]}")
        assert warning.endswith("; taking an older checkpoint")
        assert records(run_dir) == records(reference)
        verify_checkpoint(run_dir / "checkpoint-2")


@pytest.mark.parametrize("failing_file", [ckpt_module.OPTIMIZER_FILE, ckpt_module.RNG_FILE])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch, capsys,
                                                                      failing_file):
    original = ckpt_module.save_file

    def save_file(tensors, path, *args, **kwargs):
        if ".checkpoint-2." in path and path.endswith(failing_file):
            with open(path, "wb") as handle:
                handle.write(b"\0" * 100)  # a partly written file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", save_file)
    run_dir = copy_at_checkpoint_1(reference, tmp_path / "run")
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir)]) == 1
    line = one_error_line(capsys)
    assert (f"could not write checkpoint-2 in '{run_dir}': No space left on device; the newest intact checkpoint is "
            "checkpoint-1") in line
    verify_checkpoint(run_dir / "checkpoint-1")
    assert (run_dir / "latest").read_text().strip() == "checkpoint-1"
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert find_resumable(run_dir)[0].name == "checkpoint-1"  # what `--resume auto` continues from


def test_a_full_disk_is_one_line_when_the_last_plot_cannot_be_written_either(tmp_path, monkeypatch, capsys):
    """The plot redrawn after the failed checkpoint found the disk full too, and its warning ("training goes on")
    came before the error that ended the run."""
    import matplotlib.figure

    monkeypatch.setattr(trainer_module, "REWARD_PLOT_SECONDS", 3600.0)  # epoch 2 is plotted only at the end
    full, plots_refused = [], []
    original_save_file, original_savefig = ckpt_module.save_file, matplotlib.figure.Figure.savefig

    def save_file(tensors, path, *args, **kwargs):
        if ".checkpoint-2." in path:
            full.append(True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original_save_file(tensors, path, *args, **kwargs)

    def savefig(self, *args, **kwargs):
        if full:
            plots_refused.append(True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original_savefig(self, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", save_file)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert train(tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert plots_refused and "warning" not in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("rlcm-fast:")][1:] == [
        f"rlcm-fast: error: could not write checkpoint-2 in '{tmp_path / 'run'}': No space left on device; "
        "the newest intact checkpoint is checkpoint-1"]


def test_torchs_cpu_allocation_failure_is_out_of_memory():
    """The test below raises the CPU allocator's message as written by hand; this pins it to what torch says:
    128 PiB, more than any machine's address space, so that no overcommit setting lets it through."""
    with pytest.raises(RuntimeError) as raised:
        torch.empty(1 << 57, dtype=torch.uint8)
    assert is_out_of_memory(raised.value), str(raised.value)


@pytest.mark.parametrize("phase, memory", [("sampling", "GPU"), ("training", "GPU"), ("sampling", "CPU")])
def test_out_of_memory_is_one_message_with_the_sizes_and_the_remedies(tmp_path, monkeypatch, capsys, phase, memory):
    def oom(*args, **kwargs):
        if memory == "CPU":  # what --set resolution=800000 raised on the CPU, a traceback
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 5120000000000 bytes. Error code 12")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LCMSampler if phase == "sampling" else Trainer,
                        "sample" if phase == "sampling" else "policy_log_probs", oom)
    run_dir = tmp_path / "run"
    assert train(run_dir) == 1
    line = [one_error_line(capsys)]
    for part in (f"out of {memory} memory while {phase}", "sample_batch_size=4", "train_batch_size=2", "resolution=32",
                 "gradient_checkpointing=true", "gradient_accumulation_steps"):
        assert part in line[0]


def test_gradient_checkpointing_trains_identically(reference, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "--set", "epochs=1", "--set", "gradient_checkpointing=true") == 0
    got, want = records(run_dir), records(reference)[:3]
    assert [r["kind"] for r in got] == [r["kind"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "reward_mean"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("change, message", [
    ({"lora_rank": 4}, "lora_rank=4 differs from the checkpoint's 8; a resumed run cannot change it"),
    # It scales the saved A and B: 32 resumed a LoRA whose effect on the UNet's output was 4.1x the checkpoint's.
    ({"lora_alpha": 32}, "lora_alpha=32.0 differs from the checkpoint's 8.0; a resumed run cannot change it"),
    # The stat tracker's reward histories are the old reward's: the new one's advantages mixed both.
    ({"reward": "jpeg_incompressibility"}, "reward='jpeg_incompressibility' differs from the checkpoint's "
                                           "'jpeg_compressibility'; a resumed run cannot change it"),
    ({"jpeg_quality": 50}, "jpeg_quality=50 differs from the checkpoint's 95; a resumed run cannot change it"),
    ({"keep_checkpoints": -1}, "keep_checkpoints=-1 is invalid: it must be >= 0"),
    ({"max_nonfinite_steps": "many"}, "max_nonfinite_steps='many' in --set is invalid: expected int"),
])
def test_a_resumed_run_with_invalid_or_incompatible_settings_refuses(reference, tmp_path, capsys, change, message):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    sets = [x for key, value in change.items() for x in ("--set", f"{key}={value}")]
    assert main(["train", "--resume", str(run_dir), *sets]) == 2
    assert message in one_error_line(capsys)
    assert records(run_dir) == records(reference) and find_resumable(run_dir)[0].name == "checkpoint-2"


def test_a_resume_that_spells_the_reward_or_the_lora_targets_otherwise_continues_the_run(reference, tmp_path):
    """`jpeg_compressibility` is `jpeg_compressibility:1.0`, and peft matches LoRA targets in any order: a resume
    spelling them so was refused as a change of reward or adapter."""
    run_dir = copy_at_checkpoint_1(reference, tmp_path / "run")
    targets = ",".join(reversed(TINY_LORA_TARGETS))
    assert main(["train", "--resume", str(run_dir), "--reward", "jpeg_compressibility:1.0",
                 "--set", f"lora_targets=[{targets}]"]) == 0
    assert records(run_dir) == records(reference)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(learnin_rate=1e-3), "unknown config key 'learnin_rate' in checkpoint"),
    (lambda c: c.update(stat_buffer_size=-3), "stat_buffer_size=-3 is invalid: it must be a positive integer"),
    (lambda c: c.update(horizon="four"), "horizon='four' in checkpoint"),
])
def test_a_checkpoint_config_is_validated_like_any_other(reference, tmp_path, capsys, edit, message):
    """A checkpoint whose stored config was edited (manifest rewritten to match) is checked on resume."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    state_file = run_dir / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text())
    edit(state["config"])
    state_file.write_text(json.dumps(state))
    manifest = json.loads((run_dir / "checkpoint-2" / "manifest.json").read_text())
    manifest["files"]["training_state.json"] = {"bytes": state_file.stat().st_size,
                                                "sha256": ckpt_module._sha256(state_file)}
    (run_dir / "checkpoint-2" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=3"]) == 2
    line = one_error_line(capsys)
    assert message in line
    if "unknown" in message:
        assert "did you mean 'learning_rate'" in line


def test_a_mid_epoch_checkpoint_refuses_a_different_batch_layout(reference, tmp_path, monkeypatch, capsys):
    sigterm_during_update(monkeypatch, 0)
    run_dir = tmp_path / "run"
    assert train(run_dir) == 0
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir), "--set", "train_batch_size=4"]) == 2
    assert ("train_batch_size=4 differs from the checkpoint's 2; a checkpoint stopped mid-epoch cannot change it"
            in one_error_line(capsys))
    # The stored log-probs are the policy's at guidance 8: at another, the epoch's ratios would start off 1.
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir), "--set", "guidance_scale=4"]) == 2
    assert ("guidance_scale=4.0 differs from the checkpoint's 8.0; a checkpoint stopped mid-epoch cannot change it"
            in one_error_line(capsys))
    # Its samples are split among 1 process: refused before any process starts (each of them said so, once its
    # model had loaded).
    monkeypatch.setattr("rlcm_fast.launch.usable_cpu_cores", lambda: 2)
    monkeypatch.setattr("rlcm_fast.launch.launch_local", lambda *args: pytest.fail("processes were started"))
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir), "--num-processes", "2"]) == 2
    assert one_error_line(capsys) == (f"rlcm-fast: error: checkpoint {str(run_dir / 'checkpoint-0-1')!r} stopped "
                                      "mid-epoch with 1 process(es); resume it with --num-processes 1, or resume an "
                                      "epoch checkpoint (checkpoint-N) with any")
    verify_checkpoint(run_dir / "checkpoint-0-1")


@pytest.mark.parametrize("args, message", [
    (["--resume", "auto"], "--resume auto needs --output-dir: the run folder to continue (or start)"),
    (["--num-processes", "0"], "--num-processes 0 is invalid: it must be >= 1"),
    (["--set", "keep_checkpoints=-1"], "keep_checkpoints=-1 is invalid: it must be >= 0"),
])
def test_bad_fault_options_are_one_line_exit_2(tmp_path, capsys, args, message):
    assert main(["train", "--device", "cpu", *args]) == 2
    assert message in one_error_line(capsys)


def test_resuming_into_another_runs_folder_is_refused(reference, tmp_path, capsys):
    """It overwrote that run's checkpoint-2, latest pointer, config.yaml and metrics (6 lines cut to 4)."""
    other = tmp_path / "other"
    shutil.copytree(reference, other)
    before = records(other)
    assert main(["train", "--resume", str(reference / "checkpoint-1"), "--output-dir", str(other)]) == 2
    assert (f"--output-dir '{other}' already holds another run; resume '{reference / 'checkpoint-1'}' into an empty "
            f"folder, or into its own ('{reference}')") in one_error_line(capsys)
    assert records(other) == before and (other / "latest").read_text().strip() == "checkpoint-2"


def test_resuming_an_older_checkpoint_over_newer_intact_ones_is_refused(reference, tmp_path, capsys):
    """It dropped the later epochs' metrics at once while their checkpoints and `latest` stayed: a stop before
    the next checkpoint then said "Resume with: --resume RUN", which continued the other branch."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = records(run_dir)
    assert main(["train", "--resume", str(run_dir / "checkpoint-1"), "--set", "epochs=3"]) == 2
    assert ("checkpoint-1 is older than this run's intact checkpoint-2: resuming it here would overwrite the later "
            "checkpoints and metrics; resume it into a new --output-dir (a branch of the run), or remove the newer "
            "checkpoints first") in one_error_line(capsys)
    assert records(run_dir) == before
    branch = tmp_path / "branch"  # the way it says: the branch's epoch 2 is the reference's
    assert main(["train", "--resume", str(run_dir / "checkpoint-1"), "--output-dir", str(branch)]) == 0
    assert [r for r in records(branch) if r["kind"] == "epoch"] == [r for r in before if r["kind"] == "epoch"][1:]
    (run_dir / "checkpoint-2" / ckpt_module.OPTIMIZER_FILE).write_bytes(b"damaged")  # passed over, as --resume does
    assert main(["train", "--resume", str(run_dir / "checkpoint-1")]) == 0
    assert records(run_dir) == before


def test_output_dir_from_set_is_the_run_folder_and_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """--set output_dir=DIR was ignored (the run went to runs/<task>-<time>); a file as --output-dir was a
    FileExistsError traceback once the model had loaded."""
    run_dir = tmp_path / "from-set"
    assert main(["train", *ARGS, "--set", "epochs=1", "--set", f"output_dir={run_dir}"]) == 0
    assert (run_dir / "checkpoint-1").is_dir()
    assert main(["train", *ARGS, "--output-dir", str(tmp_path / "a"), "--set", f"output_dir={tmp_path / 'b'}"]) == 2
    assert (f"--output-dir '{tmp_path / 'a'}' and --set output_dir='{tmp_path / 'b'}' differ: give one of them"
            in one_error_line(capsys))
    monkeypatch.setattr(Trainer, "__init__", lambda *args: pytest.fail("the model was loaded"))
    (tmp_path / "afile").write_text("hi")
    assert main(["train", *ARGS, "--output-dir", str(tmp_path / "afile")]) == 2
    assert f"output dir '{tmp_path / 'afile'}' cannot be created: it is a file" in one_error_line(capsys)
    assert main(["train", *ARGS, "--output-dir", str(tmp_path / "afile" / "run")]) == 2
    assert (f"output dir '{tmp_path / 'afile' / 'run'}' cannot be created: '{tmp_path / 'afile'}' is a file"
            in one_error_line(capsys))
    # A folder this user may not write into (as root every folder is writable, so os.access stands in).
    monkeypatch.setattr("rlcm_fast.path_checks.os.access", lambda path, mode: Path(path) != tmp_path)
    assert main(["train", *ARGS, "--output-dir", str(tmp_path / "run")]) == 2
    assert (f"output dir '{tmp_path / 'run'}' cannot be created or written: '{tmp_path}' is not writable"
            in one_error_line(capsys))
    # Where os.access says yes and making a folder fails all the same (root in /proc, a read-only mount).
    monkeypatch.setattr("rlcm_fast.path_checks.os.access", lambda path, mode: True)
    assert main(["train", *ARGS, "--output-dir", "/proc/rlcm-fast-run"]) == 2
    assert one_error_line(capsys).startswith("rlcm-fast: error: output dir '/proc/rlcm-fast-run' cannot be created or "
                                             "written: making a folder in '/proc' failed: ")
    assert not list(Path("/proc").glob(".rlcm-fast-probe-*"))


def test_resume_auto_in_an_empty_folder_starts_the_run(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "--resume", "auto", "--set", "epochs=1") == 0
    assert (run_dir / "latest").read_text().strip() == "checkpoint-1"


def test_resume_auto_in_an_empty_folder_reads_the_config_file(tmp_path):
    from rlcm_fast.cli import build_parser
    from rlcm_fast.train_command import _plan_run

    (tmp_path / "c.yaml").write_text("epochs: 7\n")
    args = build_parser().parse_args(["train", "--resume", "auto", "--output-dir", str(tmp_path / "run"),
                                      "--config", str(tmp_path / "c.yaml")])
    cfg, run_dir, resume_from = _plan_run(args)
    assert (cfg.epochs, run_dir, resume_from) == (7, tmp_path / "run", None)


def test_an_end_of_epoch_checkpoint_resumes_with_other_sampling_settings(monkeypatch, tmp_path):
    """Only a checkpoint stopped mid-epoch holds samples drawn with the old seed and guidance."""
    from rlcm_fast.resume import resumed_config
    from rlcm_fast.config import resolve_config

    saved = resolve_config().to_dict()
    monkeypatch.setattr(ckpt_module, "read_training_state", lambda checkpoint: {"config": saved, "update": 0})
    cfg = resumed_config(tmp_path / "checkpoint-1", {"seed": 5, "guidance_scale": 4.0})
    assert (cfg.seed, cfg.guidance_scale) == (5, 4.0)


@pytest.mark.parametrize("saved, overrides, warned", [
    ({"reward": "clipscore", "clipscore_model": "openai/clip"}, {"clipscore_model": "/models/clip"},
     ["clipscore_model='/models/clip' differs from the checkpoint's 'openai/clip': its rewards go beside reward "
      "histories scored with 'openai/clip' (fine for a local copy of the same model)"]),
    ({"reward": "jpeg_compressibility:1,aesthetic:0.5"}, {"jpeg_backend": "pillow", "clipscore_model": "/m"},
     ["jpeg_backend='pillow' differs from the checkpoint's 'auto': its rewards go beside reward histories scored "
      "with 'auto'"]),
    ({"reward": "jpeg_compressibility"}, {"aesthetic_model": "/models/vit-l"}, []),  # a scorer the reward never uses
    ({"reward": "jpeg_compressibility", "jpeg_backend": "pillow"}, {"jpeg_backend": "exact"}, []),  # the same sizes
    ({"reward": "jpeg_compressibility", "jpeg_backend": "exact"}, {"jpeg_backend": "nvjpeg"},
     ["jpeg_backend='nvjpeg' differs from the checkpoint's 'exact': its rewards go beside reward histories scored "
      "with 'exact'"]),
])
def test_a_resume_warns_of_another_scorer_for_its_reward(monkeypatch, tmp_path, saved, overrides, warned):
    """A changed scorer mixes its values into the restored per-prompt histories; a local copy of the model is the
    same scorer, so it is a warning."""
    from rlcm_fast.config import resolve_config
    from rlcm_fast.resume import resumed_config

    saved = resolve_config(overrides=saved).to_dict()
    monkeypatch.setattr(ckpt_module, "read_training_state", lambda checkpoint: {"config": saved, "update": 0})
    warnings = []
    resumed_config(tmp_path / "checkpoint-1", overrides, warn=warnings.append)
    assert warnings == warned


def test_a_resume_cannot_change_the_task(monkeypatch, tmp_path):
    """The task chose the settings a resume takes from its checkpoint: a new one was written to config.yaml only."""
    from rlcm_fast.config import ConfigError, resolve_config
    from rlcm_fast.resume import resumed_config

    saved = resolve_config().to_dict()
    monkeypatch.setattr(ckpt_module, "read_training_state", lambda checkpoint: {"config": saved, "update": 0})
    with pytest.raises(ConfigError) as error:
        resumed_config(tmp_path / "checkpoint-1", {"task": "aesthetic"})
    assert str(error.value) == ("task='aesthetic' differs from the checkpoint's 'compressibility'; a resumed run "
                                "cannot change it")


def test_a_finite_step_ends_a_run_of_faults_and_the_counts_survive_a_checkpoint():
    from rlcm_fast.faults import NonFiniteSteps

    steps = NonFiniteSteps(limit=2)
    for finite in (False, False, True, False):
        steps.record(finite)
    assert (steps.total, steps.in_a_row, steps.exceeded) == (3, 1, False)
    restored = NonFiniteSteps(limit=2)
    restored.load_state_dict(json.loads(json.dumps(steps.state_dict())))
    assert (restored.total, restored.in_a_row) == (3, 1)
    restored.record(False)
    restored.record(False)
    assert restored.exceeded  # 3 in a row, counting the one before the checkpoint


def test_a_broken_pipe_is_a_lost_peer_only_under_several_processes(monkeypatch):
    from rlcm_fast.faults import is_lost_peer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not is_lost_peer(RuntimeError("Broken pipe"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert is_lost_peer(RuntimeError("Broken pipe"))


def test_a_stopped_epochs_record_holds_the_epoch_as_it_was_and_passes_the_checkpoints_checks():
    """A wrong count or stats would fail the checkpoint's own checks, and `--resume auto` would quietly fall
    back to the epoch's start (the same metrics in the end: the SIGTERM tests cannot see it); the grid keeps
    the 16 images the epoch's grid shows."""
    from types import SimpleNamespace

    from rlcm_fast.checkpoint_checks import stopped_epoch_problem
    from rlcm_fast.epoch_samples import EpochSamples, stopped_epoch_record
    from rlcm_fast.run_logging import GRID_IMAGES

    generator = torch.Generator().manual_seed(0)
    samples = EpochSamples(prompts=[f"p{i}" for i in range(20)], states=torch.randn(20, 3, 4, 2, 2, generator=generator),
                           log_probs=torch.randn(20, 2, generator=generator),
                           rewards=np.random.default_rng(0).normal(size=20),  # float64, as the rewards are
                           advantages=torch.randn(20, generator=generator), images=torch.rand(20, 3, 8, 8, generator=generator))
    one_process = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, num_processes=1, process_index=0,
                                  is_main_process=True)
    stats = {"reward_mean": 0.5, "reward_std": 0.25, "samples": 20, "sample_seconds": 1.0}
    files, stopped = stopped_epoch_record(samples, stats, 3, one_process)
    assert stopped == {"updates_done": 3, "processes": 1, "prompts": samples.prompts, "stats": stats}
    assert stopped_epoch_problem(stopped, 3) is None
    tensors = files[SAMPLES_FILE]
    assert torch.equal(tensors["states"], samples.states) and torch.equal(tensors["log_probs"], samples.log_probs)
    assert torch.equal(tensors["advantages"], samples.advantages)
    assert tensors["rewards"].dtype == torch.float64 and np.array_equal(tensors["rewards"].numpy(), samples.rewards)
    assert torch.equal(tensors["grid_images"], samples.images[:GRID_IMAGES])


def test_one_line_collapses_whitespace_and_marks_where_it_cut():
    assert one_line(OSError("cannot\n  load\tit")) == "OSError: cannot load it"
    assert one_line(ValueError("x" * 12), limit=12) == "ValueError: " + "x" * 12
    assert one_line(ValueError("x" * 13), limit=12) == "ValueError: " + "x" * 12 + "..."


def raised_from(cause: BaseException, message: str = "Cannot load org/name: several sentences and a URL") -> OSError:
    """What from_pretrained raises: its own OSError over the hub client's error."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise OSError(message) from inner
    except OSError as outer:
        return outer


def test_a_hub_id_neither_cached_nor_reachable_is_said_in_a_few_words(monkeypatch):
    """The libraries said it in several sentences and a URL, cut at 400 characters ("Please check out the roo...")."""
    import socket

    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as the hub client read the environment at import
    unreachable = ("not in this machine's hub cache, and the hub cannot be reached: download the model once where "
                   "there is a network, or give a local folder")
    assert load_failure(raised_from(LocalEntryNotFoundError("not cached"))) == unreachable
    assert load_failure(raised_from(socket.gaierror(-3, "Temporary failure in name resolution"))) == unreachable
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_failure(raised_from(OfflineModeIsEnabled("offline"))) == unreachable.replace(
        "the hub cannot be reached", "offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE) keeps the hub from being "
        "asked")
    # Anything else is the error itself, one line; a cause the raiser suppressed is not looked into.
    assert load_failure(raised_from(ValueError("bad config"), "no\nweights"), limit=20) == "OSError: no weights"
    try:
        try:
            raise socket.gaierror(-3, "name resolution")
        except OSError:
            raise OSError("a folder without model_index.json") from None
    except OSError as suppressed:
        assert load_failure(suppressed) == "OSError: a folder without model_index.json"


def test_a_refused_connection_under_the_hubs_error_is_said_in_a_few_words(monkeypatch):
    """Besides the hub client's own errors and DNS: a refused or reset connection, and httpx's ConnectError and
    ConnectTimeout (matched by name: their module differs between httpx releases)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = ("not in this machine's hub cache, and the hub cannot be reached: download the model once where "
                   "there is a network, or give a local folder")
    ConnectError = type("ConnectError", (Exception,), {})
    ConnectTimeout = type("ConnectTimeout", (Exception,), {})
    for cause in (ConnectionRefusedError(111, "Connection refused"), ConnectionResetError(104, "reset"),
                  ConnectError("[Errno 111] Connection refused"), ConnectTimeout("timed out")):
        assert load_failure(raised_from(cause)) == unreachable, cause
    assert load_failure(raised_from(PermissionError(13, "Permission denied"))) == (
        "OSError: Cannot load org/name: several sentences and a URL")


def test_first_line_is_the_messages_first_line_or_the_given_text_when_it_has_none():
    from rlcm_fast.faults import first_line

    assert first_line(ValueError("  bad value\nsecond line\nthird")) == "bad value"
    assert first_line(ValueError(" \n ")) == "ValueError"
    assert first_line(KeyError(), empty="the key is missing") == "the key is missing"
    assert first_line(ValueError("shown"), empty="not shown") == "shown"


def test_shown_values_are_their_repr_and_never_longer_than_the_limit():
    from rlcm_fast.faults import shown

    assert shown("abc") == "'abc'"
    assert shown("x" * 8, limit=10) == "'" + "x" * 8 + "'"  # exactly the limit: whole
    assert shown("x" * 9, limit=10) == "'xxxxxx..."
    assert len(shown(list(range(100)))) == 60 and shown(list(range(100))).endswith("...")


@pytest.mark.parametrize("value, finite", [
    (1, True), (-2.5, True), (0, True), (10**300, True), (10**400, False), (float("nan"), False),
    (float("inf"), False), (True, False), (False, False), ("1", False), (None, False), ([1], False)])
def test_a_finite_number_is_an_int_or_float_not_a_bool_and_overflow_is_not_finite(value, finite):
    """Checkpoint and stat-tracker checks read JSON with this: a bool is not a count, and a 400-digit integer
    (a tampered file) is refused instead of raising OverflowError."""
    from rlcm_fast.faults import is_finite_number

    assert is_finite_number(value) is finite


def test_a_stop_says_stop_requested_unless_a_fault_stopped_it():
    from rlcm_fast.faults import StopTraining

    requested, fault = StopTraining(3), StopTraining(5, "loss was nan 3 times in a row")
    assert (str(requested), requested.updates_done, requested.fault) == ("stop requested", 3, None)
    assert (str(fault), fault.updates_done, fault.fault) == ("loss was nan 3 times in a row", 5, fault.fault)


def test_agreeing_is_an_or_over_the_processes_and_costs_nothing_in_one():
    """A stop or skip any process asks for is every process's: otherwise one leaves a collective the others wait in."""
    from types import SimpleNamespace

    from rlcm_fast.faults import agree, processes_where

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective with one process")

    one = SimpleNamespace(num_processes=1, reduce=no_collective, gather=no_collective)
    assert agree(one, True, False, 0, "SIGTERM", None) == [True, False, False, True, False]
    assert processes_where(one, True) == [0] and processes_where(one, False) == []
    others = torch.tensor([1, 0, 0])  # what the other process of two asks: stop only
    two = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                          reduce=lambda values, reduction: values + others if reduction == "sum" else None,
                          gather=lambda flag: torch.cat([torch.tensor([0]), flag]))
    assert agree(two, False, True, False) == [True, True, False]
    assert processes_where(two, True) == [1] and processes_where(two, False) == []


def test_only_a_quiet_error_is_left_to_the_main_process_to_report():
    from rlcm_fast.faults import TrainingFault, left_to_the_main_process, reported_by_main_process

    assert reported_by_main_process(left_to_the_main_process(TrainingFault("disk full")))
    assert not reported_by_main_process(left_to_the_main_process(TrainingFault("disk full"), quiet=False))
    assert not reported_by_main_process(TrainingFault("disk full"))
    assert not reported_by_main_process("a message")


def test_stop_signals_ask_once_a_second_ctrl_c_interrupts_and_the_handlers_are_put_back(capsys):
    import signal

    from rlcm_fast.faults import StopSignals

    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == "SIGTERM"
        try:
            signal.raise_signal(signal.SIGTERM)  # a scheduler's second SIGTERM only asks again
        except KeyboardInterrupt:
            pytest.fail("a second SIGTERM interrupted the run")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before
    assert capsys.readouterr().err.splitlines() == 2 * [
        "rlcm-fast: SIGTERM received; stopping after the current optimizer step to write a checkpoint (SIGINT again "
        "stops at once)"]
    with StopSignals(announce=False) as quiet:  # the processes other than the main one
        signal.raise_signal(signal.SIGINT)
    assert quiet.received == "SIGINT" and capsys.readouterr().err == ""


def test_a_loss_scale_overflow_is_counted_but_neither_adds_to_nor_ends_a_run_of_faults():
    from rlcm_fast.faults import NonFiniteSteps

    steps = NonFiniteSteps(limit=2)
    steps.record(False)
    steps.record(False, is_fault=False)
    assert (steps.total, steps.in_a_row, steps.exceeded) == (2, 1, False)
    steps.record(False)
    assert (steps.total, steps.in_a_row, steps.exceeded) == (3, 2, False)  # the limit itself is allowed
    steps.record(False)
    assert (steps.in_a_row, steps.exceeded) == (3, True)
    restored = NonFiniteSteps(limit=2)
    restored.load_state_dict({})  # a checkpoint from before the counts were saved
    assert (restored.total, restored.in_a_row) == (0, 0)


def test_out_of_memory_is_the_gpus_the_cpu_allocators_or_pythons_and_nothing_else():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found Half"))
    assert not is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))


def test_each_way_gloo_or_nccl_says_a_peer_is_gone_is_a_lost_peer(monkeypatch):
    from rlcm_fast.faults import PEER_GONE, is_lost_peer

    monkeypatch.setenv("WORLD_SIZE", "2")
    for text in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker"):
        assert text in PEER_GONE and is_lost_peer(RuntimeError(f"[gloo] {text} [127.0.0.1]:2753"))
    assert is_lost_peer(torch.distributed.DistError("Timed out waiting 1800000ms for recv operation"))
    assert not is_lost_peer(RuntimeError("CUDA error: an illegal memory access was encountered"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not is_lost_peer(torch.distributed.DistError("Timed out"))


def test_the_out_of_memory_message_names_every_size_and_remedy():
    from types import SimpleNamespace

    from rlcm_fast.faults import out_of_memory_message

    cfg = SimpleNamespace(sample_batch_size=8, train_batch_size=4, sample_batches_per_call=5, train_rows_per_call=7,
                          resolution=512, horizon=8, gradient_checkpointing=False)
    assert out_of_memory_message(cfg, "training", 2, memory="CPU") == (
        "out of CPU memory while training (per process: sample_batch_size=8, train_batch_size=4, "
        "sample_batches_per_call=5, train_rows_per_call=7, resolution=512, horizon=8, gradient_checkpointing=false; "
        "2 process(es)). To use less memory: narrower UNet calls, --set sample_batches_per_call=1 (sampling) and "
        "train_rows_per_call=0 (training), the same results; lower sample_batch_size "
        "(sampling), lower train_batch_size and raise gradient_accumulation_steps to keep the samples per update "
        "(training), --set gradient_checkpointing=true (training), or lower resolution; the last checkpoint is "
        "intact, resume it with --resume RUN_DIR (batch-size changes need an epoch checkpoint, checkpoint-N)")


@pytest.mark.parametrize("world_size", ["", "two", " 2x"])
def test_a_garbled_world_size_is_one_process_not_a_traceback(monkeypatch, world_size):
    """is_lost_peer runs inside cli.main's exception handler: a WORLD_SIZE it cannot read must not raise there."""
    from rlcm_fast.faults import is_lost_peer

    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert is_lost_peer(RuntimeError("Connection reset by peer")) is False
    monkeypatch.setenv("WORLD_SIZE", " 2 ")
    assert is_lost_peer(RuntimeError("Connection reset by peer")) is True
