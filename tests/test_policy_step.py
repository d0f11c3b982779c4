"""The policy step's dispatch and its C++ path through autograd, against the float64 reference."""

import math

import pytest
import torch
from diffusers import LCMScheduler

from rlcm_fast.policy_step import PREDICTION_TYPES, policy_step, policy_step_reference, row_scalars_for_schedule, select_backend


def mixed_rows(batch, seed=0):
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(8, original_inference_steps=50)
    t = scheduler.timesteps
    pick = torch.randint(0, len(t) - 1, (batch,), generator=torch.Generator().manual_seed(seed))
    return row_scalars_for_schedule(scheduler, t[pick], t[pick + 1])


def independent_logp(x_next, mean, std):
    """The action's log-density (README, "The algorithm"), per element in float64, without the package's code."""
    n = mean[0].numel()
    out = []
    for b in range(mean.shape[0]):
        s = float(std[b])
        terms = -((x_next[b].double() - mean[b].double()) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
        out.append(terms.sum().item() / n)
    return torch.tensor(out, dtype=torch.float64)


def test_cpu_float_tensors_dispatch_to_the_native_op():
    assert select_backend(torch.zeros(2, 3)) == "native"
    assert select_backend(torch.zeros(2, 3, dtype=torch.bfloat16)) == "reference"


def test_float64_accelerator_tensors_skip_the_float32_triton_kernel(monkeypatch):
    from rlcm_fast import policy_step as module

    monkeypatch.setattr(module, "_triton_ready", lambda tensor: True)  # as for CUDA tensors with Triton
    assert select_backend(torch.zeros(2, 3, device="meta", dtype=torch.bfloat16)) == "triton"
    assert select_backend(torch.zeros(2, 3, device="meta", dtype=torch.float64)) == "reference"


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_log_prob_equals_an_independent_float64_formula(prediction_type):
    g = torch.Generator().manual_seed(1)
    mo, x, z = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    scalars = mixed_rows(3)
    denoised, x_next, logp = policy_step(mo, x, scalars, prediction_type, noise=z)
    mean = scalars[:, 4].reshape(3, 1, 1, 1) * denoised.double()
    torch.testing.assert_close(logp.double(), independent_logp(x_next, mean, scalars[:, 5]), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_native_autograd_matches_reference_gradients(prediction_type):
    g = torch.Generator().manual_seed(2)
    mo, x, x_next = (torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    scalars = mixed_rows(3, seed=3)
    weights_d = torch.randn(3, 4, 7, 5, generator=g, dtype=torch.float64)
    weights_logp = torch.randn(3, generator=g, dtype=torch.float64)
    grads = {}
    for backend in ("native", "reference"):
        leaf = mo.clone().requires_grad_(True)
        denoised, _, logp = policy_step(leaf, x, scalars, prediction_type, next_state=x_next, backend=backend)
        ((denoised * weights_d).sum() + (logp * weights_logp).sum()).backward()
        grads[backend] = (denoised.detach(), logp.detach(), leaf.grad)
    for native, reference in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(native, reference, atol=1e-10, rtol=1e-10)


def test_sampling_log_prob_is_reproduced_exactly_in_training_mode():
    g = torch.Generator().manual_seed(4)
    mo, x, z = (torch.randn(2, 4, 9, 9, generator=g) for _ in range(3))
    scalars = mixed_rows(2, seed=5)
    _, x_next, logp_sample = policy_step(mo, x, scalars, "epsilon", noise=z)
    _, _, logp_train = policy_step(mo, x, scalars, "epsilon", next_state=x_next)
    assert torch.equal(logp_sample, logp_train)
    _, _, logp_ref = policy_step_reference(mo, x, scalars, "epsilon", next_state=x_next)
    torch.testing.assert_close(logp_sample, logp_ref, atol=2e-6, rtol=1e-6)


def test_bad_arguments_are_clear_errors():
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="exactly one of noise"):
        policy_step(x, x, mixed_rows(1), "epsilon")
    with pytest.raises(ValueError, match="prediction_type 'eps' is not supported; allowed: epsilon"):
        policy_step(x, x, mixed_rows(1), "eps", noise=x)
