"""Mutation-testing round 50h (kernels/jpeg_size.py, a second round after 46a; benchmarks/test_micro.py, a first
look): hand-written mutants of those modules were run against their tests (test_jpeg_triton, test_mutants_round46a;
for test_micro its own benchmarks, `pytest benchmarks/ --benchmark-only`); each test here kills one that survived
(named in its docstring). All are CPU-only, seeded and fast: the jpeg_size test stops at the device check, before
any kernel; test_micro's benchmarks are called with a stub `benchmark` fixture that runs the function once, and
where a test checks that a benchmark's result check can fail, the function it times is wrapped to return a wrong
result. One test shows a weak check found on the way and mended: the JPEG benchmark checked its rewards' sign, not
their values."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import test_micro  # noqa: E402

from rlcm_fast.rewards.jpeg import jpeg_size_kb, to_uint8_images  # noqa: E402


class StubBenchmark:
    """pytest-benchmark's fixture, standing in: runs the function once and returns its result."""

    def __init__(self):
        self.extra_info = {}

    def __call__(self, fn, *args):
        return fn(*args)


# -- benchmarks/test_micro: each benchmark's result check can fail -------------------------------------------

@pytest.mark.parametrize("step_pass", ["sampling", "training_forward_backward"])
def test_a_policy_step_benchmark_fails_on_a_log_probability_off_by_a_thousandth(monkeypatch, step_pass):
    """Mutants: test_policy_step without its assert_close, or with atol 1e2 for 1e-4. Either way a backend whose
    log-probabilities are wrong (here by 1e-3 each) would be timed and pass, and the module's promise that "a
    fast wrong kernel fails" would not hold. The same benchmark on the true step passes."""
    real = test_micro.policy_step
    test_micro.test_policy_step(StubBenchmark(), "reference", step_pass)  # the true step passes

    def off_by_a_thousandth(*args, **kwargs):
        out = real(*args, **kwargs)
        return (*out[:2], out[2] + 1e-3)

    monkeypatch.setattr(test_micro, "policy_step", off_by_a_thousandth)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        test_micro.test_policy_step(StubBenchmark(), "reference", step_pass)


def test_the_native_backend_is_benchmarked_where_it_is_selected(monkeypatch):
    """Mutant: backends() without the native backend. On a machine with the C++ extension the micro-benchmarks
    then timed only the plain-PyTorch reference, and the native step's speed went unmeasured without a word."""
    monkeypatch.setattr(test_micro, "select_backend", lambda tensor: "native")
    monkeypatch.setattr(test_micro.torch.cuda, "is_available", lambda: False)
    assert test_micro.backends() == ["reference", "native"]
    monkeypatch.setattr(test_micro, "select_backend", lambda tensor: "reference")
    assert test_micro.backends() == ["reference"]


def test_the_training_benchmark_times_a_backward_pass_that_reaches_the_model_output(monkeypatch):
    """Mutant: test_policy_step's training pass without `logp.sum().backward()`. Its log-probabilities are still
    right, so the result check passed, but the "training_forward_backward" row then timed the forward alone and
    reported a training step several times quicker than it is."""
    real, leaves = test_micro.policy_step, []

    def recording(model_output, *args, **kwargs):
        leaves.append(model_output)
        return real(model_output, *args, **kwargs)

    monkeypatch.setattr(test_micro, "policy_step", recording)
    test_micro.test_policy_step(StubBenchmark(), "reference", "training_forward_backward")
    grad = leaves[0].grad
    assert grad is not None and grad.shape == (test_micro.BATCH, *test_micro.LATENT) and grad.abs().sum() > 0


class StubJpegReward:
    """JpegSizeReward, standing in: records how it was made, returns `wrong` of Pillow's true rewards (-kB)."""

    made = []
    wrong = staticmethod(lambda rewards: rewards)

    def __init__(self, *args, **kwargs):
        self.made.append((args, kwargs))

    def __call__(self, images, prompts):
        return self.wrong(np.array([-jpeg_size_kb(image, 95) for image in to_uint8_images(images)]))


def test_the_jpeg_benchmark_fails_on_positive_rewards_and_times_compressibility_at_quality_95(monkeypatch):
    """Mutants: test_jpeg_reward_pillow without its result check, and its reward made at quality 50 for 95. A
    reward of the wrong sign (incompressibility for compressibility) would be timed and pass; and at quality 50
    the row labelled with the reward the training uses (95, Pillow) times another encoding."""
    StubJpegReward.made = []
    monkeypatch.setattr(test_micro, "JpegSizeReward", StubJpegReward)
    test_micro.test_jpeg_reward_pillow(StubBenchmark(), 512)
    assert StubJpegReward.made == [((-1.0, 95, 0, "pillow"), {})]
    monkeypatch.setattr(StubJpegReward, "wrong", staticmethod(lambda rewards: -rewards))
    with pytest.raises(AssertionError):
        test_micro.test_jpeg_reward_pillow(StubBenchmark(), 512)


def test_the_jpeg_benchmark_fails_on_a_reward_of_the_wrong_size(monkeypatch):
    """The module promises that each benchmark checks its result against the reference, "so a fast wrong kernel
    fails"; the JPEG benchmark checks only that there is one negative reward per image, so a reward of -1 kB for
    every image (a broken encoder or size count) was timed and passed. (Mended in round 50h: it now compares each
    reward with Pillow's file size for that image.)"""
    StubJpegReward.made = []
    monkeypatch.setattr(test_micro, "JpegSizeReward", StubJpegReward)
    monkeypatch.setattr(StubJpegReward, "wrong", staticmethod(lambda rewards: np.full_like(rewards, -1.0)))
    with pytest.raises(AssertionError):
        test_micro.test_jpeg_reward_pillow(StubBenchmark(), 512)


# -- kernels/jpeg_size: the devices it runs on ---------------------------------------------------------------

def test_images_on_a_device_other_than_cuda_or_the_cpu_are_refused_in_one_line(monkeypatch):
    """Mutant: triton_jpeg_sizes refusing only CPU tensors outside the interpreter (`== "cpu"` for `!= "cuda"`).
    Images on another device (an Apple GPU, an XPU; here the meta device) then went on into the kernels and
    failed there with a traceback, instead of the one-line error that says the kernels need CUDA tensors."""
    from rlcm_fast.kernels import jpeg_size

    monkeypatch.setattr(jpeg_size, "_interpreting", lambda: False)
    message = r"^the Triton JPEG sizes run on CUDA tensors \(or on the CPU under TRITON_INTERPRET=1\), got device meta$"
    with pytest.raises(ValueError, match=message):
        jpeg_size.triton_jpeg_sizes(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device="meta"), 95)
