"""Per-prompt reward normalisation (DDPO's stat tracker, README, "The algorithm")."""

from __future__ import annotations

from collections import deque

import numpy as np

from .faults import is_finite_number, shown


class PerPromptStatTracker:
    """Keeps each prompt's last `buffer_size` rewards and turns rewards into advantages.

    A prompt whose history holds fewer than `min_count` rewards (after adding this batch) is
    normalised with the whole batch's mean and std instead of its own; std always gets + 1e-6.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        prompt_array = np.asarray(prompts, dtype=object)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
            rows = prompt_array == prompt
            history = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(rewards[rows].tolist())
            if len(history) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = np.fromiter(history, dtype=np.float64)
                mean, std = values.mean(), values.std() + 1e-6
            advantages[rows] = (rewards[rows] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        # buffer_size and min_count are for a reader of training_state.json: a resumed run takes its config's.
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "history": {prompt: list(values) for prompt, values in self.history.items()},
        }

    @staticmethod
    def check_state(state) -> None:
        """A ValueError saying what is wrong if `state` is not what `state_dict` writes (as JSON): a mapping
        whose "history" maps each prompt to a list of finite rewards. Checked before load_state_dict is called."""
        if not isinstance(state, dict):
            raise ValueError(f"is {shown(state)}, expected an object")
        if "history" not in state:
            raise ValueError("has no 'history'")
        history = state["history"]
        if not isinstance(history, dict):
            raise ValueError(f"history is {shown(history)}, expected an object of prompt: rewards")
        for prompt, values in history.items():
            if not (isinstance(values, list) and all(is_finite_number(v) for v in values)):
                raise ValueError(f"history[{prompt!r}] is {shown(values)}, expected a list of finite numbers")

    def load_state_dict(self, state: dict) -> None:
        """The saved histories, under this tracker's buffer_size and min_count: a run resumed with other
        stat settings uses them (a smaller buffer keeps each prompt's latest rewards), as its config says."""
        self.history = {p: deque(v, maxlen=self.buffer_size) for p, v in state["history"].items()}
