"""Checkpoints: LoRA weights (diffusers format), optimizer, LR schedule, stat tracker, RNG and epoch.

A checkpoint is a folder holding only safetensors and JSON, so loading never unpickles anything:
`checkpoint-<E>` after E epochs, or `checkpoint-<E>-<U>` for a run stopped U optimizer updates into
epoch E+1 (it then also holds that epoch's samples, so a resume continues at update U+1 exactly).

Surviving a kill at any moment: files are written into a temporary folder with a manifest (size and
sha256 of every file) written last, fsynced, and the folder renamed into place; then the `latest`
pointer file is replaced atomically. Loading checks the manifest, so a damaged or truncated file is a
clear CheckpointError, and `find_resumable` skips such a checkpoint for the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .checkpoint_checks import STATE_FORMAT, compatibility_problem, is_count, state_problem
from .faults import shown
from .lora import LORA_FILE, load_lora_into, save_lora
from .run_logging import PICTURE_TMP
from .tiny_presets import preset_weights_id

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)(?:-(\d+))?$")
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
MANIFEST_FILE = "manifest.json"
# A run's prompts files (config key -> its copy in a checkpoint): a resume reads the copy, not the path it was given.
PROMPT_COPIES = {"prompts": "prompts.txt", "eval_prompts": "eval_prompts.txt"}
LATEST_FILE = "latest"
# An optimizer's settings that its config gives (learning_rate, adam_*; initial_lr is the LR schedule's base),
# not its checkpoint.
CONFIGURED_SETTINGS = ("lr", "initial_lr", "betas", "eps", "weight_decay")
REQUIRED_FILES = (STATE_FILE, OPTIMIZER_FILE, RNG_FILE, LORA_FILE)  # in every checkpoint's manifest


class CheckpointError(ValueError):
    """An unreadable or incompatible checkpoint; one line naming it."""


class IncompatibleCheckpointError(CheckpointError):
    """An intact checkpoint that this rlcm-fast would read otherwise than the one that wrote it did."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); the checkpoints written before are intact."""


def checkpoint_name(epoch: int, update: int = 0) -> str:
    return f"checkpoint-{epoch}-{update}" if update else f"checkpoint-{epoch}"


