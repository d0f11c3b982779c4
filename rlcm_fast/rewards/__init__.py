"""Rewards: a function of (images, prompts) -> one float per image (README, "Rewards").

Images arrive as a float tensor N x 3 x H x W in [0, 1] on the training device. Built-in rewards are
named in `BUILTIN_REWARDS`; `module:function` names any importable callable with the same signature;
`name:weight,name:weight` sums them (grammar in base.py). Models load lazily: importing this package
imports neither transformers nor the native extension.
"""

from __future__ import annotations

from typing import Any, Callable

from .alignment import DEFAULT_SERVER, AlignmentClient
from .base import (AsyncReward, RewardError, RewardFn, WeightedSum, checked_rewards, import_user_reward,
                   parse_reward_spec)
from .clip_scores import (DEFAULT_AESTHETIC_MODEL, DEFAULT_CLIPSCORE_MODEL, DEFAULT_PICKSCORE_MODEL,
                          DEFAULT_PICKSCORE_PROCESSOR, AestheticReward, clip_score, pick_score)
from .jpeg import JPEG_BACKENDS, NVJPEG_COLOURS, JpegSizeReward, jpeg_size_kb, to_uint8, to_uint8_images

# The options built-in rewards read besides jpeg_quality and threads, with their defaults; the config
# fields of the same names set them (and repeat these defaults: config.py imports no torch; a test keeps
# the two equal).
DEFAULT_OPTIONS: dict[str, Any] = dict(
    jpeg_backend="auto",
    nvjpeg_colour="nvjpeg",
    aesthetic_model=DEFAULT_AESTHETIC_MODEL,
    clipscore_model=DEFAULT_CLIPSCORE_MODEL,
    pickscore_model=DEFAULT_PICKSCORE_MODEL,
    pickscore_processor=DEFAULT_PICKSCORE_PROCESSOR,
    reward_server=DEFAULT_SERVER,
    reward_timeout=120.0,
)

BUILTIN_REWARDS: dict[str, Callable[[dict], RewardFn]] = {
    "jpeg_compressibility": lambda o: JpegSizeReward(-1.0, o["jpeg_quality"], o["reward_threads"], o["jpeg_backend"],
                                                     o["nvjpeg_colour"]),
    "jpeg_incompressibility": lambda o: JpegSizeReward(+1.0, o["jpeg_quality"], o["reward_threads"], o["jpeg_backend"],
                                                       o["nvjpeg_colour"]),
    "aesthetic": lambda o: AestheticReward(o["aesthetic_model"]),
    "alignment": lambda o: AlignmentClient(o["reward_server"], o["reward_timeout"]),
    "clipscore": lambda o: clip_score(o["clipscore_model"]),
    "pickscore": lambda o: pick_score(o["pickscore_model"], o["pickscore_processor"]),
}


def user_reward_names(name: str) -> list[str]:
    """The `module:function` terms of a reward name: code that building the reward imports and runs."""
    return [term.name for term in parse_reward_spec(name, tuple(BUILTIN_REWARDS)) if term.name not in BUILTIN_REWARDS]


def check_reward_name(name: str) -> None:
    """Fail early, before any run state exists, on a reward name outside the grammar (nothing is loaded)."""
    parse_reward_spec(name, tuple(BUILTIN_REWARDS))


def reward_options(cfg) -> dict[str, Any]:
    """The reward options of a TrainConfig (or any object with those attributes)."""
    return {key: getattr(cfg, key, default) for key, default in DEFAULT_OPTIONS.items()}


def silent_reward_server(name: str, server: str) -> str | None:
    """A warning, or None: `name` scores with the reward server at `server`, which does not answer now. Said as a
    run starts: the first batch's scoring would otherwise find it out after sampling, and retry for a minute."""
    if "alignment" not in {term.name for term in parse_reward_spec(name, tuple(BUILTIN_REWARDS))}:
        return None
    client = AlignmentClient(server)
    problem = client.health_problem()
    return None if problem is None else f"reward server {client.url} {problem}"


def make_reward(name: str, jpeg_quality: int = 95, threads: int = 0, **options) -> RewardFn:
    """Build the reward `name` (a builtin, module:function, or a weighted sum of them).

    `options` are DEFAULT_OPTIONS keys (e.g. jpeg_backend="pillow", aesthetic_model="/models/clip").
    """
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise RewardError(f"unknown reward options {sorted(unknown)}; allowed: {', '.join(DEFAULT_OPTIONS)}")
    settings = {**DEFAULT_OPTIONS, **options, "jpeg_quality": jpeg_quality, "reward_threads": threads}
    terms = parse_reward_spec(name, tuple(BUILTIN_REWARDS))
    made: dict[str, RewardFn] = {}  # a name repeated in a sum is built once (not a second CLIP in memory)
    for term in terms:
        if term.name not in made:
            made[term.name] = (BUILTIN_REWARDS[term.name](settings) if term.name in BUILTIN_REWARDS
                               else import_user_reward(term.name))
    built = [(term, made[term.name]) for term in terms]
    if len(built) == 1 and built[0][0].weight == 1.0:
        return built[0][1]
    return WeightedSum(built)


__all__ = [
    "AestheticReward", "AlignmentClient", "AsyncReward", "BUILTIN_REWARDS", "DEFAULT_OPTIONS", "JPEG_BACKENDS",
    "NVJPEG_COLOURS",
    "JpegSizeReward", "RewardError", "WeightedSum", "check_reward_name", "checked_rewards", "clip_score",
    "jpeg_size_kb", "make_reward", "parse_reward_spec", "pick_score", "reward_options", "silent_reward_server",
    "to_uint8",
    "to_uint8_images",
]
