"""A path starting with ~ is the home folder wherever rlcm-fast takes a path: in a config file, a --set value, an
option written `--output-dir=~/runs` or quoted, and a Trainer's arguments, where no shell expanded it. pathlib,
os.path and diffusers take "~" as a folder's name: a run went into ./~/, a model or prompts file was "missing"."""

import dataclasses
from pathlib import Path

import pytest

from rlcm_fast import cli
from rlcm_fast.checkpoint import CheckpointError
from rlcm_fast.config import PATH_KEYS, ConfigError, TrainConfig, resolve_config
from rlcm_fast.path_checks import home_expanded
from rlcm_fast.resume import checked_start, refuse_changed_settings


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder of its own, and a working folder elsewhere (a ./~ made there would be seen)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


def test_only_a_leading_tilde_is_expanded(home):
    assert home_expanded("~/runs/a") == f"{home}/runs/a"
    assert home_expanded("~") == str(home)
    for unchanged in ("tiny", "runs/~a", "org/name", "", None, 3):
        assert home_expanded(unchanged) == unchanged


def test_config_paths_from_a_file_and_from_set_are_under_home(home):
    (home / "prompts.txt").write_text("a cat\na dog\n")
    (home / "config.yaml").write_text("prompts: ~/prompts.txt\naesthetic_model: ~/clip\n")
    cfg = resolve_config(config_file=home / "config.yaml",
                         overrides={"lcm_lora": "~/lora", "eval_prompts": "~/prompts.txt", "output_dir": "~/runs/a"})
    assert cfg.prompts == cfg.eval_prompts == str(home / "prompts.txt")
    assert (cfg.aesthetic_model, cfg.lcm_lora, cfg.output_dir) == (f"{home}/clip", f"{home}/lora", f"{home}/runs/a")
    assert cfg.model == "tiny"  # a preset's name as it is


def test_every_path_key_is_expanded_by_validation(home):
    """A TrainConfig built in code is expanded too (validate runs on every Trainer's config)."""
    from rlcm_fast.config_checks import validate

    (home / "prompts.txt").write_text("a cat\n")
    cfg = validate(TrainConfig(**{key: "~/prompts.txt" if "prompts" in key else f"~/{key}" for key in PATH_KEYS}))
    for key in PATH_KEYS:
        assert getattr(cfg, key).startswith(f"{home}/"), (key, getattr(cfg, key))


def test_a_trainers_run_folder_and_resume_path_are_under_home(home):
    cfg, run_dir, resume_from = checked_start(resolve_config(), "~/runs/a", None)
    assert run_dir == home / "runs" / "a" and cfg.output_dir == str(run_dir) and resume_from is None
    assert not Path("~").exists()
    with pytest.raises(CheckpointError, match=rf"^resume_from '{home}/runs/b' does not exist"):  # the expanded one
        checked_start(resolve_config(), "~/runs/a", "~/runs/b")


@pytest.mark.parametrize("argv, option", [
    (["train", "--output-dir=~/runs/a", "--resume", "~/runs/a", "--config", "~/c.yaml", "--prompts", "~/p.txt",
      "--model", "~/m"], ("output_dir", "resume", "config", "prompts", "model")),
    (["sample", "--lora=~/runs/a", "--output-dir", "~/out", "--model", "~/m", "--prompts", "~/p.txt"],
     ("lora", "output_dir", "model", "prompts")),
])
def test_the_command_lines_path_options_are_under_home(home, monkeypatch, argv, option):
    seen = {}

    def record(args, *rest):
        seen.update(vars(args))
        return 0

    monkeypatch.setattr("rlcm_fast.train_command.run_train", record)
    monkeypatch.setattr("rlcm_fast.sample_command.run_sample", record)
    assert cli.main(argv) == 0
    for name in option:
        assert seen[name].startswith(f"{home}/"), (name, seen[name])


def test_serve_rewards_model_folders_are_under_home(home, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run_serve_reward", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["serve-reward", "--vlm=~/llava", "--scorer", "~/roberta"]) == 0
    assert (seen["vlm"], seen["scorer"]) == (f"{home}/llava", f"{home}/roberta")


def test_a_resume_naming_the_saved_folder_with_a_tilde_changes_no_setting(home):
    """A run saved its model expanded; `--set model=~/m` at resume is the same folder, not a changed model."""
    saved = {"model": f"{home}/m", "lcm_lora": f"{home}/lora"}
    refuse_changed_settings(saved, {"model": "~/m", "lcm_lora": "~/lora"}, mid_epoch=False)
    with pytest.raises(ConfigError, match="^model='~/n' differs"):
        refuse_changed_settings(saved, {"model": "~/n", "lcm_lora": "~/lora"}, mid_epoch=False)


def test_path_keys_name_fields_of_the_config():
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(PATH_KEYS) <= names
