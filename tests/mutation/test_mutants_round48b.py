"""Mutation-testing round 48b (checkpoint, checkpoint_checks): a second round of hand-written mutants of those modules
was run against their tests (test_damaged_checkpoints, test_resume, test_faults, rounds 41, 42, 43b and 44b); each
test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast: no model is loaded or
trained; checkpoints are written from round 43b's one-layer stand-in."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import rlcm_fast.checkpoint as checkpoint
from rlcm_fast.checkpoint import (CheckpointError, find_resumable, list_checkpoints, load_checkpoint,
                                  resolve_checkpoint, verify_checkpoint)
from rlcm_fast.checkpoint_checks import state_problem, stopped_epoch_problem
from rlcm_fast.faults import shown
from test_mutants_round43b import stand_in_lora, stand_ins, valid_state, write  # noqa: F401 - a fixture


def rewrite(saved, name: str, data: bytes) -> None:
    """Replace a file of a checkpoint and its manifest entry: an edit that the manifest cannot catch."""
    (saved / name).write_bytes(data)
    manifest = json.loads((saved / checkpoint.MANIFEST_FILE).read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": checkpoint._sha256(saved / name)}
    (saved / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))


def malformed(saved, edit) -> str:
    """verify_checkpoint's one line for the checkpoint's manifest with its files edited by `edit`."""
    manifest = json.loads((saved / checkpoint.MANIFEST_FILE).read_text())
    edit(manifest["files"])
    (saved / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(saved)
    return str(error.value)

# -- checkpoint: the manifest ----------------------------------------------------------------------------------

def test_a_manifest_listing_itself_or_a_name_with_a_backslash_is_malformed(tmp_path, stand_in_lora):
    """Mutants: MANIFEST_FILE, and the backslash, dropped from the names a manifest may not list. A manifest naming
    itself (it cannot hold its own sha256) was reported as a file not matching its sha256, and "..\\\\x" (a path out
    of the checkpoint where a backslash separates folders) as a missing file: both are a malformed manifest."""
    saved = write(tmp_path, 1)
    where = f"checkpoint {str(saved)!r} is damaged: manifest.json is malformed "
    entry = json.loads((saved / checkpoint.MANIFEST_FILE).read_text())["files"][checkpoint.RNG_FILE]
    assert malformed(saved, lambda files: files.update({"manifest.json": entry})) == (
        where + "(it lists 'manifest.json', not a file of the checkpoint)")
    saved = write(tmp_path, 2)
    outside = "..\\checkpoint-1\\rng_state.safetensors"
    assert malformed(saved, lambda files: files.update({outside: entry})) == (
        f"checkpoint {str(saved)!r} is damaged: manifest.json is malformed (it lists {outside!r}, not a file of the "
        "checkpoint)")


@pytest.mark.parametrize("field, value", [("sha256", "abc123"), ("bytes", -1), ("bytes", True)])
def test_a_manifest_entry_without_a_size_or_a_full_sha256_is_malformed(tmp_path, stand_in_lora, field, value):
    """Mutants: the sha256 checked as any run of hex digits (not 64 lower-case ones), and the size as any int (not
    a count). An entry of "abc123", -1 bytes or `true` bytes is no entry `_write_manifest` writes: the manifest was
    edited or garbled, which the one line says, rather than blaming a file of the checkpoint for not matching it."""
    saved = write(tmp_path, 1)
    entry = {}

    def edit(files):
        files[checkpoint.RNG_FILE][field] = value
        entry.update(files[checkpoint.RNG_FILE])

    message = malformed(saved, edit)
    assert message == (f"checkpoint {str(saved)!r} is damaged: manifest.json is malformed (the entry of "
                       f"rng_state.safetensors is {shown(entry)}, expected {{bytes: a size, sha256: 64 hex digits}})")

# -- checkpoint: writing, listing, pruning ---------------------------------------------------------------------

def test_a_staging_folder_left_by_a_killed_writer_of_the_same_pid_is_replaced(tmp_path, stand_in_lora):
    """Mutant: the staging folder not cleared before it is made. A restarted container's process often has the PID
    of the one killed while writing checkpoint-1: its `.checkpoint-1.tmp-<pid>` then failed every later write of
    checkpoint-1 ("File exists") instead of being replaced, and its half-written files never reach the checkpoint."""
    staging = tmp_path / f".checkpoint-1.tmp-{os.getpid()}"
    staging.mkdir(parents=True)
    (staging / "half_written.safetensors").write_bytes(b"x" * 10)
    saved = write(tmp_path, 1)
    verify_checkpoint(saved)
    assert not (saved / "half_written.safetensors").exists() and not staging.exists()
    assert find_resumable(tmp_path) == (saved, [])

def test_a_file_named_like_a_checkpoint_is_neither_resumed_nor_pruned(tmp_path, stand_in_lora):
    """Mutant: list_checkpoints without `p.is_dir()`. A file named checkpoint-2 in the run folder (a user's notes, an
    archive) was then taken for the newest checkpoint: --resume auto warned it was damaged, and pruning tried to
    delete it as a folder (NotADirectoryError traceback after the new checkpoint was written)."""
    first = write(tmp_path, 1)
    (tmp_path / "checkpoint-2").write_text("notes")
    assert list_checkpoints(tmp_path) == [first]
    assert find_resumable(tmp_path) == (first, [])
    third = write(tmp_path, 3, keep=1)
    assert list_checkpoints(tmp_path) == [third] and (tmp_path / "checkpoint-2").read_text() == "notes"

def test_a_run_folder_without_a_latest_pointer_resumes_its_newest_checkpoint_without_a_warning(tmp_path, stand_in_lora):
    """Mutant: a missing `latest` read as an unreadable one (FileNotFoundError no longer told apart from OSError). A
    run folder whose pointer was deleted by hand, or copied without it, is no damage: a resume of it warned that
    the pointer was damaged and ignored, where it should just take the newest intact checkpoint."""
    write(tmp_path, 1)
    second = write(tmp_path, 2)
    (tmp_path / checkpoint.LATEST_FILE).unlink()
    assert find_resumable(tmp_path) == (second, [])
    warned = []
    assert resolve_checkpoint(tmp_path, warn=warned.append) == second and warned == []

# -- checkpoint: loading ---------------------------------------------------------------------------------------

def test_an_optimizer_file_with_a_garbled_header_is_one_line_naming_it(tmp_path, stand_in_lora):
    """Mutant: load_tensors catching OSError only. safetensors' own error for a file whose header is not one (an
    edited or foreign checkpoint whose manifest was recomputed) escaped as a SafetensorError traceback instead of
    the one line naming the checkpoint and the file."""
    saved = write(tmp_path, 1)
    rewrite(saved, checkpoint.OPTIMIZER_FILE, b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=rf"^checkpoint {str(saved)!r} is unreadable \(optimizer\.safetensors: "
                                              r"Error while deserializing header"):
        load_checkpoint(saved, *stand_ins(steps=0))

def test_optimizer_moments_without_their_step_count_are_one_line_naming_the_checkpoint(tmp_path, stand_in_lora):
    """Mutant: KeyError dropped from what loading the optimizer's state catches. AdamW's state without its per-
    parameter "step" (an edited or foreign optimizer file whose manifest was recomputed) makes torch raise KeyError
    'step': it escaped as a traceback instead of the one line saying the checkpoint does not match this optimizer."""
    saved = write(tmp_path, 1)
    tensors = load_file(str(saved / checkpoint.OPTIMIZER_FILE))
    assert sorted(tensors) == [f"state.{i}.{name}" for i in (0, 1) for name in ("exp_avg", "exp_avg_sq", "step")]
    save_file({k: v for k, v in tensors.items() if not k.endswith(".step")}, str(tmp_path / "optimizer.safetensors"))
    rewrite(saved, checkpoint.OPTIMIZER_FILE, (tmp_path / "optimizer.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(saved, *stand_ins(steps=0))
    assert str(error.value) == f"checkpoint {str(saved)!r} does not match this optimizer: 'step'"

def test_an_rng_state_of_another_dtype_is_damage_named_in_one_line(tmp_path, stand_in_lora):
    """Mutant: TypeError and ValueError dropped from what restoring the RNG state catches. A generator state stored
    as floats makes torch raise TypeError: it escaped as a traceback at the end of loading the checkpoint instead of the
    one line that names it as damaged."""
    saved = write(tmp_path, 1)
    save_file({"torch_cpu": torch.get_rng_state().float()}, str(tmp_path / "rng.safetensors"))
    rewrite(saved, checkpoint.RNG_FILE, (tmp_path / "rng.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(saved, *stand_ins(steps=0))
    assert str(error.value) == (f"checkpoint {str(saved)!r} is damaged: rng_state.safetensors holds no usable RNG "
                                "state (TypeError: RNG state must be a torch.ByteTensor)")

# -- checkpoint_checks -----------------------------------------------------------------------------------------

SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
STOPPED = {"updates_done": 1, "processes": 1, "prompts": ["a cat"],
           "stats": {"reward_mean": 1.0, "reward_std": 0.5, "sample_seconds": 2.0}}

def test_a_loss_scalers_state_without_its_growth_tracker_is_damage():
    """Mutant: `_growth_tracker` left out of the loss scaler's checked counts. GradScaler.load_state_dict reads it:
    a checkpoint without it passed as intact and the resume failed with a KeyError traceback once the scaler was
    restored, instead of being passed over (or refused in one line)."""
    assert torch.amp.GradScaler("cpu").state_dict() == SCALER
    assert state_problem(valid_state(grad_scaler=SCALER)) is None
    scaler = {k: v for k, v in SCALER.items() if k != "_growth_tracker"}
    assert state_problem(valid_state(grad_scaler=scaler)) == (
        f"has grad_scaler={shown(scaler)}, expected a loss scaler's state")


@pytest.mark.parametrize("case", ["last_epoch -1", "last_epoch true", "two lr_lambdas"])
def test_an_lr_schedules_step_and_its_functions_are_checked(case):
    """Mutants: the schedule's last_epoch not checked to be a count, and its lr_lambdas not checked to be one per
    parameter group. last_epoch -1 (or true) resumed the schedule at a step it never took; two lr_lambdas for
    one group are no schedule this optimizer wrote: both passed as intact instead of damage."""
    schedule = dict(valid_state()["lr_scheduler"])
    schedule.update({"last_epoch -1": {"last_epoch": -1}, "last_epoch true": {"last_epoch": True},
                     "two lr_lambdas": {"lr_lambdas": [None, None]}}[case])
    assert state_problem(valid_state(lr_scheduler=schedule)) == (
        f"has lr_scheduler={shown(schedule)}, expected an LR schedule's state for 1 parameter group(s)")


@pytest.mark.parametrize("weight_decay", [None, "0.01"])
def test_an_optimizer_group_without_a_numeric_weight_decay_is_damage(weight_decay):
    """Mutant: weight_decay left out of the group's numbers checked. A group whose weight_decay is null or a string
    is none that AdamW's state_dict writes: it passed as intact where every other setting of the group is checked."""
    group = {**valid_state()["optimizer"]["param_groups"][0], "weight_decay": weight_decay}
    assert state_problem(valid_state(optimizer={"param_groups": [group]})) == (
        f"has optimizer={shown({'param_groups': [group]})}, expected {{param_groups: [{{params, lr, betas, eps, "
        "weight_decay}, ...]}")


@pytest.mark.parametrize("prompts", [[], ["a cat", 7]])
def test_a_stopped_epoch_without_prompts_or_with_one_that_is_not_text_is_damage(prompts):
    """Mutants: a stopped epoch's prompts not checked to be non-empty, and not checked to be strings. The resumed
    epoch trains on these prompts' samples: an empty list (no sample to continue) or a number among them passed
    as intact, and failed later in the resumed epoch instead of being passed over for an older checkpoint."""
    assert stopped_epoch_problem(STOPPED, 1) is None
    assert stopped_epoch_problem({**STOPPED, "prompts": prompts}, 1) == (
        f"has stopped_epoch.prompts={shown(prompts)}, expected a list of prompts, as many for each of its 1 "
        "process(es)")
