"""benchmarks/bench_sampler.py times like for like: rlcm-fast's calls encode their prompt, as the pipeline's do."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sampler  # noqa: E402

from rlcm_fast.models import load_pipeline  # noqa: E402


def test_every_timed_call_encodes_its_prompt_in_both_variants(monkeypatch):
    """rlcm-fast's prompt cache skipped the text encoder at every timed call but the first, while diffusers'
    pipeline ran it each time: the text encoder's time was in the baseline only."""
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    encoded = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda *args, **kwargs: encoded.append(1) or encode(*args, **kwargs))
    for name in (bench_sampler.EAGER, bench_sampler.FAST):
        call = bench_sampler.variant_call(name, pipe, horizon=2, batch=2, resolution=32, device=torch.device("cpu"))
        encoded.clear()
        for _ in range(3):
            call()
        assert len(encoded) == 3, name
