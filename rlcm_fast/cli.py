"""`rlcm-fast`: train an LCM with RLCM (or Stable Diffusion with the DDPO baseline), or sample from one."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import os
import re
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .config import (
    DDPO_PYTORCH_NAMES, TASK_PRESETS, ConfigError, TrainConfig, field_types, parse_set_pairs, resolve_config,
)
from .path_checks import NAME_MAX, PROBE_PREFIX, UsageError, check_run_dir, shell_path, shell_quote
from .resume import newer_intact_checkpoint, nothing_left_to_train, resume_options, resumed_config
from .run_lock import refuse_if_in_use


def _faults() -> tuple[type[Exception], ...]:
    """Runs that stopped on a fault (exit 1): the checkpoints written before are intact."""
    from .checkpoint import CheckpointWriteError
    from .faults import TrainingFault

    return TrainingFault, CheckpointWriteError


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _warns() -> bool:
    """Whether this process prints the command's warnings: the main one, unless `--num-processes`'s launcher
    (which checked the command line first) has printed them already."""
    from .launch import LAUNCHED_HERE

    return _is_main_process() and not os.environ.get(LAUNCHED_HERE)


def warn(message: str) -> None:
    print(f"rlcm-fast: warning: {message}", file=sys.stderr)


def warn_skipped(reason: str) -> None:
    """Why a checkpoint newer than the one taken was passed over (`reason`: "checkpoint '...' is damaged: ..."),
    or why the run's `latest` pointer was ignored (it says so itself)."""
    warn(reason + ("; taking an older checkpoint" if reason.startswith("checkpoint ") else ""))


