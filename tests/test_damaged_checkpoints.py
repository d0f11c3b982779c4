"""Damaged checkpoints and a full disk, beyond tests/test_faults.py: a `latest` pointer that is not a
checkpoint's name, a malformed manifest, a training state of the wrong shape (manifest recomputed to
match, as an edit would), safetensors' own full-disk error, and a full disk while the sample grid, the
reward plot, the metrics or the `latest` pointer is written. A damaged checkpoint is skipped with a one-line warning
for the newest intact one, or, named exactly, is a one-line error; a write failure is one line, exit 1."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

import rlcm_fast
from rlcm_fast import checkpoint as ckpt_module
from rlcm_fast.checkpoint import (CheckpointError, IncompatibleCheckpointError, find_resumable, resolve_checkpoint,
                                  verify_checkpoint)
from rlcm_fast.checkpoint_checks import STATE_FORMAT
from rlcm_fast.cli import main
from rlcm_fast.tiny_presets import preset_weights_id
from rlcm_fast.trainer import Trainer

# 3 epochs of one update each (2 samples), a checkpoint after each, all kept.
ARGS = ["--device", "cpu", "--set", "epochs=3", "--set", "checkpoint_every=1", "--set", "keep_checkpoints=0",
        "--set", "batches_per_epoch=1", "--set", "sample_batch_size=2", "--set", "train_batch_size=2",
        "--set", "gradient_accumulation_steps=1"]
DISK_FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--output-dir", str(run_dir), *ARGS]) == 0
    return run_dir


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def stderr_lines(capsys, prefix: str) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith(prefix)]


def rewrite(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace (or add) a file of a checkpoint and recompute its manifest entry: an edit, not damage on disk."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": ckpt_module._sha256(checkpoint / name)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def edit_state(checkpoint: Path, edit) -> None:
    state = json.loads((checkpoint / "training_state.json").read_text())
    state = edit(state) or state
    rewrite(checkpoint, "training_state.json", json.dumps(state).encode())


def resume_run_folder(run: Path, capsys) -> list[str]:
    """`train --resume RUN` (nothing left to train at epochs=2): exit 0 from checkpoint-2; its warnings."""
    assert main(["train", "--resume", str(run), "--set", "epochs=2"]) == 0
    return stderr_lines(capsys, "rlcm-fast: warning")


# -- B5: the `latest` pointer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, why", [
    (bytes(range(128, 178)), "it is not text"),  # random bytes: not UTF-8
    (b"hello\n", "it holds 'hello', not a checkpoint's name"),
    (b"../other/checkpoint-9\n", "it holds '../other/checkpoint-9', not a checkpoint's name"),
], ids=["random bytes", "text", "a path"])
def test_a_damaged_latest_pointer_is_ignored_with_a_warning(run, capsys, content, why):
    (run / "latest").write_bytes(content)
    reason = f"the latest pointer {str(run / 'latest')!r} is damaged: {why}; ignoring it"
    found, skipped = find_resumable(run)
    assert found == run / "checkpoint-3" and skipped == [reason]
    warned = []  # `sample --lora RUN` resolves the run folder so
    assert resolve_checkpoint(run, "--lora", warn=warned.append) == run / "checkpoint-3" and warned == [reason]
    # Every checkpoint damaged: the error names the checkpoint's damage, not the pointer's.
    for checkpoint in run.glob("checkpoint-*"):
        (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="holds no intact checkpoint \\(checkpoint .*checkpoint-3' is incomplete"):
        resolve_checkpoint(run)


def test_train_resume_with_a_damaged_latest_pointer_takes_the_newest_intact_checkpoint(run, capsys):
    (run / "latest").write_bytes(bytes(range(200, 250)))
    assert main(["train", "--resume", str(run), "--set", "epochs=3"]) == 0  # nothing left: resumed at checkpoint-3
    (warning,) = stderr_lines(capsys, "rlcm-fast: warning")
    assert warning == (f"rlcm-fast: warning: the latest pointer {str(run / 'latest')!r} is damaged: "
                       "it is not text; ignoring it")  # not "...; taking an older checkpoint": it took the newest
    (run / "latest").write_bytes(b"\xff\xfe")
    assert main(["train", "--resume", "auto", "--output-dir", str(run), "--set", "epochs=3"]) == 0
    assert len(stderr_lines(capsys, "rlcm-fast: warning")) == 1


# -- B6: a malformed manifest ---------------------------------------------------------------------------------

@pytest.mark.parametrize("manifest, problem", [
    ({"format": 1, "files": []}, "files is [], expected an object of file name: {bytes, sha256}"),
    ([1, 2], "it holds [1, 2], not an object"),
    ({"format": 1, "files": {"optimizer.safetensors": "abc"}},
     "the entry of optimizer.safetensors is 'abc', expected {bytes: a size, sha256: 64 hex digits}"),
    ({"format": 1, "files": {"optimizer.safetensors": {"bytes": "12", "sha256": "abc"}}},
     "the entry of optimizer.safetensors is {'bytes': '12', 'sha256': 'abc'}, "
     "expected {bytes: a size, sha256: 64 hex digits}"),
    ({"format": 1, "files": {"../../checkpoint-2/optimizer.safetensors": {"bytes": 1, "sha256": "0" * 64}}},
     "it lists '../../checkpoint-2/optimizer.safetensors', not a file of the checkpoint"),
    ({"format": 1, "files": {}}, "it does not list training_state.json, optimizer.safetensors, rng_state.safetensors, "
                                 "pytorch_lora_weights.safetensors"),
    ({"format": 2, "files": {}}, "format is 2, expected 1"),
], ids=["files a list", "a list", "entry a string", "bytes a string", "a path outside", "files missing", "format 2"])
def test_a_malformed_manifest_is_damage(run, manifest, problem):
    (run / "checkpoint-3" / "manifest.json").write_text(json.dumps(manifest))
    reason = f"checkpoint {str(run / 'checkpoint-3')!r} is damaged: manifest.json is malformed ({problem})"
    found, skipped = find_resumable(run)
    assert found == run / "checkpoint-2" and skipped == [reason]


def test_resume_skips_a_malformed_manifest_or_names_it_in_one_line(run, capsys):
    (run / "checkpoint-3" / "manifest.json").write_text('{"format":1,"files":[]}\n')
    reason = (f"checkpoint {str(run / 'checkpoint-3')!r} is damaged: manifest.json is malformed "
              "(files is [], expected an object of file name: {bytes, sha256})")
    assert resume_run_folder(run, capsys) == [f"rlcm-fast: warning: {reason}; taking an older checkpoint"]
    assert main(["train", "--resume", str(run / "checkpoint-3"), "--set", "epochs=3"]) == 2
    assert stderr_lines(capsys, "rlcm-fast: error") == [f"rlcm-fast: error: {reason}"]


# -- B7: a training state of the wrong shape ------------------------------------------------------------------

def drop(key):
    return lambda state: state.pop(key) and None


def put(key, value):
    return lambda state: state.update({key: value})


STATE_EDITS = {
    "no epoch": (drop("epoch"), "has no 'epoch'"),
    "stat_tracker a string": (put("stat_tracker", "x"), "has a stat_tracker that is 'x', expected an object"),
    "stat_tracker history of strings": (
        put("stat_tracker", {"history": {"cat": ["high"]}}),
        "has a stat_tracker that history['cat'] is ['high'], expected a list of finite numbers"),
    "epoch a string": (put("epoch", "3"), "has epoch='3', expected an integer >= 0"),
    "negative epoch": (put("epoch", -1), "has epoch=-1, expected an integer >= 0"),
    "global_step a float": (put("global_step", 3.5), "has global_step=3.5, expected an integer >= 0"),
    "update without its epoch": (
        put("update", 1), "has update=1 but no 'stopped_epoch' (the samples of the epoch it stopped in)"),
    "a list": (lambda state: [state["epoch"]], "holds [3], not an object"),
    "config a list": (put("config", ["epochs"]), "has config=['epochs'], expected an object"),
    "nonfinite a list": (put("nonfinite", [0, 0]),
                         "has nonfinite=[0, 0], expected {total, in_a_row: integers >= 0}"),
    "no param_groups": (put("optimizer", {}),
                        "has optimizer={}, expected {param_groups: [{params, lr, betas, eps, weight_decay}, ...]}"),
    "lr_scheduler without lr_lambdas": (
        put("lr_scheduler", {"base_lrs": [0.003], "last_epoch": 3, "_last_lr": [0.003]}),
        "has lr_scheduler={'base_lrs': [0.003], 'last_epoch': 3, '_last_lr': [0.003]}, "
        "expected an LR schedule's state for 1 parameter group(s)"),
    # A 400-digit JSON integer made math.isfinite raise OverflowError: a traceback (security audit).
    "lr a 400-digit integer": (lambda state: state["optimizer"]["param_groups"][0].update(lr=10 ** 400),
                               "has optimizer={'param_groups': [{'lr': 1" + "0" * 31 + "..., expected "
                               "{param_groups: [{params, lr, betas, eps, weight_decay}, ...]}"),
    "stat_tracker reward a 400-digit integer": (
        put("stat_tracker", {"history": {"cat": [10 ** 400]}}),
        "has a stat_tracker that history['cat'] is [1" + "0" * 55 + "..., expected a list of finite numbers"),
    "stopped_epoch without prompts": (
        lambda state: state.update(update=1, stopped_epoch={"updates_done": 1, "processes": 1, "stats": {}}),
        "has stopped_epoch.prompts=None, expected a list of prompts, as many for each of its 1 process(es)"),
}


@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_a_malformed_training_state_is_damage(run, capsys, case):
    edit, problem = STATE_EDITS[case]
    edit_state(run / "checkpoint-3", edit)
    reason = f"checkpoint {str(run / 'checkpoint-3')!r} is damaged: training_state.json {problem}"
    found, skipped = find_resumable(run)
    assert found == run / "checkpoint-2" and skipped == [reason]
    # Named exactly: one line, exit 2, before any model is loaded.
    assert main(["train", "--resume", str(run / "checkpoint-3"), "--set", "epochs=4"]) == 2
    assert stderr_lines(capsys, "rlcm-fast: error") == [f"rlcm-fast: error: {reason}"]
    with pytest.raises(CheckpointError) as error:
        ckpt_module.saved_config(run / "checkpoint-3")  # what `sample --lora` reads first
    assert str(error.value) == reason


@pytest.mark.parametrize("name", ["manifest.json", "training_state.json"])
def test_json_nested_too_deep_to_parse_is_damage_not_a_recursion_traceback(run, capsys, name):
    nested = b"[" * 100_000 + b"]" * 100_000
    if name == "manifest.json":
        (run / "checkpoint-3" / name).write_bytes(nested)
        problem = "is damaged: manifest.json is unreadable (maximum recursion depth exceeded"
    else:
        rewrite(run / "checkpoint-3", name, nested)
        problem = "is unreadable (training_state.json: maximum recursion depth exceeded"
    found, skipped = find_resumable(run)
    assert found == run / "checkpoint-2" and skipped[0].startswith(f"checkpoint {str(run / 'checkpoint-3')!r} {problem}")
    assert main(["sample", "--device", "cpu", "--lora", str(run / "checkpoint-3"), "--prompt", "cat",
                 "--output-dir", str(run / "out")]) == 2
    assert stderr_lines(capsys, "rlcm-fast: error")[0].startswith(f"rlcm-fast: error: checkpoint "
                                                                  f"{str(run / 'checkpoint-3')!r} {problem}")


def test_sample_of_a_run_folder_names_the_older_checkpoint_it_takes(run, capsys):
    """It said "...; taking an older checkpoint" and not which one (train names it on its start line), and its
    reward line read "over 1 images" (found by a newcomer's walk through README)."""
    (run / "checkpoint-3" / "manifest.json").unlink()
    assert main(["sample", "--device", "cpu", "--lora", str(run), "--prompt", "cat", "--num-images", "1",
                 "--reward", "jpeg_compressibility", "--output-dir", str(run / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlcm-fast: ")]
    assert err[0].startswith(f"rlcm-fast: warning: checkpoint {str(run / 'checkpoint-3')!r} is ")
    assert err[0].endswith("; taking an older checkpoint")
    assert err[1] == f"rlcm-fast: sampling checkpoint-2 of {str(run)!r}"
    assert err[-1].startswith("rlcm-fast: jpeg_compressibility: mean ") and err[-1].endswith(" over 1 image")


def test_optimizer_moments_of_another_shape_are_one_line_before_training(run, capsys, monkeypatch):
    """torch's load_state_dict takes moments of any shape; the first step then failed with a traceback."""
    tensors = load_file(run / "checkpoint-3" / "optimizer.safetensors")
    name = sorted(key for key in tensors if key.endswith("exp_avg"))[0]
    tensors[name] = torch.zeros(3)
    rewrite(run / "checkpoint-3", "optimizer.safetensors", save(tensors))
    monkeypatch.setattr(Trainer, "train", lambda self: pytest.fail("training started"))
    assert main(["train", "--resume", str(run / "checkpoint-3"), "--set", "epochs=4"]) == 2
    assert re.fullmatch(rf"rlcm-fast: error: checkpoint {re.escape(repr(str(run / 'checkpoint-3')))} does not match "
                        r"this optimizer: its exp_avg of parameter \d+ is \[3\], the parameter \[\d+(, \d+)*\]",
                        stderr_lines(capsys, "rlcm-fast: error")[0])


def test_metrics_lines_that_are_not_records_are_dropped_on_resume(run):
    metrics = run / "metrics.jsonl"
    kept = metrics.read_bytes()
    metrics.write_bytes(kept + b'[1, 2]\n{"kind": "step"}\n\xff\xfe not text\n' + b"[" * 100_000 + b"\n"
                        + b'{"kind": "epoch", "epoch": 1, "step": 0}\n')  # without the rewards the plot draws
    assert main(["train", "--resume", str(run), "--set", "epochs=3"]) == 0  # nothing to train: the file is kept
    assert main(["train", "--resume", str(run), "--set", "epochs=4"]) == 0
    lines = metrics.read_text().splitlines()
    assert metrics.read_bytes().startswith(kept) and all(json.loads(line)["kind"] in ("step", "epoch") for line in lines)
    assert [json.loads(line)["epoch"] for line in lines if json.loads(line)["kind"] == "epoch"] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["reward.png", "samples", "checkpoint-1"])
def test_a_run_folder_holding_a_symbolic_link_is_refused_before_anything_is_written(run, tmp_path, capsys, name):
    """A run folder from elsewhere whose reward.png linked to a user's file had the resumed run write a PNG over it
    (security audit); a linked checkpoint made pruning fail with a traceback."""
    victim = tmp_path / "victim"
    victim.mkdir() if name != "reward.png" else victim.write_text("important")
    shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    (run / name).symlink_to(victim)
    assert main(["train", "--resume", "auto", "--output-dir", str(run), "--set", "epochs=4"]) == 2
    assert stderr_lines(capsys, "rlcm-fast: error") == [
        f"rlcm-fast: error: output dir {str(run)!r} holds a symbolic link, {name!r} -> {str(victim)!r}; a run writes "
        "its files in place and would write through it: put the file or folder itself there"]
    assert (victim.read_text() == "important") if name == "reward.png" else list(victim.iterdir()) == []


def test_a_checkpoint_file_that_is_a_symbolic_link_is_damage(run, tmp_path):
    """Its sha256 is its target's: a checkpoint from elsewhere could have a resume read any file as, say, its
    prompts.txt, with a manifest made to match."""
    checkpoint = run / "checkpoint-3"
    shutil.move(checkpoint / "rng_state.safetensors", tmp_path / "rng_state.safetensors")
    (checkpoint / "rng_state.safetensors").symlink_to(tmp_path / "rng_state.safetensors")
    with pytest.raises(ckpt_module.CheckpointError) as error:
        ckpt_module.verify_checkpoint(checkpoint)
    assert str(error.value) == f"checkpoint '{checkpoint}' is damaged: rng_state.safetensors is a symbolic link"


def test_a_linked_sample_grid_is_replaced_not_written_through(run, tmp_path):
    """Below the run folder's top level the pictures are written beside their name and renamed over it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("important")
    (run / "samples" / "epoch-0004.png").symlink_to(victim)
    assert main(["train", "--resume", str(run), "--set", "epochs=4"]) == 0
    assert victim.read_text() == "important"
    grid = run / "samples" / "epoch-0004.png"
    assert not grid.is_symlink() and Image.open(grid).format == "PNG"


def test_sample_of_a_lora_file_with_a_garbled_header_is_one_line(run, capsys):
    rewrite(run / "checkpoint-3", "pytorch_lora_weights.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    assert main(["sample", "--device", "cpu", "--lora", str(run / "checkpoint-3"), "--prompt", "cat",
                 "--output-dir", str(run / "out")]) == 2
    assert stderr_lines(capsys, "rlcm-fast: error")[0].startswith(
        f"rlcm-fast: error: --lora {str(run / 'checkpoint-3')!r} cannot be loaded into model 'tiny': ")


@pytest.mark.parametrize("case", ["negative epoch", "update without its epoch"])
def test_resume_of_the_run_folder_skips_a_malformed_training_state(run, capsys, case):
    edit, problem = STATE_EDITS[case]
    edit_state(run / "checkpoint-3", edit)
    assert resume_run_folder(run, capsys) == [
        f"rlcm-fast: warning: checkpoint {str(run / 'checkpoint-3')!r} is damaged: training_state.json {problem}; "
        "taking an older checkpoint"]


@pytest.mark.parametrize("rows, problem", [
    (2, "has no 'rewards'"),
    (3, "holds states of shape (3, 5, 4, 4, 4) for 2 prompts"),
    (1, "holds states of shape (1, 5, 4, 4, 4) for 2 prompts"),
], ids=["a tensor missing", "a row too many", "a row too few"])
def test_a_mid_epoch_checkpoint_whose_samples_do_not_fit_its_state_is_one_line(run, capsys, rows, problem):
    checkpoint = run / "checkpoint-3"
    prompts = ["cat", "dog"]
    tensors = {"states": torch.zeros(rows, 5, 4, 4, 4), "log_probs": torch.zeros(2, 4), "advantages": torch.zeros(2),
               "grid_images": torch.zeros(2, 3, 32, 32)}
    if rows != 2:
        tensors["rewards"] = torch.zeros(2)
    save_file(tensors, str(checkpoint / "epoch_samples.safetensors"))
    rewrite(checkpoint, "epoch_samples.safetensors", (checkpoint / "epoch_samples.safetensors").read_bytes())
    stats = {"reward_mean": 0.0, "reward_std": 1.0, "samples": 2, "sample_seconds": 1.0}
    edit_state(checkpoint, lambda state: state.update(
        update=1, stopped_epoch={"updates_done": 1, "processes": 1, "prompts": prompts, "stats": stats}))
    verify_checkpoint(checkpoint)  # the state's shape is right: only its samples file does not fit it
    assert main(["train", "--resume", str(checkpoint), "--set", "epochs=4"]) == 2
    assert stderr_lines(capsys, "rlcm-fast: error") == [
        f"rlcm-fast: error: checkpoint {str(checkpoint)!r} is damaged: epoch_samples.safetensors {problem}"]


# -- checkpoints another rlcm-fast wrote ------------------------------------------------------------------------

def test_a_checkpoint_records_its_state_format_and_its_presets_weights(finished):
    state = json.loads((finished / "checkpoint-3" / "training_state.json").read_text())
    assert state["state_format"] == STATE_FORMAT and state["rlcm_fast_version"] == rlcm_fast.__version__
    assert state["base_weights"] == preset_weights_id("tiny") and state["base_weights"].startswith("tiny-v2-")


REMEDY = "resume or sample it with the rlcm-fast that wrote it, or start a new run"
VERSION_EDITS = {
    "earlier": (drop("state_format"), "was written by an earlier rlcm-fast, which recorded no state_format, and "
                "this one might continue it otherwise (another tiny preset, another minibatch plan): " + REMEDY),
    "newer": (lambda state: state.update(state_format=STATE_FORMAT + 1, rlcm_fast_version="9.0"),
              f"was written by a newer rlcm-fast (state_format {STATE_FORMAT + 1}, version '9.0'; this one reads "
              f"{STATE_FORMAT}): upgrade rlcm-fast"),
    "other preset weights": (put("base_weights", "tiny-v1-0123456789ab"),
                             f"was trained on 'tiny-v1-0123456789ab', and this rlcm-fast's 'tiny' is "
                             f"{preset_weights_id('tiny')!r}: its LoRA and samples belong to other base weights; "
                             + REMEDY),
}


@pytest.mark.parametrize("case", sorted(VERSION_EDITS))
def test_a_checkpoint_of_another_rlcm_fast_is_refused_not_reinterpreted(run, tmp_path, capsys, case):
    """Resumed or sampled, the older one's LoRA went onto other base weights, or its stopped epoch went on
    under another minibatch plan, without a word. Not skipped as damage either: the run's older checkpoints
    come from the same rlcm-fast."""
    edit, problem = VERSION_EDITS[case]
    edit_state(run / "checkpoint-3", edit)
    reason = f"checkpoint {str(run / 'checkpoint-3')!r} {problem}"
    for argv in (["train", "--resume", str(run), "--set", "epochs=4"],
                 ["train", "--resume", "auto", "--output-dir", str(run), "--set", "epochs=4"],
                 ["sample", "--device", "cpu", "--lora", str(run), "--prompt", "cat", "--output-dir", str(tmp_path)]):
        assert main(argv) == 2
        assert stderr_lines(capsys, "rlcm-fast: error") == [f"rlcm-fast: error: {reason}"], argv
    with pytest.raises(IncompatibleCheckpointError, match="rlcm-fast"):
        find_resumable(run)


def test_a_checkpoint_from_before_manifests_is_named_as_an_earlier_versions(run):
    edit_state(run / "checkpoint-3", drop("state_format"))
    (run / "checkpoint-3" / "manifest.json").unlink()
    with pytest.raises(IncompatibleCheckpointError, match="was written by an earlier rlcm-fast"):
        verify_checkpoint(run / "checkpoint-3")
    (run / "checkpoint-2" / "manifest.json").unlink()  # a checkpoint of this version without one is incomplete
    with pytest.raises(CheckpointError, match="is incomplete: it has no manifest.json"):
        verify_checkpoint(run / "checkpoint-2")


# -- A1: a full disk --------------------------------------------------------------------------------------------

def at_checkpoint_2(run: Path) -> Path:
    """The run as a kill after epoch 2's checkpoint would leave it."""
    shutil.rmtree(run / "checkpoint-3")
    (run / "latest").write_text("checkpoint-2\n")
    return run


def safetensors_disk_full(monkeypatch):
    """save_file as safetensors fails on a full disk: a partly written file, then its own SafetensorError."""
    original = ckpt_module.save_file

    def save_file(tensors, path, *args, **kwargs):
        if ".checkpoint-3." in path and path.endswith(ckpt_module.RNG_FILE):
            Path(path).write_bytes(b"\0" * 100)
            # What safetensors 0.8 raised on a full tmpfs (os error 28 is ENOSPC).
            raise SafetensorError(f"Error while serializing: I/O error: {DISK_FULL} (os error {errno.ENOSPC})")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", save_file)


def latest_disk_full(monkeypatch):
    def write_latest(run_dir, name):
        (run_dir / f".latest.tmp-{os.getpid()}").write_text("chec")
        raise OSError(errno.ENOSPC, DISK_FULL)

    monkeypatch.setattr(ckpt_module, "_write_latest", write_latest)


@pytest.mark.parametrize("failing", ["safetensors", "latest pointer"])
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_the_previous_checkpoint(run, monkeypatch, capsys,
                                                                                        failing):
    {"safetensors": safetensors_disk_full, "latest pointer": latest_disk_full}[failing](monkeypatch)
    run = at_checkpoint_2(run)
    assert main(["train", "--resume", "auto", "--output-dir", str(run)]) == 1
    assert stderr_lines(capsys, "rlcm-fast: error") == [
        f"rlcm-fast: error: could not write checkpoint-3 in {str(run)!r}: {DISK_FULL}; the newest intact "
        "checkpoint is checkpoint-2"]
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name or "latest" in p.name) == [
        "checkpoint-1", "checkpoint-2", "latest"]  # no temporary folder or pointer left
    assert (run / "latest").read_text() == "checkpoint-2\n" and find_resumable(run) == (run / "checkpoint-2", [])


def test_a_full_disk_rewriting_a_damaged_checkpoint_names_the_older_intact_one(run, monkeypatch, capsys):
    """A resume passes over a damaged checkpoint-3 and writes it anew; when that fails, the damaged folder is still
    there, and the message must not call it intact."""
    optimizer = run / "checkpoint-3" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    safetensors_disk_full(monkeypatch)
    assert main(["train", "--resume", "auto", "--output-dir", str(run)]) == 1
    assert stderr_lines(capsys, "rlcm-fast: error") == [
        f"rlcm-fast: error: could not write checkpoint-3 in {str(run)!r}: {DISK_FULL}; the newest intact "
        "checkpoint is checkpoint-2"]


@pytest.mark.parametrize("checkpoint_too", [False, True])
def test_a_full_disk_while_writing_the_sample_grid_and_reward_plot_is_a_warning(run, monkeypatch, capsys,
                                                                               checkpoint_too):
    original = Image.Image.save

    def save(self, fp, *args, **kwargs):  # files only: the JPEG reward encodes into memory with it
        if not isinstance(fp, (str, Path)):
            return original(self, fp, *args, **kwargs)
        Path(fp).write_bytes(b"\x89PNG")  # partly written
        raise OSError(errno.ENOSPC, DISK_FULL)

    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda self, fp, *a, **k: save(None, fp))
    if checkpoint_too:
        safetensors_disk_full(monkeypatch)
    run = at_checkpoint_2(run)
    grid, plot = run / "samples" / "epoch-0003.png", run / "reward.png"
    grid.unlink()
    plot.unlink()
    assert main(["train", "--resume", "auto", "--output-dir", str(run)]) == (1 if checkpoint_too else 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("rlcm-fast: warning")] == [
        f"rlcm-fast: warning: could not write the sample grid {str(grid)!r}: {DISK_FULL}; training goes on",
        f"rlcm-fast: warning: could not write the reward plot {str(plot)!r}: {DISK_FULL}; training goes on"]
    assert not grid.exists() and not plot.exists()  # the partly written files are removed
    errors = [line for line in err.splitlines() if line.startswith("rlcm-fast: error")]
    if checkpoint_too:  # the checkpoint after them reports the full disk, as a full disk while checkpointing
        assert errors == [f"rlcm-fast: error: could not write checkpoint-3 in {str(run)!r}: {DISK_FULL}; "
                          "the newest intact checkpoint is checkpoint-2"]
        assert find_resumable(run) == (run / "checkpoint-2", [])
    else:
        assert errors == [] and find_resumable(run) == (run / "checkpoint-3", [])


def test_a_full_disk_while_writing_the_metrics_is_one_line(run, monkeypatch, capsys):
    """Found on a full tmpfs: resuming rewrites metrics.jsonl (dropping what was logged after the checkpoint),
    and that write was an OSError traceback that left metrics.tmp behind."""
    original = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == "metrics.tmp":
            original(self, data[:10], *args, **kwargs)  # partly written
            raise OSError(errno.ENOSPC, DISK_FULL)
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    run = at_checkpoint_2(run)  # epoch 3's metrics are dropped on resume
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", "auto", "--output-dir", str(run)]) == 1
    assert stderr_lines(capsys, "rlcm-fast: error") == [
        f"rlcm-fast: error: could not write metrics.jsonl in {str(run)!r}: {DISK_FULL}; the checkpoints written "
        "before are intact"]
    assert (run / "metrics.jsonl").read_text() == before and not (run / "metrics.tmp").exists()
    assert find_resumable(run) == (run / "checkpoint-2", [])


def test_a_full_disk_while_writing_config_yaml_is_one_line_and_leaves_it_whole(run, monkeypatch, capsys):
    """It was an OSError traceback, and a config.yaml cut short by the full disk."""
    before = (run / "config.yaml").read_text()
    original_write = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        if path.name.startswith(".config.yaml.tmp-"):
            original_write(path, text[:10], *args, **kwargs)  # what fitted
            raise OSError(errno.ENOSPC, DISK_FULL)
        return original_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(["train", "--resume", str(run), "--set", "epochs=4"]) == 1
    assert stderr_lines(capsys, "rlcm-fast: error") == [
        f"rlcm-fast: error: could not write {str(run / 'config.yaml')!r}: {DISK_FULL}; the checkpoints written "
        "before are intact"]
    assert (run / "config.yaml").read_text() == before and not list(run.glob(".config.yaml.tmp-*"))


def test_cuda_generator_states_are_restored_by_device_index(monkeypatch):
    """Sorted as strings, torch_cuda_10 came before torch_cuda_2: with 11 or more GPUs each device would have
    resumed another's random stream."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    rng = {"torch_cpu": torch.get_rng_state(), **{f"torch_cuda_{i}": torch.tensor([i]) for i in range(12)}}
    ckpt_module.restore_rng_states(rng)
    assert [int(state) for state in restored] == list(range(12))


def test_resume_auto_takes_the_checkpoint_latest_names_over_a_newer_intact_one(run):
    """`latest` names the history the run continues; a newer intact folder (say, of an abandoned branch) is not."""
    (run / "latest").write_text("checkpoint-2\n")
    assert find_resumable(run) == (run / "checkpoint-2", [])


# -- found by mutation testing ----------------------------------------------------------------------------------

def test_checkpoint_10_is_newer_than_checkpoint_9_for_resume_and_pruning(run):
    """Checkpoints order by number: sorted as strings, checkpoint-10 came before checkpoint-9 (resume, prune)."""
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-10")
    (run / "latest").unlink()
    assert find_resumable(run) == (run / "checkpoint-10", [])
    for epoch in (8, 9, 11):
        shutil.copytree(run / "checkpoint-3", run / f"checkpoint-{epoch}")
    ckpt_module.prune_checkpoints(run, keep=2, current=run / "checkpoint-11")
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-11"]


def test_a_checkpoint_is_synced_file_by_file_before_latest_names_it(run, monkeypatch):
    """After a power cut `latest` must not name a checkpoint whose files, manifest or folder entry were not on disk."""
    synced = []
    original = ckpt_module._fsync
    monkeypatch.setattr(ckpt_module, "_fsync", lambda path: synced.append(path) or original(path))
    run = at_checkpoint_2(run)
    assert main(["train", "--resume", "auto", "--output-dir", str(run)]) == 0
    tmp = run / f".checkpoint-3.tmp-{os.getpid()}"
    files = sorted(p.name for p in (run / "checkpoint-3").iterdir() if p.name != "manifest.json")
    assert synced == [*(tmp / name for name in files), tmp / "manifest.json", tmp, run,
                      run / f".latest.tmp-{os.getpid()}", run]
    assert (run / "latest").read_text() == "checkpoint-3\n"


def stopped_at_update_1(processes: int, prompts: list, updates_done=1):
    stats = {"reward_mean": 0.0, "reward_std": 1.0, "sample_seconds": 1.0}
    return lambda state: state.update(update=1, stopped_epoch={"updates_done": updates_done, "processes": processes,
                                                               "prompts": prompts, "stats": stats})


SUBTLER_STATE_EDITS = {
    "epoch true": (put("epoch", True), "has epoch=True, expected an integer >= 0"),
    "negative update": (put("update", -1), "has update=-1, expected an integer >= 0"),
    "updates_done true": (stopped_at_update_1(1, ["cat"], updates_done=True),
                          "has stopped_epoch.updates_done=True, expected 1 (its update)"),
    "prompts not a multiple of processes": (
        stopped_at_update_1(2, ["cat", "dog", "owl"]),
        "has stopped_epoch.prompts=['cat', 'dog', 'owl'], expected a list of prompts, as many for each of its 2 "
        "process(es)"),
    "base_lrs for two groups": (
        lambda state: state["lr_scheduler"].update(base_lrs=[0.003, 0.003]),
        "expected an LR schedule's state for 1 parameter group(s)"),
}


@pytest.mark.parametrize("case", sorted(SUBTLER_STATE_EDITS))
def test_a_training_state_subtly_of_the_wrong_shape_is_skipped_as_damage(run, case):
    """JSON's true is no count, stopped prompts split evenly over processes, a rate per group: else resumes go wrong."""
    edit, problem = SUBTLER_STATE_EDITS[case]
    edit_state(run / "checkpoint-3", edit)
    found, skipped = find_resumable(run)
    assert found == run / "checkpoint-2" and len(skipped) == 1, skipped
    assert skipped[0].startswith(f"checkpoint {str(run / 'checkpoint-3')!r} is damaged: training_state.json has ")
    assert skipped[0].endswith(problem)
