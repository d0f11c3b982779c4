"""Mutation-testing round 47a (the Triton kernel bodies of kernels/policy_step.py and the tensor plumbing of its
_forward/_backward/_rows/_launch_config): hand-written mutants of the kernels' math (the three prediction types'
pred_x0 and partial derivatives, the log-prob's constant, 1/(2 s^2) and mean over n, masks at a row's last chunk,
per-row scalar loads, the per-chunk partial sums and the gradients through D, x_next and logp) were run against
their tests (test_triton_step, test_policy_step, test_policy_step_contract, test_mutants_round44e); each test here
kills one that survived (named in its docstring). All are CPU-only, seeded and fast: the kernels run in Triton's
interpreter (tests/conftest.py) on small tensors."""

import os

import pytest
import torch

from test_mutants_round44e import randn, random_rows

from rlcm_fast.policy_step import PREDICTION_TYPES, policy_step_reference

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors need Triton's interpreter")


@pytest.fixture(scope="module")
def kernels():
    return pytest.importorskip("rlcm_fast.kernels.policy_step")


def assert_close_to(grad, expected, rtol=1e-5):
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


# -- the forward: values ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_d_and_the_sampled_state_are_the_float32_reference_s_bit_for_bit(kernels, prediction_type):
    """Mutant: epsilon's pred_x0 as `x / alpha_t - sigma_t * model_output / alpha_t` (the same math, other
    roundings): D and the action moved by an ulp from the float32 reference, which the kernels' docstring says they
    follow operation by operation; the 1e-5 tolerances against float64 could not see it. Bit-equal actions are
    what let policy_step's backends (Triton on a GPU, the C++ op or the reference on a CPU) replay one another's
    trajectories exactly."""
    model_output, x, noise = randn(3, (2, 4, 7, 5), seed=4701)
    scalars = random_rows(2, 4702)
    denoised, sampled, _ = kernels.fused_policy_step(model_output, x, scalars, prediction_type, noise=noise)
    ref_denoised, ref_sampled, _ = policy_step_reference(model_output, x, scalars, prediction_type, noise=noise)
    assert torch.equal(denoised, ref_denoised) and torch.equal(sampled, ref_sampled)


@pytest.mark.parametrize("mode", ["sampling", "training"])
def test_each_of_two_rows_of_three_chunks_sums_only_its_own_partials(kernels, mode):
    """Mutants: the reducing kernel's mask `chunks < num_chunks` -> `<=`, and its row offset `row * num_chunks` ->
    `row * BLOCK_CHUNKS`: both are harmless while a row's chunk count is a power of two (every test had 1 or 2
    chunks per row, or one row), but with 3 chunks per row (9000 elements in 4096-element chunks) row 0 also
    summed row 1's first partial, or row 1 read from the wrong place: the log-probs of a batch of large latents
    were wrong."""
    model_output, x, given = randn(3, (2, 9000), seed=4703)
    scalars = random_rows(2, 4704)
    assert -(-9000 // kernels._launch_config(2, 9000, x.device)[0]) == 3
    step = {"noise" if mode == "sampling" else "next_state": given}
    _, sampled, logp = kernels.fused_policy_step(model_output, x, scalars, "epsilon", **step)
    ref_logp = policy_step_reference(model_output, x, scalars, "epsilon", next_state=sampled,
                                     compute_dtype=torch.float64)[2]
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)


# -- the backward ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_training_gradient_through_d_alone_is_the_reference_s(kernels, prediction_type):
    """Mutant: `logp_term = grad_logp is not None and not ctx.sampling` -> `not ctx.sampling`: in training mode
    with an objective on D alone (logp unused, so its incoming gradient is None) the backward called
    `None.contiguous()`, an AttributeError, where the reference gives D's gradient. Every test so far used logp in
    its training objective."""
    model_output, x, next_state, weight = randn(4, (2, 3, 5, 7), seed=4705)
    scalars = random_rows(2, 4706)
    leaves = [model_output.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    denoised, _, _ = kernels.fused_policy_step(*leaves, scalars, prediction_type, next_state=next_state)
    (denoised * weight).sum().backward()
    ref_leaves = [model_output.double().requires_grad_(True), x.double().requires_grad_(True)]
    ref_denoised = policy_step_reference(*ref_leaves, scalars, prediction_type, next_state=next_state.double(),
                                         compute_dtype=torch.float64)[0]
    expected = torch.autograd.grad((ref_denoised * weight.double()).sum(), ref_leaves)
    for leaf, grad in zip(leaves, expected):
        assert_close_to(leaf.grad, grad)


def test_a_float32_model_output_with_bfloat16_latents_keeps_each_input_s_precision(kernels):
    """Mutants: the stored state's dtype taken from model_output's pointer rather than D's (x's), model_output's
    gradient allocated in x's dtype, and model_output's gradient rounded to grad_x's element type before its
    store: with a float32 UNet output and bfloat16 latents (mixed inputs the entry point accepts) the sampled
    log-prob was of the unrounded state, not of the bfloat16 action stored and replayed in training, and
    model_output's float32 gradient came back rounded to bfloat16. Every test gave all inputs one dtype."""
    model_output, x, noise = randn(3, (2, 3, 5, 7), seed=4707)
    x, noise = x.bfloat16(), noise.bfloat16()
    scalars = random_rows(2, 4708)
    _, sampled, logp = kernels.fused_policy_step(model_output, x, scalars, "epsilon", noise=noise)
    assert sampled.dtype == torch.bfloat16
    ref_logp = policy_step_reference(model_output, x, scalars, "epsilon", next_state=sampled,
                                     compute_dtype=torch.float64)[2]
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    leaves = [model_output.clone().requires_grad_(True), x.clone().requires_grad_(True)]
    _, _, logp = kernels.fused_policy_step(*leaves, scalars, "epsilon", next_state=sampled)
    weights = torch.tensor([0.5, -2.0], dtype=torch.float64)
    (logp * weights.float()).sum().backward()
    assert leaves[0].grad.dtype == torch.float32 and leaves[1].grad.dtype == torch.bfloat16
    ref_leaves = [model_output.double().requires_grad_(True), x.double().requires_grad_(True)]
    ref_logp = policy_step_reference(*ref_leaves, scalars, "epsilon", next_state=sampled,
                                     compute_dtype=torch.float64)[2]
    expected = torch.autograd.grad((ref_logp * weights).sum(), ref_leaves)
    assert_close_to(leaves[0].grad, expected[0])
    assert_close_to(leaves[1].grad, expected[1], rtol=1e-2)  # x's gradient comes back in bfloat16


def test_the_backward_launches_with_the_forward_s_rows(kernels, monkeypatch):
    """Mutant: the backward's launch configuration computed for one row instead of the batch: its result stays
    right, but on a GPU the gradient of a batch of 8 latents (4x96x96) ran in chunks half the size the documented
    rule gives (more, smaller programs than needed to fill the device), which no interpreter value shows."""
    calls = []
    real = kernels._launch_config

    def recorded(rows, n, device):
        calls.append((rows, n))
        return real(rows, n, device)

    monkeypatch.setattr(kernels, "_launch_config", recorded)
    model_output, x, next_state = randn(3, (3, 4, 5, 7), seed=4709)
    leaf = model_output.clone().requires_grad_(True)
    _, _, logp = kernels.fused_policy_step(leaf, x, random_rows(3, 4710), "epsilon", next_state=next_state)
    logp.sum().backward()
    assert calls == [(3, 140), (3, 140)]