def checkpoint_key(path: Path) -> tuple[int, int]:
    """(epochs completed, updates into the next epoch): checkpoints of one history sort by it."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)), int(match.group(2) or 0)


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


def _optimizer_shape_problem(optimizer) -> str | None:
    """Why the loaded per-parameter state (AdamW's moments) does not fit the parameters' shapes, or None."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                return f"its {name} of parameter {index} is {list(value.shape)}, the parameter {list(param.shape)}"
    return None


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    """Sizes and hashes of every file, written (and synced) after all of them."""
    files = {}
    for path in sorted(folder.iterdir()):
        _fsync(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    _fsync(manifest)
    _fsync(folder)


def verify_checkpoint(checkpoint: Path) -> None:
    """Every file the manifest lists is there with its size and sha256, or a CheckpointError naming it."""
    where = f"checkpoint {str(checkpoint)!r}"
    try:
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        try:  # a checkpoint from before manifests were written is named as an earlier version's, not as damaged
            read_training_state(checkpoint)
        except IncompatibleCheckpointError:
            raise
        except CheckpointError:
            pass
        raise CheckpointError(f"{where} is incomplete: it has no {MANIFEST_FILE}") from None
    # ValueError: not UTF-8 (UnicodeDecodeError) or not JSON; RecursionError: JSON nested thousands deep
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is damaged: {MANIFEST_FILE} is unreadable ({exc})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{where} is damaged: {MANIFEST_FILE} is malformed ({problem})")
    for name, expected in manifest["files"].items():
        path = checkpoint / name
        if path.is_symlink():  # its sha256 would be its target's: a folder from elsewhere could point anywhere
            raise CheckpointError(f"{where} is damaged: {name} is a symbolic link")
        if not path.is_file():
            raise CheckpointError(f"{where} is damaged: {name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{where} is damaged: {name} has {size} bytes, the manifest says {expected['bytes']}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{where} is damaged: {name} does not match its sha256 in the manifest")
    read_training_state(checkpoint)  # its shape: a state the trainer cannot use is damage too


def prompts_copy(checkpoint: Path, key: str = "prompts") -> Path | None:
    """The checkpoint's copy of the prompts file its run's config `key` names (PROMPT_COPIES), if its manifest lists
    one (verify_checkpoint checked it)."""
    try:
        listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    name = PROMPT_COPIES[key]
    return checkpoint / name if isinstance(listed, dict) and name in listed else None


def _manifest_problem(manifest) -> str | None:
    """What is wrong with a parsed manifest (`_write_manifest`'s shape: format 1, files: name -> {bytes,
    sha256}, naming at least every file a checkpoint has), or None."""
    if not isinstance(manifest, dict):
        return f"it holds {shown(manifest)}, not an object"
    if manifest.get("format") != 1:
        return f"format is {shown(manifest.get('format'))}, expected 1"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"files is {shown(files)}, expected an object of file name: {{bytes, sha256}}"
    for name, entry in files.items():
        if name in ("", ".", "..", MANIFEST_FILE) or any(c in name for c in "/\\\0"):
            return f"it lists {name!r}, not a file of the checkpoint"
        if not (isinstance(entry, dict) and is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            return f"the entry of {name} is {shown(entry)}, expected {{bytes: a size, sha256: 64 hex digits}}"
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        return f"it does not list {', '.join(missing)}"
    return None


def _write_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, run_dir / LATEST_FILE)
    _fsync(run_dir)


def _discard(folder: Path) -> None:
    """Delete a folder so that a kill midway leaves no half checkpoint under a checkpoint's name."""
    trash = folder.parent / f".{folder.name}.trash-{os.getpid()}"
    folder.rename(trash)
    shutil.rmtree(trash)


def remove_leftovers(run_dir: Path) -> None:
    """Delete what a writer killed midway left in the run folder: a checkpoint being written, replaced or
    deleted (.checkpoint-*), and `latest` or config.yaml being replaced. Whatever the PID in their names: a
    container's restarted process often has the PID of the one that was killed. Only the main process
    of the one train that holds the folder's lock (run_lock.py) writes, and never while this runs."""
    for leftover in run_dir.glob(".checkpoint-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    # `latest`'s (_write_latest), config.yaml's (run_logging.write_run_config) and the pictures' replacements
    for leftover in (*run_dir.glob(f".{LATEST_FILE}.tmp-*"), *run_dir.glob(".config.yaml.tmp-*"),
                     *run_dir.glob(f".*.png{PICTURE_TMP}*"), *run_dir.glob(f"samples/.*.png{PICTURE_TMP}*")):
        leftover.unlink(missing_ok=True)


def prune_checkpoints(run_dir: Path, keep: int, current: Path) -> None:
    """Keep the `keep` newest checkpoints up to `current` (0: all), and drop leftovers of killed writers.

    Checkpoints after `current` (from before a resume from an earlier one) are left alone. A stopped epoch's
    checkpoint (checkpoint-N-U) older than an epoch's `current` goes first: the run went on past it, so it
    must not outlive the epoch checkpoints pruned after it.
    """
    remove_leftovers(run_dir)
    if keep <= 0:
        return
    older = [p for p in list_checkpoints(run_dir) if checkpoint_key(p) < checkpoint_key(current)]
    if checkpoint_key(current)[1] == 0:
        passed = [p for p in older if checkpoint_key(p)[1] > 0]
        for path in passed:
            _discard(path)
        older = [p for p in older if p not in passed]
    for path in older[: max(0, len(older) - (keep - 1))]:
        _discard(path)


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    unet,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    stat_tracker,
    training_state: dict,
    update: int = 0,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    keep: int = 0,
    prompt_files: dict[str, tuple[str, ...]] | None = None,
) -> Path:
    """Write `run_dir/checkpoint-<epoch>[-<update>]` atomically, point `latest` at it, prune; return its path.

    `extra_tensors` maps file names to tensors to store alongside (a stopped epoch's samples); `prompt_files` maps
    config keys of PROMPT_COPIES to the prompts the run read from that file, stored one per line (as
    prompts.load_prompt_set reads them back).
    """
    name = checkpoint_name(epoch, update)
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_lora(unet, tmp)
        optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE))
        save_file(_rng_tensors(), str(tmp / RNG_FILE))
        for file_name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / file_name))
        for key, prompts in (prompt_files or {}).items():  # utf-8-sig: reading drops this BOM, not the first prompt's
            (tmp / PROMPT_COPIES[key]).write_text("".join(f"{prompt}\n" for prompt in prompts), encoding="utf-8-sig")
        state = dict(training_state)
        config = state.get("config") or {}
        state.update(
            state_format=STATE_FORMAT,
            rlcm_fast_version=__version__,  # for the reader; STATE_FORMAT is what is checked
            base_weights=preset_weights_id(config.get("model"), config.get("method", "rlcm")),
            epoch=epoch,
            update=update,
            optimizer=optimizer_meta,
            lr_scheduler=lr_scheduler.state_dict(),
            stat_tracker=stat_tracker.state_dict(),
        )
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _write_manifest(tmp)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, name, exc) from None
    if final.exists():  # re-running an epoch after a resume from an earlier checkpoint
        stale = run_dir / f".{name}.stale-{os.getpid()}"
        final.rename(stale)
        tmp.rename(final)
        shutil.rmtree(stale)
    else:
        tmp.rename(final)
    try:
        _fsync(run_dir)
        _write_latest(run_dir, name)
    except OSError as exc:  # `latest` still names the previous checkpoint: drop this one, as if never written
        try:
            (run_dir / f".{LATEST_FILE}.tmp-{os.getpid()}").unlink(missing_ok=True)
            _discard(final)
        except OSError:
            pass
        raise _write_error(run_dir, name, exc) from None
    prune_checkpoints(run_dir, keep, final)
    return final


