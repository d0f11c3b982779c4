"""What a resume takes from its checkpoint (rlcm_fast/resume.py): the prompts' copy, the configured learning rate
under a schedule that is not constant, the warning for another reward scorer. End-to-end resumes: test_train.py."""

import json
import os
import shutil

import pytest
import torch

import rlcm_fast.checkpoint as checkpoint_module

from rlcm_fast.checkpoint import prompts_copy
from rlcm_fast.cli import main
from rlcm_fast.prompts import load_prompt_set
from rlcm_fast.config import ConfigError, TrainConfig, resolve_config
from rlcm_fast.resume import prompt_source, refuse_changed_settings, resumed_config
from rlcm_fast.trainer import Trainer

FAST = ["--set", "batches_per_epoch=1", "--set", "sample_batch_size=8", "--set", "train_batch_size=8"]


def train(run_dir, *extra) -> None:
    assert main(["train", "--device", "cpu", "--output-dir", str(run_dir), "--set", "epochs=1", *FAST, *extra]) == 0


@pytest.fixture(scope="module")
def file_prompts_run(tmp_path_factory):
    """One epoch drawn from a prompts file whose first prompt starts with a byte-order mark of its own: the file's
    BOM is not part of the prompt, the second is (reading removes one), and the copy keeps it."""
    folder = tmp_path_factory.mktemp("file_prompts")
    prompts = folder / "data" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_bytes("\ufeff\ufeffa cat\na dog\n".encode())
    train(folder / "run", "--prompts", str(prompts))
    return prompts, folder / "run" / "checkpoint-1"


def test_the_copy_gives_the_prompts_the_run_drew_even_one_starting_with_a_byte_order_mark(file_prompts_run):
    prompts, checkpoint = file_prompts_run
    assert load_prompt_set(str(prompts)) == ("\ufeffa cat", "a dog")
    source = prompt_source(str(prompts), checkpoint)
    assert source == str(checkpoint / "prompts.txt")
    assert load_prompt_set(source) == ("\ufeffa cat", "a dog")


def test_the_same_file_by_another_spelling_reads_the_copy_and_another_file_does_not(file_prompts_run, tmp_path,
                                                                                        monkeypatch):
    prompts, checkpoint = file_prompts_run
    copy = str(checkpoint / "prompts.txt")
    monkeypatch.chdir(prompts.parent.parent)
    assert prompt_source(os.path.join("data", "prompts.txt"), checkpoint) == copy
    (tmp_path / "linked").symlink_to(prompts.parent, target_is_directory=True)
    assert prompt_source(str(tmp_path / "linked" / "prompts.txt"), checkpoint) == copy
    other = tmp_path / "prompts.txt"
    other.write_text("a fox\n")
    assert prompt_source(str(other), checkpoint) == str(other)
    assert prompt_source("simple_animals", checkpoint) == "simple_animals"


def test_a_copy_the_manifest_does_not_list_is_not_read(file_prompts_run, tmp_path):
    """The manifest is what verify_checkpoint checked: a prompts.txt put beside it afterwards is not the run's."""
    prompts, checkpoint = file_prompts_run
    unlisted = tmp_path / "checkpoint"
    unlisted.mkdir()
    for entry in checkpoint.iterdir():
        (unlisted / entry.name).write_bytes(entry.read_bytes())
    manifest = json.loads((unlisted / "manifest.json").read_text())
    del manifest["files"]["prompts.txt"]
    (unlisted / "manifest.json").write_text(json.dumps(manifest))
    assert prompts_copy(checkpoint) == checkpoint / "prompts.txt"
    assert prompts_copy(unlisted) is None
    assert prompt_source(str(prompts), unlisted) == str(prompts)


