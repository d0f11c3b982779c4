"""A pipeline's scheduler swapped for a test and put back however the test ends (the pipeline fixtures are shared)."""

import contextlib


@contextlib.contextmanager
def scheduler_swapped(pipe, scheduler_class, **config_changes):
    """pipe.scheduler is `scheduler_class` built from its config with `config_changes` until the block ends."""
    original = pipe.scheduler
    pipe.scheduler = scheduler_class.from_config(original.config, **config_changes)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original