def _write_error(run_dir: Path, name: str, exc: Exception) -> CheckpointWriteError:
    """One line: which checkpoint could not be written, why (a full disk: "No space left on device", from an
    OSError or from safetensors' "Error while serializing: I/O error: No space left on device (os error 28)"),
    and the newest intact checkpoint (verified: the folder of the one being rewritten may be a damaged one that a
    resume passed over)."""
    reason = getattr(exc, "strerror", None) or str(exc)
    match = re.search(r"I/O error: (.*?) \(os error \d+\)", reason)
    reason = match.group(1) if match else reason
    kept = ""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError:
            continue
        kept = f"; the newest intact checkpoint is {checkpoint.name}"
        break
    return CheckpointWriteError(f"could not write {name} in {str(run_dir)!r}: {reason}{kept}")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run (complete or not: see verify_checkpoint), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_key)


def find_resumable(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint `--resume auto` continues from: the one `latest` names if it is intact, else the
    newest intact one; None if there is none. Also returns why each newer candidate was skipped, after
    why the `latest` pointer was ignored if it is damaged (not a checkpoint's name)."""
    found, pointer_problem, skipped = _scan(run_dir)
    return found, ([pointer_problem] if pointer_problem else []) + skipped


def _latest_problem(run_dir: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint folder `latest` names, None) or (None, why the pointer is damaged). A missing pointer,
    or one naming a checkpoint that is not there (deleted by hand), is no damage: (None, None)."""
    pointer = run_dir / LATEST_FILE
    try:
        text = pointer.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        why = f"it is unreadable ({exc.strerror or exc})"
    else:
        try:
            name = text.decode("utf-8").strip()
        except UnicodeDecodeError:
            why = "it is not text"
        else:
            if CHECKPOINT_PATTERN.match(name):
                return run_dir / name, None
            why = f"it holds {shown(name)}, not a checkpoint's name"
    return None, f"the latest pointer {str(pointer)!r} is damaged: {why}; ignoring it"


def _scan(run_dir: Path) -> tuple[Path | None, str | None, list[str]]:
    """find_resumable's checkpoint, why the pointer was ignored (or None), and why each newer checkpoint was
    skipped."""
    candidates = list(reversed(list_checkpoints(run_dir)))
    pointed, pointer_problem = _latest_problem(run_dir)
    if pointed in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    skipped = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            return candidate, pointer_problem, skipped
        except IncompatibleCheckpointError:
            raise  # not damage: an older checkpoint of the run would be of the same other version
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, pointer_problem, skipped


def resolve_checkpoint(path: str | Path, what: str = "resume path", warn: Callable[[str], None] | None = None) -> Path:
    """A checkpoint folder, or a run folder (the checkpoint `find_resumable` picks); checked intact. `what`
    names the path in the error (e.g. "--lora"); `warn`, if given, is told why each newer checkpoint of a
    run folder was passed over."""
    path = Path(path)
    if not path.exists():
        # e.g. a checkpoint `latest` named a moment ago, which the run's train then pruned
        pruned = (" (a train running in its run folder keeps only the newest keep_checkpoints, and may have removed "
                  "it: name the run folder to take its newest)") if CHECKPOINT_PATTERN.match(path.name) else ""
        raise CheckpointError(f"{what} {str(path)!r} does not exist{pruned}")
    # A run folder may be named like a checkpoint (--output-dir checkpoint-7); no checkpoint holds checkpoints.
    held = list_checkpoints(path)
    if path.is_dir() and CHECKPOINT_PATTERN.match(path.name) and not held:
        verify_checkpoint(path)
        return path
    if not held:
        raise CheckpointError(
            f"{what} {str(path)!r} is neither a checkpoint-N folder nor a run folder holding one"
        )
    found, pointer_problem, skipped = _scan(path)
    if found is None:
        raise CheckpointError(f"run folder {str(path)!r} holds no intact checkpoint ({skipped[0]})")
    for reason in ([pointer_problem] if pointer_problem else []) + skipped if warn is not None else ():
        warn(reason)
    return found


def load_tensors(checkpoint: Path, file_name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(checkpoint / file_name))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is unreadable ({file_name}: {exc})") from None


def read_training_state(checkpoint: Path) -> dict:
    """The checkpoint's training state, checked to have the shape `save_checkpoint` writes (else the
    checkpoint is damaged: a CheckpointError "checkpoint '...' is damaged: training_state.json ...")."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # as the manifest's
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is unreadable ({STATE_FILE}: {exc})") from None
    if problem := compatibility_problem(state):
        raise IncompatibleCheckpointError(f"checkpoint {str(checkpoint)!r} {problem}")
    problem = state_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is damaged: {STATE_FILE} {problem}")
    return state


def saved_config(checkpoint: Path) -> dict:
    """The resolved config a checkpoint was trained with."""
    return read_training_state(checkpoint)["config"]


def load_checkpoint(checkpoint: Path, unet, optimizer, lr_scheduler, stat_tracker) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the training state (epoch, global_step, ...)."""
    verify_checkpoint(checkpoint)
    state = read_training_state(checkpoint)
    optimizer_tensors = load_tensors(checkpoint, OPTIMIZER_FILE)
    rng = load_tensors(checkpoint, RNG_FILE)
    try:
        load_lora_into(unet, checkpoint)
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has unusable LoRA weights: {exc}") from None
    configured = [{key: group[key] for key in CONFIGURED_SETTINGS} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(_optimizer_state_from(optimizer_tensors, state["optimizer"]))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not match this optimizer: {exc}") from None
    if problem := _optimizer_shape_problem(optimizer):  # torch takes any shape here and fails at the first step
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not match this optimizer: {problem}")
    # The moments and step counts come from the checkpoint, the settings from this run's config: a resume may
    # change learning_rate and adam_* (the optimizer's state dict holds the old ones, and would keep them). The
    # schedule (a LambdaLR: policy_model.py) continues at its step from the configured base rates.
    schedule = state["lr_scheduler"]
    base_lrs = [settings["initial_lr"] for settings in configured]
    rates = [base * factor(schedule["last_epoch"]) for base, factor in zip(base_lrs, lr_scheduler.lr_lambdas)]
    for group, settings, rate in zip(optimizer.param_groups, configured, rates):
        group.update(settings, lr=rate)
    lr_scheduler.load_state_dict({**schedule, "base_lrs": base_lrs, "_last_lr": rates})
    stat_tracker.load_state_dict(state["stat_tracker"])
    try:
        restore_rng_states(rng)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is damaged: {RNG_FILE} holds no usable RNG state "
                              f"({type(exc).__name__}: {exc})") from None
    return state


def restore_rng_states(rng: dict[str, torch.Tensor]) -> None:
    """torch's CPU generator state, and each CUDA device's when the checkpoint holds one per visible device."""
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        # By device index: sorted as strings, torch_cuda_10 came before torch_cuda_2.
        cuda_keys = sorted((k for k in rng if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        if len(cuda_keys) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([rng[k] for k in cuda_keys])
