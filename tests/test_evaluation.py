"""The run's evaluation (eval_every, eval_images, eval_prompts; rlcm_fast/evaluation.py): the same images from the
same draws at every evaluation, logged as "eval" records, without changing what the run trains on; each evaluation
logged once across stops and resumes; a reward failing in it saves the state the weights hold."""

import json
import shutil
from pathlib import Path

import pytest

from rlcm_fast.cli import main
from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.evaluation import eval_image_generator, padded_calls, process_share, unused_evaluation_settings
from rlcm_fast.prompts import load_prompt_set
from rlcm_fast.run_logging import RunLogger

# Two optimizer updates per epoch (4 samples, minibatches of 2): the tiny model's epoch in about a second.
ARGS = ["--device", "cpu", "--set", "batches_per_epoch=1", "--set", "sample_batch_size=4",
        "--set", "train_batch_size=2", "--set", "epochs=2", "--set", "checkpoint_every=1", "--set", "grid_every=0"]
EVAL = ["--set", "eval_every=1", "--set", "eval_images=6"]
TIMINGS = ("sample_seconds", "train_seconds", "eval_seconds")


def train(run_dir: Path, *extra) -> int:
    return main(["train", "--output-dir", str(run_dir), *ARGS, *extra])


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in record.items() if k not in TIMINGS}
            for record in map(json.loads, lines) if record["kind"] == kind]


@pytest.mark.parametrize("images, processes", [(6, 1), (6, 4), (7, 3), (2, 3), (32, 2)])
def test_the_processes_share_every_image_once_in_calls_of_the_epochs_size(images, processes):
    shares = [process_share(images, processes, p) for p in range(processes)]
    assert [i for share in shares for i in share] == list(range(images))
    for share in shares:
        calls = padded_calls(share, 4)
        assert all(len(call) == 4 for call, _ in calls)
        assert [i for call, real in calls for i in call[:real]] == list(share)  # scored: the share, in order
        assert sum(4 - real for _, real in calls) < 4  # less than one call of padding, none for an empty share
        assert {i for call, real in calls for i in call[real:]} <= {share[-1] if share else None}


def test_each_image_has_its_own_stream_whatever_samples_it():
    first = [eval_image_generator(0, i).initial_seed() for i in range(4)]
    assert len(set(first)) == 4 and first == [eval_image_generator(0, i).initial_seed() for i in range(4)]
    assert eval_image_generator(1, 0).initial_seed() != first[0]  # the run's seed counts