def test_a_named_prompt_set_is_not_copied(tmp_path):
    train(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert not (checkpoint / "prompts.txt").exists()
    assert "prompts.txt" not in json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert prompts_copy(checkpoint) is None


def test_a_resumed_schedule_applies_its_factor_to_the_configured_learning_rate(tmp_path, monkeypatch):
    """The paper's schedule is constant (factor 1 at every step), which hides a factor dropped on resume: one that
    halves at each step must give half the configured rate after the checkpoint's one step."""
    halving = torch.optim.lr_scheduler.LambdaLR
    monkeypatch.setattr(torch.optim.lr_scheduler, "LambdaLR",
                        lambda optimizer, _factor: halving(optimizer, lambda step: 0.5 ** step))
    train(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-1"
    trainer = Trainer(resumed_config(checkpoint, {"learning_rate": 1e-5}), tmp_path / "branch", checkpoint)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-5, rel=1e-12)
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([0.5e-5], rel=1e-12)
    assert trainer.lr_scheduler.base_lrs == [1e-5]


def test_another_jpeg_encoder_on_resume_is_a_warning_and_the_run_goes_on(tmp_path, capsys):
    train(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "epochs=2", "--set", "jpeg_backend=pillow"]) == 0
    assert ("rlcm-fast: warning: jpeg_backend='pillow' differs from the checkpoint's 'auto': its rewards go beside "
            "reward histories scored with 'auto'\n") in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def test_the_same_prompts_file_name_is_the_same_file_even_where_it_cannot_be_encoded():
    """A run started under a UTF-8 locale and resumed under LC_ALL=C: its prompts file's name cannot be encoded
    for resolving, and the resume read the file itself, not the checkpoint's copy."""
    from rlcm_fast.resume import _same_file_name

    assert _same_file_name("/data/p\ud800.txt", "/data/p\ud800.txt")
    assert not _same_file_name("/data/p\ud800.txt", "/data/q\ud800.txt")


def test_a_run_folder_named_like_a_checkpoint_resumes_as_a_run_folder(file_prompts_run, tmp_path):
    """`--output-dir checkpoint-7` trained, and then `--resume checkpoint-7` called it an incomplete checkpoint."""
    from rlcm_fast.checkpoint import resolve_checkpoint

    run = tmp_path / "checkpoint-7"
    shutil.copytree(file_prompts_run[1].parent, run)
    assert resolve_checkpoint(run) == run / "checkpoint-1"
    assert resolve_checkpoint(run / "checkpoint-1") == run / "checkpoint-1"


@pytest.mark.parametrize("a, b", [(None, "/data/p.txt"), ("/data/p.txt", None), (7, "/data/p.txt"), (None, None)])
def test_a_prompts_name_that_is_not_a_string_is_not_the_same_file(a, b):
    """A crafted checkpoint's `prompts` that is not a string is another name, not a TypeError from Path(None)."""
    from rlcm_fast.resume import _same_file_name

    assert _same_file_name(a, b) is False


def test_a_reward_that_is_not_a_reward_name_is_compared_as_written():
    """A reward that does not parse is the same only as the same string (validate() then says why)."""
    refuse_changed_settings({"reward": "no such reward"}, {"reward": "no such reward"}, mid_epoch=False)
    with pytest.raises(ConfigError, match="^reward='no such reward' differs from the checkpoint's "
                                          "'jpeg_compressibility'; a resumed run cannot change it"):
        refuse_changed_settings({"reward": "jpeg_compressibility"}, {"reward": "no such reward"}, mid_epoch=False)
    with pytest.raises(ConfigError, match="^reward='jpeg_compressibility' differs from the checkpoint's"):
        refuse_changed_settings({"reward": "jpeg_compressibility:"}, {"reward": "jpeg_compressibility"},
                                mid_epoch=False)


def test_a_resume_may_not_drop_or_add_a_lora_target():
    """LoRA targets in another order are the same adapter; fewer or more are another."""
    refuse_changed_settings({"lora_targets": ["to_q", "to_v"]}, {"lora_targets": ["to_v", "to_q"]}, mid_epoch=False)
    for fewer_or_more in (["to_q"], ["to_q", "to_v", "to_k"]):
        with pytest.raises(ConfigError, match=r"^lora_targets=\[.*\] differs from the checkpoint's \['to_q', 'to_v'\]"):
            refuse_changed_settings({"lora_targets": ["to_q", "to_v"]}, {"lora_targets": fewer_or_more},
                                    mid_epoch=False)


def test_a_checkpoint_without_a_later_setting_resumes_with_its_default(monkeypatch, tmp_path):
    """A checkpoint written before a setting existed (its config lacks the key) resumes with the default."""
    import rlcm_fast.checkpoint as ckpt_module

    saved = resolve_config().to_dict()
    for key in ("lora_targets", "jpeg_quality", "eta"):  # fixed on resume, and mid-epoch
        saved.pop(key)
    monkeypatch.setattr(ckpt_module, "read_training_state", lambda checkpoint: {"config": saved, "update": 1})
    cfg = resumed_config(tmp_path / "checkpoint-1", {})
    defaults = TrainConfig()
    assert (cfg.lora_targets, cfg.jpeg_quality, cfg.eta) == (defaults.lora_targets, defaults.jpeg_quality,
                                                               defaults.eta)