def _user_errors() -> tuple[type[Exception], ...]:
    from .checkpoint import CheckpointError
    from .faults import ModelLoadError
    from .rewards import RewardError
    from .run_lock import RunFolderUnusable

    return ConfigError, RewardError, ModelLoadError, CheckpointError, UsageError, RunFolderUnusable


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated options: `--num-proc 2` reached the launched processes, which strip only the full
    # `--num-processes` from their command line, so each of them tried to launch again.
    parser = argparse.ArgumentParser(prog="rlcm-fast", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"rlcm-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune an LCM's LoRA with RLCM on a reward", allow_abbrev=False)
    train.add_argument("--task", default=None,
                       help=f"the paper's task presets: {', '.join(TASK_PRESETS)} (default: compressibility)")
    train.add_argument("--model", default=None,
                       help="'tiny' (default, CPU-sized: a small UNet trained in code, random VAE and text encoder), "
                            "'sd15-lcm' (random weights, LCM_Dreamshaper_v7's "
                            "architecture), a diffusers LCM folder or hub id; with --algo ddpo: 'tiny-sd' (default), "
                            "'sd15' (random weights, SD1.5's architecture), a Stable Diffusion folder or hub id")
    train.add_argument("--algo", default=None, metavar="rlcm|ddpo",
                       help="rlcm (default): RL on an LCM; ddpo: the DDPO baseline (DDIM, CFG) on a Stable Diffusion "
                            "model (config key `method`)")
    train.add_argument("--reward", metavar="SPEC",
                       help="the reward (overrides the task's): a built-in name, a user reward my_pkg.module:fn, or "
                            "a weighted sum such as 'aesthetic:1.0,jpeg_compressibility:0.1' (config key `reward`)")
    train.add_argument("--prompts", metavar="SET",
                       help="the prompt set (overrides the task's): imagenet_animals, simple_animals, alignment, "
                            "or a text file of one prompt per line (config key `prompts`)")
    train.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys")
    train.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one config key")
    train.add_argument("--output-dir", help="run folder (default: runs/<task>-<time>)")
    train.add_argument("--resume", metavar="PATH",
                       help="a run folder (its newest intact checkpoint), RUN/checkpoint-N, or 'auto': continue "
                            "--output-dir's newest intact checkpoint, or start there if it has none")
    train.add_argument("--num-processes", type=int, default=1, metavar="N",
                       help="processes on this machine (one per GPU; gloo on CPUs); default 1")
    train.add_argument("--seed", type=int, help="random seed, 0..2**63-1 (config key `seed`; default 0)")
    train.add_argument("--device", help="auto | cpu | cuda (config key `device`; default auto: CUDA when available)")

    sample = commands.add_parser("sample", help="write images from an LCM (with --algo ddpo: a Stable Diffusion "
                                                "model), optionally with a trained LoRA", allow_abbrev=False)
    sample.add_argument("--model", default=None,
                        help="as for train (default: the LoRA's run model, else tiny, or tiny-sd with --algo ddpo)")
    sample.add_argument("--lora", metavar="RUN/checkpoint-N",
                        help="a checkpoint folder of `rlcm-fast train`, or its run folder (the newest intact one)")
    sample.add_argument("--algo", default=None, metavar="rlcm|ddpo",
                        help="the policy to sample without --lora: rlcm (default; an LCM) or ddpo (a Stable "
                             "Diffusion model with DDIM, as DDPO samples it); with --lora: the run's")
    sample.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    sample.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    sample.add_argument("--horizon", type=int,
                        help="sampling steps (default: the run's, else train's for the model and --algo)")
    sample.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance scale, >= 1 (default: the run's, else train's for the model and --algo)")
    sample.add_argument("--resolution", type=int,
                        help="image size in pixels (default: the run's, else the model's own)")
    sample.add_argument("--seed", type=int, default=0, help="random seed, 0..2**63-1 (default: 0)")
    sample.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto, CUDA when available)")
    sample.add_argument("--output-dir", default="samples", help="folder for the PNGs (default: samples)")

    serve = commands.add_parser("serve-reward", help="serve a reward over HTTP for trainers to share (alignment)",
                                 allow_abbrev=False)
    serve.add_argument("--reward", default="alignment", choices=["alignment"],
                       help="the reward to serve: alignment (a VLM's answer, BERTScore recall against the prompt; "
                            "the default and only choice)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on, IPv4 or IPv6 (default: "
                                                          "127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8060, help="0: any free port, printed at start (default: 8060)")
    serve.add_argument("--vlm", default=None, help="image-text-to-text model, hub id or folder "
                                                   "(default: llava-hf/llava-1.5-7b-hf)")
    serve.add_argument("--scorer", default=None, help="BERT-family model for BERTScore (default: roberta-large)")
    serve.add_argument("--scorer-layer", type=int, default=None,
                       help="hidden layer for BERTScore (default: bert_score's for known models, else the last)")
    serve.add_argument("--max-new-tokens", type=int, default=48, help="length limit of the VLM's answers (default: 48)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto, CUDA when available)")
    parser.commands = {"train": train, "sample": sample, "serve-reward": serve}  # each command's own parser
    return parser


def run_serve_reward(args: argparse.Namespace) -> int:
    import torch

    from .faults import first_line, hub_offline, hub_unreachable_reason
    from .rewards import RewardError
    from .rewards.alignment_server import DEFAULT_SCORER, DEFAULT_VLM, AlignmentScorer, bind, serve, server_url
    from .rewards.base import missing_model_folder

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {args.device!r} is invalid; allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu or auto")
    if not args.host.strip():  # the socket's empty host is every interface, which must be asked for by name
        raise UsageError(f"--host {args.host!r} is invalid: give an address (127.0.0.1 for this machine, 0.0.0.0 "
                         "or :: for every interface)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is invalid: it must be in 0..65535")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} is invalid: it must be >= 1")
    for option, value in (("--vlm", args.vlm), ("--scorer", args.scorer)):
        if value and (problem := missing_model_folder(value)):
            raise UsageError(f"{option} {value!r} is invalid: {problem} (a hub id or a local model folder)")
    try:
        server = bind(args.host, args.port)  # a port in use is found before the models load, not after
    except OSError as exc:
        raise UsageError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    vlm, scorer_model = args.vlm or DEFAULT_VLM, args.scorer or DEFAULT_SCORER
    from_hub = any(not Path(model).is_dir() for model in (vlm, scorer_model))
    # With no network the hub client retries each file for about 20 s before the error: minutes in all.
    offline_hint = ("; with no network, HF_HUB_OFFLINE=1 reads the hub's cache without retrying the hub for minutes"
                    if from_hub and not hub_offline() else "")
    # The port now, not after the minutes the models take: --port 0's choice, for the trainers to be started.
    print(f"serve-reward: {server_url(server)} bound; loading the VLM {vlm} and the scorer {scorer_model}"
          f"{offline_hint}", file=sys.stderr, flush=True)
    try:
        try:
            with library_bars_hidden_off_terminal():
                scorer = AlignmentScorer(vlm, scorer_model, args.scorer_layer, device, args.max_new_tokens)
        except (OSError, ValueError) as exc:
            raise RewardError(f"the alignment models cannot be loaded: {hub_unreachable_reason(exc) or first_line(exc)}"
                              ) from None
        serve(scorer, server=server)
    except OSError as exc:
        raise UsageError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:  # main's message for an interrupt is about training checkpoints
        print("rlcm-fast: serve-reward stopped (interrupted)", file=sys.stderr)
        return 130
    finally:
        server.server_close()
    return 0


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
    if _is_main_process():  # under a launcher, one process speaks
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
    say(f"done, {summarize(records)}; checkpoints in {run_dir}")
    return 0


