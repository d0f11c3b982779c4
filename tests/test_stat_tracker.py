import numpy as np
import pytest

from rlcm_fast.stat_tracker import PerPromptStatTracker


def test_batch_statistics_until_a_prompt_has_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["cat", "cat", "dog"]
    rewards = np.array([1.0, 3.0, 8.0])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(tracker.update(prompts, rewards), expected)


def test_per_prompt_statistics_once_history_is_long_enough():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    tracker.update(["cat", "cat"], [1.0, 2.0])
    advantages = tracker.update(["cat", "dog"], [3.0, 10.0])
    cat_history = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(advantages[0], (3.0 - cat_history.mean()) / (cat_history.std() + 1e-6))
    batch = np.array([3.0, 10.0])  # dog has 1 < 3 rewards: batch statistics
    np.testing.assert_allclose(advantages[1], (10.0 - batch.mean()) / (batch.std() + 1e-6))


@pytest.mark.parametrize("min_count", [0, 1])
def test_a_lone_reward_under_min_count_0_or_1_has_advantage_0(min_count):
    """As README says, and as DDPO's tracker: a history of one reward is its own mean."""
    tracker = PerPromptStatTracker(buffer_size=4, min_count=min_count)
    advantages = tracker.update(["cat", "dog", "dog"], [5.0, 1.0, 3.0])
    assert advantages[0] == 0.0
    np.testing.assert_allclose(advantages[1:], [-1.0, 1.0], rtol=1e-5)


def test_history_keeps_only_the_last_buffer_size_rewards():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1)
    tracker.update(["a"] * 3, [100.0, 1.0, 2.0])
    assert list(tracker.history["a"]) == [1.0, 2.0]
    advantage = tracker.update(["a"], [3.0])[0]
    np.testing.assert_allclose(advantage, (3.0 - 2.5) / (0.5 + 1e-6))


def test_state_dict_round_trip_gives_the_same_future():
    a = PerPromptStatTracker(buffer_size=3, min_count=2)
    a.update(["x", "y", "x"], [1.0, 2.0, 4.0])
    b = PerPromptStatTracker(buffer_size=3, min_count=2)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.update(["x", "y"], [5.0, 7.0]), b.update(["x", "y"], [5.0, 7.0]))


def test_a_loaded_history_is_kept_under_the_new_settings():
    """A run resumed with other stat settings uses them (they were accepted and written to its config.yaml,
    but the checkpoint's 3 / 2 were used)."""
    a = PerPromptStatTracker(buffer_size=3, min_count=2)
    a.update(["x", "x", "x"], [1.0, 2.0, 4.0])
    b = PerPromptStatTracker(buffer_size=2, min_count=3)
    b.load_state_dict(a.state_dict())
    assert (b.buffer_size, b.min_count) == (2, 3) and list(b.history["x"]) == [2.0, 4.0]  # the latest two
    # x holds 2 < min_count 3 rewards after this batch: the batch's own mean and std, not x's history.
    np.testing.assert_allclose(b.update(["x", "y"], [6.0, 8.0]), [-1.0, 1.0], atol=1e-5)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 prompts but 1 rewards"):
        PerPromptStatTracker(4, 2).update(["a", "b"], [1.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True])
def test_a_saved_history_with_a_non_finite_or_boolean_reward_is_refused(bad):
    """A damaged training_state.json must not load: a NaN would reach every later advantage of its prompt."""
    PerPromptStatTracker.check_state({"history": {"a cat": [1.0, 2]}})
    with pytest.raises(ValueError, match="a cat"):
        PerPromptStatTracker.check_state({"history": {"a cat": [1.0, bad]}})
