"""Mutation-testing round 48c (resume, evaluation, faults), a second round over them after 43b: hand-written
mutants of those modules were run against their tests (test_resume, test_evaluation, test_faults' unit tests, round
43b's); each test here kills one that survived (named in its docstring). All are CPU-only, seeded and fast: no
model is loaded or trained; checkpoints are written from round 43b's one-layer stand-in."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rlcm_fast.evaluation as evaluation
from rlcm_fast import run_lock
from rlcm_fast.config import ConfigError, TrainConfig
from rlcm_fast.evaluation import eval_image_generator, evaluate_policy, evaluation_settings, process_share
from rlcm_fast.resume import checked_start, held_start, resumed_config

from test_mutants_round43b import StandInSampler, resumable, stand_in_lora, write  # noqa: F401 (a fixture)


# -- resume: where a resume may start --------------------------------------------------------------------------

def test_a_run_folder_named_auto_is_resumed_as_a_folder(tmp_path, stand_in_lora, monkeypatch):
    """Mutant: resume_from="auto" refused even where a folder of that name exists. The refusal is for the command
    line's `--resume auto` given to a Trainer; a run folder that a user named "auto" must still resume."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^resume_from='auto' is the command line's `--resume auto`"):
        checked_start(TrainConfig(), "other", "auto")
    resumable(tmp_path / "auto")
    assert checked_start(TrainConfig(), "auto", "auto")[2].resolve() == tmp_path / "auto" / "checkpoint-1"


def test_a_run_folder_holding_a_stray_training_state_resumes_its_newest_checkpoint(tmp_path, stand_in_lora):
    """Mutant: `list_checkpoints(resume_from) or` dropped, so a folder with training_state.json is taken as a
    checkpoint. A run folder that holds a copy of one (a user's backup) still holds checkpoints: the resume takes
    its newest, not the folder itself (which was then refused as "another run" in its own folder)."""
    run = tmp_path / "run"
    checkpoint_1 = resumable(run)
    (run / "training_state.json").write_bytes((checkpoint_1 / "training_state.json").read_bytes())
    assert checked_start(TrainConfig(), run, run)[2] == checkpoint_1


def test_an_older_checkpoint_is_refused_in_its_own_folder_but_may_resume_into_an_empty_one(tmp_path, stand_in_lora):
    """Mutants: the "another run" check made regardless of whether the folder is the checkpoint's own, and the
    "newer intact checkpoint" check made for any folder. Resuming checkpoint-1 in its own folder beside
    checkpoint-2 must say that it would overwrite the later one (not that the folder is another run's); resuming it
    into an empty folder overwrites nothing and is what the refusal itself advises."""
    for epoch in (1, 2):
        write(tmp_path / "run", epoch, config=TrainConfig().to_dict())
    with pytest.raises(ConfigError, match="^checkpoint-1 is older than its run's intact checkpoint-2: resuming it in "
                                          "its own folder would overwrite"):
        checked_start(TrainConfig(), tmp_path / "run", tmp_path / "run" / "checkpoint-1")
    started = checked_start(TrainConfig(), tmp_path / "empty", tmp_path / "run" / "checkpoint-1")
    assert started[2] == tmp_path / "run" / "checkpoint-1"


# -- resume: the run lock ----------------------------------------------------------------------------------------

def test_a_run_written_between_the_checks_and_the_lock_is_refused_and_the_lock_let_go(tmp_path, stand_in_lora,
                                                                                      monkeypatch):
    """Mutants: the checks not made again under the lock, and the lock kept when they refuse. Another train that
    writes its first checkpoint into the folder between a Trainer's checks and its lock must be refused (the new
    run would overwrite its checkpoints and metrics), and the refused Trainer must not keep the folder locked: a
    later resume of that run in this process (a notebook keeping the refusal's traceback) would be told the folder
    is in use."""
    run = tmp_path / "run"
    real_hold = run_lock.hold_run_folder

    def another_train_checkpoints_before_the_lock(folder, **kwargs):
        if not folder.exists():
            resumable(folder)
        return real_hold(folder, **kwargs)

    monkeypatch.setattr(run_lock, "hold_run_folder", another_train_checkpoints_before_the_lock)
    with pytest.raises(ConfigError, match="^run folder .* already holds a run: resume it") as refused:
        held_start(TrainConfig(), run, None)
    # Kept as a REPL or notebook keeps its last traceback (with the refused start's frames).
    assert refused.traceback and not run_lock.held_in_this_process(run)
    hold, _, _, resume_from = held_start(TrainConfig(), run, run)
    with hold:
        assert resume_from == run / "checkpoint-1" and run_lock.held_in_this_process(run)


# -- resume: what is warned of -------------------------------------------------------------------------------------

def test_another_jpeg_encoder_is_warned_of_for_either_jpeg_reward_but_not_pillow_for_exact(tmp_path, stand_in_lora):
    """Mutants: the pillow/exact pair warned of, and a JPEG encoder warned of for jpeg_compressibility alone. The
    exact encoder gives Pillow's byte counts by construction (no histories mix scorers: a false warning); for an
    incompressibility run another encoder does put other sizes beside its histories, as for a compressibility one."""
    checkpoint_1 = resumable(tmp_path, reward="jpeg_incompressibility", jpeg_backend="pillow")
    warned = []
    assert resumed_config(checkpoint_1, {"jpeg_backend": "exact"}, warn=warned.append).jpeg_backend == "exact"
    assert warned == []
    resumed_config(checkpoint_1, {"jpeg_backend": "auto"}, warn=warned.append)
    assert warned == ["jpeg_backend='auto' differs from the checkpoint's 'pillow': its rewards go beside reward "
                      "histories scored with 'pillow'"]


