"""What a resumed run takes from its checkpoint, and what only its command line may give it.

A resume continues the checkpoint's own config with the command line's --set overrides, but may not change
what the checkpoint's weights, trajectories or reward histories depend on (FIXED_ON_RESUME, and mid-epoch
FIXED_MID_EPOCH). A run's prompts file is read from the checkpoint's copy of it (prompt_source). A run folder may
come from elsewhere: the code it names as a reward, a reward server off this machine, and a prompts file that its
checkpoint holds no copy of are used only when the command line names them again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable

from .config import PATH_KEYS, ConfigError, TrainConfig, apply_overrides, config_from_saved
from .config_checks import validate
from .path_checks import UsageError, check_run_dir, home_expanded
from .prompts import is_prompts_file

# Settings a resumed run may not change: the checkpoint's weights and trajectories depend on them (lora_alpha
# scales the saved LoRA's A and B: another value would resume another policy), or its stat tracker's per-prompt
# reward histories do (reward, jpeg_quality: the new reward's advantages were normalised by the old one's values).
# task: it chose the other settings, which a resume takes from the checkpoint (a new one would be recorded only).
FIXED_ON_RESUME = ("task", "method", "model", "lcm_lora", "lora_rank", "lora_alpha", "lora_targets", "horizon",
                   "train_final_step", "original_inference_steps", "resolution", "reward", "jpeg_quality")
# ... and, from a checkpoint stopped mid-epoch, the settings that lay out that epoch's samples and updates
# (algorithm: REBEL trains pairs; step_fraction: which steps), or that the policy whose log-probs the
# checkpoint stores sampled with (guidance_scale, DDPO's eta).
FIXED_MID_EPOCH = ("seed", "batches_per_epoch", "num_sample_iters", "sample_batch_size", "train_batch_size",
                   "gradient_accumulation_steps", "num_inner_epochs", "algorithm", "step_fraction", "guidance_scale",
                   "eta")

# Settings that choose how a built-in reward scores (its model, its JPEG encoder): another value puts other values
# beside the per-prompt reward histories the checkpoint restores. Warned of, not refused: a local copy of the same
# model is the same scorer under another name.
_JPEG = ("jpeg_compressibility", "jpeg_incompressibility")
REWARD_SCORER_SETTINGS = {"aesthetic_model": ("aesthetic",), "clipscore_model": ("clipscore",),
                          "pickscore_model": ("pickscore",), "pickscore_processor": ("pickscore",),
                          "jpeg_backend": _JPEG, "nvjpeg_colour": _JPEG}


def resumed_config(checkpoint: Path, overrides: dict, fresh: TrainConfig | None = None,
                   warn: Callable[[str], None] | None = None) -> TrainConfig:
    """The config to continue `checkpoint` with: its own plus --set overrides (or `fresh`, resolved from the
    command line, for `--resume auto`), refused where it changes what the checkpoint depends on; `warn`, if given,
    is told of a changed reward scorer."""
    from .checkpoint import PROMPT_COPIES, read_training_state

    state = read_training_state(checkpoint)
    before = config_from_saved(state.get("config"), f"checkpoint {str(checkpoint)!r}")
    values = dict(before)
    if fresh is not None:
        values = fresh.to_dict()
    apply_overrides(values, overrides, "--set")
    refuse_changed_settings(before, values, mid_epoch=bool(state.get("update")))
    if fresh is None:  # with --resume auto's --task/--model/--config, this command line chose the settings
        check_what_the_checkpoint_alone_starts(checkpoint, values, overrides)
    for problem in _changed_scorers(before, values) + _changed_evaluation(before, values) if warn is not None else ():
        warn(problem)
    named = {key: values.get(key, getattr(TrainConfig(), key)) for key in PROMPT_COPIES}
    sources = {key: prompt_source(name, checkpoint, key) for key, name in named.items()}
    cfg = validate(TrainConfig(**{**values, **sources}))
    for key in PROMPT_COPIES:
        if sources[key] != named[key]:  # read from the checkpoint's copy; config.yaml still names the run's own file
            setattr(cfg, key, before[key])
    return cfg


def refuse_changed_settings(before: dict, values: dict, mid_epoch: bool) -> None:
    """ConfigError naming the first setting a resume may not change (FIXED_ON_RESUME, and from a checkpoint
    stopped mid-epoch FIXED_MID_EPOCH) whose value in `values` differs from the checkpoint's config `before`."""
    defaults = TrainConfig()
    for key in FIXED_ON_RESUME + (FIXED_MID_EPOCH if mid_epoch else ()):
        old = before.get(key, getattr(defaults, key))
        if not _same_setting(key, values.get(key, getattr(defaults, key)), old):
            where = "a checkpoint stopped mid-epoch" if key in FIXED_MID_EPOCH else "a resumed run"
            raise ConfigError(
                f"{key}={values.get(key)!r} differs from the checkpoint's {old!r}; {where} cannot change it"
            )


