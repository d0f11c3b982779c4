"""`rlcm-fast`: train an LCM with RLCM (or Stable Diffusion with the DDPO baseline), or sample from one."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import os
import re
import sys
import warnings

from . import __version__
from .config import DDPO_PYTORCH_NAMES, TASK_PRESETS, ConfigError, field_types
from .path_checks import NAME_MAX, UsageError, home_expanded, shell_path, shell_quote

# The options that may name a file or folder (each command has some): a leading ~ is the home folder.
PATH_OPTIONS = ("model", "prompts", "config", "output_dir", "resume", "lora", "vlm", "scorer")


def _faults() -> tuple[type[Exception], ...]:
    """Runs that stopped on a fault (exit 1): the checkpoints written before are intact."""
    from .checkpoint import CheckpointWriteError
    from .faults import TrainingFault

    return TrainingFault, CheckpointWriteError


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    print(f"rlcm-fast: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def package_warnings_as_lines():
    """The package's own warnings (warnings.warn, for callers in Python: a slow JPEG backend, a missed CUDA graph)
    in the command's `rlcm-fast: warning: ...` form for the block, not as Python's file:line with a line of its
    source. Other libraries' warnings are shown as before."""
    shown, package = warnings.showwarning, os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package):
            warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


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
    sample.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    sample.add_argument("--prompts", metavar="SET",
                        help="a prompt set as for train (imagenet_animals, simple_animals, alignment, or a text file "
                             "of one prompt per line), sampled after any --prompt")
    sample.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    sample.add_argument("--batch-size", type=int, default=8,
                        help="images per pipeline call, at most (default: 8; the same seed and batch size give the "
                             "same images)")
    sample.add_argument("--horizon", type=int,
                        help="sampling steps (default: the run's, else train's for the model and --algo)")
    sample.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance scale, >= 1 (default: the run's, else train's for the model and --algo)")
    sample.add_argument("--resolution", type=int,
                        help="image size in pixels (default: the run's, else the model's own)")
    sample.add_argument("--seed", type=int, default=0, help="random seed, 0..2**63-1 (default: 0)")
    sample.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto, CUDA when available)")
    sample.add_argument("--output-dir", default="samples", help="folder for the PNGs (default: samples)")
    sample.add_argument("--reward", metavar="SPEC",
                        help="also score each image with this reward (as train's --reward; with --lora, the run's "
                             "reward settings): prints 'PATH<tab>REWARD' lines, then the mean on stderr")

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

    from .faults import first_line, hub_unreachable_reason
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
    # The port now, not after the minutes the models take: --port 0's choice, for the trainers to be started.
    print(f"serve-reward: {server_url(server)} bound; loading the VLM {vlm} and the scorer {scorer_model}",
          file=sys.stderr, flush=True)
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


@contextlib.contextmanager
def library_bars_hidden_off_terminal():
    """diffusers' and transformers' own bars (a model's parts and weights loading, downloads) off for the block
    where standard error is no terminal (a log file: each redraw is another line) or this is not the main process;
    then as they were. Never switched on: HF_HUB_DISABLE_PROGRESS_BARS=1 and the like are left to hold. Entered
    where the models load, not before a command's checks: importing the two libraries takes seconds."""
    if sys.stderr.isatty() and is_main_process():
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
    for name in PATH_OPTIONS:  # `--output-dir=~/runs` or a quoted "~/runs": no shell expanded the ~
        if hasattr(args, name):
            setattr(args, name, home_expanded(getattr(args, name)))
    try:
        with package_warnings_as_lines():
            if args.command == "train":
                from .train_command import run_train

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
        if is_main_process():
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
