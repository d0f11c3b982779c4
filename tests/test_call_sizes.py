"""`auto` UNet batch sizes (train_rows_per_call, sample_batches_per_call): what they choose on CUDA at each
resolution and method, the paper's loop on a CPU, and how a config takes and refuses them."""

import pytest
import yaml

from rlcm_fast.call_sizes import resolve_call_sizes
from rlcm_fast.checkpoint import saved_config
from rlcm_fast.config import ConfigError, TrainConfig, resolve_config
from rlcm_fast.config_checks import validate
from rlcm_fast.trainer import Trainer


PAPER = {"model": "sd15-lcm"}  # the paper's sizes: 10 sampling batches of 4, train batch 2 (no tiny preset)
DDPO = {"method": "ddpo", "model": "sd15", "sample_batch_size": 4, "batches_per_epoch": 10}  # train batch 1


def chosen(device: str, latent_side: int, **overrides) -> tuple[int, int]:
    cfg = resolve_call_sizes(resolve_config(overrides={**PAPER, **overrides}), device, latent_side)
    return cfg.train_rows_per_call, cfg.sample_batches_per_call


def test_both_default_to_auto():
    assert TrainConfig().train_rows_per_call == TrainConfig().sample_batches_per_call == "auto"


@pytest.mark.parametrize("resolution, overrides, sizes", [
    # The paper's sizes (10 batches of 4, train batch 2) at 768 px: bench_train's calls_of_20_and_7, the widths
    # measured on the H200.
    (768, {}, (7, 5)),
    (512, {}, (15, 10)),  # 64 x 64 latents: 15 rows; all 10 batches (40 trajectories) in one call
    (1024, {}, (3, 2)),  # 128 x 128: 3 rows (one more than train_batch_size); 5 batches: 36 trajectories' worth
    (2048, {}, (0, 1)),  # not even one 256 x 256 row fits 7 x 96 x 96: the paper's calls
    (1024, {"train_batch_size": 4}, (0, 2)),  # 3 rows would be no wider than train_batch_size
    (768, {"batches_per_epoch": 7}, (7, 1)),  # 7 is prime, and 7 batches of 4 are more than 20
    (768, {"batches_per_epoch": 3, "num_sample_iters": 2}, (7, 3)),  # divides the 6 rounds
    # DDPO's classifier-free guidance doubles the UNet's batch: half as many rows and trajectories a call.
    (768, {**DDPO, "guidance_scale": 5.0}, (3, 2)),
    (768, {**DDPO, "guidance_scale": 1.0}, (7, 5)),  # no guidance: no doubling
    # Training plans that take no width: the per-timestep loop, REBEL's pairs.
    (768, {"train_rows": "per_timestep"}, (0, 5)),
    (768, {"algorithm": "rebel", "images_per_prompt": 2}, (0, 5)),
    # A size that is set stays.
    (768, {"train_rows_per_call": 4, "sample_batches_per_call": 2}, (4, 2)),
    (768, {"train_rows_per_call": 0, "sample_batches_per_call": 1}, (0, 1)),
])
def test_auto_on_cuda_makes_calls_about_as_wide_as_those_measured_at_768_px(resolution, overrides, sizes):
    assert chosen("cuda", resolution // 8, **overrides) == sizes


def test_auto_on_a_cpu_keeps_the_papers_loop():
    assert chosen("cpu", 96) == (0, 1)
    assert chosen("cpu", 96, train_rows_per_call=7) == (7, 1)


def test_a_trainer_resolves_auto_and_saves_it_as_auto(tmp_path):
    """config.yaml and the checkpoint say auto, not this machine's choice: a resume elsewhere chooses again."""
    overrides = {"device": "cpu", "batches_per_epoch": 2, "sample_batch_size": 2, "train_batch_size": 2,
                 "gradient_accumulation_steps": 1, "grid_every": 0, "epochs": 1}
    trainer = Trainer(resolve_config(overrides=overrides), tmp_path / "run")
    assert (trainer.cfg.train_rows_per_call, trainer.cfg.sample_batches_per_call) == (0, 1)
    trainer.train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["train_rows_per_call"], saved["sample_batches_per_call"]) == ("auto", "auto")
    in_checkpoint = saved_config(tmp_path / "run" / "checkpoint-1")
    assert (in_checkpoint["train_rows_per_call"], in_checkpoint["sample_batches_per_call"]) == ("auto", "auto")
    explicit = Trainer(resolve_config(overrides={**overrides, "train_rows_per_call": 3}), tmp_path / "explicit")
    assert explicit.config_to_save()["train_rows_per_call"] == 3 and explicit.config_to_save()[
        "sample_batches_per_call"] == "auto"


