"""The Triton policy step against the float64 reference: values, gradients, sampling/training agreement.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with CUDA the same tests run the compiled kernels.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from rlcm_fast.kernels import policy_step as triton_step

from rlcm_fast.policy_step import PREDICTION_TYPES, policy_step_reference, row_scalars_for_schedule

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = pytest.mark.gpu  # on a GPU where there is one

# Shapes with odd sizes: 140 elements (one partial chunk) and 4620 (two chunks of 4096 in the
# interpreter, more on a GPU), B = 1 and B = 3.
SHAPES = [(1, 4, 7, 5), (3, 4, 33, 35)]
# fp32: the kernel computes in fp32 (rounding ~1e-7 relative), the reference in float64. bf16: D and x_next may differ
# from the float64 reference by one bf16 rounding (the interpreter truncates fp32 -> bf16 where GPUs
# round to nearest even), and gradients come back rounded to bf16.
VALUE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LOGP_TOL = dict(rtol=1e-5, atol=1e-5)  # logp is fp32 math on the same stored x_next in every dtype


@pytest.fixture(scope="module")
def scheduler():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.LCMScheduler()
    scheduler.set_timesteps(8, original_inference_steps=50)
    return scheduler


def mixed_row_scalars(scheduler, batch, generator):
    """Each row a different action t_k -> t_{k+1} of the 8-step schedule, like a training minibatch."""
    steps = torch.randperm(len(scheduler.timesteps) - 1, generator=generator)[:batch]
    return row_scalars_for_schedule(scheduler, scheduler.timesteps[steps], scheduler.timesteps[steps + 1])


def random_inputs(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    model_output, x, noise = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    return model_output, x, noise, generator


def assert_grad_close(actual, expected, tol):
    actual, expected = actual.double().cpu(), expected.double()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def check_against_reference(model_output, x, noise, scalars, prediction_type, sampling, with_grad_denoised, generator):
    dtype = x.dtype
    # Training replays a stored action: the reference's own sampled next state.
    stored_next = None if sampling else policy_step_reference(model_output, x, scalars, prediction_type, noise=noise)[1]
    step_input = dict(noise=noise) if sampling else dict(next_state=stored_next)
    on_device = {key: value.to(DEVICE) for key, value in step_input.items()}

    model_output_k = model_output.to(DEVICE).requires_grad_()
    x_k = x.to(DEVICE).requires_grad_()
    denoised, x_next, logp = triton_step.fused_policy_step(
        model_output_k, x_k, scalars.to(DEVICE), prediction_type, **on_device
    )
    assert denoised.dtype == x_next.dtype == dtype and logp.dtype == torch.float32

    # Values: x in its own dtype so the reference rounds the next state like the kernel stores it.
    ref_denoised, ref_next, _ = policy_step_reference(
        model_output, x, scalars, prediction_type, compute_dtype=torch.float64, **step_input
    )
    torch.testing.assert_close(denoised.cpu(), ref_denoised, **VALUE_TOL[dtype])
    torch.testing.assert_close(x_next.cpu(), ref_next, **VALUE_TOL[dtype])
    # logp of the kernel's own stored next state (they may differ by one rounding in bf16).
    ref_logp = policy_step_reference(
        model_output, x, scalars, prediction_type, next_state=x_next.detach().cpu(), compute_dtype=torch.float64
    )[2]
    torch.testing.assert_close(logp.cpu().double(), ref_logp, **LOGP_TOL)

    # Gradients: cotangents rounded to the outputs' dtypes, so both sides see the same values.
    outputs = [logp, denoised] + ([x_next] if sampling else [])
    use = [True, with_grad_denoised, sampling]
    cotangents = [torch.randn(out.shape, generator=generator).to(out.dtype) for out in outputs]
    grads = torch.autograd.grad(
        [o for o, u in zip(outputs, use) if u],
        [model_output_k, x_k],
        [c.to(DEVICE) for c, u in zip(cotangents, use) if u],
    )
    model_output_r = model_output.double().requires_grad_()
    x_r = x.double().requires_grad_()
    ref_denoised, ref_next, ref_logp = policy_step_reference(
        model_output_r, x_r, scalars, prediction_type, compute_dtype=torch.float64, **step_input
    )
    ref_grads = torch.autograd.grad(
        [o for o, u in zip([ref_logp, ref_denoised, ref_next], use) if u],
        [model_output_r, x_r],
        [c.double() for c, u in zip(cotangents, use) if u],
    )
    assert grads[0].dtype == grads[1].dtype == dtype
    for grad, ref_grad in zip(grads, ref_grads):
        assert_grad_close(grad, ref_grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_grad_denoised", [False, True], ids=["logp", "logp+D"])
@pytest.mark.parametrize("sampling", [True, False], ids=["sampling", "training"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_matches_float64_reference(scheduler, prediction_type, dtype, sampling, with_grad_denoised, shape):
    seed = 1000 * PREDICTION_TYPES.index(prediction_type) + 10 * shape[0] + sampling
    model_output, x, noise, generator = random_inputs(shape, dtype, seed)
    scalars = mixed_row_scalars(scheduler, shape[0], generator)
    check_against_reference(model_output, x, noise, scalars, prediction_type, sampling, with_grad_denoised, generator)


@pytest.mark.parametrize("sampling", [True, False], ids=["sampling", "training"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_matches_reference_with_large_skip_scaling(prediction_type, sampling):
    """LCM schedules make c_skip ~1e-5 at t >= 100; these rows weigh both terms of D alike."""
    model_output, x, noise, generator = random_inputs(SHAPES[1], torch.float32, seed=11)
    alphas_cumprod = torch.rand(2, 3, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    alpha_t, alpha_next = alphas_cumprod[0].sqrt(), alphas_cumprod[1].sqrt()
    c_skip, c_out = torch.rand(2, 3, generator=generator, dtype=torch.float64) * 0.8 + 0.2
    scalars = torch.stack(
        [alpha_t, (1 - alpha_t**2).sqrt(), c_skip, c_out, alpha_next, (1 - alpha_next**2).sqrt()], dim=1
    )
    check_against_reference(model_output, x, noise, scalars, prediction_type, sampling, True, generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_sampling_logp_equals_training_recompute(scheduler, prediction_type, dtype):
    model_output, x, noise, generator = random_inputs(SHAPES[1], dtype, seed=7)
    scalars = mixed_row_scalars(scheduler, SHAPES[1][0], generator).to(DEVICE)
    model_output, x, noise = model_output.to(DEVICE), x.to(DEVICE), noise.to(DEVICE)
    denoised, x_next, logp = triton_step.fused_policy_step(model_output, x, scalars, prediction_type, noise=noise)
    denoised_again, next_again, logp_again = triton_step.fused_policy_step(
        model_output, x, scalars, prediction_type, next_state=x_next
    )
    assert next_again is x_next
    assert torch.equal(logp, logp_again)
    assert torch.equal(denoised, denoised_again)


def test_sampling_logp_gradient_is_pathwise_zero(scheduler):
    """x_next - mean = sigma_next * z in sampling mode: logp alone gives no gradient, as in the reference."""
    model_output, x, noise, generator = random_inputs(SHAPES[0], torch.float32, seed=3)
    scalars = mixed_row_scalars(scheduler, 1, generator)
    model_output_k = model_output.to(DEVICE).requires_grad_()
    logp = triton_step.fused_policy_step(
        model_output_k, x.to(DEVICE), scalars.to(DEVICE), "epsilon", noise=noise.to(DEVICE)
    )[2]
    (grad,) = torch.autograd.grad(logp.sum(), model_output_k)
    assert torch.count_nonzero(grad) == 0
    model_output_r = model_output.double().requires_grad_()
    ref_logp = policy_step_reference(
        model_output_r, x.double(), scalars, "epsilon", noise=noise.double(), compute_dtype=torch.float64
    )[2]
    (ref_grad,) = torch.autograd.grad(ref_logp.sum(), model_output_r)
    assert torch.count_nonzero(ref_grad) == 0


def test_rejects_bad_arguments():
    x = torch.zeros(2, 3, device=DEVICE)
    scalars = torch.ones(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="exactly one"):
        triton_step.fused_policy_step(x, x, scalars, "epsilon")
    with pytest.raises(ValueError, match="not supported"):
        triton_step.fused_policy_step(x, x, scalars, "flow", noise=x)
    with pytest.raises(ValueError, match="scalars"):
        triton_step.fused_policy_step(x, x, scalars[:1], "epsilon", noise=x)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_step_on_a_second_gpu_from_a_new_thread_equals_the_reference(scheduler):
    """Triton launches on the thread's current device, GPU 0 in a new thread: the step on GPU 1's tensors still
    gives the reference's values (the launch takes the tensors' device guard)."""
    from concurrent.futures import ThreadPoolExecutor

    generator = torch.Generator().manual_seed(32)
    model_output, x, noise = (torch.randn(3, 4, 33, 35, generator=generator) for _ in range(3))
    scalars = mixed_row_scalars(scheduler, 3, generator)
    expected = policy_step_reference(model_output.double(), x.double(), scalars, "epsilon", noise=noise.double())
    on_second = [t.to("cuda:1") for t in (model_output, x, scalars, noise)]
    with ThreadPoolExecutor(1) as pool:
        outputs = pool.submit(lambda: triton_step.fused_policy_step(*on_second[:3], "epsilon",
                                                                    noise=on_second[3])).result()
    for got, want in zip(outputs, expected):
        assert got.device == torch.device("cuda", 1)
        torch.testing.assert_close(got.double().cpu(), want, **VALUE_TOL[torch.float32])
