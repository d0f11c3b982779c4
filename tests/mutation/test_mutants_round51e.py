"""Mutation-testing round 51e (config, config_checks), a third round over them after 44a and 48e: hand-written
mutants of each key's range and type checks and the words of their messages, --set parsing, YAML files, the
presets' precedence, to_dict round trips and the reward server's URL checks were run against their tests
(test_config, test_cli_inputs, test_home_paths, test_mutants_round44a, test_mutants_round48e,
test_edges_found_by_mutation); each test here kills one that survived (named in its docstring). All are CPU-only
and fast: configs are only built and checked, no model is loaded and nothing is trained."""

import pytest

from rlcm_fast.config import ConfigError, parse_set_pairs, resolve_config


def refused(**kwargs) -> str:
    """The one-line error resolve_config gives for these arguments (on the default task and the tiny model)."""
    with pytest.raises(ConfigError) as info:
        resolve_config(**kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- --set parsing --------------------------------------------------------------------------------------------------

def test_spaces_around_a_set_key_are_ignored():
    """Mutant C5: `key = key.strip()` dropped: `--set "epochs = 3"` (spaces as a shell user types them around
    `=`) was refused as the unknown config key 'epochs ', though the value's spaces were already ignored."""
    assert parse_set_pairs(["epochs = 3", " lora_targets =to_q, to_v"]) == {"epochs": 3, "lora_targets": "to_q, to_v"}
    assert resolve_config(overrides=parse_set_pairs(["epochs = 3"])).epochs == 3


def test_a_name_quoted_as_yaml_is_the_name_without_its_quotes():
    """Mutant C22: `not isinstance(value, str)` dropped from parse_set_pairs' keep-as-typed rule: every name key's
    value was kept raw, so `--set prompts="'run: 2.txt'"` (quoted, as YAML needs for a name holding ": ") named
    the file "'run: 2.txt'" with its quotes, though --set values are read as YAML scalars."""
    assert parse_set_pairs(["prompts='run: 2.txt'", 'model="my model"', "lcm_lora='010'"]) == {
        "prompts": "run: 2.txt", "model": "my model", "lcm_lora": "010"}


def test_a_function_given_in_code_as_the_lcm_lora_is_refused_before_the_run():
    """Mutant C19: `callable(value)` dropped from _coerce's `str | None` branch: resolve_config(overrides=
    {"lcm_lora": load_adapter}) passed, naming the adapter "<function load_adapter at 0x...>", which the run then
    tried to fetch from the hub after its run folder was written; validate refuses the same value in TrainConfig."""
    def load_adapter():
        return None

    assert refused(overrides={"lcm_lora": load_adapter}) == (
        f"lcm_lora={load_adapter!r} in --set is invalid: expected str | None")


# -- ranges: each limit and the words of its message ---------------------------------------------------------------

def test_zero_sampling_batches_per_call_is_a_one_line_error_not_a_division_by_zero():
    """Mutant K16: `joined < 1` -> `joined < 0` in the sample_batches_per_call check: `--set
    sample_batches_per_call=0` ended in a ZeroDivisionError traceback (`rounds % 0`) instead of the error naming
    the sizes that divide the run's sampling rounds."""
    assert refused(overrides={"sample_batches_per_call": 0, "batches_per_epoch": 3}) == (
        "sample_batches_per_call=0 is invalid: it must be a positive integer dividing batches_per_epoch x "
        "num_sample_iters = 3 (e.g. 1 or 3), or 'auto'")
    assert resolve_config(overrides={"sample_batches_per_call": 3, "batches_per_epoch": 3}).sample_batches_per_call == 3


def test_ddpo_eta_of_zero_is_refused_by_the_config_itself():
    """Mutant K13: `0 < cfg.eta` -> `0 <= cfg.eta`: `--algo ddpo --set eta=0` (deterministic DDIM, no
    log-density to train) passed the config, so config.yaml and the run folder were written and the models loaded
    before the DDPO policy refused it; the config's check is what stops it before any run state."""
    assert refused(overrides={"method": "ddpo", "eta": 0.0}) == (
        "eta=0.0 is invalid: DDPO's DDIM eta must be in (0, 1] (0 has no log-density)")
    assert resolve_config(overrides={"method": "ddpo", "eta": 1e-3}).eta == 1e-3


def test_a_negative_reward_thread_count_is_refused():
    """Mutant K22: "reward_threads" dropped from the keys that must be >= 0: `--set reward_threads=-1` passed
    (0 is the documented "one per CPU core"; -1 is no count), to fail as ThreadPoolExecutor's traceback when the
    JPEG reward built its pool."""
    assert refused(overrides={"reward_threads": -1}) == "reward_threads=-1 is invalid: it must be >= 0"
    assert resolve_config(overrides={"reward_threads": 0}).reward_threads == 0