def checked_start(cfg: TrainConfig, run_dir, resume_from) -> tuple[TrainConfig, Path, Path | None]:
    """What a Trainer starts from, with the command line's checks (train_command._plan_run) for one made in
    code: the run folder's name and whether it can be made (path_checks.check_run_dir), the config validated (a
    dataclass changed after resolve_config, or built directly), a new run refused in a folder that holds one (it
    would overwrite its checkpoints and metrics), a resume's settings against its checkpoint, and a resume refused
    where it would overwrite another run's checkpoints or its own later ones.
    `resume_from` may name a run folder (its newest intact checkpoint is taken); paths may be str."""
    from .checkpoint import PROMPT_COPIES, find_resumable, list_checkpoints, read_training_state, resolve_checkpoint

    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg is a {type(cfg).__name__}; a Trainer takes a TrainConfig (rlcm_fast.config."
                        "resolve_config builds one from a task, a model and overrides)")
    run_dir = Path(run_dir).expanduser()  # a leading ~ (pathlib takes it as a folder's name)
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))  # the caller's is left as it is
    try:  # before the model loads: a name too long or not UTF-8 failed after it, leaving a folder behind
        check_run_dir(run_dir, "run folder")
    except UsageError as exc:
        raise ConfigError(str(exc)) from None
    if resume_from is None:
        # Damaged checkpoints alone do not count: `--resume auto` starts the run over them.
        if find_resumable(run_dir)[0] is not None:
            raise ConfigError(f"run folder {str(run_dir)!r} already holds a run: resume it "
                              f"(resume_from={str(run_dir)!r}) or start the run in another folder")
        return validate(cfg), run_dir, None
    if str(resume_from) == "auto" and not Path(resume_from).exists():
        raise ConfigError("resume_from='auto' is the command line's `--resume auto`; a Trainer takes the run folder "
                          "(its newest intact checkpoint is taken), a checkpoint folder, or None for a new run")
    resume_from = Path(resume_from).expanduser()
    # A run folder (a checkpoint holds no checkpoints); a path that is neither is said so, not "unreadable".
    if list_checkpoints(resume_from) or not (resume_from / "training_state.json").is_file():
        resume_from = resolve_checkpoint(resume_from, what="resume_from")
    # Either would overwrite checkpoints and metrics; the command line says it in its own words first.
    own_folder = run_dir.resolve() == resume_from.parent.resolve()
    if not own_folder and list_checkpoints(run_dir):
        raise ConfigError(f"run folder {str(run_dir)!r} holds another run: resume {str(resume_from)!r} into an empty "
                          f"folder, or into its own ({str(resume_from.parent)!r})")
    if own_folder and (newer := newer_intact_checkpoint(resume_from)):
        raise ConfigError(f"{resume_from.name} is older than its run's intact {newer.name}: resuming it in its own "
                          "folder would overwrite the later checkpoints and metrics; resume it into an empty folder")
    # Its prompts are read from the checkpoint's copies where it keeps the files' names (prompt_source).
    validate(dataclasses.replace(cfg, **{key: prompt_source(getattr(cfg, key), resume_from, key)
                                         for key in PROMPT_COPIES}))
    state = read_training_state(resume_from)
    before = config_from_saved(state.get("config"), f"checkpoint {str(resume_from)!r}")
    refuse_changed_settings(before, cfg.to_dict(), mid_epoch=bool(state.get("update")))
    return cfg, run_dir, resume_from


def _anchored(checked: tuple[TrainConfig, Path, Path | None]) -> tuple[TrainConfig, Path, Path | None]:
    """The run folder and checkpoint as absolute paths (the config keeps output_dir as given): a Trainer made with
    relative ones in code, and trained after an os.chdir, still writes its checkpoints, metrics and lock where it
    took them, not under the new working folder."""
    cfg, run_dir, resume_from = checked
    return cfg, Path(os.path.abspath(run_dir)), None if resume_from is None else Path(os.path.abspath(resume_from))


