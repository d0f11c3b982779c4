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


def test_a_prompt_set_name_a_typo_away_gets_a_suggestion(tmp_path, monkeypatch):
    import pytest

    monkeypatch.chdir(tmp_path)
    for typo, meant in (("simple_animal", "simple_animals"), ("imagenet-animals", "imagenet_animals")):
        with pytest.raises(ValueError, match=rf"^prompts '{typo}' is unknown \(did you mean '{meant}'\?\); allowed: "):
            load_prompt_set(typo)
    with pytest.raises(ValueError, match=r"^prompts 'birds' is unknown; allowed: "):  # nothing close: no guess
        load_prompt_set("birds")


def test_a_missing_prompts_file_is_named_as_a_file_and_a_folder_as_a_folder(tmp_path, monkeypatch):
    import pytest

    monkeypatch.chdir(tmp_path)
    allowed = "allowed: imagenet_animals, simple_animals, alignment, or a text file of one prompt per line"
    for name in ("missing_prompts.txt", "prompts/animals", "./animals"):
        with pytest.raises(ValueError) as error:
            load_prompt_set(name)
        assert str(error.value) == f"prompts file {name!r} does not exist; {allowed}"
    (tmp_path / "prompts").mkdir()
    with pytest.raises(ValueError) as error:
        load_prompt_set("prompts")
    assert str(error.value) == f"prompts 'prompts' is a folder; {allowed}"


def test_the_alignment_set_is_animal_major_with_each_animal_s_activities():
    prompts = load_prompt_set("alignment")
    assert len(prompts) == 45 * 3
    animal = load_prompt_set("simple_animals")[0]
    assert all(p.startswith((f"a {animal} ", f"an {animal} ")) for p in prompts[:3]) and len(set(prompts[:3])) == 3


def test_a_prompt_file_is_stripped_of_blank_lines_and_spaces_and_an_empty_one_is_refused(tmp_path):
    import pytest

    path = tmp_path / "mine.txt"
    path.write_text(" a red fox \n\n   \nan owl\r\n", encoding="utf-8")
    assert load_prompt_set(str(path)) == ("a red fox", "an owl")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompt_set(str(empty))


def test_a_byte_order_mark_is_not_part_of_the_first_prompt_and_a_huge_line_is_refused(tmp_path):
    import pytest

    from rlcm_fast.prompts import MAX_PROMPT_CHARS

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffa cat\na dog\n".encode("utf-8"))
    assert load_prompt_set(str(path)) == ("a cat", "a dog")
    huge = tmp_path / "huge.txt"
    huge.write_text(f"a cat\n\n{'x' * MAX_PROMPT_CHARS}\n{'y' * (MAX_PROMPT_CHARS + 1)}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"^prompts file '{huge}' line 4 has {MAX_PROMPT_CHARS + 1} characters; at most "
                                         f"{MAX_PROMPT_CHARS} \\(the text encoder reads the first 77 tokens\\)$"):
        load_prompt_set(str(huge))


def test_prompt_lines_are_the_editors_lines_and_an_invisible_line_is_blank(tmp_path):
    """str.splitlines split a prompt at a form feed, a vertical tab or U+2028 (and shifted the line numbers that
    errors give); a line of zero-width spaces was kept as a prompt of nothing."""
    import pytest

    from rlcm_fast.prompts import MAX_PROMPT_CHARS

    path = tmp_path / "odd.txt"
    path.write_text("a cat\x0cin a hat\n\u200b\u200d\n\ufeff \n\u200b \u200b\nan owl\u2028at night\ra fox\x0b\n",
                    encoding="utf-8")
    assert load_prompt_set(str(path)) == ("a cat\x0cin a hat", "an owl\u2028at night", "a fox")
    long = tmp_path / "long.txt"
    long.write_text(f"a\x0cb\u2028c\n{'y' * (MAX_PROMPT_CHARS + 1)}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"line 2 has {MAX_PROMPT_CHARS + 1} characters"):
        load_prompt_set(str(long))


def test_a_prompt_file_is_read_again_at_each_call(tmp_path):
    """Two runs in one process (a notebook): the second gets the file as it is then, not as the first read it."""
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")
    assert load_prompt_set(str(path)) == ("a cat",)
    path.write_text("a dog\n")
    assert load_prompt_set(str(path)) == ("a dog",)
