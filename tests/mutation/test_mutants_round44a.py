"""Mutation-testing round 44a (config, config_checks): hand-written mutants of the training config's defaults, its
--set parsing, its validation and its one-line errors were run against their tests (test_config, the config cases
of test_call_sizes, test_switches, test_algorithms, test_ddpo, test_rewards, test_edges_found_by_mutation); each
test here kills one that survived (named in its docstring). All are CPU-only and fast: configs are only built and
checked, no model is loaded and nothing is trained."""

import dataclasses
import re

import pytest

from rlcm_fast.config import ConfigError, parse_set_pairs, resolve_config
from rlcm_fast.config_checks import validate


def refused(**overrides) -> str:
    """The one-line error resolve_config gives for these overrides (on the default task and the tiny model)."""
    with pytest.raises(ConfigError) as info:
        resolve_config(overrides=overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- the limits of a range: the limit itself passes, one past it is refused --------------------------------------

@pytest.mark.parametrize("overrides", [
    {"horizon": 2},  # the least multi-step sampling, as the error's "horizon >= 2" says
    {"resolution": 8},  # the least the error's "a multiple of 8, at least 8" allows
    {"adam_weight_decay": 0.0},  # plain Adam, no weight decay
    {"jpeg_quality": 1},  # the bottom of "1..100"
    {"method": "ddpo", "horizon": 60},  # DDPO's DDIM steps are not bounded by the LCM's original_inference_steps
], ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()))
def test_each_limit_that_its_error_names_as_allowed_is_accepted(overrides):
    """Mutants: `horizon < 2` -> `< 3`, `resolution < 8` -> `< 16`, `adam_weight_decay >= 0` -> `> 0`,
    `1 <= jpeg_quality` -> `1 <` and the horizon <= original_inference_steps check applied to DDPO too: each refused
    a value that its own error message (or, for DDPO, the method's own schedule) says is allowed, so a user following
    the message was refused again."""
    cfg = resolve_config(overrides=overrides)
    assert {key: getattr(cfg, key) for key in overrides} == overrides


PAST_THE_RANGE = [
    ({"resolution": 0}, "resolution=0 is invalid: it must be a multiple of 8, at least 8"),
    ({"eval_images": 0}, "eval_images=0 is invalid: it must be a positive integer"),
    ({"max_grad_norm": 0.0}, "max_grad_norm=0.0 is invalid: it must be a finite number > 0"),
    ({"adam_weight_decay": float("inf")}, "adam_weight_decay=inf is invalid: it must be a finite number >= 0"),
    ({"grid_every": -1}, "grid_every=-1 is invalid: it must be >= 0"),
    ({"stat_min_count": -1}, "stat_min_count=-1 is invalid: it must be >= 0"),
    ({"kl_beta": float("inf")}, "kl_beta=inf is invalid: it must be a finite number >= 0"),
    ({"images_per_prompt": 0}, "images_per_prompt=0 is invalid: it must be a positive integer"),
    ({"reward_device": "cuda"}, "reward_device 'cuda' is invalid; allowed: auto, cpu"),
    ({"lora_targets": []}, "lora_targets=[] is invalid: it must be a non-empty list of module names"),
]


@pytest.mark.parametrize("overrides, message", PAST_THE_RANGE, ids=[next(iter(o)) for o, _ in PAST_THE_RANGE])
def test_each_value_just_past_its_range_is_a_one_line_error(overrides, message):
    """Mutants: `resolution < 8 or` dropped (0 is a multiple of 8: a 0-pixel run reached the model), eval_images and
    max_grad_norm dropped from the positive checks (0 evaluation images, a gradient clipped to nothing), the
    isfinite of adam_weight_decay and kl_beta dropped (inf trained on NaN), `grid_every`'s >= 0 check dropped,
    `stat_min_count < 0` -> `< -1`, images_per_prompt's positive check dropped (0 was a ZeroDivisionError
    traceback), `reward_device` accepting "cuda" (a value nothing reads) and an empty lora_targets accepted (a LoRA
    on no module: nothing trains)."""
    assert refused(**overrides) == message


