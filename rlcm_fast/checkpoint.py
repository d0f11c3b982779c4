"""Checkpoints: LoRA weights (diffusers format), optimizer, LR schedule, stat tracker, RNG and epoch.

A checkpoint is a folder `checkpoint-<epoch>` (epochs completed) holding only safetensors and JSON,
so loading never unpickles anything. It is written under a temporary name and renamed into place, so
a crash mid-write leaves either the previous state or a complete new one, never half a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models import load_lora_into, save_lora

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


class CheckpointError(ValueError):
    """An unreadable or incompatible checkpoint; one line naming it."""


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (safetensors) and JSON-able hyperparameters."""
    state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in state["state"].items()
        for name, value in entry.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    unet,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    stat_tracker,
    training_state: dict,
) -> Path:
    """Write `run_dir/checkpoint-<epoch>` atomically and return its path."""
    final = run_dir / f"checkpoint-{epoch}"
    tmp = run_dir / f".checkpoint-{epoch}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(unet, tmp)
    optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
    save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE))
    save_file(_rng_tensors(), str(tmp / RNG_FILE))
    state = dict(training_state)
    state.update(
        epoch=epoch,
        optimizer=optimizer_meta,
        lr_scheduler=lr_scheduler.state_dict(),
        stat_tracker=stat_tracker.state_dict(),
    )
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # re-running an epoch after a resume from an earlier checkpoint
        stale = run_dir / f".checkpoint-{epoch}.stale-{os.getpid()}"
        final.rename(stale)
        tmp.rename(final)
        shutil.rmtree(stale)
    else:
        tmp.rename(final)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir() and CHECKPOINT_PATTERN.match(path.name):
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(
            f"resume path {str(path)!r} is neither a checkpoint-N folder nor a run folder holding one"
        )
    return checkpoints[-1]


def read_training_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is unreadable ({STATE_FILE}: {exc})") from None


def load_checkpoint(checkpoint: Path, unet, optimizer, lr_scheduler, stat_tracker) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the training state (epoch, global_step, ...)."""
    state = read_training_state(checkpoint)
    try:
        optimizer_tensors = load_file(str(checkpoint / OPTIMIZER_FILE))
        rng = load_file(str(checkpoint / RNG_FILE))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is unreadable: {exc}") from None
    try:
        load_lora_into(unet, checkpoint)
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has unusable LoRA weights: {exc}") from None
    try:
        optimizer.load_state_dict(_optimizer_state_from(optimizer_tensors, state["optimizer"]))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not match this optimizer: {exc}") from None
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    stat_tracker.load_state_dict(state["stat_tracker"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return state
