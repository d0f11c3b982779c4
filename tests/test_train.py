"""The trainer end to end on the tiny model: learning, resume, bad input, checkpoints diffusers can load."""

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from rlcm_fast.cli import _how_to_continue, main
from rlcm_fast.config import resolve_config
from rlcm_fast.models import load_pipeline
from rlcm_fast.path_checks import shell_path, shell_quote
from rlcm_fast.resume import resumed_config
from rlcm_fast.trainer import Trainer

# Small enough for CI: ~1 s per epoch on 2 cores.
FAST = ["--set", "batches_per_epoch=1", "--set", "sample_batch_size=8", "--set", "train_batch_size=8"]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train(tmp_path, name, *extra) -> Path:
    run_dir = tmp_path / name
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), *extra]) == 0
    return run_dir


@pytest.mark.parametrize("task, min_gain", [
    # Measured with seed 0 on 2 CPU cores (mean of epochs 8-10 minus mean of epochs 1-3). An epoch's mean
    # of 32 rewards (std ~0.1 kB) has a standard error of ~0.018, so such a gain has one of ~0.015:
    ("compressibility", 0.1),  # -1.313 -> -0.964 kB over the 10 epochs, a gain of 0.25
    # +1.313 -> +1.394 kB, a gain of 0.041; seeds 1-4: 0.004, 0.058, 0.051, 0.021 (weak, and not at every seed)
    ("incompressibility", 0.03),
])
def test_tiny_model_learns_each_jpeg_objective(tmp_path, task, min_gain):
    run_dir = train(tmp_path, task, "--task", task, "--set", "epochs=10", "--set", "grid_every=0", "--seed", "0")
    rewards = np.array([r["reward_mean"] for r in records(run_dir, "epoch")])
    assert len(rewards) == 10
    assert (rewards < 0).all() if task == "compressibility" else (rewards > 0).all()  # -/+ the JPEG size in kB
    assert rewards[-3:].mean() - rewards[:3].mean() > min_gain, rewards


def test_the_reward_plot_is_redrawn_at_most_every_reward_plot_seconds_and_at_the_end(tmp_path, monkeypatch):
    from rlcm_fast import run_logging
    from rlcm_fast import trainer as trainer_module

    plotted = []  # the epochs each drawn plot shows
    real = run_logging.save_reward_plot
    monkeypatch.setattr(run_logging, "save_reward_plot", lambda path, epoch_records, reward, **options: (
        plotted.append([r["epoch"] for r in epoch_records]), real(path, epoch_records, reward, **options)))
    monkeypatch.setattr(trainer_module, "REWARD_PLOT_SECONDS", 3600.0)
    run_dir = train(tmp_path, "run", *FAST, "--set", "epochs=3", "--set", "grid_every=0")
    assert plotted == [[1], [1, 2, 3]] and (run_dir / "reward.png").exists()


def test_run_directory_contents_and_diffusers_can_load_the_lora(tmp_path):
    run_dir = train(tmp_path, "run", *FAST, "--set", "epochs=2", "--set", "checkpoint_every=1")
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock", "checkpoint-1", "checkpoint-2", "config.yaml", "latest", "metrics.jsonl", "reward.png", "samples",
        "tensorboard"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch-0001.png", "epoch-0002.png"]
    assert any((run_dir / "tensorboard").iterdir())
    steps = records(run_dir, "step")
    assert len(steps) == 2 and {"loss", "approx_kl", "clipfrac", "ratio", "grad_norm", "learning_rate"} <= set(steps[0])
    # First update of the first epoch: the policy is the one that sampled, so the ratio is 1.
    assert abs(steps[0]["ratio"] - 1) < 1e-5 and steps[0]["approx_kl"] < 1e-10

    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "pytorch_lora_weights.safetensors").exists()
    trained = load_pipeline("tiny")
    trained.load_lora_weights(str(checkpoint))
    base = load_pipeline("tiny")
    args = dict(prompt=["a cat"], num_inference_steps=4, height=32, width=32, output_type="pt")
    with_lora = trained(**args, generator=torch.Generator().manual_seed(0)).images
    without = base(**args, generator=torch.Generator().manual_seed(0)).images
    assert (with_lora - without).abs().max() > 1e-4

    out = tmp_path / "samples"
    notices = []  # what diffusers' LoRA loader logs; its text-encoder notice does not apply to a policy
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    logging.getLogger("diffusers.loaders.lora_base").addHandler(handler)
    try:
        assert main(["sample", "--lora", str(checkpoint), "--prompt", "a cat", "--num-images", "2",
                     "--output-dir", str(out), "--device", "cpu"]) == 0
    finally:
        logging.getLogger("diffusers.loaders.lora_base").removeHandler(handler)
    assert len(list(out.glob("*.png"))) == 2
    assert not [n for n in notices if "No LoRA keys" in n], notices