# -- combinations of switches ------------------------------------------------------------------------------------

def test_graphed_training_is_refused_only_with_what_it_was_never_tested_with():
    """Mutants: `compiled_training` ignoring compile_scope (compile_unet with compile_scope=sampling leaves training
    eager, the combination the config's comment allows, refused), the gradient_checkpointing half of the refusal
    dropped (graphs captured around recomputed activations ran) and the message naming gradient_checkpointing when
    compile_unet is the one that clashes."""
    cfg = resolve_config(overrides={"train_cuda_graph": True, "compile_unet": True, "compile_scope": "sampling",
                                    "compile_backend": "aot_eager"})
    assert (cfg.train_cuda_graph, cfg.compile_unet, cfg.compile_scope) == (True, True, "sampling")
    assert refused(train_cuda_graph=True, gradient_checkpointing=True) == (
        "train_cuda_graph=true with gradient_checkpointing=true is refused (the two were never tested together); "
        "set one of them to false")
    assert refused(train_cuda_graph=True, gradient_checkpointing=True, compile_unet=True,
                   compile_backend="aot_eager").startswith("train_cuda_graph=true with compile_unet=true is refused")


def test_rows_per_call_zero_means_train_batch_size_and_is_accepted_outside_flattened_ppo():
    """Mutants: `rows_per_call not in (0, "auto")` -> `not in ("auto",)` and `rows_per_call < 0` -> `< 1`: 0,
    documented as "train_batch_size rows per call" (the paper's loop), was refused with train_rows=per_timestep,
    whose error says "set it to 0 or auto"."""
    cfg = resolve_config(overrides={"train_rows_per_call": 0, "train_rows": "per_timestep"})
    assert (cfg.train_rows_per_call, cfg.train_rows) == (0, "per_timestep")


def test_rebel_counts_pairs_and_is_not_held_to_ppos_sample_batch_rule():
    """Mutant: the `return` after REBEL's checks dropped, so PPO's sample_batch_size % train_batch_size rule applied
    to REBEL too: 4 batches of 6 images are 12 pairs, 3 updates of 4 pairs, a valid REBEL epoch that was refused."""
    overrides = {"algorithm": "rebel", "images_per_prompt": 2, "sample_batch_size": 6, "batches_per_epoch": 4,
                 "train_batch_size": 4, "gradient_accumulation_steps": 1}
    cfg = resolve_config(overrides=overrides)
    assert {key: getattr(cfg, key) for key in overrides} == overrides


# -- a config built in code is checked like one from --set -------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("epochs", True, "epochs=True is invalid: expected int"),
    ("lora_targets", ["to_q", 1], "lora_targets=['to_q', 1] is invalid: expected list[str]"),
    ("task", "compression", "task 'compression' is unknown; allowed: compressibility"),
    ("eval_prompts", "birds", "eval_prompts 'birds' is unknown; allowed: "),
])
def test_validate_refuses_what_code_can_set_but_set_cannot(field, value, message):
    """Mutants: the int check accepting a bool (TrainConfig(epochs=True) trained one epoch), the list[str] check
    not looking inside the list, validate's own task check dropped (a config built in code or read from a
    checkpoint skips resolve_config's: TrainConfig(task="compression") passed) and the eval_prompts check dropped
    (an unknown set failed at the first evaluation, after the run had started)."""
    cfg = dataclasses.replace(resolve_config(), **{field: value})
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate(cfg)