@contextlib.contextmanager
def library_bars_hidden_off_terminal():
    """diffusers' and transformers' own bars (a model's parts and weights loading, downloads) off for the block
    where standard error is no terminal (a log file: each redraw is another line) or this is not the main process;
    then as they were. Never switched on: HF_HUB_DISABLE_PROGRESS_BARS=1 and the like are left to hold. Entered
    where the models load, not before a command's checks: importing the two libraries takes seconds."""
    if sys.stderr.isatty() and _is_main_process():
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    switched = [library for library in (diffusers_logging, transformers_logging) if library.is_progress_bar_enabled()]
    for library in switched:
        library.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # huggingface_hub's, where an environment variable keeps its bars off
            warnings.simplefilter("ignore")
            for library in switched:
                library.enable_progress_bar()


def _error(exc: Exception | str) -> None:
    """One line on stderr, after clearing progress bars an exception left mid-line; nothing for an error that
    the main process of a run of several reports for all of them."""
    from tqdm.auto import tqdm

    from .faults import reported_by_main_process

    if reported_by_main_process(exc):
        return

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    # One write: print() writes the newline separately, and several processes share the stream.
    sys.stderr.write(f"rlcm-fast: error: {exc}\n")
    sys.stderr.flush()


def unknown_option_hint(commands: dict[str, argparse.ArgumentParser], command: str, unknown: list[str]) -> str:
    """For the first unknown option: the command it belongs to (`train --prompt` is sample's) and the option
    of this command it most likely meant (`--num-proc`: --num-processes; no option is abbreviated)."""
    option = next((word.split("=", 1)[0] for word in unknown if word.startswith("--")), None)
    if option is None:
        return ""
    own = [name for action in commands[command]._actions for name in action.option_strings
           if name.startswith("--") and name != "--help"]
    if option in own:  # this command's own option, given before the command (`rlcm-fast --seed 1 train`)
        return f" ({option} is an option of `rlcm-fast {command}`: give it after the command)"
    hints = []
    if others := [f"`rlcm-fast {other}`" for other, other_parser in commands.items()
                  if other != command and option in other_parser._option_string_actions]:
        hints.append(f"{option} is an option of {' and '.join(others)}")
    # This command's option, spelt longer or shorter (`--algorithm`: --algo; `--num-proc`: --num-processes) or
    # nearly; else, for train, a config key (`--learning-rate 1e-4`, ddpo-pytorch's `--num-steps 8`, `--epoch`).
    meant = ([name for name in own if name.startswith(option) or option.startswith(name)]
             or difflib.get_close_matches(option, own, n=1, cutoff=0.75))
    key = option[2:].replace("-", "_")
    key = DDPO_PYTORCH_NAMES.get(key, key)
    keys = [key] if key in field_types() else difflib.get_close_matches(key, field_types(), n=1, cutoff=0.8)
    if len(meant) == 1:
        hints.append(f"did you mean {meant[0]}?")
    elif command == "train" and keys:
        hints.append(f"a config key is set with --set {keys[0]}=VALUE")
    return f" ({'; '.join(hints)})" if hints else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # told with the command's usage: parse_args tells it with the top level's
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}"
                                                f"{unknown_option_hint(parser.commands, args.command, unknown)}")
    except SystemExit as exc:  # argparse's exit: a usage error (2), --help or --version (0); returned as any other
        return exc.code
    try:
        if args.command == "train":
            return run_train(args, argv)
        if args.command == "sample":
            from .sample_command import run_sample

            return run_sample(args)
        return run_serve_reward(args)
    except _user_errors() as exc:
        _error(exc)
        return 2
    except _faults() as exc:
        _error(exc)
        return 1
    except (RuntimeError, MemoryError) as exc:  # out of memory outside an epoch (the trainer names its sizes)
        from .faults import first_line, is_lost_peer, is_out_of_memory

        if is_lost_peer(exc):  # the process that ended first said why (or its launcher did): not a traceback here
            _error(f"process {os.environ.get('RANK', '?')} stopped: another process of the run ended first (its "
                   "message, or the launcher's, says why); the checkpoints written before are intact")
            return 1
        if not is_out_of_memory(exc):
            raise
        _error(f"out of memory ({first_line(exc)[:200]}): lower resolution, the batch sizes, lora_rank or --num-images")
        return 1
    except OSError as exc:  # from whichever check first touches a path given on the command line
        if exc.errno != errno.ENAMETOOLONG:
            raise
        from .faults import shown

        _error(f"{shown(exc.filename, 120) if exc.filename else 'a path'} is too long: a file system takes at most "
               f"{NAME_MAX} bytes per file or folder name (and Linux 4096 for a whole path)")
        return 2
    except KeyboardInterrupt:  # a second interrupt, or one before the trainer listens: no checkpoint waited for
        if _is_main_process():
            print(f"rlcm-fast: interrupted; {_how_to_continue(args, argv)}", file=sys.stderr)
        return 130