def held_start(cfg: TrainConfig, run_dir, resume_from) -> tuple[contextlib.ExitStack, TrainConfig, Path, Path | None]:
    """checked_start, then the run folder's lock (RUN/.lock: run_lock.py) held until the returned stack is closed,
    and the checks again under it: another train may have started there in between (not when the command line
    held the folder already: the checks ran under its hold). In a process that does not take run folders' locks
    (run_lock.holds_run_folders_here) the stack holds nothing."""
    from .run_lock import held_in_this_process, hold_run_folder, holds_run_folders_here, refuse_if_in_use

    # A folder another train or Trainer is using: said first, not "it holds a run: resume it" (refused in turn).
    refuse_if_in_use(Path(run_dir), holder="Trainer", joins="rlcm-fast train")
    checked, hold = _anchored(checked_start(cfg, run_dir, resume_from)), contextlib.ExitStack()
    if holds_run_folders_here():
        checked_under_the_lock = held_in_this_process(checked[1])
        hold.enter_context(hold_run_folder(checked[1], holder="Trainer", joins="rlcm-fast train"))
        try:
            if not checked_under_the_lock:
                checked = _anchored(checked_start(cfg, run_dir, resume_from))
        except BaseException:
            hold.close()
            raise
    return (hold, *checked)


def _same_setting(key: str, new, old) -> bool:
    """Whether a setting fixed on resume is unchanged: a reward by its terms (`jpeg_compressibility` is
    `jpeg_compressibility:1.0`), LoRA targets in any order (peft matches each on its own), a path with its ~
    expanded; else by value."""
    from .rewards import BUILTIN_REWARDS, RewardError, parse_reward_spec

    if key == "reward" and isinstance(new, str) and isinstance(old, str):
        try:
            return parse_reward_spec(new, tuple(BUILTIN_REWARDS)) == parse_reward_spec(old, tuple(BUILTIN_REWARDS))
        except RewardError:  # not a reward name: validate() says why, unless the checkpoint's is the same string
            return new == old
    if key == "lora_targets" and all(isinstance(t, list) and all(isinstance(n, str) for n in t) for t in (new, old)):
        return set(new) == set(old)
    if key in PATH_KEYS:  # a ~ typed again for the folder the run saved expanded
        return home_expanded(new) == home_expanded(old)
    return new == old


def _changed_scorers(before: dict, values: dict) -> list[str]:
    from .rewards import BUILTIN_REWARDS, parse_reward_spec

    defaults = TrainConfig()
    terms = {term.name for term in parse_reward_spec(values.get("reward", defaults.reward), tuple(BUILTIN_REWARDS))}
    changed = []
    for key, rewards in REWARD_SCORER_SETTINGS.items():
        old, new = before.get(key, getattr(defaults, key)), values.get(key, getattr(defaults, key))
        if key == "jpeg_backend" and {old, new} == {"pillow", "exact"}:
            continue  # the same byte counts by construction (rewards/jpeg_exact.py)
        if new != old and terms.intersection(rewards):
            copy = " (fine for a local copy of the same model)" if key.endswith(("_model", "_processor")) else ""
            changed.append(f"{key}={new!r} differs from the checkpoint's {old!r}: its rewards go beside reward "
                           f"histories scored with {old!r}{copy}")
    return changed


def _changed_evaluation(before: dict, values: dict) -> list[str]:
    """The settings that choose the evaluation's images (evaluation.evaluation_settings: seed, eval_images and
    eval_prompts, or the run's prompts where eval_prompts is ""), changed while the run evaluates: the evaluations
    from here on are not comparable with the ones logged before."""
    defaults = TrainConfig()

    def chosen(config: dict) -> list[tuple[str, object]]:
        def get(key: str):
            return config.get(key, getattr(defaults, key))

        name = "eval_prompts" if get("eval_prompts") else "prompts"
        prompts = get(name)  # a file by its absolute path, as validate() keeps it
        return [("seed", get("seed")), ("eval_images", get("eval_images")),
                (name, str(Path(prompts).resolve()) if is_prompts_file(prompts) else prompts)]

    if not (before.get("eval_every", defaults.eval_every) and values.get("eval_every", defaults.eval_every)):
        return []
    changed = [f"{name}={value!r}" for (name, value), (_, old) in zip(chosen(values), chosen(before)) if value != old]
    verb = "differs" if len(changed) == 1 else "differ"
    return [f"{', '.join(changed)} {verb} from the checkpoint's: the evaluations from here on sample other images "
            "than the ones logged before (reward.png draws them as another line)"] if changed else []