# FAST: one update per epoch; the tiny preset's own sizes: two updates of 16 samples, prompts met in other
# batches after the resume than before (their embeddings must not depend on the batch: test_sampler.py).
# one_update also uses 2 prompts and stat_min_count 2, so that after the resume the advantages come from the
# per-prompt histories the checkpoint restored.
@pytest.mark.parametrize("sizes", [FAST, []], ids=["one_update", "tiny_preset"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, sizes):
    if sizes:
        (tmp_path / "two_prompts.txt").write_text("a cat\na dog\n")
        sizes = [*sizes, "--prompts", str(tmp_path / "two_prompts.txt"), "--set", "stat_min_count=2"]
    straight = train(tmp_path, "straight", *sizes, "--set", "epochs=3")
    interrupted = train(tmp_path, "interrupted", *sizes, "--set", "epochs=1")
    if sizes:  # the resume draws from the checkpoint's copy of the prompts file, not from the file as it is now
        (tmp_path / "two_prompts.txt").write_text("a red boat\na green tree\n")
        assert (interrupted / "checkpoint-1" / "prompts.txt").read_text(encoding="utf-8-sig") == "a cat\na dog\n"
    assert main(["train", "--resume", str(interrupted), "--set", "epochs=3"]) == 0
    for kind in ("step", "epoch"):
        a, b = records(straight, kind), records(interrupted, kind)
        drop = ("sample_seconds", "train_seconds")
        assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
               [{k: v for k, v in r.items() if k not in drop} for r in b]



def test_a_resume_trains_with_the_optimizer_settings_its_command_line_sets(tmp_path):
    """The checkpoint's optimizer state held the old learning rate and Adam settings, and loading it kept them:
    `--set learning_rate=...` on a resume was written to config.yaml and not used (a combination audit)."""
    run_dir = train(tmp_path, "run", *FAST, "--set", "epochs=1")
    changed = {"learning_rate": 1e-5, "adam_beta1": 0.5, "adam_beta2": 0.9, "adam_epsilon": 1e-3,
               "adam_weight_decay": 0.5}
    checkpoint = run_dir / "checkpoint-1"
    loaded = Trainer(resumed_config(checkpoint, changed), tmp_path / "branch", checkpoint).optimizer.param_groups[0]
    assert (loaded["lr"], loaded["betas"], loaded["eps"], loaded["weight_decay"]) == (1e-5, (0.5, 0.9), 1e-3, 0.5)
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=2",
                 *[f"--set={key}={value}" for key, value in changed.items()]]) == 0
    assert [r["learning_rate"] for r in records(run_dir, "step")] == [3e-3, 1e-5]  # the tiny preset's, then ours
    state = json.loads((run_dir / "checkpoint-2" / "training_state.json").read_text())
    (group,) = state["optimizer"]["param_groups"]
    assert (group["lr"], group["initial_lr"], group["betas"], group["eps"], group["weight_decay"]) == \
           (1e-5, 1e-5, [0.5, 0.9], 1e-3, 0.5)
    assert state["lr_scheduler"]["base_lrs"] == [1e-5]


def test_resume_restores_the_global_random_stream_a_user_reward_draws_from(tmp_path):
    """The trainer draws from its own generators only; a user's reward (or a LoRA dropout) may draw from torch's
    global one, which the checkpoint saves and the resume restores. reward_overlap=false: one thread draws."""
    write_reward_module(tmp_path, "import torch\ndef noisy(images, prompts):\n"
                                  "    return images.mean(dim=(1, 2, 3)) + torch.rand(len(prompts))\n")
    noisy = [*FAST, "--reward", "my_rewards:noisy", "--set", "reward_overlap=false"]
    straight = train(tmp_path, "straight", *noisy, "--set", "epochs=2")
    interrupted = train(tmp_path, "interrupted", *noisy, "--set", "epochs=1")
    torch.rand(1000)  # the resumed process's global stream is elsewhere
    assert main(["train", "--resume", str(interrupted), "--set", "epochs=2", "--reward", "my_rewards:noisy"]) == 0
    means = [[r["reward_mean"] for r in records(run, "epoch")] for run in (straight, interrupted)]
    assert means[0] == means[1] and len(means[0]) == 2


