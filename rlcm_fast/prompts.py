"""The prompt sets of the paper's tasks (README, "Data"), shipped as package data."""

from __future__ import annotations

import difflib
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

PROMPT_SETS = ("imagenet_animals", "simple_animals", "alignment")
# Far past the 77 tokens a CLIP text encoder reads; a 20 MB line made each epoch's sampling 100x slower, and a
# stopped epoch's checkpoint holds its prompts.
MAX_PROMPT_CHARS = 10_000


def is_prompts_file(name: str) -> bool:
    """Whether a prompts setting (prompts, eval_prompts) names a file: not a set, nor eval_prompts' "" (the run's)."""
    return bool(name) and name not in PROMPT_SETS


def _read_lines(filename: str) -> tuple[str, ...]:
    text = resources.files("rlcm_fast").joinpath("data", filename).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _with_article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


@lru_cache(maxsize=None)
def _named_set(name: str) -> tuple[str, ...]:
    if name == "alignment":
        animals, activities = _read_lines("simple_animals.txt"), _read_lines("activities.txt")
        return tuple(f"{_with_article(a)} {act}" for a in animals for act in activities)
    return _read_lines(f"{name}.txt")


def load_prompt_set(name: str, key: str = "prompts") -> tuple[str, ...]:
    """All prompts of a named set, in file order.

    `alignment` is every "{a|an} {animal} {activity}" over simple_animals x activities, as in RLCM.
    Any other name is read as a UTF-8 text file of one prompt per line (blank lines skipped), each time: a file
    edited between two runs of one process gives the second run its new prompts. Errors name the config `key`.
    """
    if name in PROMPT_SETS:
        return _named_set(name)
    path = Path(name)
    allowed = f"allowed: {', '.join(PROMPT_SETS)}, or a text file of one prompt per line"
    if path.is_dir():
        raise ValueError(f"{key} {name!r} is a folder; {allowed}")
    if not path.is_file():
        # A name with a folder or a suffix was meant as a file: say that it is missing, not that the set is unknown.
        if path.suffix or "/" in name:
            raise ValueError(f"{key} file {name!r} does not exist; {allowed}")
        close = difflib.get_close_matches(name.replace("-", "_"), PROMPT_SETS, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key} {name!r} is unknown{hint}; {allowed}")
    try:  # utf-8-sig: a byte-order mark that an editor wrote is not part of the first prompt
        text = path.read_text(encoding="utf-8-sig")  # \r\n and \r read as \n
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{key} file {name!r} is unreadable: {exc}") from None
    # Lines as an editor numbers them: str.splitlines also splits at a form feed, a vertical tab or U+2028 inside
    # a prompt. A line of only spaces and invisible format characters (a zero-width space) is blank.
    lines = [line.strip() for line in text.split("\n")]
    prompts = tuple(line for line in lines if not all(c.isspace() or unicodedata.category(c) == "Cf" for c in line))
    if not prompts:
        raise ValueError(f"{key} file {name!r} holds no prompt; it needs one prompt per line")
    if (longest := max(prompts, key=len)) and len(longest) > MAX_PROMPT_CHARS:
        raise ValueError(f"{key} file {name!r} line {lines.index(longest) + 1} has {len(longest)} characters; at "
                         f"most {MAX_PROMPT_CHARS} (the text encoder reads the first 77 tokens)")
    return prompts
