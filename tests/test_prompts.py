from rlcm_fast.prompts import load_prompt_set


def test_shipped_prompt_sets_have_the_papers_sizes():
    assert len(load_prompt_set("imagenet_animals")) == 398
    assert load_prompt_set("imagenet_animals")[0] == "tench, Tinca tinca"
    assert len(load_prompt_set("simple_animals")) == 45


def test_alignment_prompts_use_the_right_article():
    prompts = load_prompt_set("alignment")
    assert len(prompts) == 45 * 3
    assert "a cat riding a bike" in prompts
    assert all(p.startswith(("a ", "an ")) for p in prompts)
    vowel = [p for p in prompts if p.split()[1][0] in "aeiou"]
    assert vowel and all(p.startswith("an ") for p in vowel)


def test_unknown_prompt_set_names_the_allowed_ones():
    import pytest

    with pytest.raises(ValueError, match="'birds' is unknown; allowed: imagenet_animals"):
        load_prompt_set("birds")
