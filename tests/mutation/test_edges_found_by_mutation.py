"""Edges of run_lock, run_logging, the stat tracker, config checks and reward specs that a mutation audit found no
test of: each test fails under the mutant its docstring names. Fast, seeded, no model loaded."""

import fcntl
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_fast import run_lock, run_logging
from rlcm_fast.run_lock import LOCK_FILE, RunFolderInUse, hold_run_folder
from rlcm_fast.run_logging import RunLogger, save_sample_grid


# ---------------------------------------------------------------- run_lock.py

def test_a_held_lock_file_that_holds_no_process_id_names_no_process(tmp_path):
    """Mutant R5 (`holder.isdigit()` -> `holder`): the message names a process only when the file holds a number."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("not a pid\n")
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another holder, which has not written its id
        with pytest.raises(RunFolderInUse) as error, hold_run_folder(run_dir):
            pass
    finally:
        os.close(fd)
    assert str(error.value) == (f"output dir {str(run_dir)!r} is in use by another rlcm-fast train: wait for it to "
                                "end, or give another --output-dir")


def test_the_lock_file_holds_only_this_process_id_after_a_longer_one(tmp_path, monkeypatch):
    """Mutant R7 (no os.ftruncate): a shorter id written over a dead holder's longer one left its tail digits, and a
    later refused train named a process that never existed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("1234567890123\n")  # a dead holder's (longer than any pid)
    with hold_run_folder(run_dir):
        assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        monkeypatch.setattr(run_lock, "_HELD", {})  # this process's holds forgotten: refused as another process is
        with pytest.raises(RunFolderInUse, match=rf"\(process {os.getpid()}\): wait"), hold_run_folder(run_dir):
            pass


# ---------------------------------------------------------------- run_logging.py

def log_epochs(logger, epochs, steps_per_epoch=2):
    for epoch in epochs:
        for step in range((epoch - 1) * steps_per_epoch + 1, epoch * steps_per_epoch + 1):
            logger.log("step", epoch, step, {"loss": float(step)})
        logger.log("epoch", epoch, epoch * steps_per_epoch, {"reward_mean": float(epoch), "reward_std": 0.5})


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_checkpoint_after_an_epochs_last_step_but_before_its_record_drops_that_epochs_record(tmp_path):
    """Mutant G2 (the epoch condition dropped): a mid-epoch checkpoint after epoch 3's last step (epoch=2, step=6)
    keeps steps 1..6, but epoch 3 runs again and logs its record again: the old one must go, or the plot and
    metrics.jsonl show epoch 3 twice."""
    logger = RunLogger(tmp_path)
    log_epochs(logger, range(1, 4))
    logger.close()
    logger = RunLogger(tmp_path, resume_epoch=2, resume_step=6)
    logger.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in logger.epoch_records()] == [1, 2]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("step", 1), ("step", 2), ("epoch", 2), ("step", 3), ("step", 4), ("epoch", 4), ("step", 5), ("step", 6)]


def test_a_resumed_run_shows_the_steps_up_to_its_checkpoint_once_in_tensorboard(tmp_path):
    """Mutant G5 (purge_step=resume_step): the checkpoint's own last step was purged from TensorBoard and never
    logged again."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = RunLogger(tmp_path)
    log_epochs(logger, range(1, 4))
    logger.close()  # killed after epoch 3; resumed from epoch 2's checkpoint (4 steps)
    logger = RunLogger(tmp_path, resume_epoch=2, resume_step=4)
    log_epochs(logger, range(3, 4))
    logger.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(s, float(s)) for s in range(1, 7)]


def test_a_grid_of_fewer_than_four_images_is_as_wide_as_its_images(tmp_path):
    """Mutant G9 (`columns = 4`): two images made a grid twice as wide, half of it blank."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    save_sample_grid(tmp_path / "grid.png", images, ["a cat", "an owl"], [0.5, 0.25])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * 128, 128 + 24)


def test_a_large_image_is_shrunk_by_averaging_not_by_dropping_pixels(tmp_path):
    """Mutant G10 (always NEAREST): a 512 px checkerboard of single pixels shrunk to 256 px is a mid grey when
    averaged (BOX); nearest-neighbour keeps every other pixel and shows pure black or white."""
    ys, xs = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    board = ((ys + xs) % 2).float().expand(1, 3, 512, 512)
    save_sample_grid(tmp_path / "grid.png", board, ["a board"], [0.0])
    with Image.open(tmp_path / "grid.png") as grid:
        tile = np.asarray(grid.convert("RGB"))[:256, :256].astype(int)
    assert np.abs(tile - 127.5).max() <= 1