@pytest.mark.parametrize("key, value, message", [
    ("eval_every", -1, "eval_every=-1 is invalid: it must be >= 0"),
    ("eval_images", 0, "eval_images=0 is invalid: it must be a positive integer"),
    ("eval_prompts", "no_such_set", "eval_prompts 'no_such_set' is unknown; allowed: imagenet_animals"),
    ("eval_prompts", "missing/prompts.txt", "eval_prompts file 'missing/prompts.txt' does not exist"),
])
def test_bad_evaluation_settings_are_refused_in_one_line(key, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        resolve_config(overrides={key: value})


def test_an_evaluation_prompts_file_is_kept_by_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "held_out.txt").write_text("a zebra\na quokka\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config(overrides={"eval_prompts": "held_out.txt"}).eval_prompts == str(tmp_path / "held_out.txt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same seeded run without and with evaluations (after 0, 1 and 2 epochs)."""
    root = tmp_path_factory.mktemp("evaluation")
    assert train(root / "plain") == 0
    assert train(root / "evaluated", *EVAL) == 0
    return {"plain": root / "plain", "evaluated": root / "evaluated"}


def test_evaluations_change_nothing_the_run_trains_on(runs):
    for kind in ("step", "epoch"):
        assert records(runs["evaluated"], kind) == records(runs["plain"], kind)
    from safetensors.torch import load_file

    weights = [load_file(runs[name] / "checkpoint-2" / "pytorch_lora_weights.safetensors") for name in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


def test_an_evaluation_is_logged_before_training_and_after_each_epoch(runs):
    evals = records(runs["evaluated"], "eval")
    assert [(r["epoch"], r["step"], r["images"]) for r in evals] == [(0, 0, 6), (1, 2, 6), (2, 4, 6)]
    assert len({r["reward_mean"] for r in evals}) == 3  # the policy changed between them
    assert all(r["reward_std"] > 0 for r in evals)
    assert records(runs["plain"], "eval") == []


def test_a_resumed_run_logs_each_evaluation_once_and_draws_the_same_images(runs, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, *EVAL, "--set", "epochs=1") == 0
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=2"]) == 0
    # The same evaluations as the uninterrupted run's: the same policy, the same images of the same draws.
    assert records(run_dir, "eval") == records(runs["evaluated"], "eval")


def test_the_starting_policy_s_evaluation_is_dropped_by_a_run_started_again(tmp_path):
    """A run killed before its first checkpoint starts again from nothing and evaluates its start again; a resume
    past it keeps it, and drops the evaluations logged after its checkpoint (they run again)."""
    def logged(run_dir, kind, epoch, step):
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"kind": kind, "epoch": epoch, "step": step, "reward_mean": -1.0, "reward_std": 0.1})
                    + "\n")

    for epoch, step in ((0, 0), (1, 2), (2, 4)):
        logged(tmp_path, "eval", epoch, step)
    for step in (1, 2, 3, 4):
        logged(tmp_path, "step", 1 + (step > 2), step)
    logged(tmp_path, "epoch", 1, 2)
    logged(tmp_path, "epoch", 2, 4)
    RunLogger(tmp_path, resume_epoch=1, resume_step=2).close()
    assert [(r["epoch"], r["step"]) for r in records(tmp_path, "eval")] == [(0, 0), (1, 2)]
    RunLogger(tmp_path, resume_epoch=1, resume_step=3).close()  # mid-epoch 2: epoch 1's evaluation stays
    assert [(r["epoch"], r["step"]) for r in records(tmp_path, "eval")] == [(0, 0), (1, 2)]
    logger = RunLogger(tmp_path)  # started again
    assert records(tmp_path, "eval") == [] and logger.eval_records() == []
    logger.close()


def reward_failing_at_call(call: int, module: str, tmp_path, monkeypatch) -> None:
    """A user reward `module:reward` (one call per batch scored) that raises at its `call`-th call."""
    (tmp_path / f"{module}.py").write_text(
        "CALLS = []\ndef reward(images, prompts):\n    CALLS.append(1)\n"
        f"    if len(CALLS) == {call}:\n        raise ValueError('the scorer crashed')\n"
        "    return -images.mean(dim=(1, 2, 3)).numpy()\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_reward_failing_in_an_evaluation_saves_the_epochs_trained_before_it(tmp_path, monkeypatch, capsys):
    """The evaluation after epoch 1 is the reward's third call (one per evaluation of 4 images, one per epoch),
    which fails: checkpoint-1 (not due, checkpoint_every=5) holds epoch 1's weights; the starting state is no
    checkpoint to write."""
    reward_failing_at_call(3, "fails_third", tmp_path, monkeypatch)
    assert train(tmp_path / "run", "--set", "reward=fails_third:reward", "--set", "checkpoint_every=5",
                 "--set", "eval_every=1", "--set", "eval_images=4") == 2
    err = capsys.readouterr().err
    assert ("raised ValueError: the scorer crashed (in the evaluation after epoch 1); checkpoint-1 holds the state it "
            "evaluated, which a resume evaluates first") in err
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "training_state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    # The resume evaluates that checkpoint first: each evaluation once, none lost.
    assert main(["train", "--resume", str(tmp_path / "run"), "--reward", "fails_third:reward"]) == 0
    assert [(r["epoch"], r["step"]) for r in records(tmp_path / "run", "eval")] == [(0, 0), (1, 2), (2, 4)]


def test_a_reward_failing_in_the_last_evaluation_says_so(tmp_path, monkeypatch, capsys):
    reward_failing_at_call(5, "fails_fifth", tmp_path, monkeypatch)
    assert train(tmp_path / "run", "--set", "reward=fails_fifth:reward", "--set", "eval_every=1",
                 "--set", "eval_images=4") == 2
    assert ("raised ValueError: the scorer crashed (in the evaluation after the last epoch); checkpoint-2 holds the "
            "trained run") in capsys.readouterr().err


def test_padded_images_are_sampled_but_not_scored(tmp_path, monkeypatch):
    """5 images in calls of 4: the second call holds one image and three repeats of it, which no reward sees."""
    (tmp_path / "counted.py").write_text(
        "SIZES = []\ndef reward(images, prompts):\n    SIZES.append((len(images), len(prompts)))\n"
        "    return -images.mean(dim=(1, 2, 3)).numpy()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert train(tmp_path / "run", "--set", "reward=counted:reward", "--set", "epochs=1", "--set", "eval_every=1",
                 "--set", "eval_images=5") == 0
    import counted

    assert counted.SIZES == [(4, 4), (1, 1), (4, 4), (4, 4), (1, 1)]  # evaluation, epoch 1, evaluation


def test_out_of_memory_in_an_evaluation_names_it(tmp_path, monkeypatch, capsys):
    import rlcm_fast.trainer as trainer_module

    def out_of_memory(trainer):
        raise MemoryError()

    monkeypatch.setattr(trainer_module, "evaluate_policy", out_of_memory)
    assert train(tmp_path / "run", "--set", "eval_every=1") == 1
    assert "rlcm-fast: error: out of CPU memory while evaluating (per process: sample_batch_size=4" in capsys.readouterr().err


def test_a_resume_evaluates_its_start_once_and_warns_of_other_images(tmp_path, capsys):
    """A run that did not evaluate, resumed with evaluations, evaluates the checkpoint it starts from; a resume
    that changes the seed draws other evaluation images, and is told so."""
    run_dir = tmp_path / "run"
    assert train(run_dir, "--set", "epochs=1") == 0
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=2", *EVAL]) == 0
    assert [(r["epoch"], r["step"]) for r in records(run_dir, "eval")] == [(1, 2), (2, 4)]
    assert "sample other images" not in capsys.readouterr().err  # no evaluation before: nothing to compare
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=3", "--set", "seed=7"]) == 0
    err = capsys.readouterr().err
    assert ("rlcm-fast: warning: seed=7 differs from the checkpoint's: the evaluations from here on sample other "
            "images than the ones logged before") in err
    # checkpoint-2 is evaluated again, on the seed-7 images: the new settings' line starts where the resume does.
    evals = records(run_dir, "eval")
    assert [(r["epoch"], r["settings"]) for r in evals] == [
        (1, "6 images of simple_animals, seed 0"), (2, "6 images of simple_animals, seed 0"),
        (2, "6 images of simple_animals, seed 7"), (3, "6 images of simple_animals, seed 7")]
    assert err.splitlines()[-1].endswith(
        f"evaluation with the settings of its last resume {evals[2]['reward_mean']:+.4f} (after 2 epochs) -> "
        f"{evals[3]['reward_mean']:+.4f} (after 3); checkpoints in {run_dir}")
    # Resumed again with those settings: checkpoint-3's evaluation is logged, not run again.
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=4"]) == 0
    assert [r["epoch"] for r in records(run_dir, "eval")] == [1, 2, 2, 3, 4]


def test_an_evaluation_prompts_file_is_read_from_the_checkpoint_s_copy(tmp_path, capsys):
    """A resume evaluates the prompts the run evaluated, not the file as edited since (as the run's own prompts file);
    a checkpoint without the copy reads the file only when the command line names it again."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a zebra\na quokka\na heron\n")
    uninterrupted, run_dir = tmp_path / "uninterrupted", tmp_path / "run"
    assert train(uninterrupted, *EVAL, "--set", f"eval_prompts={held_out}") == 0
    assert train(run_dir, *EVAL, "--set", f"eval_prompts={held_out}", "--set", "epochs=1") == 0
    checkpoint = run_dir / "checkpoint-1"
    assert load_prompt_set(str(checkpoint / "eval_prompts.txt")) == ("a zebra", "a quokka", "a heron")
    shutil.copytree(run_dir, tmp_path / "older")
    held_out.write_text("a wolf\n")
    assert main(["train", "--resume", str(run_dir), "--set", "epochs=2"]) == 0
    assert records(run_dir, "eval") == records(uninterrupted, "eval")
    assert f"eval_prompts: {held_out}\n" in (run_dir / "config.yaml").read_text()

    older = tmp_path / "older" / "checkpoint-1"  # as a checkpoint written before they kept the copy
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["files"]["eval_prompts.txt"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    (older / "eval_prompts.txt").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(older), "--set", "epochs=2"]) == 2
    assert capsys.readouterr().err == (
        f"rlcm-fast: error: checkpoint {str(older)!r} holds no copy of its eval_prompts file {str(held_out)!r} (written "
        f"before checkpoints kept one), which a resume reads only when named: add --set eval_prompts={str(held_out)!r} "
        "(or --set eval_prompts= to evaluate the run's prompts)\n")
    assert main(["train", "--resume", str(older), "--set", "epochs=2", "--set", f"eval_prompts={held_out}"]) == 0
    assert records(older.parent, "eval")[-1]["images"] == 6


