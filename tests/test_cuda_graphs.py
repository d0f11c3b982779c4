"""Sampling through CUDA graphs (rlcm_fast.cuda_graphs): on the CPU, how the sampler uses a captured
call (its inputs, its outputs' ownership, the fallback when capture fails); on a GPU, the real graphs."""

import pytest
import torch

from rlcm_fast import sampler as sampler_module
from rlcm_fast.config import resolve_config
from rlcm_fast.cuda_graphs import CaptureError, CapturedCall
from rlcm_fast.models import load_pipeline
from rlcm_fast.sampler import LCMSampler
from rlcm_fast.trainer import Trainer

PROMPTS = ["a cat", "a dog", "a cat", "great white shark, white shark, man-eater"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


class ReusedBuffers:
    """Stands in for CapturedCall on the CPU: runs fn, then hands out the same output tensors every call
    (overwritten in place), as a replayed graph does."""

    calls: list = []

    def __init__(self, fn, device):
        self.fn, self.outputs = fn, None

    def __call__(self, *inputs):
        ReusedBuffers.calls.append(inputs)
        outputs = self.fn(*inputs)
        if self.outputs is None:
            self.outputs = outputs
        else:
            for buffer, value in zip(self.outputs, outputs):
                buffer.copy_(value)
        return self.outputs


def test_captured_call_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        CapturedCall(lambda x: x, torch.device("cpu"))


def test_sampler_through_a_replayed_call_equals_the_plain_loop_and_owns_its_outputs(pipe, monkeypatch):
    monkeypatch.setattr(sampler_module, "CapturedCall", ReusedBuffers)
    ReusedBuffers.calls = []
    plain = LCMSampler(pipe, horizon=4, resolution=32)
    replayed = LCMSampler(pipe, horizon=4, resolution=32)
    replayed.cuda_graph = True  # as on a CUDA device
    first = replayed.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(1))
    second = replayed.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(2))
    for seed, got in ((1, first), (2, second)):  # the first call's outputs were not overwritten by the second
        want = plain.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got.states, want.states, atol=0, rtol=0)
        torch.testing.assert_close(got.log_probs, want.log_probs, atol=0, rtol=0)
        torch.testing.assert_close(got.images, want.images, atol=0, rtol=0)
    # One captured function per UNet; its inputs: x_0, the stacked noises of the 3 actions, embeddings, w.
    assert len(replayed._captured_rollouts) == 1 and len(ReusedBuffers.calls) == 2
    x, noises, embeds, w = ReusedBuffers.calls[0]
    assert x.shape == (4, 4, 16, 16) and noises.shape == (3, 4, 4, 16, 16) and embeds.shape[0] == 4
    assert w.shape[0] == 4


def test_sampler_falls_back_to_the_plain_loop_when_capture_fails(pipe, monkeypatch):
    class FailingCapture:
        def __init__(self, fn, device):
            pass

        def __call__(self, *inputs):
            raise CaptureError("CUDA-graph capture failed (RuntimeError: operation not permitted when stream is capturing)")

    monkeypatch.setattr(sampler_module, "CapturedCall", FailingCapture)
    sampler = LCMSampler(pipe, horizon=2, resolution=32)
    sampler.cuda_graph = True
    with pytest.warns(UserWarning, match="operation not permitted when stream is capturing.*; sampling goes on "
                                         "without CUDA graphs"):
        got = sampler.sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(4))
    assert not sampler.cuda_graph
    want = LCMSampler(pipe, horizon=2, resolution=32).sample(pipe.unet, PROMPTS, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got.images, want.images, atol=0, rtol=0)


def test_sample_cuda_graph_is_ignored_on_a_cpu(tmp_path):
    cfg = resolve_config(overrides={"device": "cpu", "sample_cuda_graph": True, "grid_every": 0})
    assert not Trainer(cfg, tmp_path / "run").sampler.cuda_graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_trainer_sampling_through_cuda_graphs_equals_the_plain_loop(tmp_path):
    """Two sampling rounds (the second replays the graph) and one update; then sampling again must follow
    the updated LoRA weights."""
    def run(name, graph):
        cfg = resolve_config(overrides={"device": "cuda", "sample_cuda_graph": graph, "grid_every": 0, "seed": 5,
                                        "batches_per_epoch": 2, "sample_batch_size": 4, "train_batch_size": 4})
        trainer = Trainer(cfg, tmp_path / name)
        first = trainer.sample_epoch(0)
        trainer.compute_advantages(first)
        trainer.train_epoch(0, first)
        return trainer, first, trainer.sample_epoch(1)

    plain, plain_first, plain_second = run("plain", False)
    graphed, graphed_first, graphed_second = run("graphed", True)
    assert graphed.sampler.cuda_graph and len(graphed.sampler._captured_rollouts) == 1
    for got, want in ((graphed_first, plain_first), (graphed_second, plain_second)):
        torch.testing.assert_close(got.states, want.states, atol=1e-3, rtol=0)
        torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-3, rtol=0)
    assert not torch.equal(graphed_first.states[:4], graphed_first.states[4:])  # two rounds, two trajectories
