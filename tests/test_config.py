import dataclasses
import re

import pytest

from rlcm_fast.config import ConfigError, TrainConfig, config_from_saved, parse_set_pairs, resolve_config
from rlcm_fast.config_checks import validate


def test_paper_presets_follow_table_1():
    aesthetic = resolve_config("aesthetic", model="sd15-lcm", overrides={"reward": "jpeg_compressibility"})
    assert (aesthetic.gradient_accumulation_steps, aesthetic.sample_batch_size, aesthetic.stat_buffer_size) == (4, 8, 32)
    assert (aesthetic.lora_rank, aesthetic.lora_alpha, aesthetic.prompts) == (8, 8.0, "simple_animals")
    compress = resolve_config("compressibility", model="sd15-lcm")
    assert (compress.horizon, compress.batches_per_epoch, compress.sample_batch_size, compress.train_batch_size) == (8, 10, 4, 2)
    assert (compress.learning_rate, compress.clip_range, compress.adv_clip_max, compress.max_grad_norm) == (1e-4, 1e-4, 10.0, 5.0)
    assert compress.resolution == 768 and compress.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert not compress.train_final_step  # 7 of the 8 actions trained


def test_tiny_model_gets_the_cpu_scale_preset_and_overrides_win(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 3\nclip_range: 0.05\n")
    cfg = resolve_config(None, None, config_file, parse_set_pairs(["epochs=2", "lora_targets=to_q,to_v"]))
    assert cfg.model == "tiny" and cfg.resolution == 32 and cfg.horizon == 4
    assert cfg.epochs == 2 and cfg.clip_range == 0.05 and cfg.lora_targets == ["to_q", "to_v"]


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_tiny_presets_keep_the_alignment_tasks_prompts(model):
    method = "ddpo" if model == "tiny-sd" else "rlcm"
    for task, prompts in (("compressibility", "simple_animals"), ("aesthetic", "simple_animals"),
                          ("alignment", "alignment")):
        cfg = resolve_config(task, model, None, {"method": method})
        assert cfg.prompts == prompts and cfg.resolution == 32, (task, model)


def test_set_values_are_typed():
    pairs = parse_set_pairs(["learning_rate=3e-4", "train_final_step=true", "seed=7"])
    cfg = resolve_config(overrides=pairs)
    assert cfg.learning_rate == 3e-4 and cfg.train_final_step is True and cfg.seed == 7


@pytest.mark.parametrize("overrides, message", [
    ({"horizon": 1}, "horizon=1 is invalid: multi-step sampling needs horizon >= 2"),
    ({"learning_rate": 0}, "learning_rate=0.0 is invalid: it must be a finite number > 0"),
    ({"learning_rate": -1e-4}, "learning_rate=-0.0001 is invalid"),
    ({"sample_batch_size": 6, "train_batch_size": 4}, "sample_batch_size=6 is not divisible by train_batch_size=4"),
    ({"prompts": "birds"}, "prompts 'birds' is unknown; allowed: imagenet_animals"),
    ({"reward": "beauty"}, "reward 'beauty' is unknown"),
    ({"device": "tpu"}, "device 'tpu' is invalid; allowed: auto, cpu, cuda"),
    ({"epochs": "many"}, "epochs='many' in --set is invalid: expected int"),
    ({"learning_rat": 1e-3}, "unknown config key 'learning_rat' in --set; did you mean 'learning_rate'"),
    ({"unknown_key": 1}, "unknown config key 'unknown_key' in --set; the keys are TrainConfig's fields "
                         "(rlcm_fast/config.py)"),
    ({"horizon": 60}, "horizon=60 is invalid: it must be <= original_inference_steps=50"),
    ({"train_final_step": "yes"}, "train_final_step='yes' in --set is invalid: expected bool"),
    ({"attention_backend": "flash"}, "attention_backend 'flash' is invalid; allowed: sdpa, cudnn, xformers"),
    ({"epochs": 0}, "epochs=0 is invalid: it must be a positive integer"),
    ({"checkpoint_every": 0}, "checkpoint_every=0 is invalid: it must be a positive integer"),
    ({"learning_rate": float("inf")}, "learning_rate=inf is invalid: it must be a finite number > 0"),
    ({"adam_epsilon": 0}, "adam_epsilon=0.0 is invalid: it must be a finite number > 0"),
    ({"adam_beta2": 1.0}, "adam_beta2=1.0 is invalid: it must be in [0, 1)"),
    ({"resolution": 36}, "resolution=36 is invalid: it must be a multiple of 8, at least 8"),
    ({"seed": 2**63}, f"seed={2**63} is invalid: it must be in 0..2**63-1"),
    ({"jpeg_quality": 101}, "jpeg_quality=101 is invalid: it must be in 1..100"),
    ({"lora_targets": ["to_q", ""]}, "lora_targets=['to_q', ''] is invalid"),
    ({"algorithm": "rebel", "images_per_prompt": 2, "train_rows": "per_timestep"},
     "train_rows='per_timestep' applies to"),
    # Each policy's own keys: the other method's run ignored them without a word.
    ({"method": "ddpo", "train_final_step": True},
     "train_final_step=True applies to --algo rlcm only, and --algo ddpo ignores it: leave it at False"),
    ({"method": "ddpo", "sample_cuda_graph": True}, "sample_cuda_graph=True applies to --algo rlcm only"),
    ({"method": "ddpo", "policy_step_backend": "reference"}, "policy_step_backend='reference' applies to --algo rlcm"),
    ({"method": "ddpo", "original_inference_steps": 20}, "original_inference_steps=20 applies to --algo rlcm only"),
    ({"eta": 0.5}, "eta=0.5 applies to --algo ddpo only, and --algo rlcm ignores it: leave it at 1.0"),
    # tiny: 2 batches of 16 = 16 pairs; a train batch of 32 divides the samples, not the pairs
    ({"algorithm": "rebel", "images_per_prompt": 2, "train_batch_size": 32}, "REBEL: pairs per epoch (16"),
])
def test_bad_values_give_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        resolve_config(overrides=overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [
    {"seed": 2**63 - 1},
    {"guidance_scale": 1.0},  # no guidance
    {"stat_min_count": 0},  # batch statistics never (per-prompt ones from the first reward)
    {"jpeg_quality": 100},
    {"original_inference_steps": 4},  # tiny's horizon: every step of the schedule
    {"adam_beta1": 0.0},
    {"reward_server": "https://example.org:8060"},
], ids=lambda overrides: next(iter(overrides)))
def test_values_at_the_edges_of_their_ranges_are_accepted(overrides):
    cfg = resolve_config(overrides=overrides)
    assert {key: getattr(cfg, key) for key in overrides} == overrides


def test_unknown_task_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="task 'compression' is unknown; allowed: compressibility"):
        resolve_config("compression")
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_config(config_file=bad)
    bad.write_text("epochs: 3\nlora_targets: [to_q, to_v\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(config_file=bad)
    assert str(info.value) == (f"config file {str(bad)!r} is not valid YAML at line 3, column 1: expected ',' or "
                               "']', but got '<stream end>'")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_pairs(["epochs"])


def test_a_name_given_with_set_is_kept_as_typed_even_where_yaml_reads_a_number(tmp_path):
    """YAML 1.1 reads 010 as 8 and 1_000 as 1000: `--set prompts=010` named the prompts file "8"."""
    (tmp_path / "010").write_text("a cat\n")
    pairs = parse_set_pairs([f"prompts={tmp_path / '010'}", "model=1_000", "lcm_lora=010", "epochs=12"])
    assert pairs == {"prompts": str(tmp_path / "010"), "model": "1_000", "lcm_lora": "010", "epochs": 12}
    assert parse_set_pairs(["prompts=010"]) == {"prompts": "010"}
    assert parse_set_pairs(["reward= 0x10 "]) == {"reward": "0x10"}  # a name: its spaces go, as a string's do


def test_no_yes_on_and_off_are_words_not_booleans(tmp_path):
    """YAML 1.1 read the documented `mixed_precision: no` as False, which the str field then refused."""
    assert resolve_config(overrides=parse_set_pairs(["mixed_precision=no"])).mixed_precision == "no"
    config_file = tmp_path / "run.yaml"
    config_file.write_text("mixed_precision: no\ngradient_checkpointing: true\n")
    cfg = resolve_config(config_file=config_file)
    assert cfg.mixed_precision == "no" and cfg.gradient_checkpointing is True
    upper = resolve_config(overrides=parse_set_pairs(["gradient_checkpointing=TRUE", "reward_overlap=FALSE"]))
    assert upper.gradient_checkpointing is True and upper.reward_overlap is False  # YAML 1.2's other spellings
    with pytest.raises(ConfigError) as error:
        resolve_config(overrides=parse_set_pairs(["reward_overlap=off"]))
    assert str(error.value) == "reward_overlap='off' in --set is invalid: expected bool (true or false)"


def test_the_default_compile_scope_is_the_whole_unet():
    assert TrainConfig().compile_scope == resolve_config().compile_scope == "unet"


def test_a_compile_backend_is_checked_even_while_compile_unet_is_off():
    """The list names every backend the check accepts, aot_eager (the CPU's with torch < 2.14.1) among them."""
    with pytest.raises(ConfigError, match=r"compile_backend 'nope' is unknown; allowed: .*\baot_eager\b"):
        resolve_config(overrides={"compile_backend": "nope"})
    assert resolve_config(overrides={"compile_backend": "aot_eager"}).compile_backend == "aot_eager"


def test_defaults_round_trip_through_a_dict():
    cfg = resolve_config()
    assert TrainConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"keep_checkpoints": -1}, "keep_checkpoints=-1 is invalid: it must be >= 0"),
    ({"max_nonfinite_steps": -2}, "max_nonfinite_steps=-2 is invalid: it must be >= 0"),
    ({"gradient_checkpointing": "on"}, "gradient_checkpointing='on' in --set is invalid: expected bool"),
    ({"keep_checkpoints": 1.5}, "keep_checkpoints=1.5 in --set is invalid: expected int"),
])
def test_reliability_keys_are_typed_and_range_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"policy_step_backend": "triton"}, "policy_step_backend 'triton' is invalid; allowed: auto, reference"),
    ({"train_rows": "rows"}, "train_rows 'rows' is invalid; allowed: flattened, per_timestep"),
    ({"compile_unet": "yes"}, "compile_unet='yes' in --set is invalid: expected bool"),
    ({"compile_unet": True, "compile_backend": "nvfuser"}, "compile_backend 'nvfuser' is unknown; allowed: .*inductor"),
    ({"compile_scope": "model"}, "compile_scope 'model' is invalid; allowed: unet, blocks, sampling"),
])
def test_bad_switch_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=overrides)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", "3", "epochs='3' is invalid: expected int"),
    ("train_final_step", 1, "train_final_step=1 is invalid: expected bool"),
    ("lora_targets", "to_q", "lora_targets='to_q' is invalid: expected list[str]"),
    ("learning_rate", None, "learning_rate=None is invalid: expected float"),
    ("learning_rate", True, "learning_rate=True is invalid: expected float"),  # a bool is an int, not a number here
])
def test_validate_checks_types_of_a_config_built_in_code(field, value, message):
    cfg = resolve_config()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg)