def test_a_relative_prompts_file_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    """Mutant: the resolve of a prompts file dropped: config.yaml and checkpoints kept "mine.txt", and a --resume
    from another folder could not find the run's prompts."""
    (tmp_path / "mine.txt").write_text("a cat\na dog\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(overrides={"prompts": "mine.txt"})
    assert cfg.prompts == str((tmp_path / "mine.txt").resolve())


def test_unchecked_configs_are_left_to_the_caller():
    """Mutant: `checked=False` ignored: a resume reading its prompts from the checkpoint's copy had its config
    validated before the copy was in place, and failed on a prompts file that the resume would have restored."""
    cfg = resolve_config(overrides={"prompts": "gone/prompts.txt"}, checked=False)
    assert cfg.prompts == "gone/prompts.txt"
    with pytest.raises(ConfigError, match="^prompts file 'gone/prompts.txt' does not exist"):
        validate(cfg)


def test_samples_per_epoch_counts_every_sampling_iteration():
    """Mutant: samples_per_epoch without num_sample_iters: the divisibility checks (and the trainer's update count)
    saw half the samples of a run with num_sample_iters=2."""
    cfg = resolve_config(overrides={"num_sample_iters": 2})
    assert cfg.samples_per_epoch == cfg.batches_per_epoch * 2 * cfg.sample_batch_size == 64


def test_ddpo_on_the_tiny_model_gets_the_tiny_sd_preset():
    """Mutant: the "tiny-sd" model given TINY_MODEL_PRESET: `--algo ddpo` without a model trained with the LCM's
    4 steps and two batches of 16 instead of tiny-sd's 10 DDIM steps and one on-policy batch of 32 (README)."""
    cfg = resolve_config(overrides={"method": "ddpo"})
    assert (cfg.model, cfg.horizon, cfg.guidance_scale) == ("tiny-sd", 10, 5.0)
    assert (cfg.batches_per_epoch, cfg.sample_batch_size, cfg.train_batch_size) == (1, 32, 32)


# -- --set parsing -----------------------------------------------------------------------------------------------

def test_set_parses_yaml_12_booleans_and_keeps_values_yaml_cannot_read():
    """Mutants: "False" dropped from the YAML 1.2 booleans (`--set reward_overlap=False`, Python's spelling, was
    refused as not a bool while True was accepted) and a value that is not valid YAML ("[x", "@x") changed instead
    of being kept as typed."""
    cfg = resolve_config(overrides=parse_set_pairs(["reward_overlap=False", "train_final_step=True"]))
    assert cfg.reward_overlap is False and cfg.train_final_step is True
    assert parse_set_pairs(["eval_prompts=[x", "prompts=@mine.txt"]) == {"eval_prompts": "[x",
                                                                          "prompts": "@mine.txt"}


@pytest.mark.parametrize("pair", ["=5", " =5"])
def test_a_set_pair_without_a_key_is_refused_as_such(pair):
    """Mutant: the empty-key check dropped: `--set =5` was reported as an unknown config key ''."""
    with pytest.raises(ConfigError) as info:
        parse_set_pairs([pair])
    assert str(info.value) == f"--set {pair!r} is invalid: expected key=value"


def test_lcm_lora_null_is_no_adapter_and_a_boolean_is_no_list_entry():
    """Mutants: `lcm_lora=null` read as the adapter named "None" (a hub download of "None" after the config passed),
    and a boolean accepted as a lora_targets entry (`[to_q, true]` became the module name "True")."""
    assert resolve_config(overrides=parse_set_pairs(["lcm_lora=null"])).lcm_lora is None
    assert refused(**parse_set_pairs(["lora_targets=[to_q, true]"])) == (
        "lora_targets=['to_q', True] in --set is invalid: expected list[str]")


def test_an_unknown_key_one_letter_off_gets_a_suggestion():
    """Mutant: difflib's cutoff raised from 0.6 to 0.9: `seeds` (0.89 like `seed`) got no suggestion."""
    assert refused(seeds=1) == "unknown config key 'seeds' in --set; did you mean 'seed'?"


# -- a source bug found on the way, mended beside this file ---------------------------------------------------------

@pytest.mark.parametrize("pair, shown", [("lcm_lora=true", "True"), ("lcm_lora=false", "False")])
def test_a_boolean_lcm_lora_from_set_is_refused_as_it_is_from_code(pair, shown):
    """Found beside mutant C11/C12 (the `str | None` branch): `model=true` is refused and TrainConfig(lcm_lora=True)
    fails validate with "expected str | None", but `--set lcm_lora=true` became the adapter named "True", passed
    every check and failed only when the model loaded, as a hub lookup of "True"."""
    message = f"lcm_lora={shown} in --set is invalid: expected str | None"
    assert refused(**parse_set_pairs([pair])) == message
