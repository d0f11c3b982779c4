"""pytest-benchmark micro-benchmarks: the policy step (C++ native and plain-PyTorch reference on the CPU,
the Triton kernel where CUDA is) and the JPEG reward.

    pytest benchmarks/ --benchmark-only

Not part of the normal test run: pyproject's `testpaths = ["tests"]` keeps `pytest -q` away from this
folder. Each benchmark also checks its result against the reference, so a fast wrong kernel fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the source checkout on sys.path)

from rlcm_fast.policy_step import policy_step, policy_step_reference, select_backend  # noqa: E402
from rlcm_fast.rewards import JpegSizeReward  # noqa: E402
from rlcm_fast.rewards.jpeg import jpeg_size_kb, to_uint8_images  # noqa: E402

LATENT = (4, 96, 96)  # 768 px
BATCH = 8


def step_inputs(device: str):
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH, *LATENT)
    model_output, x, noise = (torch.randn(shape, generator=generator).to(device) for _ in range(3))
    alpha_t, alpha_next, c_skip, c_out = 0.1 + 0.8 * torch.rand(4, BATCH, generator=generator, dtype=torch.float64)
    scalars = torch.stack([alpha_t, (1 - alpha_t**2).sqrt(), c_skip, c_out, alpha_next, (1 - alpha_next**2).sqrt()],
                          dim=1).to(device)
    next_state = policy_step_reference(model_output, x, scalars, "epsilon", noise=noise)[1]
    return model_output, x, noise, next_state, scalars


def backends():
    out = ["reference"]
    if select_backend(torch.zeros(1)) == "native":
        out.append("native")
    if torch.cuda.is_available() and select_backend(torch.zeros(1, device="cuda")) == "triton":
        out.append("triton")
    return out


def synchronized(fn, device: str):
    if device != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("step_pass", ["sampling", "training_forward_backward"])
def test_policy_step(benchmark, backend, step_pass):
    device = "cuda" if backend == "triton" else "cpu"
    model_output, x, noise, next_state, scalars = step_inputs(device)
    expected = policy_step_reference(model_output, x, scalars, "epsilon", next_state=next_state)[2]
    if step_pass == "sampling":
        fn = lambda: policy_step(model_output, x, scalars, "epsilon", noise=noise, backend=backend)  # noqa: E731
        logp = benchmark(synchronized(fn, device))[2]
    else:
        leaf = model_output.clone().requires_grad_()

        def fn():
            logp = policy_step(leaf, x, scalars, "epsilon", next_state=next_state, backend=backend)[2]
            logp.sum().backward()
            return logp

        logp = benchmark(synchronized(fn, device))
    torch.testing.assert_close(logp.float(), expected.float(), atol=1e-4, rtol=0)
    benchmark.extra_info.update(batch=BATCH, latent=list(LATENT), device=device)


@pytest.mark.parametrize("size", [512, 768])
def test_jpeg_reward_pillow(benchmark, size):
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(BATCH, 3, size // 16, size // 16, generator=generator),
                                             size=(size, size), mode="bilinear", align_corners=False)
    reward = JpegSizeReward(-1.0, 95, 0, "pillow")
    expected = [-jpeg_size_kb(image, 95) for image in to_uint8_images(smooth)]  # Pillow's files, one by one
    sizes = benchmark(reward, smooth, [""] * BATCH)
    assert sizes.shape == (BATCH,) and sizes.tolist() == expected
    benchmark.extra_info.update(batch=BATCH, resolution=size, backend="pillow")