def test_a_stored_config_is_read_with_types_and_unknown_keys_refused():
    stored = {**resolve_config().to_dict(), "epochs": 4.0}
    assert config_from_saved(stored, "checkpoint 'c'")["epochs"] == 4
    with pytest.raises(ConfigError, match="unknown config key 'keep_checkpoint' in checkpoint 'c'; did you mean 'keep_checkpoints'"):
        config_from_saved({**stored, "keep_checkpoint": 2}, "checkpoint 'c'")
    with pytest.raises(ConfigError, match="is not a mapping"):
        config_from_saved(["epochs"], "checkpoint 'c'")


# Bad input found by an audit that ended in Python tracebacks: each is one line now.

def _message(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(**kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("pair, message", [
    ("model=[a]", "model=['a'] in --set is invalid: expected str"),
    ("model={a: 1}", "model={'a': 1} in --set is invalid: expected str"),
    ("task=[x]", "task=['x'] in --set is invalid: expected str"),
    ("model=null", "model=None in --set is invalid: expected str"),  # was the model named "None"
    ("method=true", "method=True in --set is invalid: expected str"),
])
def test_task_model_and_method_must_be_strings_before_they_pick_presets(pair, message):
    assert _message(overrides=parse_set_pairs([pair])) == message


@pytest.mark.parametrize("text, message", [
    ("model: [a]\n", "model=['a'] in {source} is invalid: expected str"),
    ("task: {a: 1}\n", "task={'a': 1} in {source} is invalid: expected str"),
    ("model:\n", "model=None in {source} is invalid: expected str"),
    ("epochs: 2\nreward: ~\n", "reward=None in {source} is invalid: expected str"),
    ("1: 2\n", "config key 1 in {source} is invalid: expected a key name (a string), e.g. epochs"),
    ("epochs: 2\ntrue: 1\n", "config key True in {source} is invalid: expected a key name (a string), e.g. epochs"),
    ("null: 1\n", "config key None in {source} is invalid: expected a key name (a string), e.g. epochs"),
])
def test_config_file_keys_and_preset_names_are_checked(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert _message(config_file=path) == message.replace("{source}", f"config file {str(path)!r}")


def test_a_stored_config_with_a_key_that_is_not_a_string_is_one_line():
    with pytest.raises(ConfigError) as info:
        config_from_saved({1: 2}, "checkpoint 'c'")
    assert str(info.value) == "config key 1 in checkpoint 'c' is invalid: expected a key name (a string), e.g. epochs"


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe: 1\n", "byte 0xff at position 0 cannot be decoded"),
    (b"epochs: 3\nmodel: \xe9t\xe9\n", "byte 0xe9 at position 17 cannot be decoded"),
])
def test_config_file_that_is_not_utf8_is_one_line(tmp_path, data, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    assert _message(config_file=path) == (f"config file {str(path)!r} is not UTF-8 text: {message} "
                                          "(a config file must be UTF-8 YAML)")


def test_config_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: " + "[" * 10000 + "\n")
    assert _message(config_file=path) == f"config file {str(path)!r} is not valid YAML: it is nested too deeply"
    with pytest.raises(ConfigError) as info:
        parse_set_pairs(["epochs=" + "[" * 10000])
    assert str(info.value) == "--set epochs=... is invalid: its value is nested too deeply"


INT_KEYS = [f.name for f in dataclasses.fields(TrainConfig)  # "int | str": an int or "auto"
            if f.type in ("int", "int | str") and f.name not in ("seed", "jpeg_quality")]


@pytest.mark.parametrize("name", INT_KEYS)
def test_every_int_key_has_an_upper_bound(name):
    assert _message(overrides={name: 2**31}) == f"{name}={2**31} is invalid: it must be <= 2**31-1 (2147483647)"


FLOAT_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"]


@pytest.mark.parametrize("name", FLOAT_KEYS)
def test_every_float_key_stays_within_float32(name):
    """1e39: clip_range and adv_clip_max were torch's overflow traceback, kl_beta a NaN loss at every step."""
    for value in (1e39, -1e300):
        assert _message(overrides={name: value}) == (
            f"{name}={value} is invalid: it must be within float32's range (|x| <= 3.403e+38)")


def test_guidance_scale_is_at_most_1000():
    """At 1e36 the LCM's guidance embedding overflowed into NaN images, reported as the reward's fault."""
    assert _message(overrides={"guidance_scale": 1e36}) == (
        "guidance_scale=1e+36 is invalid: it must be in [1, 1000] (w = guidance_scale - 1)")
    assert resolve_config(overrides={"guidance_scale": 1000.0}).guidance_scale == 1000.0


@pytest.mark.parametrize("url, problem", [
    ("http://", "no host"),  # retried for a minute, after sampling
    ("http://[::1", "Invalid IPv6 URL"),  # the reward's own ValueError, after sampling
    ("ftp://host:8060", "the scheme must be http or https"),
    ("http://host:99999", "Port out of range 0-65535"),
    ("localhost:8060", "the scheme must be http or https"),
    # urlsplit dropped the newline and tab without a word; the space and NUL went into the request.
    ("http://host:8060/\nscore", "it holds a space or a control character"),
    ("http://ho\tst:8060", "it holds a space or a control character"),
    ("http://host:8060/my scorer", "it holds a space or a control character"),
    ("http://host\x00:8060", "it holds a space or a control character"),
])
def test_a_reward_server_url_is_checked_before_anything_runs(url, problem):
    assert _message(overrides={"reward_server": url}) == (
        f"reward_server {url!r} is invalid ({problem}): expected http://host:port")


def test_reward_timeout_is_at_most_a_day():
    assert _message(overrides={"reward_timeout": 1e30}) == (  # 1e300: an OverflowError from the socket, after sampling
        "reward_timeout=1e+30 is invalid: it must be at most 86400 seconds (a day)")


def test_huge_counts_from_the_command_line_are_refused_and_the_bound_is_allowed():
    assert len(INT_KEYS) > 20 and "stat_buffer_size" in INT_KEYS and "train_rows_per_call" in INT_KEYS
    for name in ("stat_buffer_size", "train_rows_per_call"):  # OverflowError in deque / torch.split before
        assert _message(overrides=parse_set_pairs([f"{name}=10000000000000000000"])) == (
            f"{name}=10000000000000000000 is invalid: it must be <= 2**31-1 (2147483647)")
    assert resolve_config(overrides={"stat_buffer_size": 2**31 - 1}).stat_buffer_size == 2**31 - 1
    assert resolve_config(overrides={"train_rows_per_call": 2**31 - 1}).train_rows_per_call == 2**31 - 1


@pytest.mark.parametrize("pair, message", [
    ("lcm_lora=[x]", "lcm_lora=['x'] in --set is invalid: expected str | None"),
    ("lcm_lora={a: 1}", "lcm_lora={'a': 1} in --set is invalid: expected str | None"),
    ("lora_targets=[[a]]", "lora_targets=[['a']] in --set is invalid: expected list[str]"),
    ("lora_targets=[to_q, {a: 1}]", "lora_targets=['to_q', {'a': 1}] in --set is invalid: expected list[str]"),
    ("lora_targets=[to_q, ~]", "lora_targets=['to_q', None] in --set is invalid: expected list[str]"),
])
def test_lists_are_refused_where_a_string_is_expected(pair, message):
    assert _message(overrides=parse_set_pairs([pair])) == message
    assert resolve_config(overrides=parse_set_pairs(["lora_targets=[to_q, to_v]"])).lora_targets == ["to_q", "to_v"]


@pytest.mark.parametrize("args, message", [
    (["--set", "model=[a]"], "model=['a'] in --set is invalid: expected str"),
    (["--set", "stat_buffer_size=10000000000000000000"],
     "stat_buffer_size=10000000000000000000 is invalid: it must be <= 2**31-1 (2147483647)"),
])
def test_train_refuses_them_in_one_line_before_loading_a_model(tmp_path, capsys, monkeypatch, args, message):
    from rlcm_fast.cli import main

    # The name policy_model loads through (patching rlcm_fast.models would miss it, and, were policy_model
    # first imported under the patch, keep the stand-in for every later test).
    monkeypatch.setattr("rlcm_fast.policy_model.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [f"rlcm-fast: error: {message}"], err
    assert not run_dir.exists()


def test_set_lists_drop_empty_entries_and_an_empty_value_is_an_empty_string():
    assert resolve_config(overrides=parse_set_pairs(["lora_targets=to_q,,to_v,"])).lora_targets == ["to_q", "to_v"]
    assert parse_set_pairs(["output_dir="]) == {"output_dir": ""}


def test_a_model_given_with_ddpo_gets_its_own_preset_not_tiny_sds():
    cfg = resolve_config(model="sd15", overrides={"method": "ddpo"})
    assert (cfg.model, cfg.resolution, cfg.horizon, cfg.sample_batch_size) == ("sd15", 512, 50, 1)


def test_set_task_picks_the_preset_over_the_config_files_task(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("task: aesthetic\n")
    cfg = resolve_config(model="sd15-lcm", config_file=config_file, overrides={"task": "compressibility"})
    assert cfg.task == "compressibility"
    assert (cfg.sample_batch_size, cfg.gradient_accumulation_steps, cfg.prompts) == (4, 2, "imagenet_animals")


def test_a_ddpo_pytorch_key_names_ours():
    with pytest.raises(ConfigError, match="ddpo-pytorch's num_steps is 'horizon' here"):
        resolve_config(overrides={"num_steps": 8})


def my_brightness(images, prompts):
    return images.mean((1, 2, 3))


def test_a_reward_function_given_as_the_reward_says_how_to_name_it():
    """str() of it was reported as an unknown reward's name; TrainConfig(reward=fn) said only "expected str"."""
    from rlcm_fast.rewards.base import checked_rewards  # a function of another module: named by its own

    named = r"^reward=<function {} at .*> is invalid: a config names its reward, here '{}', not the function itself$"
    with pytest.raises(ConfigError, match=named.format("my_brightness", "test_config:my_brightness")):
        resolve_config(overrides={"reward": my_brightness})
    with pytest.raises(ConfigError, match=named.format("checked_rewards", r"rlcm_fast\.rewards\.base:checked_rewards")):
        validate(TrainConfig(reward=checked_rewards))
    with pytest.raises(ConfigError, match=r"here 'module:function' \(a lambda has no name to give\), not the function"):
        validate(dataclasses.replace(resolve_config(), reward=lambda images, prompts: images.mean((1, 2, 3))))
    with pytest.raises(ConfigError, match=r"^model=<function my_brightness .*> in .* is invalid: expected str$"):
        resolve_config(overrides={"model": my_brightness})


def test_an_empty_config_file_is_the_presets(tmp_path):
    """A config file holding nothing (or only comments) changes nothing: it is not 'not a mapping'."""
    for text in ("", "# nothing set yet\n"):
        config_file = tmp_path / "empty.yaml"
        config_file.write_text(text)
        assert resolve_config(config_file=config_file) == resolve_config()


@pytest.mark.parametrize("theirs, ours", [("num_epochs", "epochs"), ("num_steps", "horizon"),
                                          ("timestep_fraction", "step_fraction"),
                                          ("num_batches_per_epoch", "batches_per_epoch")])
def test_each_ddpo_pytorch_key_names_ours(theirs, ours):
    with pytest.raises(ConfigError) as error:
        resolve_config(overrides={theirs: 1})
    assert str(error.value) == f"unknown config key {theirs!r} in --set; ddpo-pytorch's {theirs} is {ours!r} here"


def test_a_config_files_model_with_ddpo_gets_its_own_preset_not_tiny_sds(tmp_path):
    """As test_a_model_given_with_ddpo_gets_its_own_preset_not_tiny_sds, with both named in a config file."""
    config_file = tmp_path / "ddpo.yaml"
    config_file.write_text("method: ddpo\nmodel: sd15\n")
    cfg = resolve_config(config_file=config_file)
    assert (cfg.model, cfg.resolution, cfg.horizon, cfg.sample_batch_size) == ("sd15", 512, 50, 1)


@pytest.mark.parametrize("pair", ["learning_rate=true", "guidance_scale=false"])
def test_a_boolean_for_a_float_key_in_set_is_refused(pair):
    """YAML reads `true` as a bool, and float(True) is 1.0: `--set learning_rate=true` trained at lr 1."""
    key, value = pair.split("=")
    with pytest.raises(ConfigError) as error:
        resolve_config(overrides=parse_set_pairs([pair]))
    assert str(error.value) == f"{key}={value.capitalize()} in --set is invalid: expected float"


def test_the_reliability_defaults_are_the_readmes():
    """README, "Reliability": keep_checkpoints (default 3) and max_nonfinite_steps (default 5)."""
    for cfg in (TrainConfig(), resolve_config(), resolve_config(overrides={"method": "ddpo"})):
        assert (cfg.keep_checkpoints, cfg.max_nonfinite_steps) == (3, 5)