def _how_to_continue(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command's message says to run next. For train: `--resume auto` where this run wrote a
    checkpoint, else this same command again (`--resume auto` finding no checkpoint starts from the defaults,
    and resuming the checkpoint this command started from would drop its --set changes)."""
    from .checkpoint import list_checkpoints

    if args.command == "sample":  # its fixed file names: the same call again would be refused
        return (f"the images written so far are in {shell_path(args.output_dir)}; another call needs another "
                "--output-dir")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launch = f" --num-processes {processes} (or the same launcher)" if processes > 1 else ""
    same = f"{' '.join(shell_quote(word) for word in ['rlcm-fast', *argv])}{launch}"
    run_dir, started = getattr(args, "run_dir", None), getattr(args, "resume_from", None)
    if run_dir is None:  # interrupted while the command line was being checked
        return f"run the same command again: {same}"
    try:  # a listing, not find_resumable's hashing of a checkpoint: another Ctrl-C may come meanwhile
        written = list_checkpoints(run_dir)
    except Exception:  # noqa: BLE001 (the message must not become a traceback; the command is still right)
        written = []
    if not written:
        return f"no checkpoint was written; start again with: {same}"
    if started is not None and written[-1].resolve() == started.resolve():
        return f"no checkpoint was written after {started.name}; run the same command again: {same}"
    return (f"continue from the newest checkpoint with: rlcm-fast train --resume auto --output-dir "
            f"{shell_path(run_dir)}{getattr(args, 'resume_options', '')}{launch}")


if __name__ == "__main__":
    sys.exit(main())