def test_a_checkpoint_scored_by_user_code_resumes_only_when_the_command_line_names_it(tmp_path, capsys, monkeypatch):
    """A run folder from elsewhere can name any module as its reward: resuming it must not import that module
    unless asked to (a security audit ran a payload shipped in the run folder this way)."""
    write_reward_module(tmp_path, "def bright(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    run = train(tmp_path, "run", *FAST, "--reward", "jpeg_compressibility:0.5,my_rewards:bright", "--set", "epochs=1")
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr("rlcm_fast.rewards.import_user_reward", lambda spec: pytest.fail(f"{spec} was imported"))
        for resume in (["--resume", str(run)], ["--resume", "auto", "--output-dir", str(run)]):
            assert main(["train", *resume, "--set", "epochs=2"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1] == (f"rlcm-fast: error: checkpoint '{run / 'checkpoint-1'}' is scored by user code "
                               "(my_rewards:bright), which resuming imports and runs: add --reward "
                               "'jpeg_compressibility:0.5,my_rewards:bright' to run it")
    assert main(["train", "--resume", str(run), "--set", "epochs=2",
                 "--reward", "jpeg_compressibility:0.5,my_rewards:bright"]) == 0
    assert (run / "checkpoint-2").is_dir()


# bf16: the GPU's default precision, here through the same accelerate autocast wrapper on the CPU's bf16.
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_first_inner_epoch_recomputes_the_stored_log_probs(tmp_path, precision):
    cfg = resolve_config(overrides={"device": "cpu", "batches_per_epoch": 1, "sample_batch_size": 8,
                                    "train_batch_size": 8, "mixed_precision": precision})
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.pipe.unet.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    samples = trainer.sample_epoch(0)
    n, steps = samples.log_probs.shape
    pairs = torch.randperm(n * steps, generator=torch.Generator().manual_seed(0))
    sample_idx, step_idx = pairs // steps, pairs % steps
    embeds = trainer.sampler.prompt_embeddings(samples.prompts)[sample_idx]
    with torch.no_grad(), trainer.autocast():
        log_probs, kl = trainer.policy_log_probs(samples.states, sample_idx, step_idx, embeds)
    assert kl is None  # kl_beta = 0: no base-model forward
    ratio = torch.exp(log_probs - samples.log_probs[sample_idx, step_idx])
    assert (ratio - 1).abs().max().item() < 1e-5


def write_reward_module(tmp_path, body):
    (tmp_path / "my_rewards.py").write_text(body)
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("my_rewards", None)  # another test's my_rewards may be imported already


@pytest.mark.parametrize("args, message", [
    (["--task", "compression"], "task 'compression' is unknown; allowed: compressibility"),
    (["--set", "reward=beauty"], "reward 'beauty' is unknown"),
    (["--set", "prompts=birds"], "prompts 'birds' is unknown"),
    (["--prompts", "birds"], "or a text file of one prompt per line"),
    (["--reward", "beauty"], "reward 'beauty' is unknown"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
    (["--set", "sample_batch_size=6", "--set", "train_batch_size=4"], "sample_batch_size=6 is not divisible by train_batch_size=4"),
    (["--set", "horizon=1"], "horizon=1 is invalid"),
    (["--set", "learning_rate=0"], "learning_rate=0.0 is invalid"),
    (["--set", "learning_rate=-1"], "learning_rate=-1.0 is invalid"),
    (["--resume", "/no/such/run"], "resume path '/no/such/run' does not exist"),
    (["--set", "mixed_precision=fp16"], "mixed_precision=fp16 needs a CUDA device; on the CPU use bf16 or no"),
    (["--set", "adam_weight_decay=.nan"], "adam_weight_decay=nan is invalid: it must be a finite number >= 0"),
    (["--seed", str(2**64)], f"seed={2**64} is invalid: it must be in 0..2**63-1"),
    (["--set", "num_epochs=2"], "unknown config key 'num_epochs' in --set; ddpo-pytorch's num_epochs is 'epochs' here"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_state(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlcm-fast: error: ") and message in err[0]
    assert not run_dir.exists()


def test_a_step_count_the_models_scheduler_refuses_is_one_line_after_loading(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--set", "original_inference_steps=5000"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("rlcm-fast: error: original_inference_steps=5000 is invalid: it must be in "
                                            "horizon..num_train_timesteps = 4..1000")
    assert "Traceback" not in err and not run_dir.exists()


def test_a_resolution_twice_the_models_own_is_warned_once_and_the_start_line_names_it(tmp_path, capsys):
    """A model folder trains at the config's 768 px default whatever its UNet was made for: a tiny folder (32 px)
    ran for minutes an epoch, and the start line named neither the size nor the steps."""
    from rlcm_fast.models import oversized_resolution

    pipe = load_pipeline("tiny")
    assert oversized_resolution(pipe, 32) is None and oversized_resolution(pipe, 56) is None
    assert oversized_resolution(pipe, 768) == (
        "resolution=768 is 24x the side of the model's own 32 px images (its UNet's sample_size x the VAE's scale "
        "factor): a UNet call costs 576x as many pixels or more; resolution=32 (--set resolution=32) trains at the "
        "model's size")
    for unknown_size in (None, [16, 16]):  # a UNet config without one int sample_size: nothing to compare with
        pipe.unet.register_to_config(sample_size=unknown_size)
        assert oversized_resolution(pipe, 768) is None
    run_dir = train(tmp_path, "run", *FAST, "--set", "epochs=1", "--set", "resolution=64", "--set", "grid_every=0")
    err = capsys.readouterr().err
    assert err.count("rlcm-fast: warning: resolution=64 is 2x the side of the model's own 32 px images") == 1
    assert f"rlcm-fast: training tiny on jpeg_compressibility (64 px, 4 steps) -> {run_dir}\n" in err


def test_a_real_sized_unet_on_the_cpu_is_warned_once(tmp_path, capsys, monkeypatch):
    """`--model sd15-lcm` on a CPU printed its start line and then nothing for as long as an epoch took (found by
    a newcomer's walk through README, who killed it): 860M parameters at 768 px, over a minute a UNet call."""
    from rlcm_fast import models

    big = types.SimpleNamespace(unet=torch.nn.Linear(10_000, 10_000, device="meta"))  # 100M parameters, no memory
    message = models.slow_on_a_cpu(big, "cpu")
    assert message.startswith("the model's UNet has 100M parameters and runs on the CPU, where each of its calls is "
                              "slow") and "--model tiny" in message
    assert models.slow_on_a_cpu(big, "cuda") is None and models.slow_on_a_cpu(load_pipeline("tiny"), "cpu") is None
    monkeypatch.setattr(models, "CPU_SIZED_UNET_PARAMETERS", 1000)  # the tiny model as if it were a real one
    train(tmp_path, "run", *FAST, "--set", "epochs=1", "--set", "grid_every=0")
    assert capsys.readouterr().err.count("rlcm-fast: warning: the model's UNet has ") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_not_run_on_the_cpu(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device=cuda, but this machine has no usable CUDA device" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_reward_module_that_fails_to_import_is_one_line(tmp_path, capsys):
    write_reward_module(tmp_path, "def broken(images, prompts)\n    return 0\n")  # no colon: a SyntaxError
    assert main(["train", "--device", "cpu", "--reward", "my_rewards:broken", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rlcm-fast: error: reward 'my_rewards:broken' cannot be imported: its module raised SyntaxError: "
                   "expected ':' (my_rewards.py, line 1)"]


def test_non_finite_rewards_stop_the_run_before_anything_is_checkpointed(tmp_path, capsys):
    write_reward_module(tmp_path, "import numpy as np\ndef nan_reward(images, prompts):\n"
                                  "    return np.full(len(prompts), np.nan)\n")
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), *FAST,
                 "--set", "reward=my_rewards:nan_reward"]) == 2
    assert "reward 'my_rewards:nan_reward' returned non-finite values" in capsys.readouterr().err
    assert not list(run_dir.glob("checkpoint-*"))


def test_reward_and_prompts_options_pick_a_user_reward_and_a_prompt_file(tmp_path, monkeypatch):
    seen = tmp_path / "seen_prompts.txt"
    write_reward_module(tmp_path, "def remember_prompts(images, prompts):\n"
                                  f"    open({str(seen)!r}, 'a').write(''.join(p + '\\n' for p in prompts))\n"
                                  "    return images.mean(dim=(1, 2, 3))\n")
    prompt_file = tmp_path / "my_prompts.txt"
    prompt_file.write_text("a red fox\n\n  a snowy owl  \n")
    monkeypatch.chdir(tmp_path)
    run_dir = train(tmp_path, "run", *FAST, "--set", "epochs=1", "--reward", "my_rewards:remember_prompts",
                    "--prompts", "my_prompts.txt")
    assert set(seen.read_text().splitlines()) == {"a red fox", "a snowy owl"}
    config = (run_dir / "config.yaml").read_text()
    # The file is kept by its absolute path: a resumed run finds it from any folder.
    assert "reward: my_rewards:remember_prompts" in config and f"prompts: {prompt_file.resolve()}" in config


def test_a_resume_draws_from_the_checkpoints_copy_of_the_prompts_file_unless_given_another(tmp_path):
    """A run folder moved to another machine, or resumed after its prompts file was edited or removed, draws the
    prompts it drew before, also where the resume names the same file; another file replaces them."""
    seen = tmp_path / "seen_prompts.txt"
    write_reward_module(tmp_path, "def remember_prompts(images, prompts):\n"
                                  f"    open({str(seen)!r}, 'a').write(''.join(p + '\\n' for p in prompts))\n"
                                  "    return images.mean(dim=(1, 2, 3))\n")
    reward = ["--reward", "my_rewards:remember_prompts"]
    (tmp_path / "first.txt").write_text("a red fox\na snowy owl\n")
    (tmp_path / "second.txt").write_text("a green frog\n")
    run_dir = train(tmp_path, "run", *FAST, *reward, "--prompts", str(tmp_path / "first.txt"), "--set", "epochs=1")
    (tmp_path / "first.txt").unlink()
    seen.unlink()
    assert main(["train", "--resume", str(run_dir), *reward, "--set", "epochs=2"]) == 0
    assert set(seen.read_text().splitlines()) == {"a red fox", "a snowy owl"}
    assert (run_dir / "checkpoint-2" / "prompts.txt").read_text(encoding="utf-8-sig") == "a red fox\na snowy owl\n"
    # The config still names the run's own file (not the copy in a checkpoint that pruning will remove).
    assert f"prompts: {tmp_path / 'first.txt'}\n" in (run_dir / "config.yaml").read_text()
    # The file is still gone: --resume auto's config names it, and the run draws the copy.
    (tmp_path / "run.yaml").write_text(f"prompts: {tmp_path / 'first.txt'}\nbatches_per_epoch: 1\n"
                                       "sample_batch_size: 8\ntrain_batch_size: 8\nepochs: 3\n")
    seen.unlink()
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir), "--config", str(tmp_path / "run.yaml"),
                 "--device", "cpu", *reward]) == 0
    assert set(seen.read_text().splitlines()) == {"a red fox", "a snowy owl"}
    seen.unlink()
    assert main(["train", "--resume", str(run_dir), *reward, "--set", "epochs=4",
                 "--prompts", str(tmp_path / "second.txt")]) == 0
    assert set(seen.read_text().splitlines()) == {"a green frog"}
    assert f"prompts: {tmp_path / 'second.txt'}\n" in (run_dir / "config.yaml").read_text()


def test_a_checkpoint_without_a_copy_of_its_prompts_file_reads_the_file_only_when_named(tmp_path, capsys):
    """One written before checkpoints kept the copy, or one from elsewhere without it: its config may name any
    file on this machine, whose lines would become prompts, go into checkpoints, and to a reward server."""
    (tmp_path / "mine.txt").write_text("a red fox\n")
    run_dir = train(tmp_path, "run", *FAST, "--prompts", str(tmp_path / "mine.txt"), "--set", "epochs=1")
    checkpoint = run_dir / "checkpoint-1"
    (checkpoint / "prompts.txt").unlink()
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["files"]["prompts.txt"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlcm-fast: error: checkpoint '{checkpoint}' holds no copy of its prompts file '{tmp_path / 'mine.txt'}' "
        f"(written before checkpoints kept one), which a resume reads only when named: add --prompts "
        f"'{tmp_path / 'mine.txt'}'")
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=2", "--prompts", str(tmp_path / "mine.txt")]) == 0
    assert (run_dir / "checkpoint-2" / "prompts.txt").read_text(encoding="utf-8-sig") == "a red fox\n"


@pytest.mark.parametrize("content, message", [
    ("\n  \n", "holds no prompt"),
    (b"\xff\xfe\xfa", "is unreadable"),
])
def test_bad_prompt_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--prompts", str(prompt_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"prompts file {str(prompt_file)!r} {message}" in err[0]
    assert not run_dir.exists()


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, capsys):
    run_dir = train(tmp_path, "run", *FAST, "--set", "epochs=1")
    (run_dir / "checkpoint-1" / "optimizer.safetensors").write_bytes(b"not a safetensors file")
    assert main(["train", "--resume", str(run_dir / "checkpoint-1"), "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "is damaged: optimizer.safetensors has 22 bytes" in err
    assert not (run_dir / "checkpoint-2").exists()


def loss_scaling_accelerator(init_scale: float, overflow_above: float = float("inf")):
    """An Accelerator class with a CPU GradScaler (growth_interval 1), standing in for accelerate's fp16 on a
    GPU. While the scale is above `overflow_above`, backward makes the gradients non-finite, as an fp16
    overflow would."""
    from accelerate import Accelerator

    class LossScalingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)

        def backward(self, loss, **kwargs):
            # The logged loss stays finite: the trainer logs the loss it computed, not this product.
            super().backward(loss * float("inf") if self.scaler.get_scale() > overflow_above else loss, **kwargs)

    return LossScalingAccelerator


def test_fp16_loss_scaling_changes_neither_the_update_nor_the_logged_gradient_norm(tmp_path, monkeypatch):
    """With fp16 on a GPU, accelerate scales the loss in backward; the trainer must unscale before it clips
    and logs, update the scaler after each step, and checkpoint the loss scale. A CPU GradScaler stands in here
    (accelerate creates one only on a GPU). Its scales are powers of two, so unscaling is exact."""
    import accelerate  # launch.start_accelerator builds the Accelerator

    # growth_interval 1: the scale doubles after every finite step, so a resumed run can tell a restored
    # scale (2^14 after two steps) from a fresh one (2^12).
    LossScalingAccelerator = loss_scaling_accelerator(init_scale=2.0 ** 12)
    cfg = resolve_config(overrides={"device": "cpu", "epochs": 1, "batches_per_epoch": 1, "sample_batch_size": 8,
                                    "train_batch_size": 4, "grid_every": 0})
    plain = Trainer(cfg, tmp_path / "plain")
    plain.train()
    monkeypatch.setattr(accelerate, "Accelerator", LossScalingAccelerator)
    scaled = Trainer(cfg, tmp_path / "scaled")
    scaled.train()
    plain_norms, scaled_norms = ([s["grad_norm"] for s in records(tmp_path / name, "step")] for name in ("plain", "scaled"))
    assert len(plain_norms) == 2 and np.allclose(scaled_norms, plain_norms, rtol=1e-6, atol=0)
    for a, b in zip(plain.params, scaled.params):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
    state = json.loads((tmp_path / "scaled" / "checkpoint-1" / "training_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0 ** 14
    assert "grad_scaler" not in json.loads((tmp_path / "plain" / "checkpoint-1" / "training_state.json").read_text())
    resumed = Trainer(cfg, tmp_path / "scaled", resume_from=tmp_path / "scaled" / "checkpoint-1")
    assert resumed.accelerator.scaler.get_scale() == 2.0 ** 14


def test_fp16_loss_scale_overflows_skip_steps_without_stopping_the_run(tmp_path, monkeypatch, capsys):
    """Overflows of a finite loss at a loss scale above 1 are the scaler's business: each skips its step and
    halves the scale, however many come in a row; they do not count toward max_nonfinite_steps."""
    import accelerate  # launch.start_accelerator builds the Accelerator

    monkeypatch.setattr(accelerate, "Accelerator", loss_scaling_accelerator(2.0 ** 15, overflow_above=2.0 ** 12))
    cfg = resolve_config(overrides={"device": "cpu", "epochs": 1, "batches_per_epoch": 1, "sample_batch_size": 8,
                                    "train_batch_size": 2, "grid_every": 0, "max_nonfinite_steps": 1})
    trainer = Trainer(cfg, tmp_path / "run")
    before = [p.detach().clone() for p in trainer.params]
    trainer.train()
    # Scales 2^15, 2^14, 2^13 overflow (three skips in a row, over the limit of 1); 2^12 steps.
    assert [s["skipped"] for s in records(tmp_path / "run", "step")] == [1.0, 1.0, 1.0, 0.0]
    assert "fp16 loss scale 32768 overflowed at step 1" in capsys.readouterr().err
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "training_state.json").read_text())
    assert state["nonfinite"] == {"total": 3, "in_a_row": 0}
    assert state["grad_scaler"]["scale"] == 2.0 ** 13  # halved thrice, then doubled after the finite step


def test_one_process_builds_trainers_of_other_precisions_in_turn(tmp_path, monkeypatch):
    """accelerate keeps one device and precision per process; a benchmark or test that builds a CPU fp32
    Trainer and then a bf16 one (or a CUDA one) must get the second's, not an error or the first's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from rlcm_fast.launch import forget_other_accelerator_state

    overrides = {"device": "cpu", "epochs": 1, "grid_every": 0}
    fp32 = Trainer(resolve_config(overrides=overrides), tmp_path / "fp32")
    assert fp32.accelerator.mixed_precision == "no"
    bf16 = Trainer(resolve_config(overrides={**overrides, "mixed_precision": "bf16"}), tmp_path / "bf16")
    assert bf16.accelerator.mixed_precision == "bf16" and bf16.device.type == "cpu"
    # Under autocast (bf16) peft's LoRA input casts are left to autocast; without it they are needed.
    casting = [[layer.cast_input_dtype_enabled for layer in t.unet.modules() if isinstance(layer, BaseTunerLayer)]
               for t in (fp32, bf16)]
    assert casting[0] and all(casting[0]) and casting[1] and not any(casting[1])
    # Under several processes the state is the process group's, never forgotten.
    monkeypatch.setenv("WORLD_SIZE", "2")
    forget_other_accelerator_state(cpu=True, mixed_precision="no")
    try:
        with pytest.raises(ValueError, match="already been initialized"):
            Accelerator(cpu=True, mixed_precision="no")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_an_interrupt_that_ends_the_run_says_how_to_continue_it(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C does not wait for the checkpoint the first one asked for. The message gives `--resume auto`
    only where this run wrote a checkpoint; else this same command (`--resume auto` would start from the defaults,
    or resume without this command's --set). Both paste back into a shell, whatever the folder's name."""
    first = train(tmp_path, "first", *FAST, "--set", "epochs=1", "--set", "lora_rank=2")
    writes_a_checkpoint = False

    def interrupted(self):
        if writes_a_checkpoint:
            shutil.copytree(self.run_dir / "checkpoint-1", self.run_dir / "checkpoint-2")
        # As train() does on any exception: else TensorBoard's writer thread flushes later, after the chdir is
        # undone, to a relative path that is not there (a thread exception seen in a random-order run).
        self._close_logs(quiet=True)
        raise KeyboardInterrupt

    def message(command):
        assert main(command) == 130
        line = capsys.readouterr().err.strip().splitlines()[-1]
        return line.split(" with: ")[0].split(" again: ")[0], shlex.split(line.split(": ", 2)[-1])

    monkeypatch.setattr(Trainer, "train", interrupted)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    command = ["train", "--device", "cpu", "--set", "lora_rank=2", "--output-dir=-my run's é"]
    assert message(command) == ("rlcm-fast: interrupted; no checkpoint was written; start again",
                                ["rlcm-fast", *command])

    shutil.copytree(first, tmp_path / "-my run's é", dirs_exist_ok=True)  # now it holds checkpoint-1
    command = ["train", "--resume", "auto", "--output-dir=-my run's é", "--set", "epochs=2"]
    assert message(command) == ("rlcm-fast: interrupted; no checkpoint was written after checkpoint-1; run the "
                                "same command", ["rlcm-fast", *command])
    writes_a_checkpoint = True
    assert message(command) == ("rlcm-fast: interrupted; continue from the newest checkpoint", [
        "rlcm-fast", "train", "--resume", "auto", "--output-dir", "./-my run's é"])


def test_lora_targets_matching_no_module_are_one_line_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--set", "lora_targets=no_such_layer"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "rlcm-fast: error: lora_targets=['no_such_layer']: LoRA target modules ['no_such_layer'] match no module "
        "of the UNet")


def test_a_lora_rank_above_every_targeted_layers_rank_is_one_line_exit_2(tmp_path, capsys):
    """Rank 100000 on the tiny UNet wrote a 15 GB checkpoint; its widest targeted weight has rank 64."""
    run_dir = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--set", "lora_rank=65"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "rlcm-fast: error: lora_rank=65 is invalid for model 'tiny': LoRA rank 65 is above the rank of every "
        "targeted layer's weight (at most 64): a larger rank adds parameters, not capacity")
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--set", "lora_rank=64",
                 "--set", "epochs=1", "--set", "batches_per_epoch=1", "--set", "sample_batch_size=2",
                 "--set", "train_batch_size=2"]) == 0


