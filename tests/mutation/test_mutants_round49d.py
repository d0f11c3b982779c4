"""Mutation-testing round 49d (stat_tracker, minibatches, epoch_samples, call_sizes, norm_precision, prompts,
algorithms; a second round after 41 and 42): hand-written mutants of those modules were run against their tests
(test_stat_tracker, test_call_sizes, test_norm_precision, test_prompts, test_algorithms, the minibatch and stream
tests of test_switches, test_damaged_checkpoints, test_mutants_round41, test_mutants_round42,
test_edges_found_by_mutation); each test here kills one that survived (named in its docstring). All are CPU-only,
seeded and fast: no model is loaded and no run is trained."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlcm_fast.algorithms import choose_trained_steps, clipped_policy_loss
from rlcm_fast.checkpoint import CheckpointError
from rlcm_fast.epoch_samples import SAMPLES_FILE, EpochSamples, restore_stopped_epoch, stopped_epoch_record
from rlcm_fast.stat_tracker import PerPromptStatTracker


# -- epoch_samples: a mid-epoch checkpoint's tensors -----------------------------------------------------------

def one_process():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, num_processes=1, process_index=0,
                           is_main_process=True)


@pytest.mark.parametrize("name, shape", [("states", (2, 3, 4, 2, 2, 1)), ("log_probs", (2, 2, 1)),
                                         ("advantages", (2, 1)), ("grid_images", (2, 3, 8, 8, 1))])
def test_a_stopped_epochs_tensor_with_a_dimension_too_many_is_damaged(tmp_path, name, shape):
    """Mutant: restore's `tensors[name].dim() != dim` -> `< dim` (round 41 tried only tensors of too few
    dimensions). A tensor of the right rows and one dimension more is a damaged checkpoint too: said in one line
    naming the tensor and its shape, before a resume trains on samples of the wrong shape."""
    generator = torch.Generator().manual_seed(0)
    samples = EpochSamples(prompts=["p0", "p1"], states=torch.randn(2, 3, 4, 2, 2, generator=generator),
                           log_probs=torch.randn(2, 2, generator=generator), rewards=np.array([0.25, 0.75]),
                           advantages=torch.randn(2, generator=generator),
                           images=torch.rand(2, 3, 8, 8, generator=generator))
    files, stopped = stopped_epoch_record(samples, {"samples": 2}, 1, one_process())
    files[SAMPLES_FILE][name] = torch.zeros(shape)
    checkpoint = tmp_path / "checkpoint-0-1"
    checkpoint.mkdir()
    save_file(files[SAMPLES_FILE], str(checkpoint / SAMPLES_FILE))
    state = {"epoch": 0, "update": 1, "stopped_epoch": stopped}
    with pytest.raises(CheckpointError) as error:
        restore_stopped_epoch(checkpoint, state, one_process())
    assert str(error.value) == (f"checkpoint {str(checkpoint)!r} is damaged: {SAMPLES_FILE} holds {name} of shape "
                                f"{shape} for 2 prompts")


# -- algorithms: PPO's diagnostics -----------------------------------------------------------------------------

def test_clipfrac_counts_only_the_ratios_the_clip_changed():
    """Mutant: clipfrac's `(ratio - 1).abs() > clip_range` -> `>=`. A row whose ratio lies exactly on the clip
    range's edge is not clipped (the clamp leaves it, its gradient flows): the logged clipfrac, which a user
    reads to tune clip_range, counted it as clipped. Rows: on the edge, inside, beyond: 1/3 clipped."""
    old = torch.zeros(3)
    log_probs = torch.tensor([0.125, 0.0, 1.0])
    ratio = torch.exp(log_probs - old)  # as clipped_policy_loss computes it (the same op on the same shape)
    clip_range = float(ratio[0] - 1.0)  # the first row's ratio is exactly 1 + clip_range
    assert torch.equal(ratio.clamp(1.0 - clip_range, 1.0 + clip_range)[:2], ratio[:2])  # the edge is not clipped
    _, stats = clipped_policy_loss(log_probs, old, torch.ones(3), clip_range, 5.0)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)


def test_training_every_step_draws_no_random_number():
    """Mutant: choose_trained_steps' `count == total_steps` shortcut dropped (every row a random subset of all its
    steps, sorted: the same table). The documented contract is that fraction 1, the default, draws nothing from
    the generator, so a default run's later shuffles from that generator are those of runs before step
    subsampling existed; the mutant consumed samples x steps numbers and moved every shuffle after it."""
    generator = torch.Generator().manual_seed(7)
    steps = choose_trained_steps(3, 5, 1.0, generator)
    assert torch.equal(steps, torch.arange(5).expand(3, 5))
    fresh = torch.Generator().manual_seed(7)
    assert torch.equal(torch.randperm(10, generator=generator), torch.randperm(10, generator=fresh))


# -- stat_tracker: a saved state that is not an object ---------------------------------------------------------

@pytest.mark.parametrize("state, shown", [(None, "None"), (["history"], r"\['history'\]"), ("history", "'history'")])
def test_a_saved_tracker_state_that_is_not_an_object_is_refused(state, shown):
    """Mutant: check_state's `isinstance(state, dict)` check dropped. A training_state.json whose stat_tracker is
    null, a list or a string (a hand-edited or damaged file) was a TypeError traceback (`"history" in None`,
    list indices must be integers) instead of the one-line ValueError naming the value and what is expected."""
    with pytest.raises(ValueError, match=rf"^is {shown}, expected an object$"):
        PerPromptStatTracker.check_state(state)
