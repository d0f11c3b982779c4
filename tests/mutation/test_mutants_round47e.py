"""Mutation-testing round 47e (rewards/base, rewards/__init__), a second round over them after 43c: hand-written
mutants of those modules were run against their tests (test_rewards, test_clip_rewards, test_alignment_client,
test_edges_found_by_mutation and rounds 43c and 44c); each test here kills one that survived (named in its
docstring). All are CPU-only, seeded and fast: no model is loaded, and rewards are small functions defined here."""

import re
import threading
import time

import numpy as np
import pytest
import torch

from rlcm_fast.config_checks import FLOAT32_MAX
from rlcm_fast.rewards import BUILTIN_REWARDS, AsyncReward, RewardError, checked_rewards, parse_reward_spec
from rlcm_fast.rewards import user_reward_names
from rlcm_fast.rewards.base import check_reward_inputs, import_user_reward, missing_model_folder, reward_cancelled


def images_of(count, seed=0):
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- model options: a hub id or a local folder ----------------------------------------------------------------

def test_a_hub_id_is_not_taken_for_a_missing_local_folder(tmp_path, monkeypatch):
    """Mutants: `value.count("/") > 1` -> `>= 1` in looks_like_path: every hub id (owner/name), the default models
    among them, read as a local path and refused as "no such folder" before the hub was asked; and "." dropped
    from the prefixes of a path: `./clip`, a folder the user named and mistyped, sent to the hub as an id."""
    monkeypatch.chdir(tmp_path)
    assert missing_model_folder("openai/clip-vit-large-patch14") is None
    assert missing_model_folder("owner/name/extra") == "no such folder"
    assert missing_model_folder("./openai/clip-vit-large-patch14") == "no such folder"
    assert missing_model_folder("./clip") == "no such folder"
    assert missing_model_folder("clip") is None


# -- checked_rewards: what a reward returned --------------------------------------------------------------------

def test_a_reward_that_returned_none_is_told_so_not_given_an_index():
    """Mutant: the `values is None` check dropped. A reward that forgot its `return` got "returned None at index 0"
    (numpy's 0-d object array), pointing at one batch entry instead of the missing return."""
    with pytest.raises(RewardError, match=r"^reward 'r' returned None, expected 2 floats$"):
        checked_rewards("r", None, 2)


def test_a_none_is_reported_at_its_first_index():
    """Mutant: the first None's index -> the last's. The error names the batch entry to look at; the first one is
    where a user's loop began to go wrong."""
    with pytest.raises(RewardError, match=r"^reward 'r' returned None at index 1, expected 4 floats$"):
        checked_rewards("r", [0.5, None, 0.25, None], 4)


def test_a_reward_of_exactly_float32s_largest_value_is_accepted():
    """Mutant: `np.abs(array) > FLOAT32_MAX` -> `>=`: a value the error's own "|x| <= 3.403e+38" allows refused."""
    values = checked_rewards("r", [FLOAT32_MAX, -FLOAT32_MAX], 2)
    np.testing.assert_array_equal(values, [FLOAT32_MAX, -FLOAT32_MAX])
    with pytest.raises(RewardError, match="beyond float32's range"):
        checked_rewards("r", [np.nextafter(FLOAT32_MAX, np.inf), 0.0], 2)


def test_integer_images_of_any_width_are_refused_not_only_uint8():
    """Mutant: only uint8 images refused as not floats. int64 pixels 0..255 (from `torch.tensor(array)` of a PIL
    image's numpy array) would be scored as if they were in [0, 1]."""
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RewardError, match=r"^images of dtype torch\.int64 given; rewards take floats in \[0, 1\]"):
        check_reward_inputs(images, ["a", "b"])


# -- user rewards ------------------------------------------------------------------------------------------------

def test_a_spec_without_a_function_name_is_called_invalid():
    """Mutant: only an empty module refused, not an empty function. `json:` would be reported as an import failure
    ("module 'json' has no attribute ''") instead of saying what the name should look like."""
    with pytest.raises(RewardError, match=r"^reward 'json:' is invalid: expected module\.path:function$"):
        import_user_reward("json:")