def test_the_optimizer_and_the_unet_get_the_configs_settings(tmp_path):
    """A decay of 1e-4 and gradient checkpointing change a short CPU run's numbers too little for the end-to-end
    comparisons to see them dropped: the settings must reach the optimizer and the UNet."""
    overrides = {"device": "cpu", "batches_per_epoch": 1, "sample_batch_size": 2, "train_batch_size": 2,
                 "adam_weight_decay": 0.05, "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-6,
                 "learning_rate": 2e-3, "gradient_checkpointing": True}
    trainer = Trainer(resolve_config(overrides=overrides), tmp_path / "run")
    (group,) = trainer.optimizer.param_groups
    assert (group["weight_decay"], group["betas"], group["eps"], group["lr"]) == (0.05, (0.8, 0.99), 1e-6, 2e-3)
    assert trainer.unet.is_gradient_checkpointing
    plain = Trainer(resolve_config(overrides={**overrides, "gradient_checkpointing": False}), tmp_path / "plain")
    assert not plain.unet.is_gradient_checkpointing


def test_the_resume_command_after_an_interrupt_repeats_the_command_lines_reward_and_server(tmp_path, monkeypatch):
    """The resume command repeats what a resume takes only from its command line (a user reward, a remote reward
    server), and the launch of several processes."""
    run_dir = tmp_path / "my run"
    (run_dir / "checkpoint-3").mkdir(parents=True)
    options = " --reward my_rewards:bright,alignment:0.5 --set reward_server=http://198.51.100.7:8060"
    args = SimpleNamespace(command="train", run_dir=run_dir, resume_from=None, resume_options=options)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _how_to_continue(args, ["train", "--output-dir", str(run_dir)]) == (
        f"continue from the newest checkpoint with: rlcm-fast train --resume auto --output-dir '{run_dir}'"
        f"{options} --num-processes 2 (or the same launcher)")


