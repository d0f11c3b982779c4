"""Mutation-testing round 48e (config, config_checks), a second round over them after 44a: hand-written mutants of
the config's resolution order, its YAML and --set reading, its coercion and its validation were run against their
tests (test_config, test_home_paths, the config cases of test_call_sizes, test_switches, test_cli_inputs,
test_rewards, test_algorithms and test_evaluation, test_mutants_round44a, test_edges_found_by_mutation,
test_cli_mutants, test_mutants_round44b); each test here kills one that survived (named in its docstring). All
are CPU-only and fast: configs are only built and checked, no model is loaded and nothing is trained."""

import pytest

from rlcm_fast.config import ConfigError, parse_set_pairs, resolve_config


def refused(**overrides) -> str:
    """The one-line error resolve_config gives for these overrides (on the default task and the tiny model)."""
    with pytest.raises(ConfigError) as info:
        resolve_config(overrides=overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- resolution order and key names -------------------------------------------------------------------------------

def test_the_task_argument_wins_over_a_task_given_with_set():
    """Mutant C22: `overrides["task"] = task` -> `overrides.setdefault("task", task)`: `rlcm-fast train --task
    aesthetic --set task=compressibility` trained compressibility, against resolve_config's documented order
    (argument > --set > file), so the task named on the command line was silently not the one run."""
    cfg = resolve_config(task="aesthetic", overrides={"task": "compressibility"})
    assert (cfg.task, cfg.reward, cfg.prompts) == ("aesthetic", "aesthetic", "simple_animals")


def test_a_longer_misspelling_still_gets_the_nearest_key():
    """Mutant C3: difflib's cutoff raised from 0.6 to 0.85: peft's `lora_target_modules` (0.77 like
    `lora_targets`) and `batch_size` (0.77 like `train_batch_size`) got no suggestion, only "the keys are
    TrainConfig's fields", though the key the user meant is one suggestion away."""
    assert refused(lora_target_modules=["to_q"]) == (
        "unknown config key 'lora_target_modules' in --set; did you mean 'lora_targets'?")
    assert refused(batch_size=4) == "unknown config key 'batch_size' in --set; did you mean 'train_batch_size'?"


# -- coercion -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair, shown", [("compile_unet=1", "1"), ("reward_overlap=0", "0")])
def test_a_number_for_a_boolean_key_is_refused(pair, shown):
    """Mutant C10: the bool branch of _coerce accepting an int as bool(value): `--set reward_overlap=0` turned the
    overlap off and `compile_unet=1` compiled, though a config's booleans are YAML 1.2's true and false only, as
    `no` and `on` are refused: one rule for every spelling that is not a boolean."""
    key = pair.partition("=")[0]
    assert refused(**parse_set_pairs([pair])) == (
        f"{key}={shown} in --set is invalid: expected bool (true or false)")


# -- paths --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model", "clipscore_model", "pickscore_model", "pickscore_processor"])
def test_each_model_folder_may_start_with_a_tilde(tmp_path, monkeypatch, key):
    """Mutant C7: "pickscore_processor" dropped from PATH_KEYS: `--set pickscore_processor=~/clip-h` stayed
    "~/clip-h", which transformers reads as a hub id or a folder named "~" in the working folder, after sampling.
    (test_home_paths loops over PATH_KEYS itself, so a key missing from it goes unseen there; the keys are named
    here one by one.)"""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert getattr(resolve_config(overrides={key: "~/weights"}), key) == f"{tmp_path}/weights"


# -- combinations of switches ------------------------------------------------------------------------------------

def test_graphed_training_with_compiled_blocks_is_refused():
    """Mutant K20: `compile_scope != "sampling"` -> `== "unet"`: compile_scope=blocks also compiles the training
    forward and backward (only its transformer blocks), yet train_cuda_graph with it passed, the combination the
    config refuses as never tested, and a run captured CUDA graphs around compiled blocks."""
    assert refused(train_cuda_graph=True, compile_unet=True, compile_scope="blocks", compile_backend="aot_eager") == (
        "train_cuda_graph=true with compile_unet=true is refused (the two were never tested together); "
        "set one of them to false")


@pytest.mark.parametrize("key, expected", [("epochs", "int"), ("learning_rate", "float"),
                                           ("compile_unet", "bool (true or false)")])
def test_auto_for_a_key_that_has_no_auto_is_refused_naming_the_file(tmp_path, key, expected):
    """Mutant C30: `kind == "int | str" and value == "auto"` -> `value == "auto"`: "auto" (which the two call sizes
    take) passed _coerce for every int and float key, and `epochs: auto` in a config file was refused later by
    validate without naming the file it came from; with checked=False (a resume) it was not refused at all. (The
    bool case is checked before "auto" either way: it guards the message of the same mistake.)"""
    path = tmp_path / "run.yaml"
    path.write_text(f"{key}: auto\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve_config(config_file=path, checked=False)
    assert str(info.value) == f"{key}='auto' in config file {str(path)!r} is invalid: expected {expected}"