def test_a_trainer_chooses_for_its_device_its_memory_and_its_latent_side(tmp_path, monkeypatch):
    """The latent side is the sampler's resolution over the VAE's scale factor (the tiny VAE's is 2, not 8)."""
    import rlcm_fast.trainer as trainer_module

    asked = []

    def record(cfg, device_type, latent_side, device_memory_gib=None):
        asked.append((device_type, latent_side, device_memory_gib))
        return resolve_call_sizes(cfg, "cuda", latent_side, 12.0)  # as on a 12 GiB GPU

    monkeypatch.setattr(trainer_module, "resolve_call_sizes", record)
    cfg = resolve_config(overrides={"device": "cpu", "resolution": 64, "grid_every": 0})
    trainer = Trainer(cfg, tmp_path / "run")
    assert asked == [("cpu", 64 // trainer.pipe.vae_scale_factor, None)] and trainer.pipe.vae_scale_factor == 2
    # 32 x 32 latents, half the pixel budgets: 32256 // 1024 = 31 rows; both 16-prompt batches, 32768 of 92160
    assert (trainer.cfg.train_rows_per_call, trainer.cfg.sample_batches_per_call) == (31, 2)


@pytest.mark.parametrize("memory_gib, sizes", [(80.0, (7, 5)), (24.0, (7, 5)), (16.0, (4, 2)), (12.0, (3, 2)),
                                               (6.0, (0, 1))])
def test_auto_on_a_smaller_gpu_makes_narrower_calls(memory_gib, sizes):
    """Below 24 GiB the budgets shrink in proportion (the wide calls reserved 19.4 GiB on the H200)."""
    cfg = resolve_call_sizes(resolve_config(overrides=PAPER), "cuda", 96, memory_gib)
    assert (cfg.train_rows_per_call, cfg.sample_batches_per_call) == sizes


def test_the_start_line_names_wide_calls_and_not_the_papers(tmp_path, capsys):
    from rlcm_fast.cli import main

    base = ["train", "--set", "epochs=1", "--set", "grid_every=0", "--set", "batches_per_epoch=2"]
    assert main([*base, "--output-dir", str(tmp_path / "papers")]) == 0
    assert "UNet calls of" not in capsys.readouterr().err  # on a CPU auto keeps the paper's calls
    assert main([*base, "--output-dir", str(tmp_path / "wide"), "--set", "train_rows_per_call=4",
                 "--set", "sample_batches_per_call=2"]) == 0
    assert ("rlcm-fast: UNet calls of 4 training rows and 32 sampling trajectories (train_rows_per_call, "
            "sample_batches_per_call)\n") in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"train_rows_per_call": "wide"}, "train_rows_per_call='wide' in --set is invalid: expected int or 'auto'"),
    ({"train_rows_per_call": -1}, "train_rows_per_call=-1 is invalid: it must be an integer >= 0 "
                                  "(0: train_batch_size) or 'auto'"),
    ({"sample_batches_per_call": 3}, "sample_batches_per_call=3 is invalid: it must be a positive integer dividing "
                                     "batches_per_epoch x num_sample_iters = 10 (e.g. 1 or 10), or 'auto'"),
    ({"sample_batches_per_call": True}, "sample_batches_per_call=True in --set is invalid: expected int or 'auto'"),
    ({"train_rows_per_call": 4, "train_rows": "per_timestep"},
     "train_rows_per_call=4 applies to train_rows=flattened with algorithm ppo (here train_rows=per_timestep, "
     "algorithm=ppo); set it to 0 or auto"),
])
def test_bad_call_sizes_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        resolve_config(overrides={**PAPER, **overrides})
    assert str(error.value) == message


def test_auto_and_numbers_are_read_from_set_values_and_yaml():
    cfg = resolve_config(overrides={**PAPER, "train_rows_per_call": "auto", "sample_batches_per_call": "5"})
    assert (cfg.train_rows_per_call, cfg.sample_batches_per_call) == ("auto", 5)
    cfg = resolve_config(overrides={**PAPER, "train_rows_per_call": "auto", "train_rows": "per_timestep"})
    assert cfg.train_rows_per_call == "auto"  # auto asks for no width where none applies: not refused
    with pytest.raises(ConfigError, match=r"^train_rows_per_call='AUTO' is invalid: expected int or 'auto'$"):
        validate(TrainConfig(train_rows_per_call="AUTO"))  # a config built in code is checked too