def test_an_interrupt_while_the_command_line_is_checked_says_to_run_the_same_command(tmp_path, monkeypatch, capsys):
    """Before the run folder is known there is no checkpoint to speak of: the message repeats the command."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("rlcm_fast.train_command._plan_run", interrupted)
    command = ["train", "--device", "cpu", "--output-dir", str(tmp_path / "my run")]
    assert main(command) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"rlcm-fast: interrupted; run the same command again: {shlex.join(['rlcm-fast', *command])}"
    assert list(tmp_path.iterdir()) == []


def test_a_printed_command_spells_bytes_that_are_not_utf8_so_that_bash_reads_them_back(tmp_path, monkeypatch,
                                                                                       capsys):
    """Bytes of the command line that are not UTF-8 reach Python as lone surrogates, which a printed line shows as
    `\\udce9`: pasted back, that is another name. They are printed as $'...\\xe9' (bash reads the same bytes)."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("rlcm_fast.train_command._plan_run", interrupted)
    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9 it's \\ \x01")
    command = ["train", "--device", "cpu", "--output-dir", folder, "--set", "lora_rank=2"]
    assert main(command) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    printed = line.removeprefix("rlcm-fast: interrupted; run the same command again: ")
    assert "\\udc" not in printed and "$'" in printed
    words = subprocess.run(["bash", "-c", f"printf '%s\\0' {printed}"], capture_output=True, check=True).stdout
    assert words.split(b"\0")[:-1] == [os.fsencode(word) for word in ["rlcm-fast", *command]]


