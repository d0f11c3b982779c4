"""What a checkpoint's training_state.json may hold (beside config.py's checks of its config): the shape that
checkpoint.save_checkpoint writes, and whether this rlcm-fast may read it at all (its state format, and the
weights of the tiny preset its LoRA was trained on). Every function returns what is wrong, or None."""

from __future__ import annotations

from typing import Callable

from .faults import is_finite_number, shown
from .stat_tracker import PerPromptStatTracker
from .tiny_presets import preset_weights_id

# What a checkpoint's state means beyond its files' shapes. Bump it with any change that would make this
# version continue an older checkpoint otherwise than the version that wrote it (e.g. another minibatch plan
# for a stopped epoch's remaining updates): a checkpoint of another format is refused, never reinterpreted.
# 1: the first recorded (2026-12-02); the checkpoints written before have none.
STATE_FORMAT = 1


def is_count(value) -> bool:
    """An integer >= 0 (JSON's true and false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def compatibility_problem(state) -> str | None:
    """Why this rlcm-fast must not read a training state written by another (another STATE_FORMAT, or a tiny
    preset's LoRA trained on other weights of that preset), or None."""
    if not isinstance(state, dict):
        return None  # damage, for state_problem to name
    remedy = "resume or sample it with the rlcm-fast that wrote it, or start a new run"
    written = state.get("state_format")
    if written is None:
        return (f"was written by an earlier rlcm-fast, which recorded no state_format, and this one might continue "
                f"it otherwise (another tiny preset, another minibatch plan): {remedy}")
    if not is_count(written) or written < STATE_FORMAT:
        return f"has state_format {shown(written)}; this rlcm-fast reads {STATE_FORMAT} only: {remedy}"
    if written > STATE_FORMAT:
        return (f"was written by a newer rlcm-fast (state_format {written}, version "
                f"{shown(state.get('rlcm_fast_version'))}; this one reads {STATE_FORMAT}): upgrade rlcm-fast")
    config = state.get("config")
    if isinstance(config, dict):
        model = config.get("model")
        expected = preset_weights_id(model, config.get("method", "rlcm"))
        if state.get("base_weights") != expected:
            return (f"was trained on {shown(state.get('base_weights'))}, and this rlcm-fast's {shown(model)} is "
                    f"{shown(expected)}: its LoRA and samples belong to other base weights; {remedy}")
    return None


def state_problem(state) -> str | None:
    """What is wrong with a training state's shape (what the trainer, the CLI and the run's logging read from
    it), or None. The config's values are checked where it is read (config_from_saved)."""
    if not isinstance(state, dict):
        return f"holds {shown(state)}, not an object"
    required = ("epoch", "global_step", "config", "optimizer", "lr_scheduler", "stat_tracker")
    missing = [key for key in required if key not in state]
    if missing:
        return f"has no {', '.join(repr(key) for key in missing)}"

    def bad(key: str, value, expected: str) -> str:
        return f"has {key}={shown(value)}, expected {expected}"

    for key in ("epoch", "global_step", "update"):
        if key in state and not is_count(state[key]):
            return bad(key, state[key], "an integer >= 0")
    if not isinstance(state["config"], dict):
        return bad("config", state["config"], "an object")
    nonfinite = state.get("nonfinite", {})
    if not isinstance(nonfinite, dict) or not all(is_count(nonfinite.get(k, 0)) for k in ("total", "in_a_row")):
        return bad("nonfinite", nonfinite, "{total, in_a_row: integers >= 0}")
    scaler = state.get("grad_scaler")
    if scaler not in (None, {}) and not (  # {}: a disabled loss scaler's
            isinstance(scaler, dict)
            and all(is_finite_number(scaler.get(k)) for k in ("scale", "growth_factor", "backoff_factor"))
            and all(is_count(scaler.get(k)) for k in ("growth_interval", "_growth_tracker"))):
        return bad("grad_scaler", scaler, "a loss scaler's state")
    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not (isinstance(groups, list) and groups and all(_is_param_group(g) for g in groups)):
        return bad("optimizer", optimizer, "{param_groups: [{params, lr, betas, eps, weight_decay}, ...]}")
    scheduler = state["lr_scheduler"]
    if not (isinstance(scheduler, dict) and is_count(scheduler.get("last_epoch"))
            and all(_is_list(scheduler.get(k), len(groups), is_finite_number) for k in ("base_lrs", "_last_lr"))
            and _is_list(scheduler.get("lr_lambdas"), len(groups), lambda f: f is None or isinstance(f, dict))):
        return bad("lr_scheduler", scheduler, f"an LR schedule's state for {len(groups)} parameter group(s)")
    try:
        PerPromptStatTracker.check_state(state["stat_tracker"])
    except ValueError as exc:
        return f"has a stat_tracker that {exc}"
    update = state.get("update", 0)
    if update:  # stopped mid-epoch: that epoch's samples (epoch_samples.stopped_epoch_record)
        if "stopped_epoch" not in state:
            return f"has update={update} but no 'stopped_epoch' (the samples of the epoch it stopped in)"
        return stopped_epoch_problem(state["stopped_epoch"], update)
    return None


def _is_list(value, length: int, item_ok: Callable[[object], bool]) -> bool:
    return isinstance(value, list) and len(value) == length and all(item_ok(v) for v in value)


def _is_param_group(group) -> bool:
    return (isinstance(group, dict) and isinstance(group.get("params"), list) and all(map(is_count, group["params"]))
            and all(is_finite_number(group.get(k)) for k in ("lr", "eps", "weight_decay"))
            and _is_list(group.get("betas"), 2, is_finite_number))


def stopped_epoch_problem(stopped, update: int) -> str | None:
    expected = "{updates_done, processes, prompts, stats}"
    if not isinstance(stopped, dict):
        return f"has stopped_epoch={shown(stopped)}, expected {expected}"
    processes, prompts, stats = stopped.get("processes"), stopped.get("prompts"), stopped.get("stats")
    if stopped.get("updates_done") != update or isinstance(stopped.get("updates_done"), bool):
        return f"has stopped_epoch.updates_done={shown(stopped.get('updates_done'))}, expected {update} (its update)"
    if not (is_count(processes) and processes >= 1):
        return f"has stopped_epoch.processes={shown(processes)}, expected an integer >= 1"
    if not (isinstance(prompts, list) and prompts and len(prompts) % processes == 0
            and all(isinstance(p, str) for p in prompts)):
        return (f"has stopped_epoch.prompts={shown(prompts)}, expected a list of prompts, as many for each of "
                f"its {processes} process(es)")
    needed = ("reward_mean", "reward_std", "sample_seconds")
    if not (isinstance(stats, dict) and all(k in stats for k in needed)
            and all(isinstance(k, str) and is_finite_number(v) for k, v in stats.items())):
        return f"has stopped_epoch.stats={shown(stats)}, expected numbers including {', '.join(needed)}"
    return None
