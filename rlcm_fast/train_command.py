"""`rlcm-fast train`: the command line's config, run folder and checkpoint to resume, checked before any model
loads; then the run, in this process or in --num-processes processes on this machine, its run folder locked."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

# cli.main dispatches here; the shared warnings and library-bar switch
from .cli import is_main_process, library_bars_hidden_off_terminal, warn, warn_skipped
from .config import TrainConfig, parse_set_pairs, resolve_config
from .path_checks import PROBE_PREFIX, UsageError, check_run_dir, shell_path
from .resume import newer_intact_checkpoint, nothing_left_to_train, resume_options, resumed_config
from .run_lock import refuse_if_in_use


def _warns() -> bool:
    """Whether this process prints the command's warnings: the main one, unless `--num-processes`'s launcher
    (which checked the command line first) has printed them already."""
    from .launch import LAUNCHED_HERE

    return is_main_process() and not os.environ.get(LAUNCHED_HERE)


def _train_overrides(args: argparse.Namespace) -> dict:
    """`train`'s config keys from --set and from its own options."""
    overrides = parse_set_pairs(args.set)
    for key in ("seed", "device", "reward", "prompts"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.algo is not None:
        overrides["method"] = args.algo
    return overrides


@contextlib.contextmanager
def _run_folder_held(run_dir: Path):
    """The run folder locked against other trains for this block (run_lock.py): here, unless this process is
    one that --num-processes started (its launcher holds it) or not rank 0 under another launcher."""
    from .run_lock import hold_run_folder, holds_run_folders_here

    if not holds_run_folders_here():
        yield
        return
    planned = _folder_state(run_dir)  # a moment after _plan_run's checks of it
    with hold_run_folder(run_dir):
        # Another train may have written the folder after those checks and before this lock (started in the same
        # second under the default name, or one that ended meanwhile): the checks no longer hold.
        if _folder_state(run_dir) != planned:
            raise UsageError(f"output dir {str(run_dir)!r} changed while this run was starting (another rlcm-fast "
                             "train wrote it): run the command again")
        yield


def _folder_state(run_dir: Path) -> dict[str, int]:
    from .run_lock import LOCK_FILE

    try:
        # check_run_dir's probe folders are another process's (a rank of the same run), there for an instant
        return {entry.name: entry.stat(follow_symlinks=False).st_mtime_ns for entry in os.scandir(run_dir)
                if entry.name != LOCK_FILE and not entry.name.startswith(PROBE_PREFIX)}
    except FileNotFoundError:
        return {}


def _holds_checkpoints(run_dir: Path) -> bool:
    from .checkpoint import list_checkpoints

    return run_dir.is_dir() and bool(list_checkpoints(run_dir))


def _default_run_dir(cfg: TrainConfig) -> Path:
    return Path(f"runs/{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the command line once here (the config, the run folder, the checkpoint to resume), then run this
    command in --num-processes processes on this machine."""
    import torch

    from .launch import launch_local, usable_cpu_cores, without_option

    if args.num_processes < 1:
        raise UsageError(f"--num-processes {args.num_processes} is invalid: it must be >= 1")
    if os.environ.get("WORLD_SIZE"):
        raise UsageError("--num-processes cannot be used inside a launcher (accelerate launch, torchrun)")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda and args.num_processes > torch.cuda.device_count():
        raise UsageError(f"--num-processes {args.num_processes} is invalid: this machine has "
                         f"{torch.cuda.device_count()} GPU(s); one process per GPU")
    if not cuda and args.num_processes > (cores := usable_cpu_cores()):
        raise UsageError(f"--num-processes {args.num_processes} is invalid: this run may use {cores} CPU core(s); "
                         "at most one process per core on the CPU")
    child = without_option(argv, "--num-processes")
    cfg, run_dir, resume_from = _plan_run(args)
    if _nothing_to_train(cfg, resume_from):
        return 0
    _check_process_count(resume_from, args.num_processes)  # once here, not in each process after its model loads
    if not args.output_dir:  # every process must write the same run folder (a default one is named by the time)
        child += ["--output-dir", str(run_dir)]
    with _run_folder_held(run_dir):
        return launch_local(args.num_processes, child)


def _plan_run(args: argparse.Namespace) -> tuple[TrainConfig, Path, Path | None]:
    """`train`'s config, run folder and checkpoint to resume (or None), every check that needs no model done;
    nothing is created."""
    from .checkpoint import find_resumable, resolve_checkpoint

    overrides = _train_overrides(args)
    # --set output_dir=DIR is --output-dir DIR, not a key the run folder's choice would pass over.
    set_dir = overrides.get("output_dir")
    if args.output_dir and set_dir and Path(str(set_dir)) != Path(args.output_dir):
        raise UsageError(f"--output-dir {args.output_dir!r} and --set output_dir={set_dir!r} differ: give one of them")
    output_dir = args.output_dir or (str(set_dir) if set_dir else None)
    resume_from = None
    if args.resume == "auto":
        if not output_dir:
            raise UsageError("--resume auto needs --output-dir: the run folder to continue (or start)")
        run_dir = Path(output_dir)
        resume_from, skipped = find_resumable(run_dir)
        for reason in skipped if _warns() else ():
            if resume_from is None:  # every checkpoint is damaged: there is no older one to take
                warn(f"{reason}; no intact checkpoint is left, so the run starts over")
            else:
                warn_skipped(reason)
        from_args = None
        if args.task or args.model or args.config:  # checked by resumed_config if resuming (prompt_source)
            from_args = resolve_config(args.task, args.model, args.config, overrides, checked=resume_from is None)
        if resume_from is not None:
            cfg = resumed_config(resume_from, {} if from_args else overrides, from_args, warn if _warns() else None)
        else:
            cfg = from_args or resolve_config(None, None, None, overrides)
    elif args.resume:
        # A run folder: say which newer checkpoints were passed over.
        resume_from = resolve_checkpoint(args.resume, warn=warn_skipped if _warns() else None)
        if args.task or args.model or args.config:
            raise UsageError("--resume takes the run's own config; change keys with --set, not --task/--model/--config")
        cfg = resumed_config(resume_from, overrides, warn=warn if _warns() else None)
        run_dir = Path(output_dir) if output_dir else resume_from.parent
        # Into another run's folder, its checkpoints, latest pointer and metrics would be overwritten.
        if run_dir.resolve() != resume_from.parent.resolve() and _holds_checkpoints(run_dir):
            raise UsageError(f"--output-dir {str(run_dir)!r} already holds another run; resume {str(resume_from)!r} "
                             f"into an empty folder, or into its own ({str(resume_from.parent)!r})")
        # An older checkpoint in its own folder would drop the later epochs' metrics while their checkpoints and
        # `latest` stay: a stop before the next checkpoint would then resume the other branch.
        if run_dir.resolve() == resume_from.parent.resolve() and (newer := newer_intact_checkpoint(resume_from)):
            raise UsageError(f"{resume_from.name} is older than this run's intact {newer.name}: resuming it here would "
                             "overwrite the later checkpoints and metrics; resume it into a new --output-dir (a branch "
                             "of the run), or remove the newer checkpoints first")
    else:
        cfg = resolve_config(args.task, args.model, args.config, overrides)
        # A config file's output_dir counts too (a run's config.yaml names its own folder: refused below).
        run_dir = Path(output_dir or cfg.output_dir or _default_run_dir(cfg))
        refuse_if_in_use(run_dir)  # a run still going: not "resume it", which would be refused too
        if _holds_checkpoints(run_dir):
            raise UsageError(f"output dir {str(run_dir)!r} already holds a run; resume it with --resume or pick another")
    check_run_dir(run_dir)
    cfg.output_dir = str(run_dir)
    return cfg, run_dir, resume_from


def _nothing_to_train(cfg: TrainConfig, resume_from: Path | None) -> bool:
    """Whether the checkpoint to resume has `epochs` epochs already; says so once, and what trains on, rather
    than end at once with "done"."""
    from .checkpoint import read_training_state

    if resume_from is None or (done := read_training_state(resume_from)["epoch"]) < cfg.epochs:
        return False
    if is_main_process():  # under a launcher, one process speaks
        print(f"rlcm-fast: {nothing_left_to_train(resume_from, done, cfg.epochs, '--set epochs=N')}", file=sys.stderr)
    return True


def _check_process_count(resume_from: Path | None, processes: int) -> None:
    """A mid-epoch checkpoint's refusal of another process count, before any model loads."""
    from .checkpoint import read_training_state
    from .epoch_samples import check_process_count

    if resume_from is not None:
        check_process_count(resume_from, read_training_state(resume_from), processes)


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    if args.num_processes != 1:
        return _launch(args, argv)
    cfg, run_dir, resume_from = _plan_run(args)
    if _nothing_to_train(cfg, resume_from):
        return 0
    if not os.environ.get("WORLD_SIZE"):  # under a launcher the trainer checks it, and the main process says it
        _check_process_count(resume_from, 1)
    args.run_dir, args.resume_from = run_dir, resume_from  # for main()'s message if an interrupt ends the run
    args.resume_options = resume_options(cfg)
    with _run_folder_held(run_dir), library_bars_hidden_off_terminal():
        return _train(cfg, run_dir, resume_from)


def _train(cfg: TrainConfig, run_dir: Path, resume_from: Path | None) -> int:
    from .run_logging import summarize
    from .trainer import Trainer

    # Progress bars only on a terminal: in a log file each redraw is another line (the epoch lines stay).
    trainer = Trainer(cfg, run_dir, resume_from, progress_bars=sys.stderr.isatty())
    say = (lambda message: print(f"rlcm-fast: {message}", file=sys.stderr)) if trainer.is_main else (lambda _: None)
    start = f" from {resume_from.name}" if resume_from is not None else ""
    say(f"training {cfg.model} on {cfg.reward} ({cfg.resolution} px, {cfg.horizon} steps){start} -> {run_dir}")
    chosen = trainer.cfg  # its UNet call sizes as `auto` chose them on this machine, when wider than the paper's
    if chosen.train_rows_per_call or chosen.sample_batches_per_call != 1:
        say(f"UNet calls of {chosen.train_rows_per_call or chosen.train_batch_size} training rows and "
            f"{chosen.sample_batches_per_call * chosen.sample_batch_size} sampling trajectories "
            "(train_rows_per_call, sample_batches_per_call)")
    records = trainer.train()
    if trainer.stopped_at is not None:
        processes = trainer.accelerator.num_processes
        options = resume_options(cfg) + (f" --num-processes {processes}" if processes > 1 else "")
        launcher = "; under accelerate launch or torchrun, the same without --num-processes" if processes > 1 else ""
        say(f"stopped by {trainer.stop.received} after step {trainer.global_step}; wrote {trainer.stopped_at}. "
            f"Resume with: rlcm-fast train --resume {shell_path(run_dir)}{options} (or --resume auto --output-dir "
            f"{shell_path(run_dir)}{options}{launcher})")
        return 0
    evals = trainer.logger.eval_records() if trainer.logger else []
    say(f"done, {summarize(records, evals)}; checkpoints in {run_dir}")
    return 0
