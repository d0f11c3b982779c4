"""Mutation-testing round 43b (checkpoint, checkpoint_checks, resume, evaluation, faults): hand-written mutants of
those modules were run against their tests; each test here kills one that survived (named in its docstring), some
also one that only a slower test (a trained tiny run) caught. All are CPU-only, seeded and fast: no model is loaded
or trained; checkpoints are written from a one-layer stand-in."""

import errno
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import rlcm_fast.checkpoint as checkpoint
import rlcm_fast.evaluation as evaluation
from rlcm_fast.checkpoint import (CheckpointError, CheckpointWriteError, find_resumable, list_checkpoints,
                                  load_checkpoint, read_training_state, resolve_checkpoint, save_checkpoint,
                                  verify_checkpoint)
from rlcm_fast.checkpoint_checks import STATE_FORMAT, compatibility_problem, state_problem, stopped_epoch_problem
from rlcm_fast.config import ConfigError, TrainConfig
from rlcm_fast.evaluation import eval_image_generator, evaluate_policy
from rlcm_fast.faults import hub_unreachable_reason, shown
from rlcm_fast.resume import checked_start, newer_intact_checkpoint, resume_options, resumed_config
from rlcm_fast.stat_tracker import PerPromptStatTracker
from rlcm_fast.tiny_presets import preset_weights_id


# -- checkpoint ------------------------------------------------------------------------------------------------

@pytest.fixture
def stand_in_lora(monkeypatch):
    """The LoRA file of a one-layer stand-in: its weight, saved and loaded as the policy's adapter would be."""
    monkeypatch.setattr(checkpoint, "save_lora", lambda unet, folder: save_file(
        {"weight": unet.weight.detach().clone()}, str(Path(folder) / checkpoint.LORA_FILE)))
    monkeypatch.setattr(checkpoint, "load_lora_into", lambda unet, folder: unet.weight.data.copy_(
        load_file(str(Path(folder) / checkpoint.LORA_FILE))["weight"]))


def stand_ins(steps: int = 3):
    """A seeded one-layer policy, its AdamW, a LambdaLR schedule and a stat tracker after `steps` updates."""
    torch.manual_seed(0)
    unet = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    for step in range(steps):
        unet(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        schedule.step()
        tracker.update(["a cat"], [float(step)])
    return unet, optimizer, schedule, tracker


def write(run_dir: Path, epoch: int, update: int = 0, keep: int = 0, config: dict | None = None,
          prompts: tuple[str, ...] | None = None) -> Path:
    """save_checkpoint of the stand-ins after `epoch` epochs (and `update` updates into the next), trained with
    `config` (a user's model by default)."""
    state = {"config": config or {"model": "user/model"}, "global_step": 2 * epoch + update}
    if update:
        state["stopped_epoch"] = {"updates_done": update, "processes": 1, "prompts": ["a cat"],
                                  "stats": {"reward_mean": 1.0, "reward_std": 0.5, "sample_seconds": 2.0}}
    return save_checkpoint(run_dir, epoch, *stand_ins(), state, update=update, keep=keep,
                           prompt_files=None if prompts is None else {"prompts": prompts})


def names(run_dir: Path) -> list[str]:
    return [path.name for path in list_checkpoints(run_dir)]


def test_pruning_keeps_the_newest_up_to_the_current_and_drops_a_passed_stopped_epoch(tmp_path, stand_in_lora):
    """Mutants: `keep - 1` -> `keep` (one checkpoint more than keep_checkpoints), the passed mid-epoch checkpoint
    dropped when the current one is mid-epoch instead of an epoch's, and every checkpoint but the current one
    counted as older (a rewrite of checkpoint-2 after a resume from it deleted the run's later ones)."""
    for epoch in (1, 2, 3):
        write(tmp_path, epoch, keep=2)
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    write(tmp_path, 3, update=1, keep=3)
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3", "checkpoint-3-1"]
    write(tmp_path, 4, keep=3)  # the run went on past checkpoint-3-1: it goes first
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    write(tmp_path, 2, keep=1)  # after a resume from checkpoint-2: the later ones are left alone
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert (tmp_path / "latest").read_text() == "checkpoint-2\n"


def test_a_mid_epoch_checkpoint_records_its_update_and_loads_back_what_was_saved(tmp_path, stand_in_lora):
    """Mutants: `update` left out of the saved state, and the stat tracker's histories not restored. A
    checkpoint-3-2 read as update 0 resumes at the start of epoch 4's samples instead of update 3 of its own; a
    tracker without its histories normalises the next epoch's rewards by the batch instead of each prompt's."""
    saved = write(tmp_path, 3, update=2)
    assert read_training_state(saved)["update"] == 2 and read_training_state(saved)["epoch"] == 3
    unet, optimizer, schedule, tracker = stand_ins(steps=0)
    state = load_checkpoint(saved, unet, optimizer, schedule, tracker)
    assert state["update"] == 2 and state["global_step"] == 8
    assert {prompt: list(values) for prompt, values in tracker.history.items()} == {"a cat": [0.0, 1.0, 2.0]}
    assert torch.equal(unet.weight, stand_ins()[0].weight)
    assert schedule.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)