def prompt_source(prompts: str, checkpoint: Path | None, key: str = "prompts") -> str:
    """Where a run reads the prompts its config `key` names ("prompts" or "eval_prompts"): a resume that keeps its
    prompts file (the same path) reads the checkpoint's copy of it, as the run read it, wherever the resume runs and
    whatever became of the file since (edited, moved, or left on the machine the run folder came from); else the
    set or file `prompts` names ("" included: eval_prompts' "the run's prompts")."""
    from .checkpoint import prompts_copy, saved_config

    copy = prompts_copy(checkpoint, key) if checkpoint is not None and is_prompts_file(prompts) else None
    if copy is None or not _same_file_name(saved_config(checkpoint).get(key), prompts):
        return prompts
    return str(copy.absolute())


def _same_file_name(a, b) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    if a == b:  # without resolving: a name this locale cannot encode (UTF-8 read as ASCII) is still the same name
        return True
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):  # a NUL in a name (a crafted state), a loop of links
        return False


def check_what_the_checkpoint_alone_starts(checkpoint: Path, values: dict, overrides: dict) -> None:
    """A run folder made elsewhere may name any module as its reward, any host as its reward server and any file
    as its prompts: a resume runs that code, sends the images and prompts off this machine, or reads a file outside
    the checkpoint, only when this command line names them too."""
    from .checkpoint import prompts_copy
    from .rewards import user_reward_names

    defaults = TrainConfig()
    reward = values.get("reward", defaults.reward)
    server = values.get("reward_server", defaults.reward_server)
    needed = _named_again_on_resume(reward, server)
    if "reward" in needed and "reward" not in overrides:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is scored by user code ({', '.join(user_reward_names(reward))}"
                          f"), which resuming imports and runs: add --reward {reward!r} to run it")
    for key, option, other in (("prompts", "--prompts ", ""),
                               ("eval_prompts", "--set eval_prompts=", " (or --set eval_prompts= to evaluate the "
                                                                       "run's prompts)")):
        prompts = values.get(key, getattr(defaults, key))
        if is_prompts_file(prompts) and key not in overrides and prompts_copy(checkpoint, key) is None:
            raise ConfigError(f"checkpoint {str(checkpoint)!r} holds no copy of its {key} file {prompts!r} (written "
                              f"before checkpoints kept one), which a resume reads only when named: add {option}"
                              f"{prompts!r}{other}")
    if "reward_server" in needed and "reward_server" not in overrides:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} sends its images and prompts to reward server {server!r}: "
                          f"add --set reward_server={server} to send them there")


def _named_again_on_resume(reward: str, server: str) -> dict[str, str]:
    """The settings that a resume of a run with this reward takes only from its command line: a user reward (code
    to run) and a reward server off this machine (where images and prompts go)."""
    from .rewards import BUILTIN_REWARDS, parse_reward_spec, user_reward_names

    needed = {"reward": reward} if user_reward_names(reward) else {}
    if any(term.name == "alignment" for term in parse_reward_spec(reward, tuple(BUILTIN_REWARDS))) \
            and not _on_this_machine(server):
        needed["reward_server"] = server
    return needed


def nothing_left_to_train(checkpoint: Path, epochs_done: int, epochs: int, how: str) -> str:
    """What a resume of a checkpoint that has all its `epochs` says, ending with `how` to raise them ("--set
    epochs=N" on the command line)."""
    return (f"{checkpoint.name} has trained {epochs_done} epoch(s), and epochs={epochs}: nothing to train; "
            f"{how} with N > {epochs_done} trains on")


def resume_options(cfg: TrainConfig) -> str:
    """What the resume command that a stopped run prints must repeat (_named_again_on_resume)."""
    import shlex

    needed = _named_again_on_resume(cfg.reward, cfg.reward_server)
    return "".join(f" --reward {shlex.quote(value)}" if key == "reward" else f" --set {key}={shlex.quote(value)}"
                   for key, value in needed.items())


def _on_this_machine(url: str) -> bool:
    import ipaddress
    import urllib.parse

    host = urllib.parse.urlsplit(str(url)).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def newer_intact_checkpoint(checkpoint: Path) -> Path | None:
    """The newest intact checkpoint of `checkpoint`'s run that is newer than it, if any (damaged ones are
    passed over, as --resume passes over them)."""
    from .checkpoint import CheckpointError, checkpoint_key, list_checkpoints, verify_checkpoint

    for candidate in reversed(list_checkpoints(checkpoint.parent)):
        if checkpoint_key(candidate) <= checkpoint_key(checkpoint):
            return None
        try:
            verify_checkpoint(candidate)
        except CheckpointError:
            continue
        return candidate
    return None
