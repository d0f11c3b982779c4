"""The C++ CPU policy step (rlcm_fast._C through rlcm_fast._native).

Checked against `policy_step_reference` (same element dtype: denoised and next state must be
bit-identical, the log-prob agrees to accumulation order), against an independent float64 formula
(torch.distributions.Normal per row), and its backward against torch.autograd on the float64
reference. Tolerances: float64 1e-12 relative for values, 1e-10 for gradients; float32 log-probs 1e-5,
float32 values/gradients against float64 1e-5 relative (float32 rounding of the inputs' math).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from rlcm_fast import _native
from rlcm_fast._native import native_available, policy_step_backward_cpu, policy_step_forward_cpu
from rlcm_fast.policy_step import PREDICTION_TYPES, policy_step_reference, row_scalars_for_schedule

pytestmark = pytest.mark.skipif(
    not native_available(), reason="rlcm_fast._C is not built (see the dev build command in CMakeLists.txt)"
)

DTYPES = (torch.float32, torch.float64)
SHAPES = ((3, 4, 7, 5), (1, 4, 7, 5), (2, 3, 64, 50))  # the last spans several 8192-element chunks per row


@pytest.fixture(scope="module")
def scheduler():
    scheduler = LCMScheduler()
    scheduler.set_timesteps(8, original_inference_steps=50)
    return scheduler


def mixed_row_scalars(scheduler, rows: int, seed: int) -> torch.Tensor:
    """Each row an action t_k -> t_{k+1} at a random step k of the H=8 schedule."""
    timesteps = scheduler.timesteps
    steps = torch.randint(0, len(timesteps) - 1, (rows,), generator=torch.Generator().manual_seed(seed))
    return row_scalars_for_schedule(scheduler, timesteps[steps], timesteps[steps + 1])


def random_tensors(shape, dtype, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(count)]


def float64_policy_step(model_output, x, scalars, prediction_type, next_state):
    """One LCM step (README, "The algorithm"), row by row in float64 from the raw inputs: (denoised, per-row mean log-prob)."""
    denoised_rows, logp_rows = [], []
    for row in range(x.shape[0]):
        alpha_t, sigma_t, c_skip, c_out, alpha_next, sigma_next = scalars[row].tolist()
        output, state = model_output[row].double(), x[row].double()
        if prediction_type == "epsilon":
            pred_original = (state - sigma_t * output) / alpha_t
        elif prediction_type == "v_prediction":
            pred_original = alpha_t * state - sigma_t * output
        else:
            pred_original = output
        denoised = c_out * pred_original + c_skip * state
        policy = torch.distributions.Normal(alpha_next * denoised, sigma_next)
        denoised_rows.append(denoised)
        logp_rows.append(policy.log_prob(next_state[row].double()).mean())
    return torch.stack(denoised_rows), torch.stack(logp_rows)


def assert_bitwise_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"max difference {(actual - expected).abs().max().item()}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_matches_reference_and_float64_formula(scheduler, dtype, prediction_type, shape):
    model_output, x, noise = random_tensors(shape, dtype, 3, seed=10)
    scalars = mixed_row_scalars(scheduler, shape[0], seed=11)

    denoised, next_state, logp = policy_step_forward_cpu(model_output, x, scalars, prediction_type, noise=noise)

    ref_denoised, ref_next_state, ref_logp = policy_step_reference(
        model_output, x, scalars, prediction_type, noise=noise, compute_dtype=dtype
    )
    assert_bitwise_equal(denoised, ref_denoised)
    assert_bitwise_equal(next_state, ref_next_state)
    assert logp.dtype == ref_logp.dtype == dtype
    logp_tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(logp, ref_logp, rtol=logp_tolerance, atol=logp_tolerance)

    exact_denoised, exact_logp = float64_policy_step(model_output, x, scalars, prediction_type, next_state)
    value_tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(denoised.double(), exact_denoised, rtol=value_tolerance, atol=value_tolerance)
    torch.testing.assert_close(logp.double(), exact_logp, rtol=value_tolerance, atol=value_tolerance)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_matches_reference_and_float64_formula(scheduler, dtype, prediction_type, shape):
    model_output, x, stored_next_state = random_tensors(shape, dtype, 3, seed=20)
    scalars = mixed_row_scalars(scheduler, shape[0], seed=21)

    denoised, next_state, logp = policy_step_forward_cpu(
        model_output, x, scalars, prediction_type, next_state=stored_next_state
    )

    assert next_state is stored_next_state
    ref_denoised, _, ref_logp = policy_step_reference(
        model_output, x, scalars, prediction_type, next_state=stored_next_state, compute_dtype=dtype
    )
    assert_bitwise_equal(denoised, ref_denoised)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(logp, ref_logp, rtol=tolerance, atol=tolerance)
    exact_denoised, exact_logp = float64_policy_step(model_output, x, scalars, prediction_type, stored_next_state)
    torch.testing.assert_close(denoised.double(), exact_denoised, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(logp.double(), exact_logp, rtol=tolerance, atol=tolerance)


def test_training_on_a_sampled_state_reproduces_the_sampling_log_prob(scheduler):
    model_output, x, noise = random_tensors((3, 4, 7, 5), torch.float32, 3, seed=30)
    scalars = mixed_row_scalars(scheduler, 3, seed=31)
    _, next_state, sampling_logp = policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise)
    _, _, training_logp = policy_step_forward_cpu(model_output, x, scalars, "epsilon", next_state=next_state)
    assert_bitwise_equal(training_logp, sampling_logp)


@pytest.mark.parametrize("with_grad_denoised", (False, True))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_autograd_on_the_float64_reference(scheduler, dtype, prediction_type, with_grad_denoised):
    shape = (3, 4, 7, 5)
    model_output, x, noise, grad_denoised = random_tensors(shape, dtype, 4, seed=40)
    scalars = mixed_row_scalars(scheduler, shape[0], seed=41)
    # A stored action drawn from the policy itself, so residuals have the scale training sees.
    _, next_state, _ = policy_step_reference(
        model_output, x, scalars, prediction_type, noise=noise, compute_dtype=dtype
    )
    grad_logp = torch.randn(shape[0], generator=torch.Generator().manual_seed(42), dtype=torch.float64)

    grads = policy_step_backward_cpu(
        model_output, x, next_state, scalars, prediction_type, grad_logp.to(dtype),
        grad_denoised=grad_denoised if with_grad_denoised else None, need_x=True,
    )

    leaves = [model_output.double().requires_grad_(True), x.double().requires_grad_(True)]
    denoised, _, logp = policy_step_reference(
        *leaves, scalars, prediction_type, next_state=next_state.double(), compute_dtype=torch.float64
    )
    objective = (logp * grad_logp.to(dtype).double()).sum()
    if with_grad_denoised:
        objective = objective + (denoised * grad_denoised.double()).sum()
    for grad, expected in zip(grads, torch.autograd.grad(objective, leaves)):
        assert grad.dtype == dtype and grad.shape == x.shape
        scale = expected.abs().max().item()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(grad.double(), expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_backward_is_the_pathwise_gradient(scheduler, dtype, prediction_type):
    """Sampling mode: x_next = alpha_next D + sigma_next z carries D's gradient; logp's is zero."""
    shape = (3, 4, 6, 5)
    model_output, x, noise, grad_denoised, grad_next = random_tensors(shape, dtype, 5, seed=43)
    scalars = mixed_row_scalars(scheduler, shape[0], seed=44)
    grads = policy_step_backward_cpu(model_output, x, None, scalars, prediction_type, None,
                                     grad_denoised=grad_denoised, grad_next=grad_next, need_x=True)
    leaves = [model_output.double().requires_grad_(True), x.double().requires_grad_(True)]
    denoised, sampled, logp = policy_step_reference(*leaves, scalars, prediction_type, noise=noise.double(),
                                                    compute_dtype=torch.float64)
    objective = (denoised * grad_denoised.double()).sum() + (sampled * grad_next.double()).sum() + 7.0 * logp.sum()
    for grad, expected in zip(grads, torch.autograd.grad(objective, leaves)):
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(grad.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    only_x = policy_step_backward_cpu(model_output, x, None, scalars, prediction_type, None, grad_next=grad_next,
                                      need_model_output=False, need_x=True)
    assert only_x[0] is None and only_x[1].shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(scheduler, dtype):
    shape = (4, 4, 96, 96)  # large enough that two threads are really used
    model_output, x, noise, grad_denoised = random_tensors(shape, dtype, 4, seed=50)
    scalars = mixed_row_scalars(scheduler, shape[0], seed=51)
    grad_logp = torch.randn(shape[0], generator=torch.Generator().manual_seed(52), dtype=torch.float64)
    results = {}
    for threads in (1, 2, 3, 0):  # 0: torch's thread count (1 under pytest-xdist, so 2 and 3 are explicit)
        forward = policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise, num_threads=threads)
        backward = policy_step_backward_cpu(
            model_output, x, forward[1], scalars, "epsilon", grad_logp, grad_denoised, need_x=True, num_threads=threads
        )
        results[threads] = (*forward, *backward)
    for threads in (2, 3, 0):
        for single, multi in zip(results[1], results[threads]):
            assert_bitwise_equal(multi, single)


def test_non_contiguous_inputs_give_the_contiguous_result(scheduler):
    model_output, x, noise = random_tensors((3, 5, 7, 4), torch.float64, 3, seed=60)
    scalars = mixed_row_scalars(scheduler, 3, seed=61)
    transposed = [tensor.transpose(1, 3) for tensor in (model_output, x, noise)]
    strided = policy_step_forward_cpu(*transposed[:2], scalars, "v_prediction", noise=transposed[2])
    packed = policy_step_forward_cpu(
        *(tensor.contiguous() for tensor in transposed[:2]), scalars, "v_prediction", noise=transposed[2].contiguous()
    )
    for a, b in zip(strided, packed):
        assert_bitwise_equal(a, b)


def test_empty_batch_gives_empty_results():
    empty = torch.zeros(0, 4, 3)
    denoised, next_state, logp = policy_step_forward_cpu(
        empty, empty, torch.zeros(0, 6, dtype=torch.float64), "sample", noise=empty
    )
    assert denoised.shape == next_state.shape == (0, 4, 3) and logp.shape == (0,)


def valid_inputs(dtype=torch.float32):
    model_output, x, noise = random_tensors((2, 3, 4), dtype, 3, seed=70)
    scalars = torch.tensor([[0.5, 0.8, 0.1, 0.9, 0.7, 0.6]] * 2, dtype=torch.float64)
    return model_output, x, noise, scalars


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": a["x"].half(), "model_output": a["model_output"].half(), "noise": a["noise"].half()},
         "float32 or float64, got torch.float16"),
        (lambda a: {**a, "model_output": a["model_output"].double()}, "model_output has dtype torch.float64"),
        (lambda a: {**a, "noise": a["noise"][:, :2]}, r"noise has shape \(2, 2, 4\)"),
        (lambda a: {**a, "model_output": a["model_output"].reshape(2, 12)}, r"model_output has shape \(2, 12\)"),
        (lambda a: {**a, "scalars": a["scalars"].float()}, "scalars must be float64"),
        (lambda a: {**a, "scalars": a["scalars"][:1]}, r"scalars must have shape \(2, 6\), got \(1, 6\)"),
        (lambda a: {**a, "prediction_type": "flow"}, "'flow' is not supported"),
        (lambda a: {**a, "next_state": a["noise"]}, "exactly one of noise"),
        (lambda a: {**a, "noise": None}, "exactly one of noise"),
        (lambda a: {**a, "num_threads": -1}, "num_threads must be an int >= 0"),
        (lambda a: {**a, "x": a["x"][0, 0], "model_output": a["model_output"][0, 0], "noise": a["noise"][0, 0]},
         r"shape \(B, ...\)"),
        (lambda a: {**a, "x": a["x"].to("meta")}, "CPU tensor, got device meta"),
    ],
)
def test_forward_rejects_bad_input_with_a_clear_message(change, message):
    model_output, x, noise, scalars = valid_inputs()
    arguments = change(
        {"model_output": model_output, "x": x, "scalars": scalars, "prediction_type": "epsilon", "noise": noise}
    )
    with pytest.raises(ValueError, match=message):
        policy_step_forward_cpu(**arguments)


def test_backward_rejects_bad_input_with_a_clear_message():
    model_output, x, next_state, scalars = valid_inputs()
    with pytest.raises(ValueError, match=r"grad_logp must be a floating tensor of shape \(2,\)"):
        policy_step_backward_cpu(model_output, x, next_state, scalars, "epsilon", torch.ones(3))
    with pytest.raises(ValueError, match="grad_denoised has dtype torch.float64"):
        policy_step_backward_cpu(
            model_output, x, next_state, scalars, "epsilon", torch.ones(2), grad_denoised=next_state.double()
        )
    with pytest.raises(ValueError, match="next_state has shape"):
        policy_step_backward_cpu(model_output, x, next_state[:1], scalars, "epsilon", torch.ones(2))
    with pytest.raises(ValueError, match=r"next_state is needed with grad_logp \(training mode\)"):
        policy_step_backward_cpu(model_output, x, None, scalars, "epsilon", torch.ones(2))
    with pytest.raises(ValueError, match="ask for at least one gradient"):
        policy_step_backward_cpu(model_output, x, next_state, scalars, "epsilon", torch.ones(2),
                                 need_model_output=False)


def test_missing_extension_raises_a_clear_runtime_error(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    assert not _native.native_available()
    model_output, x, noise, scalars = valid_inputs()
    with pytest.raises(RuntimeError, match="rlcm_fast._C is not available"):
        policy_step_forward_cpu(model_output, x, scalars, "epsilon", noise=noise)
    with pytest.raises(RuntimeError, match="rlcm_fast._C is not available"):
        policy_step_backward_cpu(model_output, x, noise, scalars, "epsilon", torch.ones(2))