def test_each_caption_is_its_reward_to_three_places_and_its_prompt_cut_to_the_tile(tmp_path, monkeypatch):
    """Mutants G11 (`:.1f`) and G12 (the whole prompt): the text drawn under each tile."""
    drawn = []
    real_draw = run_logging.ImageDraw.Draw

    def recording_draw(image):
        draw = real_draw(image)
        real_text = draw.text
        draw.text = lambda xy, text, **kw: (drawn.append((xy, text)), real_text(xy, text, **kw))[1]
        return draw

    monkeypatch.setattr(run_logging.ImageDraw, "Draw", recording_draw)
    long_prompt = "a photograph of a very small cat sitting on a very large red chair"
    images = torch.full((2, 3, 16, 16), 0.5)
    save_sample_grid(tmp_path / "grid.png", images, [long_prompt, "an owl"], [0.12345, -2.0])
    assert drawn == [((2, 129), "0.123"), ((2, 140), long_prompt[:21]),
                     ((130, 129), "-2.000"), ((130, 140), "an owl")]  # 128 px tiles: 128 // 6 = 21 characters


# ---------------------------------------------------------------- stat_tracker.py

@pytest.mark.parametrize("values, shown", [(5, "5"), ({}, "{}")])
def test_a_saved_history_that_is_not_a_list_is_refused(values, shown):
    """Mutant S6 (`isinstance(values, list)` dropped): a number was a TypeError traceback, an empty object loaded."""
    from rlcm_fast.stat_tracker import PerPromptStatTracker

    with pytest.raises(ValueError, match=rf"^history\['a cat'\] is {shown}, expected a list of finite numbers$"):
        PerPromptStatTracker.check_state({"history": {"a cat": values}})


def test_a_saved_history_that_is_not_an_object_is_refused():
    """Mutant S8 (the history-is-a-dict check dropped): a list was an AttributeError traceback on resume."""
    from rlcm_fast.stat_tracker import PerPromptStatTracker

    with pytest.raises(ValueError, match=r"^history is \[1\.0\], expected an object of prompt: rewards$"):
        PerPromptStatTracker.check_state({"history": [1.0]})


# ---------------------------------------------------------------- config_checks.py

def test_reward_timeout_of_exactly_a_day_is_accepted_and_a_moment_more_refused():
    """Mutant C4 (`>` -> `>=`): the bound the message names is allowed."""
    from rlcm_fast.config import ConfigError, resolve_config

    assert resolve_config(overrides={"reward_timeout": 86400.0}).reward_timeout == 86400.0
    with pytest.raises(ConfigError, match=r"^reward_timeout=86400\.5 is invalid: it must be at most 86400 seconds"):
        resolve_config(overrides={"reward_timeout": 86400.5})


# ---------------------------------------------------------------- rewards (base.py, __init__.py)

BUILTINS = ("aesthetic", "jpeg_compressibility")


def test_a_reward_name_of_only_spaces_is_empty():
    """Mutant W1 (`not spec.strip()` -> `not spec`): '   ' was reported as a sum with an empty entry."""
    from rlcm_fast.rewards import RewardError, parse_reward_spec

    with pytest.raises(RewardError, match=r"^reward '   ' is empty; allowed: aesthetic, jpeg_compressibility, or "
                                          r"module:function$"):
        parse_reward_spec("   ", BUILTINS)


@pytest.mark.parametrize("spec", ["aesthetic:-1e300", "pkg.mod:fn:-1e39"])
def test_a_negative_weight_beyond_float32_is_refused(spec):
    """Mutant W3 (the abs() dropped in _is_weight): -1e300 passed, and overflowed the logged statistics like +1e300."""
    from rlcm_fast.rewards import RewardError, parse_reward_spec

    weight = spec.rpartition(":")[2]
    with pytest.raises(RewardError, match=rf"^reward '{spec}' has weight '{weight}'; a weight must be a finite number "
                                          r"within float32's range"):
        parse_reward_spec(spec, BUILTINS)
    assert parse_reward_spec("aesthetic:-3e38", BUILTINS)[0].weight == -3e38


