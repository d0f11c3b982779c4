import pytest

from rlcm_fast.config import ConfigError, TrainConfig, config_from_saved, parse_set_pairs, resolve_config, validate


def test_paper_presets_follow_table_1():
    aesthetic = resolve_config("aesthetic", model="sd15-lcm", overrides={"reward": "jpeg_compressibility"})
    assert (aesthetic.gradient_accumulation_steps, aesthetic.sample_batch_size, aesthetic.stat_buffer_size) == (4, 8, 32)
    assert (aesthetic.lora_rank, aesthetic.lora_alpha, aesthetic.prompts) == (8, 8.0, "simple_animals")
    compress = resolve_config("compressibility", model="sd15-lcm")
    assert (compress.horizon, compress.batches_per_epoch, compress.sample_batch_size, compress.train_batch_size) == (8, 10, 4, 2)
    assert (compress.learning_rate, compress.clip_range, compress.adv_clip_max, compress.max_grad_norm) == (1e-4, 1e-4, 10.0, 5.0)
    assert compress.resolution == 768 and compress.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert compress.trained_steps == 7 and not compress.train_final_step


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
    ({"horizon": 60}, "horizon=60 is invalid: it must be <= original_inference_steps=50"),
    ({"train_final_step": "yes"}, "train_final_step='yes' in --set is invalid: expected bool"),
    ({"attention_backend": "flash"}, "attention_backend 'flash' is invalid; allowed: sdpa, cudnn, xformers"),
])
def test_bad_values_give_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        resolve_config(overrides=overrides)
    assert "\n" not in str(info.value)


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
])
def test_bad_switch_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=overrides)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", "3", "epochs='3' is invalid: expected int"),
    ("train_final_step", 1, "train_final_step=1 is invalid: expected bool"),
    ("lora_targets", "to_q", "lora_targets='to_q' is invalid: expected list[str]"),
    ("learning_rate", None, "learning_rate=None is invalid: expected float"),
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