def test_a_file_of_another_size_or_content_than_its_manifest_says_is_damage(tmp_path, stand_in_lora):
    """Mutants: the size check skipped, and the sha256 check skipped. A truncated file is named by its size (what a
    full disk or a killed copy leaves); a flipped byte of the same size is caught only by the sha256: without it the
    damaged checkpoint was loaded (here the RNG state) instead of passed over for the previous one."""
    write(tmp_path, 1)
    saved = write(tmp_path, 2)
    rng = saved / checkpoint.RNG_FILE
    data = bytearray(rng.read_bytes())
    data[-1] ^= 0xFF
    rng.write_bytes(bytes(data))
    where = f"checkpoint {str(saved)!r} is damaged: "
    with pytest.raises(CheckpointError, match=f"^{re.escape(where)}rng_state.safetensors does not match its sha256"):
        verify_checkpoint(saved)
    assert find_resumable(tmp_path)[0] == tmp_path / "checkpoint-1"
    rng.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match=f"^{re.escape(where)}rng_state.safetensors has {len(data) - 10} bytes, "
                                              f"the manifest says {len(data)}$"):
        verify_checkpoint(saved)


def test_a_manifest_that_leaves_out_a_required_file_or_lists_the_parent_folder_is_malformed(tmp_path, stand_in_lora):
    """Mutants: the required files' check dropped, and ".." accepted as a listed name. A manifest without the
    optimizer's entry let a checkpoint whose optimizer file was swapped or lost pass as intact (nothing checks an
    unlisted file); ".." is no file of the checkpoint, and is named as a malformed manifest."""
    saved = write(tmp_path, 1)
    manifest = json.loads((saved / "manifest.json").read_text())
    where = f"checkpoint {str(saved)!r} is damaged: manifest.json is malformed "
    for edit, problem in ((lambda files: files.pop(checkpoint.OPTIMIZER_FILE),
                           "(it does not list optimizer.safetensors)"),
                          (lambda files: files.update({"..": dict(files[checkpoint.RNG_FILE])}),
                           "(it lists '..', not a file of the checkpoint)")):
        files = dict(manifest["files"])
        edit(files)
        (saved / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(CheckpointError) as error:
            verify_checkpoint(saved)
        assert str(error.value) == where + problem


def test_a_run_folder_without_an_intact_checkpoint_names_why_its_newest_was_skipped(tmp_path, stand_in_lora):
    """Mutant: `skipped[0]` -> `skipped[-1]`. The error names why the newest checkpoint (the one a resume wanted)
    is damaged, not an older one's reason."""
    for epoch in (1, 2):
        (write(tmp_path, epoch) / checkpoint.OPTIMIZER_FILE).write_bytes(b"x" * epoch)
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(tmp_path)
    assert str(error.value).startswith(f"run folder {str(tmp_path)!r} holds no intact checkpoint (checkpoint "
                                       f"{str(tmp_path / 'checkpoint-2')!r} is damaged: optimizer.safetensors has 2 "
                                       "bytes")


def test_a_full_disk_names_the_newest_intact_checkpoint_not_the_oldest(tmp_path, stand_in_lora, monkeypatch):
    """Mutant: the intact checkpoints searched oldest first. A full disk's one line must name the one a resume
    continues from (checkpoint-2), not checkpoint-1: a user told to resume that one would retrain an epoch."""
    write(tmp_path, 1)
    write(tmp_path, 2)

    def full_disk(tensors, filename):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointWriteError) as error:
        write(tmp_path, 3)
    assert str(error.value) == (f"could not write checkpoint-3 in {str(tmp_path)!r}: No space left on device; the "
                                "newest intact checkpoint is checkpoint-2")
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2"]