def test_an_evaluation_prompt_set_is_not_copied(runs):
    checkpoint = runs["evaluated"] / "checkpoint-1"
    assert not (checkpoint / "eval_prompts.txt").exists()
    assert "eval_prompts.txt" not in json.loads((checkpoint / "manifest.json").read_text())["files"]


def test_evaluation_settings_without_evaluations_are_warned_of(tmp_path, capsys):
    assert unused_evaluation_settings(resolve_config()) is None
    assert unused_evaluation_settings(resolve_config(overrides={"eval_every": 2, "eval_images": 8})) is None
    assert unused_evaluation_settings(resolve_config(overrides={"eval_images": 8})) == (
        "eval_images=8 has no effect with eval_every=0: set eval_every=N to evaluate")
    assert train(tmp_path / "run", "--set", "epochs=1", "--set", "eval_images=8", "--set",
                 "eval_prompts=simple_animals") == 0
    assert ("rlcm-fast: warning: eval_images=8 and eval_prompts='simple_animals' have no effect with eval_every=0: "
            "set eval_every=N to evaluate\n") in capsys.readouterr().err
    assert records(tmp_path / "run", "eval") == []
    # A resume's settings are its checkpoint's, not the user's: switching evaluations off there is not warned of.
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "epochs=2"]) == 0
    assert "no effect with eval_every=0" not in capsys.readouterr().err


def test_a_resume_that_changes_the_run_s_prompts_is_warned_when_they_are_the_evaluation_s():
    from rlcm_fast.resume import _changed_evaluation

    before = {"eval_every": 1, "prompts": "simple_animals"}
    assert _changed_evaluation(before, {**before, "prompts": "imagenet_animals"}) == [
        "prompts='imagenet_animals' differs from the checkpoint's: the evaluations from here on sample other images "
        "than the ones logged before (reward.png draws them as another line)"]
    held_out = {"eval_prompts": "alignment"}
    assert _changed_evaluation({**before, **held_out}, {**before, **held_out, "prompts": "imagenet_animals"}) == []