@pytest.mark.parametrize("raw", [b"caf\xe9\nnext", b"\xff", b"\x80", b"a\xe9\xc2\x85b", b"\xe9'\\ x", b"plain"])
def test_shell_quote_spells_any_bytes_as_printable_text_that_bash_reads_back(raw):
    """Byte 0xff (the last surrogate), a newline (which would split the printed command) and U+0085 (spelled as its
    UTF-8 bytes, c2 85) among them (found by mutation testing)."""
    quoted = shell_quote(os.fsdecode(raw))
    assert quoted.isprintable() and not any("\udc80" <= c <= "\udcff" for c in quoted)
    done = subprocess.run(["bash", "-c", f"printf '%s' {quoted}"], capture_output=True, check=True)
    assert done.stdout == raw


def test_shell_quote_escapes_backslashes_inside_its_dollar_quotes():
    """In $'...' a backslash starts an escape (\\n, \\x41): one in the name must be spelled \\\\."""
    raw = b"caf\xe9 \\n\\x41\\\\ \\'"
    done = subprocess.run(["bash", "-c", f"printf '%s' {shell_quote(os.fsdecode(raw))}"], capture_output=True,
                          check=True)
    assert done.stdout == raw


def test_shell_path_spells_a_dash_led_name_that_is_not_utf8_as_printable_text():
    """./NAME, with shell_quote's spelling of the bytes that are not UTF-8 (shlex.quote left a lone surrogate)."""
    printed = shell_path(os.fsdecode(b"-caf\xe9"))
    assert printed.isprintable()
    done = subprocess.run(["bash", "-c", f"printf '%s' {printed}"], capture_output=True, check=True)
    assert done.stdout == b"./-caf\xe9"