# -- weights and sums ------------------------------------------------------------------------------------------

def test_a_weight_of_exactly_float32s_largest_value_is_accepted():
    """Mutant: `abs(weight) <= FLOAT32_MAX` -> `<`: the weight the error's own "|x| <= 3.403e+38" allows refused."""
    limit = repr(float(FLOAT32_MAX))
    [term] = parse_reward_spec(f"aesthetic:{limit}", tuple(BUILTIN_REWARDS))
    assert term.weight == FLOAT32_MAX
    past = repr(float(np.nextafter(FLOAT32_MAX, np.inf)))
    with pytest.raises(RewardError, match=re.escape(f"reward 'aesthetic:{past}' has weight '{past}'; a weight must")):
        parse_reward_spec(f"aesthetic:{past}", tuple(BUILTIN_REWARDS))


def test_spaces_around_the_terms_of_a_sum_are_not_part_of_their_names():
    """Mutant: a term not stripped of its spaces. `aesthetic, my_pkg.scores:fn` (a space after the comma, as
    people write lists) was refused as the unknown reward ' my_pkg.scores:fn'."""
    terms = parse_reward_spec(" aesthetic , my_pkg.scores:fn ", ("aesthetic",))
    assert [(term.name, term.weight) for term in terms] == [("aesthetic", 1.0), ("my_pkg.scores:fn", 1.0)]


def test_a_user_reward_written_with_a_dot_for_the_colon_gets_the_colon_form_suggested():
    """Mutant: the suggestion split at the first dot rather than the last. `my_pkg.scores.fn` is the function fn of
    my_pkg.scores, so 'my_pkg.scores:fn' is the name to suggest; split at the first dot none was offered."""
    with pytest.raises(RewardError, match=r"^reward 'my_pkg\.scores\.fn' is unknown \(did you mean "
                                          r"'my_pkg\.scores:fn'\?\)"):
        parse_reward_spec("my_pkg.scores.fn", ("aesthetic",))


# -- AsyncReward and reward_cancelled --------------------------------------------------------------------------

def test_reward_cancelled_outside_a_worker_waits_as_long_as_asked():
    """Mutant: reward_cancelled returning at once outside an AsyncReward's worker. A reward's retry loop that
    waits with it (`if reward_cancelled(2.0): return`) would, called directly, retry a failing server with no pause."""
    start = time.monotonic()
    assert reward_cancelled(0.3) is False
    assert time.monotonic() - start >= 0.29


def test_a_batch_is_scored_with_the_prompts_it_was_submitted_with():
    """Mutant: AsyncReward.submit handing the worker the caller's own prompt list, not a copy. A sampling loop that
    refills its prompt list for the next round while the worker is still busy had the queued batch scored against
    the next round's prompts."""
    release = threading.Event()

    def lengths(images, prompts):
        release.wait(10)
        return [float(len(prompt)) for prompt in prompts]
    reward = AsyncReward("lengths", lengths)
    try:
        first = reward.submit(images_of(2), ["a", "bb"])
        prompts = ["ccc", "dddd"]
        second = reward.submit(images_of(2, seed=1), prompts)
        prompts[:] = ["e", "f"]  # the next round's prompts, written while both batches wait
        release.set()
        assert first.result(timeout=10).tolist() == [1.0, 2.0]
        assert second.result(timeout=10).tolist() == [3.0, 4.0]
    finally:
        release.set()
        reward.close()


# -- the package's helpers -------------------------------------------------------------------------------------

def test_user_reward_names_are_only_the_module_function_terms():
    """Mutant: builtin names listed among the user's code. The run's list of code it imports and runs would name
    'aesthetic' as a module of the user's."""
    assert user_reward_names("aesthetic:1.0,pkg.scores:fn:0.5,jpeg_compressibility") == ["pkg.scores:fn"]
    assert user_reward_names("aesthetic") == []