def test_the_same_evaluation_prompts_file_by_a_relative_name_is_no_change(tmp_path, stand_in_lora, monkeypatch):
    """Mutant: the evaluation's prompts file compared by its name as written, not as the file it names. A resume
    naming the checkpoint's eval_prompts file again by a relative path (as the command line usually does) samples
    the same images: warning that its evaluations are not comparable would be false; another file is warned of."""
    monkeypatch.chdir(tmp_path)
    for name in ("held_out.txt", "other.txt"):
        (tmp_path / name).write_text("a zebra\na quokka\n")
    checkpoint_1 = resumable(tmp_path / "run", eval_every=1, eval_prompts=str(tmp_path / "held_out.txt"))
    warned = []
    resumed_config(checkpoint_1, {"eval_prompts": "held_out.txt"}, warn=warned.append)
    assert warned == []
    resumed_config(checkpoint_1, {"eval_prompts": "other.txt"}, warn=warned.append)
    assert [line.split(" differs ")[0] for line in warned] == [f"eval_prompts={str(tmp_path / 'other.txt')!r}"]


def test_a_run_that_starts_evaluating_on_resume_is_not_warned_of_other_evaluation_images(tmp_path, stand_in_lora):
    """Mutant: only the resumed config asked whether the run evaluates. A checkpoint of a run that did not
    evaluate has no evaluations to compare with: turning them on with another seed is not a change of the
    evaluation's images (a warning would send the user looking for a line of reward.png that is not there)."""
    checkpoint_1 = resumable(tmp_path, eval_every=0)
    warned = []
    resumed_config(checkpoint_1, {"eval_every": 1, "seed": 7}, warn=warned.append)
    assert warned == []


# -- evaluation ------------------------------------------------------------------------------------------------

def test_the_evaluation_settings_name_the_runs_prompts_when_it_evaluates_them():
    """Mutant: evaluation_settings names eval_prompts as given, "" included. Each eval record's "settings" then
    said "8 images of , seed 0" for every run evaluating its own prompts: runs of other prompt sets looked alike
    to run_logging.same_settings_runs, which compares evaluations only under the same settings."""
    assert evaluation_settings(TrainConfig(eval_images=8, prompts="simple_animals", seed=3)) == (
        "8 images of simple_animals, seed 3")
    assert evaluation_settings(TrainConfig(eval_images=8, prompts="simple_animals", eval_prompts="alignment")) == (
        "8 images of alignment, seed 0")


@pytest.mark.parametrize("images, processes", [(8, 2), (12, 4), (6, 3), (7, 2)])
def test_the_processes_share_the_images_evenly(images, processes):
    """Mutant: each process's share `images // processes + 1` rather than the ceiling. Where the images divide
    evenly the first processes took one image more each and the last one fewer (or none): an evaluation waited on
    its busiest process, though every image was still sampled once."""
    shares = [len(process_share(images, processes, process)) for process in range(processes)]
    assert sum(shares) == images and max(shares) == -(-images // processes)


def test_an_evaluation_on_two_processes_logs_the_rewards_of_both(monkeypatch):
    """Mutant: the rewards gathered only over more than two processes. On two, each process logged the mean and
    count of its own share alone (4 of 7 images here): the run's logged evaluation was half of it."""
    monkeypatch.setattr(evaluation, "gather_object", lambda objects: objects + [np.full(3, 10.0)])  # process 1's
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(eval_images=7, seed=5, sample_batch_size=4, sample_batches_per_call=1),
        accelerator=SimpleNamespace(num_processes=2, process_index=0), sampler=StandInSampler(),
        eval_prompt_set=("a cat",), pipe=SimpleNamespace(text_encoder=SimpleNamespace(dtype=torch.float32)),
        unet=torch.nn.Identity(), device="cpu",
        sample_call=lambda prompts, latents, noises, pending, scored: pending.append(np.full(scored, 2.0)),
        collect_rewards=lambda pending: np.concatenate(pending))
    result = evaluate_policy(trainer)
    assert result["images"] == 7 and result["reward_mean"] == pytest.approx((4 * 2.0 + 3 * 10.0) / 7)


def test_no_evaluation_image_draws_the_numbers_of_an_epochs_stream():
    """Mutant: the "eval" tag left out of an image's seed ([seed, image]). NumPy's SeedSequence pads a short
    entropy list with zeros, so image i drew exactly epoch i's stream 0 on process 0: the evaluation's x_0 and
    noises were that epoch's samples, not held-out draws."""
    from rlcm_fast.epoch_samples import epoch_generator

    epochs = {tuple(torch.randn(4, generator=epoch_generator(5, epoch, process, stream)).tolist())
              for epoch in range(4) for process in range(2) for stream in range(4)}
    images = {tuple(torch.randn(4, generator=eval_image_generator(5, image)).tolist()) for image in range(4)}
    assert len(epochs) == 32 and len(images) == 4 and not images & epochs