# -- checkpoint_checks -----------------------------------------------------------------------------------------

def valid_state(**changes) -> dict:
    """A training state of the shape save_checkpoint writes (one parameter group, a user's model: no preset
    weights to match), with `changes`."""
    state = {"epoch": 2, "global_step": 4, "config": {"model": "user/model"}, "state_format": STATE_FORMAT,
             "base_weights": None, "stat_tracker": {"history": {"a cat": [1.0, 2.0]}},
             "optimizer": {"param_groups": [{"params": [0, 1], "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                             "weight_decay": 0.0}]},
             "lr_scheduler": {"last_epoch": 4, "base_lrs": [1e-3], "_last_lr": [1e-3], "lr_lambdas": [None]}}
    return {**state, **changes}

def test_a_state_format_that_is_not_a_count_is_another_format_not_a_traceback():
    """Mutant: `not is_count(written) or` dropped from the state_format check. A tampered or foreign checkpoint's
    state_format "1" (a string) then reached `written < STATE_FORMAT`: a TypeError traceback instead of the one line
    that refuses the checkpoint; JSON's true was taken for format 1."""
    assert state_problem(valid_state()) is None and compatibility_problem(valid_state()) is None
    remedy = "resume or sample it with the rlcm-fast that wrote it, or start a new run"
    for written in ("1", True):
        assert compatibility_problem(valid_state(state_format=written)) == (
            f"has state_format {written!r}; this rlcm-fast reads {STATE_FORMAT} only: {remedy}")


def test_a_state_without_a_stat_tracker_is_named_as_missing_it():
    """Mutant: "stat_tracker" left out of the required keys. A state without one then failed on
    `state["stat_tracker"]`: a KeyError traceback, not a damaged checkpoint that --resume auto passes over."""
    state = valid_state()
    del state["stat_tracker"]
    assert state_problem(state) == "has no 'stat_tracker'"


def test_a_negative_count_of_non_finite_steps_in_a_row_is_damage():
    """Mutant: only nonfinite.total checked. in_a_row=-1 would let a resumed run skip one more non-finite step
    than max_nonfinite_steps allows before it stops."""
    assert state_problem(valid_state(nonfinite={"total": 2, "in_a_row": 1})) is None
    assert state_problem(valid_state(nonfinite={"total": 2, "in_a_row": -1})) == (
        "has nonfinite={'total': 2, 'in_a_row': -1}, expected {total, in_a_row: integers >= 0}")


def test_a_disabled_loss_scalers_empty_state_is_no_damage():
    """Mutant: `scaler not in (None, {})` -> `scaler is not None`. A disabled GradScaler's state_dict() is {}: the
    checkpoints of such a run would all be damage, and --resume would find none intact."""
    assert torch.amp.GradScaler("cpu", enabled=False).state_dict() == {}
    assert state_problem(valid_state(grad_scaler={})) is None
    assert state_problem(valid_state(grad_scaler={"scale": 1024.0})) == (
        "has grad_scaler={'scale': 1024.0}, expected a loss scaler's state")


def test_an_optimizer_without_parameter_groups_is_named_as_the_optimizer():
    """Mutant: the `groups and` (non-empty) condition dropped. An optimizer state with no parameter groups (and an
    LR schedule for none) was accepted; loading it into the run's optimizer then failed past the checks."""
    state = valid_state(optimizer={"param_groups": []},
                        lr_scheduler={"last_epoch": 4, "base_lrs": [], "_last_lr": [], "lr_lambdas": []})
    assert state_problem(state) == (
        "has optimizer={'param_groups': []}, expected {param_groups: [{params, lr, betas, eps, weight_decay}, ...]}")


def test_a_stopped_epoch_of_zero_processes_is_damage_not_a_division_by_zero():
    """Mutant: `processes >= 1` dropped. processes=0 then reached `len(prompts) % processes`: a ZeroDivisionError
    traceback while looking for a resumable checkpoint, instead of one line naming the field."""
    stats = {"reward_mean": 1.0, "reward_std": 0.5, "sample_seconds": 2.0}
    record = {"updates_done": 1, "processes": 1, "prompts": ["a cat", "a dog"], "stats": stats}
    assert stopped_epoch_problem(record, 1) is None
    assert stopped_epoch_problem({**record, "processes": 0}, 1) == (
        "has stopped_epoch.processes=0, expected an integer >= 1")


def test_a_stopped_epochs_stats_without_its_sampling_time_are_damage():
    """Mutant: "sample_seconds" left out of the stats a stopped epoch's record needs. The resumed epoch's record
    logs it: a checkpoint without it resumed and then failed with a KeyError at the end of that epoch."""
    stats = {"reward_mean": 1.0, "reward_std": 0.5}
    assert stopped_epoch_problem({"updates_done": 1, "processes": 1, "prompts": ["a cat"], "stats": stats}, 1) == (
        "has stopped_epoch.stats={'reward_mean': 1.0, 'reward_std': 0.5}, expected numbers including reward_mean, "
        "reward_std, sample_seconds")


def test_an_optimizer_group_with_one_beta_is_damage():
    """Mutant: betas only checked to be a list. AdamW unpacks two betas at its first step: a checkpoint with one
    was accepted, and the resumed run failed at its first update with a traceback."""
    group = valid_state()["optimizer"]["param_groups"][0]
    state = valid_state(optimizer={"param_groups": [{**group, "betas": [0.9]}]})
    assert state_problem(state).startswith("has optimizer={'param_groups': [{'params': [0, 1], 'lr': 0.001, ")
    assert state_problem(state).endswith(", expected {param_groups: [{params, lr, betas, eps, weight_decay}, ...]}")


def test_a_stopped_epochs_stats_that_are_not_numbers_are_damage():
    """Mutant: the stats' values not checked to be finite numbers. The resumed epoch's closing line formats
    reward_mean with :+.4f: a null there was accepted and failed at the end of the epoch with a traceback."""
    stats = {"reward_mean": None, "reward_std": 0.5, "sample_seconds": 2.0}
    assert stopped_epoch_problem({"updates_done": 1, "processes": 1, "prompts": ["a cat"], "stats": stats}, 1) == (
        f"has stopped_epoch.stats={shown(stats)}, expected numbers including reward_mean, reward_std, sample_seconds")


def test_an_optimizer_group_whose_params_are_not_indices_is_damage():
    """Mutant: a group's params not checked to be counts. torch maps the saved per-parameter state by these
    indices: a group naming "w" or -1 was accepted as intact instead of passed over for an older checkpoint."""
    group = valid_state()["optimizer"]["param_groups"][0]
    for params in (["w", 1], [-1, 1]):
        state = valid_state(optimizer={"param_groups": [{**group, "params": params}]})
        assert state_problem(state).startswith(f"has optimizer={{'param_groups': [{{'params': {params!r}, ")


def test_a_ddpo_checkpoint_of_the_tiny_sd_preset_is_compatible_and_one_of_other_weights_is_not():
    """Mutant: the preset's weights looked up for method "rlcm" whatever the checkpoint's method. Every DDPO
    checkpoint of the tiny-sd preset then named other base weights (None for rlcm's tiny-sd): refused as
    incompatible, so no DDPO run on it could be resumed or sampled."""
    ddpo = {"model": "tiny-sd", "method": "ddpo"}
    assert compatibility_problem(valid_state(config=ddpo, base_weights=preset_weights_id("tiny-sd", "ddpo"))) is None
    assert "its LoRA and samples belong to other base weights" in compatibility_problem(
        valid_state(config=ddpo, base_weights="tiny-sd-v1-0123456789ab"))


# -- resume ----------------------------------------------------------------------------------------------------

def resumable(run_dir: Path, update: int = 0, copied: tuple[str, ...] | None = None, **settings) -> Path:
    """checkpoint-1 (or checkpoint-1-`update`) of a run of the tiny preset with these settings, from stand-ins;
    `copied`: the prompts its copy of the run's prompts file holds."""
    return write(run_dir, 1, update=update, config=TrainConfig(**settings).to_dict(), prompts=copied)


def test_a_resume_in_code_from_a_mid_epoch_checkpoint_refuses_another_seed(tmp_path, stand_in_lora):
    """Mutant: checked_start compares the Trainer's config with the checkpoint's as if it had stopped between
    epochs. A Trainer resuming checkpoint-1-1 with another seed would continue the stopped epoch's samples with
    another random stream: refused, as the command line refuses it; an epoch's checkpoint takes the new seed."""
    stopped = resumable(tmp_path / "stopped", update=1)
    message = "^seed=7 differs from the checkpoint's 0; a checkpoint stopped mid-epoch cannot change it$"
    with pytest.raises(ConfigError, match=message):
        resumed_config(stopped, {"seed": 7})
    with pytest.raises(ConfigError, match=message):
        checked_start(TrainConfig(seed=7), tmp_path / "stopped", stopped)
    epochs = resumable(tmp_path / "epochs")
    assert checked_start(TrainConfig(seed=7), tmp_path / "epochs", epochs)[0].seed == 7


def test_a_resume_warns_once_of_other_evaluation_images_and_not_once_evaluations_stop(tmp_path, stand_in_lora):
    """Mutants: the evaluation settings' warning left out, the seed not among them, "differ" for one setting, and
    `and` -> `or` in "both runs evaluate". A changed seed or eval_images makes the evaluations from here on score
    other images (the user must be told); a resume that stops evaluating has nothing to compare."""
    checkpoint_1 = resumable(tmp_path, eval_every=1)
    said = ("from the checkpoint's: the evaluations from here on sample other images than the ones logged before "
            "(reward.png draws them as another line)")
    for overrides, expected in (({"seed": 7}, [f"seed=7 differs {said}"]),
                                ({"seed": 7, "eval_images": 8}, [f"seed=7, eval_images=8 differ {said}"]),
                                ({"seed": 7, "eval_every": 0}, []), ({"epochs": 9}, [])):
        warned = []
        resumed_config(checkpoint_1, overrides, warn=warned.append)
        assert warned == expected, overrides


def test_a_resume_warns_only_of_a_scorer_its_reward_uses(tmp_path, stand_in_lora):
    """Mutant: a changed scorer setting warned of whatever the reward. A compressibility run resumed with another
    aesthetic_model scores exactly as before: a warning that its reward histories mix scorers would be false."""
    checkpoint_1 = resumable(tmp_path, reward="jpeg_compressibility")
    warned = []
    assert resumed_config(checkpoint_1, {"aesthetic_model": "/models/clip-l14"}, warn=warned.append).aesthetic_model \
        == "/models/clip-l14"
    assert warned == []


def test_a_reward_server_named_localhost_is_on_this_machine():
    """Mutant: only a loopback IP address counts as this machine. "localhost" is the usual way to name a reward
    server here: a resume would be refused unless the command line named it again, and the printed resume command
    would repeat it."""
    assert resume_options(TrainConfig(reward="alignment", reward_server="http://localhost:8060")) == ""
    assert resume_options(TrainConfig(reward="alignment", reward_server="http://[::1]:8060")) == ""


def test_only_an_intact_checkpoint_newer_than_the_resumed_one_refuses_it(tmp_path, stand_in_lora):
    """Mutants: `<=` -> `<` (the resumed checkpoint counted as newer than itself: the newest could never be
    resumed in its own folder), and a damaged newer checkpoint returned instead of passed over (a resume of
    checkpoint-1 refused for a checkpoint-3 that --resume auto would skip, naming it rather than checkpoint-2)."""
    for epoch in (1, 2, 3):
        write(tmp_path, epoch)
    assert newer_intact_checkpoint(tmp_path / "checkpoint-3") is None
    (tmp_path / "checkpoint-3" / checkpoint.OPTIMIZER_FILE).write_bytes(b"damaged")
    assert newer_intact_checkpoint(tmp_path / "checkpoint-2") is None
    assert newer_intact_checkpoint(tmp_path / "checkpoint-1") == tmp_path / "checkpoint-2"


def test_damaged_checkpoints_alone_let_a_new_run_start_but_not_a_resume_of_another_run(tmp_path, stand_in_lora):
    """Mutants: a new run refused in a folder holding only damaged checkpoints (--resume auto starts over them, so
    may a Trainer), and a resume into another run's folder allowed when its checkpoints are damaged (it would
    overwrite them and append to that run's metrics)."""
    (resumable(tmp_path / "damaged") / checkpoint.OPTIMIZER_FILE).write_bytes(b"damaged")
    assert checked_start(TrainConfig(), tmp_path / "damaged", None)[2] is None
    other = resumable(tmp_path / "other")
    with pytest.raises(ConfigError, match="^run folder .* holds another run: resume .* into an empty folder"):
        checked_start(TrainConfig(), tmp_path / "damaged", other)


def test_a_resume_reads_the_checkpoints_copy_of_its_prompts_but_keeps_naming_the_runs_file(tmp_path, stand_in_lora):
    """Mutant: the resumed config left naming the checkpoint's copy (RUN/checkpoint-1/prompts.txt) instead of the
    run's own prompts file. config.yaml and every later checkpoint would then name a file inside a checkpoint that
    keep_checkpoints prunes, and a later resume naming the run's file again would no longer be "the same file"."""
    prompts = tmp_path / "animals.txt"
    prompts.write_text("a cat\na dog\n")
    checkpoint_1 = resumable(tmp_path / "run", copied=("a cat", "a dog"), prompts=str(prompts))
    prompts.unlink()  # gone since: the resume draws from the copy, and the run still names its own file
    assert resumed_config(checkpoint_1, {}).prompts == str(prompts)


def test_the_printed_resume_command_quotes_a_reward_written_with_spaces():
    """Mutant: the reward not shell-quoted in the printed resume command. A reward spec may hold spaces after its
    commas ("my_rewards:bright, alignment:0.5" is accepted): pasted unquoted, the shell splits it and --reward
    gets "my_rewards:bright,", so the printed command would not resume the run."""
    options = resume_options(TrainConfig(reward="my_rewards:bright, alignment:0.5",
                                         reward_server="http://198.51.100.7:8060"))
    assert shlex.split(options) == ["--reward", "my_rewards:bright, alignment:0.5",
                                    "--set", "reward_server=http://198.51.100.7:8060"]


def test_resume_auto_takes_a_user_reward_its_command_line_named(tmp_path, stand_in_lora):
    """Mutant: the checks of what a checkpoint alone may start run for `--resume auto` too (`fresh` given). Its
    config comes from this command line (--reward there is no --set override): a run scored by user code would be
    refused although the command line named the reward; a plain --resume of it still needs it named."""
    checkpoint_1 = resumable(tmp_path, reward="my_rewards:bright")
    assert resumed_config(checkpoint_1, {}, fresh=TrainConfig(reward="my_rewards:bright")).reward == "my_rewards:bright"
    with pytest.raises(ConfigError, match="is scored by user code \\(my_rewards:bright\\), which resuming imports"):
        resumed_config(checkpoint_1, {})


# -- evaluation ------------------------------------------------------------------------------------------------

class StandInSampler:
    """x_0 of one number and two actions' noises per image, drawn from the generator as the sampler draws them."""

    def draw_latents(self, batch, generator, dtype):
        return torch.randn(batch, 1, generator=generator, dtype=dtype)

    def draw_noises(self, batch, generator, dtype):
        return [torch.randn(batch, 1, generator=generator, dtype=dtype) for _ in range(2)]


def evaluated(monkeypatch, batch: int, per_call: int, processes: int = 1, images: int = 7) -> tuple[dict, list]:
    """evaluate_policy on every process of a stand-in trainer: {image's x_0: (prompt, noises)} as sampled and
    scored, and the logged result of each process; a reward is the image's x_0."""
    monkeypatch.setattr(evaluation, "gather_object", lambda objects: objects)  # each process's own rewards
    drawn, results = {}, []
    for process in range(processes):
        calls = []

        def sample_call(prompts, latents, noises, pending, scored):
            calls.append(len(prompts))
            for row in range(scored):
                drawn[float(latents[row, 0])] = (prompts[row], [float(n[row, 0]) for n in noises])
            pending.append(latents[:scored, 0].double().numpy())

        trainer = SimpleNamespace(
            cfg=SimpleNamespace(eval_images=images, seed=5, sample_batch_size=batch, sample_batches_per_call=per_call),
            accelerator=SimpleNamespace(num_processes=processes, process_index=process), sampler=StandInSampler(),
            eval_prompt_set=("a cat", "a dog", "an owl"),
            pipe=SimpleNamespace(text_encoder=SimpleNamespace(dtype=torch.float32)),
            unet=torch.nn.Dropout().train(), device="cpu", sample_call=sample_call,
            collect_rewards=lambda pending: np.concatenate(pending or [np.zeros(0)]))
        results.append((evaluate_policy(trainer), calls, trainer.unet.training))
    return drawn, results


def test_each_evaluation_image_has_its_prompt_x0_and_noises_whatever_the_call_size_or_process(monkeypatch):
    """Mutants: the prompt chosen by the image's row in its call (`prompt_set[n % ...]` for the n-th row), and the
    noises handed to the images in reverse order within a call. Either way an image's prompt or noises depended on
    the call size and process count, so evaluations of runs on other hardware or call sizes drew other images:
    image i is prompt i (mod the set) from x_0 and then its noises, all from eval_image_generator(seed, i)."""
    expected = {}
    for image in range(7):
        generator = eval_image_generator(5, image)
        x0 = float(torch.randn(1, 1, generator=generator))
        expected[x0] = (("a cat", "a dog", "an owl")[image % 3], [float(torch.randn(1, 1, generator=generator))
                                                                  for _ in range(2)])
    for batch, per_call, processes in ((4, 1, 1), (2, 2, 1), (3, 1, 2), (1, 1, 3)):
        assert evaluated(monkeypatch, batch, per_call, processes)[0] == expected, (batch, per_call, processes)


def test_an_evaluation_samples_in_the_epochs_calls_in_eval_mode_and_logs_the_epochs_std(monkeypatch):
    """Mutants: calls of sample_batch_size rows (sample_batches_per_call ignored), the UNet left in training mode,
    and the reward std with ddof=1. The epochs' calls hold sample_batch_size * sample_batches_per_call rows (a
    captured or compiled loop is not traced again for another size); a policy with dropout must sample as the
    epochs sample; reward_std is the epochs' (population) std, for the closing line and plot to compare them."""
    drawn, [(result, calls, training)] = evaluated(monkeypatch, batch=2, per_call=3)
    rewards = np.array(sorted(drawn))
    assert calls == [6, 6] and training is False
    assert result["images"] == 7 and result["reward_mean"] == pytest.approx(rewards.mean())
    assert result["reward_std"] == pytest.approx(rewards.std(ddof=0), rel=1e-9)


# -- faults ----------------------------------------------------------------------------------------------------

def test_a_hub_error_raised_while_handling_another_is_still_the_hub_being_unreachable(monkeypatch):
    """Mutant: `_hub_unreachable` follows only `__cause__`, not the implicit `__context__`. A library that raises
    its own OSError inside the `except` of the hub client's "not cached" (no `from`) chains it as the context:
    that is still a model not cached here, said in a few words, not the library's several sentences."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        try:
            raise LocalEntryNotFoundError("not cached")
        except LocalEntryNotFoundError:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them")
    except OSError as error:
        assert error.__cause__ is None and isinstance(error.__context__, LocalEntryNotFoundError)
        assert hub_unreachable_reason(error) == (
            "not in this machine's hub cache, and the hub cannot be reached: download the model once where there is "
            "a network, or give a local folder")
