"""A Trainer made in code (a notebook, a script) gets the checks the command line makes: its config validated,
no new run over a folder holding one, a resume's settings against its checkpoint, and train() once; and it
holds the run folder's lock from its making until train() ends."""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rlcm_fast import run_lock
from rlcm_fast.checkpoint import CheckpointError
from rlcm_fast.cli import main
from rlcm_fast.config import ConfigError, resolve_config
from rlcm_fast.run_lock import LOCK_FILE, RunFolderInUse
from rlcm_fast.trainer import Trainer
from stops import sigterm_during_update
from test_run_lock import lock_is_free

SMALL = {"device": "cpu", "epochs": 1, "batches_per_epoch": 1, "sample_batch_size": 2, "train_batch_size": 2,
         "lora_rank": 2, "checkpoint_every": 1}


def metrics(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run of 2 epochs, a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Trainer(resolve_config(overrides={**SMALL, "epochs": 2}), str(run_dir)).train()  # a str folder, as in a notebook
    return run_dir


def test_a_new_trainer_in_a_folder_holding_a_run_is_refused_and_the_run_kept(finished):
    """It overwrote the finished run's metrics, config and checkpoint-1 without a word."""
    before = metrics(finished)
    with pytest.raises(ConfigError, match=f"run folder '{finished}' already holds a run: resume it"):
        Trainer(resolve_config(overrides={**SMALL, "seed": 5}), finished)
    assert metrics(finished) == before


def test_a_config_changed_after_resolve_config_is_validated(tmp_path):
    cfg = resolve_config(overrides=SMALL)
    cfg.clip_range = -1.0
    with pytest.raises(ConfigError, match="clip_range=-1.0 is invalid"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_trainer_records_its_own_folder_and_leaves_the_callers_config_as_it_was(finished):
    assert yaml.safe_load((finished / "config.yaml").read_text())["output_dir"] == str(finished)
    cfg = resolve_config(overrides=SMALL)
    Trainer(cfg, finished.parent / "another")
    assert cfg.output_dir == resolve_config(overrides=SMALL).output_dir


def test_a_resume_in_code_takes_a_run_folder_and_refuses_a_changed_setting(finished, tmp_path):
    with pytest.raises(ConfigError, match="horizon=2 differs from the checkpoint's 4; a resumed run cannot change it"):
        Trainer(resolve_config(overrides={**SMALL, "horizon": 2, "epochs": 3}), tmp_path / "branch",
                resume_from=finished)
    trainer = Trainer(resolve_config(overrides={**SMALL, "epochs": 3}), tmp_path / "branch", resume_from=str(finished))
    assert (trainer.start_epoch, trainer.global_step) == (2, 2)  # the run folder's newest checkpoint


def test_a_resume_in_code_may_not_overwrite_another_runs_or_its_own_later_checkpoints(finished, tmp_path):
    """As the command line refuses them: the resumed run's metrics went into another run's metrics.jsonl, and
    its checkpoint beside the other run's."""
    before = metrics(finished)
    cfg = resolve_config(overrides={**SMALL, "epochs": 3})
    other = tmp_path / "other"
    Trainer(resolve_config(overrides=SMALL), other).train()
    with pytest.raises(ConfigError, match=f"run folder '{other}' holds another run: resume '{finished}/checkpoint-2'"):
        Trainer(cfg, other, resume_from=finished)
    with pytest.raises(ConfigError, match="checkpoint-1 is older than its run's intact checkpoint-2: resuming it in "
                                          "its own folder would overwrite the later checkpoints and metrics"):
        Trainer(cfg, finished, resume_from=finished / "checkpoint-1")
    assert metrics(finished) == before
    Trainer(cfg, tmp_path / "branch", resume_from=finished / "checkpoint-1")  # a branch, into an empty folder


def test_resume_auto_starts_a_run_over_damaged_checkpoints_alone(finished, tmp_path, capsys):
    """`--resume auto` starts the run where no checkpoint is intact; the Trainer refused it as a run held, and the
    warnings said "taking an older checkpoint" where there was none."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        (run_dir / checkpoint / "manifest.json").unlink()
    args = [f"--set={key}={value}" for key, value in SMALL.items() if key != "device"]
    assert main(["train", "--resume", "auto", "--output-dir", str(run_dir), "--device", "cpu", *args]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlcm-fast: warning")]
    assert len(warnings) == 2 and all(line.endswith("no intact checkpoint is left, so the run starts over")
                                      for line in warnings)
    assert [json.loads(line)["epoch"] for line in metrics(run_dir) if '"kind": "epoch"' in line] == [1]


def test_train_runs_once_with_gradients_whatever_the_callers_grad_mode(tmp_path):
    trainer = Trainer(resolve_config(overrides=SMALL), tmp_path / "run")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="under torch.inference_mode"):
        trainer.train()
    with torch.no_grad():  # a notebook's: the update still gets its gradients
        records = trainer.train()
    assert [r["epoch"] for r in records] == [1]
    assert json.loads(metrics(tmp_path / "run")[0])["grad_norm"] > 0
    with pytest.raises(RuntimeError, match=r"Trainer.train\(\) runs once: make another Trainer"):
        trainer.train()
    assert len(metrics(tmp_path / "run")) == 2  # one step, one epoch: the second call changed nothing


def test_a_trainer_refuses_what_is_not_a_train_config_in_one_line(tmp_path):
    """A dict failed deep inside dataclasses.replace (found by mutation testing)."""
    with pytest.raises(TypeError, match="cfg is a dict; a Trainer takes a TrainConfig"):
        Trainer(dict(SMALL), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arguments, message", [
    ({"run_dir": 5}, "run_dir=5 is not a folder's path: a Trainer takes a str or pathlib.Path"),
    ({"run_dir": None}, "run_dir=None is not a folder's path: a Trainer takes a str or pathlib.Path"),
    ({"resume_from": 5}, "resume_from=5 is not a folder's path: a Trainer takes a str or pathlib.Path, or None"),
    ({"progress_bars": "no"}, "progress_bars='no' is invalid: it must be True or False"),
], ids=["run_dir int", "run_dir None", "resume_from int", "progress_bars str"])
def test_a_trainer_names_an_argument_of_the_wrong_type_in_one_line(tmp_path, arguments, message):
    """pathlib's 'expected str, bytes or os.PathLike object, not int' named no argument (newcomer walk)."""
    arguments = {"run_dir": tmp_path / "run", **arguments}
    with pytest.raises(TypeError, match=re.escape(message)):
        Trainer(resolve_config(overrides=SMALL), **arguments)
    assert not (tmp_path / "run").exists()


def test_a_resume_in_code_validates_the_config(finished, tmp_path):
    cfg = resolve_config(overrides={**SMALL, "epochs": 3})
    cfg.clip_range = -1.0
    with pytest.raises(ConfigError, match="clip_range=-1.0 is invalid"):
        Trainer(cfg, tmp_path / "branch", resume_from=finished)


def test_a_resume_in_code_from_a_mid_epoch_checkpoint_refuses_a_changed_seed(tmp_path, monkeypatch):
    """Only the command line's resumed_config refused a setting fixed mid-epoch: a Trainer made in code took another
    seed for the stopped epoch's samples (found by mutation testing)."""
    original = sigterm_during_update(monkeypatch, 0)
    two_updates = {**SMALL, "train_batch_size": 1}  # two updates per epoch: the stop lands mid-epoch
    Trainer(resolve_config(overrides=two_updates), tmp_path / "run").train()
    monkeypatch.setattr(Trainer, "finish_update", original)
    assert (tmp_path / "run" / "checkpoint-0-1").is_dir()
    seed = resolve_config(overrides=two_updates).seed
    with pytest.raises(ConfigError, match=f"seed={seed + 1} differs from the checkpoint's {seed}; a checkpoint "
                                          "stopped mid-epoch cannot change it"):
        Trainer(resolve_config(overrides={**two_updates, "seed": seed + 1}), tmp_path / "branch",
                resume_from=tmp_path / "run")


def test_a_resume_in_code_reads_the_checkpoints_copy_of_a_prompts_file_gone_since(tmp_path):
    """The prompts file is read from the checkpoint's copy, as the command line does: validating the config's own
    path would refuse the resume of a run whose file was moved or deleted."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = resolve_config(overrides={**SMALL, "prompts": str(prompts)})
    Trainer(cfg, tmp_path / "run").train()
    prompts.unlink()
    trainer = Trainer(dataclasses.replace(cfg, epochs=2), tmp_path / "run", resume_from=tmp_path / "run")
    assert (trainer.start_epoch, trainer.global_step) == (1, 1)


def test_a_resume_in_code_into_its_own_folder_spelled_otherwise_is_its_own(finished, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(resolve_config(overrides={**SMALL, "epochs": 3}), "run", resume_from=run_dir)
    assert (trainer.start_epoch, trainer.global_step) == (2, 2)


def test_a_damaged_newest_checkpoint_does_not_hide_an_intact_newer_one(finished, tmp_path):
    """Resuming checkpoint-1 in its own folder would overwrite checkpoint-2, also with a damaged checkpoint-3
    beyond it."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shutil.copytree(run_dir / "checkpoint-2", run_dir / "checkpoint-3")
    (run_dir / "checkpoint-3" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="checkpoint-1 is older than its run's intact checkpoint-2"):
        Trainer(resolve_config(overrides={**SMALL, "epochs": 3}), run_dir, resume_from=run_dir / "checkpoint-1")


def test_a_trainer_holds_its_run_folder_from_its_making_until_train_ends(tmp_path, capsys):
    """Without the lock a command-line train (or another Trainer) could run in the folder meanwhile, and each
    one's sweep of leftovers could delete the other's half-written checkpoint."""
    run_dir = tmp_path / "run"
    trainer = Trainer(resolve_config(overrides=SMALL), run_dir)
    assert not lock_is_free(run_dir) and (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunFolderInUse) as error:
        Trainer(resolve_config(overrides=SMALL), run_dir)
    assert str(error.value) == (f"run folder '{run_dir}' is in use by another Trainer in this process (process "
                                f"{os.getpid()}): let its train() end or del it, or give another run folder")
    assert main(["train", "--device", "cpu", "--set", "epochs=1", "--output-dir", str(run_dir)]) == 2
    assert (f"output dir '{run_dir}' is in use by another Trainer in this process (process {os.getpid()}): let its "
            "train() end or del it, or give another --output-dir") in capsys.readouterr().err
    trainer.train()
    assert lock_is_free(run_dir)
    with pytest.raises(RuntimeError, match="runs once"):  # and a second train() does not take it again
        trainer.train()
    assert lock_is_free(run_dir)


def test_a_trainer_that_cannot_be_built_releases_the_folder_it_made(tmp_path):
    run_dir = tmp_path / "new" / "run"
    with pytest.raises(Exception, match="no_such_module_here") as error:
        Trainer(resolve_config(overrides={**SMALL, "reward": "no_such_module_here:score"}), run_dir)
    # Released at once, not when the error's frames are collected: a notebook keeps them (sys.last_traceback).
    assert list(tmp_path.iterdir()) == []  # the lock's folders, made for it and left empty, are gone again
    assert os.path.realpath(run_dir) not in run_lock._HELD
    del error
    Trainer(resolve_config(overrides=SMALL), run_dir).train()  # and the folder is free
    assert (run_dir / "checkpoint-1").is_dir()


def test_a_run_another_train_finished_between_the_checks_and_the_lock_is_not_overwritten(
        finished, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_hold = run_lock.hold_run_folder

    def another_train_finishes_first(folder, **kwargs):
        shutil.copytree(finished, folder)
        return real_hold(folder, **kwargs)

    monkeypatch.setattr(run_lock, "hold_run_folder", another_train_finishes_first)
    with pytest.raises(ConfigError, match=f"run folder '{run_dir}' already holds a run") as error:
        Trainer(resolve_config(overrides=SMALL), run_dir)
    # Released at once, while the error (and its frames) is still referenced
    assert metrics(run_dir) == metrics(finished) and lock_is_free(run_dir)
    assert os.path.realpath(run_dir) not in run_lock._HELD
    del error


@pytest.mark.parametrize("name, message", [
    ("x" * 300, "^run folder '.*' cannot be created: its name 'xxx.*is 300 bytes"),
    ("bad\udcff", r"^run folder '.*bad\\xff' is not a UTF-8 name, and TensorBoard's writer takes only UTF-8"),
    ("a-file/run", "^run folder '.*a-file/run' cannot be created: '.*a-file' is a file"),
    ("a-file", "^run folder '.*a-file' cannot be created: it is a file$"),
    ("linked", "^run folder '.*linked' holds a symbolic link, 'samples' -> '/tmp'"),
    ("/proc/rlcm-fast-run", "^run folder '/proc/rlcm-fast-run' cannot be created or written: making a folder in "
                            "'/proc' failed"),
    ("run\x00x", r"^run folder '.*run\\x00x' is invalid: a path cannot hold a NUL character$"),
], ids=["too-long", "not-utf8", "under-a-file", "a-file", "holds-a-link", "unwritable-parent", "nul"])
def test_a_run_folder_that_cannot_be_made_is_refused_before_the_model_loads(tmp_path, monkeypatch, name, message):
    """A name too long was an OSError, one not UTF-8 a UnicodeEncodeError from TensorBoard's writer after the
    model had loaded and the folder had been made."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "samples").symlink_to("/tmp")
    monkeypatch.setattr(Trainer, "_build", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=message):
        Trainer(resolve_config(overrides=SMALL), tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "linked"]


def test_train_resumed_from_a_run_with_all_its_epochs_warns_that_nothing_trains(finished, tmp_path):
    """It returned at once in silence, where the command line says so (test_faults)."""
    trainer = Trainer(resolve_config(overrides={**SMALL, "epochs": 2}), tmp_path / "again", resume_from=finished)
    with pytest.warns(UserWarning, match=r"^checkpoint-2 has trained 2 epoch\(s\), and epochs=2: nothing to train; "
                                         r"epochs=N with N > 2 trains on$"):
        records = trainer.train()
    assert trainer.global_step == 2 and records == []  # no epoch logged in this run folder


@pytest.mark.parametrize("resume_from, error, message", [
    ("auto", ConfigError, "^resume_from='auto' is the command line's `--resume auto`; a Trainer takes the run folder"),
    ("missing", CheckpointError, "^resume_from '.*missing' does not exist$"),
    ("no-checkpoint-yet", CheckpointError,
     "^resume_from '.*no-checkpoint-yet' is neither a checkpoint-N folder nor a run folder holding one$"),
])
def test_a_resume_in_code_from_no_checkpoint_says_so_before_the_model_loads(tmp_path, monkeypatch, resume_from,
                                                                          error, message):
    """Each was "checkpoint '...' is unreadable (training_state.json: [Errno 2] ...)"; `auto` is the command
    line's word, read here as a folder of that name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-checkpoint-yet").mkdir()
    (tmp_path / "no-checkpoint-yet" / "config.yaml").write_text("epochs: 1\n")  # a run stopped before its first
    monkeypatch.setattr(Trainer, "_build", lambda *args: pytest.fail("the model was loaded"))
    resume = resume_from if resume_from == "auto" else tmp_path / resume_from
    with pytest.raises(error, match=message):
        Trainer(resolve_config(overrides=SMALL), tmp_path / "run", resume_from=resume)
    assert not (tmp_path / "run").exists()


def test_a_trainer_made_with_relative_paths_writes_where_it_was_made_after_a_chdir(finished, tmp_path, monkeypatch):
    """A notebook that changes its working folder between making a Trainer and train(): the checkpoints and
    TensorBoard events went under the new folder while metrics.jsonl and the lock stayed in the old one (or
    train() failed when the new one had no such folder). The config still records the folder as given."""
    made_in, moved_to = tmp_path / "made-in", tmp_path / "moved-to"
    made_in.mkdir(), moved_to.mkdir()
    shutil.copytree(finished, made_in / "resumed-from")
    monkeypatch.chdir(made_in)
    trainer = Trainer(resolve_config(overrides={**SMALL, "epochs": 3}), "run", resume_from="resumed-from")
    monkeypatch.chdir(moved_to)
    trainer.train()
    assert list(moved_to.iterdir()) == []
    run_dir = made_in / "run"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert [json.loads(line)["kind"] for line in metrics(run_dir)] == ["step", "epoch"]  # epoch 3's alone
    assert any((run_dir / "tensorboard").iterdir()) and lock_is_free(run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["output_dir"] == "run"