# Literal lists, not resume.FIXED_*: a key dropped from those tuples must fail here.
MID_EPOCH_CHANGES = [("seed", 1), ("batches_per_epoch", 3), ("num_sample_iters", 2), ("sample_batch_size", 8),
                     ("train_batch_size", 4), ("gradient_accumulation_steps", 2), ("num_inner_epochs", 2),
                     ("algorithm", "rebel"), ("step_fraction", 0.5), ("guidance_scale", 4.0), ("eta", 0.5)]


@pytest.mark.parametrize("key, new", MID_EPOCH_CHANGES, ids=[k for k, _ in MID_EPOCH_CHANGES])
def test_each_epoch_layout_setting_is_refused_mid_epoch_and_allowed_between_epochs(key, new):
    """A checkpoint stopped mid-epoch stores that epoch's samples and log-probs: every setting that laid them out
    or sampled them (DDPO's eta too) is fixed, and only then."""
    before = resolve_config(overrides={"method": "ddpo"}).to_dict()
    values = {**before, key: new}
    refuse_changed_settings(before, values, mid_epoch=False)
    with pytest.raises(ConfigError) as error:
        refuse_changed_settings(before, values, mid_epoch=True)
    assert str(error.value) == (f"{key}={new!r} differs from the checkpoint's {before[key]!r}; a checkpoint stopped "
                                "mid-epoch cannot change it")


def test_a_resumed_ddpo_checkpoint_stopped_mid_epoch_refuses_another_eta(monkeypatch, tmp_path):
    """Its stored log-probs are the DDIM policy's at the run's eta: another eta would start the epoch's ratios off 1."""
    saved = resolve_config(overrides={"method": "ddpo"}).to_dict()
    monkeypatch.setattr(checkpoint_module, "read_training_state", lambda checkpoint: {"config": saved, "update": 1})
    with pytest.raises(ConfigError) as error:
        resumed_config(tmp_path / "checkpoint-1", {"eta": 0.5})
    assert str(error.value) == ("eta=0.5 differs from the checkpoint's 1.0; a checkpoint stopped mid-epoch cannot "
                                "change it")
    monkeypatch.setattr(checkpoint_module, "read_training_state", lambda checkpoint: {"config": saved, "update": 0})
    assert resumed_config(tmp_path / "checkpoint-1", {"eta": 0.5}).eta == 0.5


def test_a_mid_epoch_checkpoint_names_a_changed_run_setting_as_a_resumed_runs():
    """From a checkpoint stopped mid-epoch, a setting no resume may change is still named as a resumed run's."""
    before = resolve_config().to_dict()
    with pytest.raises(ConfigError) as error:
        refuse_changed_settings(before, {**before, "lora_rank": 4}, mid_epoch=True)
    assert str(error.value) == "lora_rank=4 differs from the checkpoint's 8; a resumed run cannot change it"


def test_a_resume_warns_that_another_pickscore_processor_is_fine_for_a_local_copy(monkeypatch, tmp_path):
    """The processor is named like a model (a hub id or a folder): its warning says a local copy is the same."""
    saved = resolve_config(overrides={"reward": "pickscore"}).to_dict()
    monkeypatch.setattr(checkpoint_module, "read_training_state", lambda checkpoint: {"config": saved, "update": 0})
    warnings = []
    resumed_config(tmp_path / "checkpoint-1", {"pickscore_processor": "/models/clip-h"}, warn=warnings.append)
    assert warnings == ["pickscore_processor='/models/clip-h' differs from the checkpoint's "
                        "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K': its rewards go beside reward histories scored with "
                        "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K' (fine for a local copy of the same model)"]


def test_a_resume_applies_the_configured_adam_settings_not_the_checkpoints(tmp_path):
    """A resume may change adam_*: loading the optimizer's state dict would keep the checkpoint's without a word."""
    train(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-1"
    changes = {"adam_beta1": 0.5, "adam_beta2": 0.75, "adam_epsilon": 1e-6, "adam_weight_decay": 0.25}
    trainer = Trainer(resumed_config(checkpoint, changes), tmp_path / "branch", checkpoint)
    (group,) = trainer.optimizer.param_groups
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.5, 0.75), 1e-6, 0.25)
    assert trainer.optimizer.state  # the moments still come from the checkpoint
