"""`rlcm-fast`'s command line where a mutation round of cli.py found no test: defaults, the edges of
serve-reward's checks, the options that become config keys, and main's exit codes and messages for errors
raised past a command's own checks. No model loads: each test stops before one or stubs the step after it."""

import errno
import sys

import pytest

from rlcm_fast.cli import build_parser, library_bars_hidden_off_terminal, main
from rlcm_fast.train_command import _train_overrides
from rlcm_fast.config import ConfigError
from rlcm_fast.path_checks import UsageError


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("rlcm-fast: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0].removeprefix("rlcm-fast: error: ")


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_each_commands_defaults_are_the_ones_its_help_names():
    sample = parse("sample", "--prompt", "cat")
    assert (sample.seed, sample.num_images, sample.output_dir, sample.device) == (0, 1, "samples", "auto")
    serve = parse("serve-reward")
    assert (serve.reward, serve.host, serve.port, serve.max_new_tokens, serve.device) == (
        "alignment", "127.0.0.1", 8060, 48, "auto")
    train = parse("train")
    assert (train.num_processes, train.set, train.seed, train.device, train.algo) == (1, [], None, None, None)


def test_a_command_is_required_and_no_top_level_option_is_abbreviated(capsys):
    assert main([]) == 2
    assert "the following arguments are required: command" in capsys.readouterr().err
    assert main(["--vers", "train"]) == 2  # not --version
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.strip().splitlines()[-1] == (
        "rlcm-fast train: error: unrecognized arguments: --vers")


def test_train_options_are_not_abbreviated(capsys):
    """`--num-proc 2` must not be --num-processes (the launched processes strip only the full option)."""
    assert main(["train", "--num-proc", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlcm-fast train: error: unrecognized arguments: --num-proc 2 (did you mean --num-processes?)")


def test_main_reads_sys_argv_without_the_program_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rlcm-fast", "--version"])
    assert main() == 0
    assert capsys.readouterr().out.startswith("rlcm-fast ")


@pytest.mark.parametrize("argv, expected", [
    (["--seed", "0", "--set", "seed=5"], {"seed": 0}),  # an option's 0 overrides --set's value too
    (["--set", "seed=5"], {"seed": 5}),
    (["--device", "cpu", "--set", "device=cuda"], {"device": "cpu"}),
    (["--algo", "ddpo"], {"method": "ddpo"}),
    (["--reward", "aesthetic", "--prompts", "simple_animals", "--set", "epochs=3"],
     {"reward": "aesthetic", "prompts": "simple_animals", "epochs": 3}),
])
def test_train_options_become_config_keys_over_set(argv, expected):
    assert _train_overrides(parse("train", *argv)) == expected


@pytest.mark.parametrize("value", ["cuda:", "cuda:x", "cpu:0", "CUDA"])
def test_serve_reward_device_is_checked_before_cuda_is(value, capsys, monkeypatch):
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.bind", lambda *a: pytest.fail("a socket was bound"))
    assert main(["serve-reward", "--device", value]) == 2
    assert one_line_error(capsys) == f"--device {value!r} is invalid; allowed: auto, cpu, cuda, cuda:N"



@pytest.mark.parametrize("pair, message", [
    ("epochs", "--set 'epochs' is invalid: expected key=value"),
    (" =3", "--set ' =3' is invalid: expected key=value"),
    ("learning_rat=1e-3", "unknown config key 'learning_rat' in --set; did you mean 'learning_rate'?"),
    ("epochs=many", "epochs='many' in --set is invalid: expected int"),
])
def test_a_bad_set_pair_is_one_line_exit_2_and_makes_no_run_folder(pair, message, tmp_path, capsys):
    assert main(["train", "--device", "cpu", "--output-dir", str(tmp_path / "run"), "--set", pair]) == 2
    assert one_line_error(capsys) == message
    assert list(tmp_path.iterdir()) == []

def refused_bind(host, port):
    raise OSError(errno.EADDRINUSE, "Address already in use")


@pytest.mark.parametrize("args, where", [
    (["--port", "0"], "127.0.0.1:0"),
    (["--port", "65535", "--max-new-tokens", "1"], "127.0.0.1:65535"),
    (["--host", "::1", "--port", "8061"], "::1:8061"),
    ([], "127.0.0.1:8060"),
])
def test_serve_reward_edge_values_pass_its_checks_and_reach_the_socket(args, where, capsys, monkeypatch):
    """0..65535 and --max-new-tokens 1 are allowed; the socket's refusal is one line with its strerror."""
    monkeypatch.setattr("rlcm_fast.rewards.alignment_server.bind", refused_bind)
    assert main(["serve-reward", "--device", "cpu", *args]) == 2
    assert one_line_error(capsys) == f"cannot serve on {where}: Address already in use"


def raising(exc: BaseException):
    def run_train(args, argv):
        raise exc
    return run_train


@pytest.mark.parametrize("exc, code, message", [
    (ConfigError("bad key"), 2, "bad key"),
    (UsageError("bad option"), 2, "bad option"),
    (MemoryError("DefaultCPUAllocator"), 1, "out of memory (DefaultCPUAllocator): lower resolution, the batch "
                                            "sizes, lora_rank or --num-images"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate " + "9" * 300), 1,
     "out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate " + "9" * 134 + "): lower "
     "resolution, the batch sizes, lora_rank or --num-images"),
    (OSError(errno.ENAMETOOLONG, "File name too long"), 2,
     "a path is too long: a file system takes at most 255 bytes per file or folder name (and Linux 4096 for a "
     "whole path)"),
])
def test_main_turns_errors_past_the_checks_into_one_line_and_an_exit_code(exc, code, message, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr("rlcm_fast.train_command.run_train", raising(exc))
    assert main(["train"]) == code
    assert one_line_error(capsys) == message


@pytest.mark.parametrize("exc", [RuntimeError("index out of range"), OSError(errno.ENOENT, "No such file")])
def test_other_errors_past_the_checks_stay_tracebacks(exc, monkeypatch):
    monkeypatch.setattr("rlcm_fast.train_command.run_train", raising(exc))
    with pytest.raises(type(exc)):
        main(["train"])


def test_a_lost_peer_under_a_launcher_is_exit_1_naming_this_process(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("rlcm_fast.train_command.run_train", raising(RuntimeError("Connection closed by peer")))
    assert main(["train"]) == 1
    assert one_line_error(capsys).startswith("process 1 stopped: another process of the run ended first")


def test_an_error_the_main_process_reports_is_not_repeated(capsys, monkeypatch):
    error = UsageError("said once by rank 0")
    error.reported_by_main_process = True
    monkeypatch.setattr("rlcm_fast.train_command.run_train", raising(error))
    assert main(["train"]) == 2
    assert "said once" not in capsys.readouterr().err


def test_an_interrupt_while_the_command_line_is_checked_says_to_run_it_again(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("rlcm_fast.train_command.run_train", raising(KeyboardInterrupt()))
    assert main(["train", "--set", "epochs=2"]) == 130
    assert capsys.readouterr().err == ("rlcm-fast: interrupted; run the same command again: "
                                       "rlcm-fast train --set epochs=2\n")


def test_an_interrupt_in_a_later_rank_prints_nothing(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("rlcm_fast.train_command.run_train", raising(KeyboardInterrupt()))
    assert main(["train"]) == 130
    assert capsys.readouterr().err == ""


def test_output_dir_and_set_output_dir_naming_one_folder_are_not_refused(tmp_path, capsys, monkeypatch):
    """`--output-dir run/` and `--set output_dir=run` are the same folder, spelt differently."""
    trained = []
    monkeypatch.setattr("rlcm_fast.train_command._train", lambda cfg, run_dir, resume_from: trained.append(run_dir) or 0)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", f"{run}/", "--set", f"output_dir={run}"]) == 0
    assert trained == [run]
    assert main(["train", "--device", "cpu", "--output-dir", str(run), "--set", f"output_dir={tmp_path}/other"]) == 2
    assert one_line_error(capsys) == (f"--output-dir {str(run)!r} and --set output_dir={str(tmp_path / 'other')!r} "
                                      "differ: give one of them")


def test_library_bars_are_off_inside_the_block_when_stderr_is_no_terminal(monkeypatch):
    from diffusers.utils import logging as diffusers_logging

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    diffusers_logging.enable_progress_bar()
    with library_bars_hidden_off_terminal():
        assert not diffusers_logging.is_progress_bar_enabled()
    assert diffusers_logging.is_progress_bar_enabled()



@pytest.mark.parametrize("command, unknown, hint", [
    (["train"], ["-q", "--sed", "3"], " (did you mean --seed?)"),  # the first `--` word is the option hinted at
    (["train"], ["--re", "x"], ""),  # --reward or --resume: no guess between two
    (["sample", "--prompt", "a"], ["--o", "x"], " (did you mean --output-dir?)"),
])
def test_an_unknown_option_hint_guesses_only_one_option(command, unknown, hint, capsys):
    assert main([*command, *unknown]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlcm-fast {command[0]}: error: unrecognized arguments: {' '.join(unknown)}{hint}")
