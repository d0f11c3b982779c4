"""A run stopped from inside, as a user's SIGTERM stops it: the signal arrives while an update finishes."""

import os
import signal


def sigterm_during_update(monkeypatch, global_step: int):
    """Patch Trainer.finish_update so that this process gets SIGTERM in the update that follows `global_step`
    optimizer steps (its backward passes have run); return the original, for a test that puts it back."""
    from rlcm_fast.trainer import Trainer

    original = Trainer.finish_update

    def finish_update(self, *args):
        if self.global_step == global_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "finish_update", finish_update)
    return original