@pytest.mark.parametrize("spec", ["pkg.mod:fn-x", "pkg.mod:fn x", "pkg.mod:fn()"])
def test_a_user_reward_name_with_trailing_junk_is_unknown_before_anything_loads(spec):
    """Mutant W4 (fullmatch -> match): the config check passed such a name, and the run failed at the import,
    after its models loaded."""
    from rlcm_fast.rewards import RewardError, check_reward_name

    with pytest.raises(RewardError, match=rf"^reward '{spec.replace('(', '[(]').replace(')', '[)]')}' is unknown"):
        check_reward_name(spec)


def raises_reward_error(images, prompts):
    from rlcm_fast.rewards import RewardError

    raise RewardError("reward 'remote' could not reach its server")


def test_a_reward_error_from_a_term_of_a_sum_is_passed_on_unchanged():
    """Mutant W6 (`except RewardError: raise` dropped): a term's own one line (say, the reward server's) was
    wrapped as "reward term ... raised RewardError: ..."."""
    from rlcm_fast.rewards import RewardError, make_reward

    reward = make_reward(f"jpeg_compressibility:0.5,{__name__}:raises_reward_error:2")
    with pytest.raises(RewardError) as error:
        reward(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), ["a", "b"])
    assert str(error.value) == "reward 'remote' could not reach its server"


def test_a_reward_below_minus_float32_max_is_refused():
    """Mutant W7 (abs() dropped in checked_rewards): -1e200 passed, and became -inf in a float32 advantage."""
    from rlcm_fast.rewards import RewardError, checked_rewards

    with pytest.raises(RewardError, match=r"^reward 'r' returned values beyond float32's range \(-1e\+200 at index 1; "
                                          r"\|x\| <= 3\.403e\+38\)$"):
        checked_rewards("r", [0.0, -1e200], 2)


def test_a_user_reward_module_that_calls_sys_exit_is_one_line(tmp_path, monkeypatch):
    """Mutant W9 (SystemExit not caught): the module's sys.exit(3) ended the whole program, with status 3 and no
    word on why."""
    from rlcm_fast.rewards import RewardError, make_reward

    (tmp_path / "exits_on_import_mod.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"^reward 'exits_on_import_mod:fn' cannot be imported: its module raised "
                                          r"SystemExit: 3$"):
        make_reward("exits_on_import_mod:fn")


def test_a_single_weighted_reward_is_weighted():
    """Mutant W12 (the weight == 1.0 condition dropped): `jpeg_compressibility:2` alone was the unweighted reward."""
    from rlcm_fast.rewards import make_reward

    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 24, 24, generator=g)
    prompts = ["a", "b", "c"]
    plain = np.asarray(make_reward("jpeg_compressibility", jpeg_backend="pillow")(images, prompts), dtype=np.float64)
    doubled = np.asarray(make_reward("jpeg_compressibility:2", jpeg_backend="pillow")(images, prompts), dtype=np.float64)
    negated = np.asarray(make_reward("jpeg_compressibility:-1", jpeg_backend="pillow")(images, prompts),
                         dtype=np.float64)
    assert (plain < 0).all()
    np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-12)
    np.testing.assert_allclose(negated, -plain, rtol=1e-12)


def test_an_epoch_that_is_not_a_whole_number_of_accumulated_updates_is_refused():
    """Mutant C21 (gradient_accumulation_steps left out of per_step): 32 samples in updates of 16 x 3 passed."""
    from rlcm_fast.config import ConfigError, resolve_config

    with pytest.raises(ConfigError) as error:
        resolve_config(overrides={"device": "cpu", "batches_per_epoch": 2, "sample_batch_size": 16,
                                  "train_batch_size": 16, "gradient_accumulation_steps": 3})
    assert str(error.value) == ("samples per epoch (32 = batches_per_epoch x num_sample_iters x sample_batch_size) is "
                                "not divisible by train_batch_size x gradient_accumulation_steps = 48")
    assert resolve_config(overrides={"device": "cpu", "batches_per_epoch": 2, "sample_batch_size": 16,
                                     "train_batch_size": 16, "gradient_accumulation_steps": 2}).samples_per_epoch == 32