@pytest.mark.parametrize("terminal", [False, True])
def test_each_of_trains_bars_follows_the_terminal(terminal, tmp_path, monkeypatch, capsys):
    """Piped into a log file, each redraw of a bar was another line: each of the two bars follows the terminal,
    and the epoch lines stay."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["train", "--device", "cpu", "--output-dir", str(tmp_path / "run"), *FAST, "--set", "epochs=1",
                 "--set", "lora_rank=2"]) == 0
    out, err = capsys.readouterr()
    assert "epoch 1/1  reward " in out
    assert ("epoch 1 sampling" in err, "epoch 1 training" in err, "Loading pipeline components" in err) == (
        terminal, terminal, terminal)


def test_a_trainer_made_without_progress_bars_given_shows_its_bars(tmp_path, capsys):
    """A notebook's Trainer(cfg, run_dir) lost its bars where progress_bars defaulted to False."""
    overrides = {"device": "cpu", "epochs": 1, "batches_per_epoch": 1, "sample_batch_size": 8, "train_batch_size": 8,
                 "lora_rank": 2}
    Trainer(resolve_config(overrides=overrides), tmp_path / "run").train()
    err = capsys.readouterr().err
    assert "epoch 1 sampling" in err and "epoch 1 training" in err


def test_library_bars_are_hidden_off_a_terminal_then_restored_and_never_switched_on(monkeypatch):
    """`rlcm-fast` called from Python (a notebook: no terminal) left diffusers' and transformers' bars off for the
    session, and on a terminal switched them on over HF_HUB_DISABLE_PROGRESS_BARS=1."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from rlcm_fast.cli import library_bars_hidden_off_terminal

    try:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
        diffusers_logging.enable_progress_bar()
        transformers_logging.disable_progress_bar()
        with library_bars_hidden_off_terminal():
            assert not diffusers_logging.is_progress_bar_enabled()
        assert diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        diffusers_logging.disable_progress_bar()
        with library_bars_hidden_off_terminal():
            assert not diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
