"""The policy step of multi-step consistency sampling: the math of one action, in one place.

For a row b of a batch (one latent x_k at timestep t_k) and the model's output at that state:

    pred_x0 = (x - sigma_t * eps) / alpha_t          (epsilon prediction)
            =  alpha_t * x - sigma_t * v             (v prediction)
            =  model_output                          (sample prediction)
    D       = c_out * pred_x0 + c_skip * x           (the consistency function's output)
    mean    = alpha_next * D,   std = sigma_next
    x_next  = mean + std * z                         (sampling; in training x_next is given)
    logp    = MEAN over the row's elements of [-(x_next - mean)^2 / (2 std^2)] - log std - log sqrt(2 pi)

Every per-row constant travels in one float64 tensor of shape (B, 6), so a training minibatch can mix
timesteps (see `ROW_SCALARS`). `policy_step_reference` is the plain-PyTorch definition that the C++
(csrc/) and Triton (kernels/) implementations are tested against.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch

# Column order of the (B, 6) float64 row-scalar table.
ROW_SCALARS = ("alpha_t", "sigma_t", "c_skip", "c_out", "alpha_next", "sigma_next")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}"
        )


def row_scalars_for_schedule(scheduler, timesteps: torch.Tensor, next_timesteps: torch.Tensor) -> torch.Tensor:
    """The (len(timesteps), 6) float64 table for actions t -> t_next, from an `LCMScheduler`.

    Uses the scheduler's own `alphas_cumprod` and boundary-condition scalings, so nothing is re-derived.
    A negative next timestep means "past the end" and uses the scheduler's `final_alpha_cumprod`, as
    `LCMScheduler.step` does.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    t = timesteps.to(torch.long).cpu()
    t_next = next_timesteps.to(torch.long).cpu()
    a_t = alphas_cumprod[t]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    a_next = torch.where(t_next >= 0, alphas_cumprod[t_next.clamp(min=0)], final)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.to(torch.float64))
    return torch.stack(
        [a_t.sqrt(), (1 - a_t).sqrt(), c_skip, c_out, a_next.sqrt(), (1 - a_next).sqrt()], dim=1
    ).contiguous()


def row_columns(scalars: torch.Tensor, ndim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The columns of a (B, C) per-row table, each shaped to broadcast against a (B, ...) tensor of `ndim`
    dims (also DDPO's DDIM table)."""
    shape = (scalars.shape[0],) + (1,) * (ndim - 1)
    return [scalars[:, i].to(dtype).reshape(shape) for i in range(scalars.shape[1])]


def mean_gaussian_log_prob(next_state: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per row, the MEAN over its elements of log N(next_state; mean, std^2), with one std per row (B,),
    computed in mean's dtype (also DDPO's DDIM action)."""
    diff = next_state.to(mean.dtype) - mean
    return -(diff * diff).flatten(1).mean(dim=1) / (2 * std * std) - torch.log(std) - LOG_SQRT_2PI


def policy_mean_std(denoised: torch.Tensor, scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The action's Gaussian: mean alpha_next * D (B, ...) and std sigma_next (B,), in float32."""
    alpha_next, sigma_next = row_columns(scalars[:, 4:], denoised.ndim, torch.float32)
    return alpha_next * denoised.float(), sigma_next.flatten()


def predicted_original(model_output, x, alpha_t, sigma_t, prediction_type: str):
    if prediction_type == "epsilon":
        return (x - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    check_prediction_type(prediction_type)


def _consistency_output(model_output, x, scalars, prediction_type: str, compute_dtype: torch.dtype):
    """D = c_out * pred_x0 + c_skip * x, in compute_dtype."""
    alpha_t, sigma_t, c_skip, c_out, _, _ = row_columns(scalars, x.ndim, compute_dtype)
    xc = x.to(compute_dtype)
    pred_x0 = predicted_original(model_output.to(compute_dtype), xc, alpha_t, sigma_t, prediction_type)
    return c_out * pred_x0 + c_skip * xc


def policy_step_reference(
    model_output: torch.Tensor,
    x: torch.Tensor,
    scalars: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor | None = None,
    next_state: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
):
    """Plain-PyTorch policy step. Give `noise` (sampling) or `next_state` (training), not both.

    Returns (denoised D, next state, per-row mean log-prob). Math runs in `compute_dtype`; D and the next
    state come back in x's dtype, the log-prob in float32 (float64 when computing in float64).
    In sampling mode the log-prob is taken of the next state as stored (rounded to x's dtype), so
    recomputing it in training gives exactly the same value.
    """
    if (noise is None) == (next_state is None):
        raise ValueError("give exactly one of noise (sampling) or next_state (training)")
    _, _, _, _, alpha_next, sigma_next = row_columns(scalars, x.ndim, compute_dtype)
    denoised = _consistency_output(model_output, x, scalars, prediction_type, compute_dtype)
    mean = alpha_next * denoised
    if next_state is None:
        next_state = (mean + sigma_next * noise.to(compute_dtype)).to(x.dtype)
    logp = mean_gaussian_log_prob(next_state, mean, sigma_next.flatten())
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return denoised.to(x.dtype), next_state, logp.to(out_dtype)


def consistency_output(model_output, x, scalars, prediction_type: str):
    """D_k alone: the last UNet call of a trajectory needs no action (its image is decoded from D). Computed as
    policy_step computes its D: in float64 for float64 latents, else in float32."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _consistency_output(model_output, x, scalars, prediction_type, compute_dtype).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Dispatch: CUDA tensors -> the Triton kernel (kernels/), CPU tensors -> the C++ op (csrc/), otherwise
# the reference above. All three agree with `policy_step_reference` (tests/).

BACKENDS = ("auto", "triton", "native", "reference")


def refuse_second_derivative() -> None:
    """Called first in the fused steps' backward: autograd runs a backward with grad mode on only when asked
    for a graph of the gradient (create_graph=True), and their hand-written backward builds none, so a
    second derivative would come out as silent zeros."""
    if torch.is_grad_enabled():
        raise RuntimeError("the fused policy step has no second derivative (create_graph=True); use "
                           "policy_step(..., backend='reference') for higher-order gradients")


class _NativePolicyStep(torch.autograd.Function):
    """The C++ CPU op with its fused backward, with the gradients of autograd through the reference: to
    model_output and x through D and the log-prob. In training mode the log-prob's gradient is the score of
    the stored action; in sampling mode x_next = alpha_next * D + sigma_next * z carries D's gradient and the
    log-prob's is zero (x_next - mean = sigma_next * z does not depend on the inputs)."""

    @staticmethod
    def forward(ctx, model_output, x, scalars, prediction_type, noise, next_state):
        from ._native import policy_step_forward_cpu

        denoised, next_state_out, logp = policy_step_forward_cpu(
            model_output.detach(), x.detach(), scalars, prediction_type, noise=noise, next_state=next_state
        )
        ctx.set_materialize_grads(False)
        ctx.sampling = noise is not None
        ctx.prediction_type = prediction_type
        if ctx.sampling:  # the gradient is linear in the incoming ones: only the scalars are needed
            ctx.save_for_backward(x.detach(), scalars)
        else:
            ctx.save_for_backward(x.detach(), scalars, model_output.detach(), next_state_out)
            ctx.mark_non_differentiable(next_state_out)  # the stored action: data, as in the reference
        return denoised, next_state_out, logp

    @staticmethod
    def backward(ctx, grad_denoised, grad_next, grad_logp):
        from ._native import policy_step_backward_cpu

        refuse_second_derivative()
        need_model_output, need_x = ctx.needs_input_grad[:2]
        if ctx.sampling:
            (x, scalars), model_output, next_state, grad_logp = ctx.saved_tensors, None, None, None
        else:
            (x, scalars, model_output, next_state), grad_next = ctx.saved_tensors, None
        if grad_denoised is None and grad_next is None and grad_logp is None:
            return None, None, None, None, None, None
        grad_model_output, grad_x = policy_step_backward_cpu(
            model_output, x, next_state, scalars, ctx.prediction_type, grad_logp,
            grad_denoised=grad_denoised, grad_next=grad_next, need_model_output=need_model_output, need_x=need_x,
        )
        return grad_model_output, grad_x, None, None, None, None


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (kernels then run on CUDA tensors, or on CPU under TRITON_INTERPRET=1)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.cache
def _kernels_import_error() -> str | None:
    """Why rlcm_fast.kernels.policy_step does not import, or None (asked once: a failed import is not cached)."""
    try:
        importlib.import_module("rlcm_fast.kernels.policy_step")
    except ImportError as exc:
        return f"rlcm_fast.kernels did not import ({exc})"
    return None


def _triton_missing() -> str | None:
    """Why the Triton kernels cannot run, or None when they can."""
    return "triton is not installed" if not triton_available() else _kernels_import_error()


def _triton_ready(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and _triton_missing() is None


def fused_step_missing(device: torch.device) -> str | None:
    """Why backend="auto" would run the plain-PyTorch reference for float32 tensors on `device`, or None when it
    runs a fused step there (the trainer warns: the reference is correct, only slower)."""
    if device.type == "cuda":
        return _triton_missing()
    if device.type == "cpu":
        from ._native import native_available, native_import_error

        return None if native_available() else f"the C++ module rlcm_fast._C did not import ({native_import_error()})"
    return f"no fused step runs on {device.type} tensors"


# The Triton kernels compute in float32: float64 inputs keep the reference's float64 arithmetic.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select_backend(model_output: torch.Tensor, x: torch.Tensor | None = None,
                   given: torch.Tensor | None = None) -> str:
    """The fastest backend that computes what the reference would for these inputs: Triton takes CUDA
    float32/bf16/fp16 (it computes in float32, so float64 stays with the reference's float64 arithmetic);
    the C++ op takes CPU float32/float64 with one dtype for all tensors (the reference promotes mixed ones)."""
    x = model_output if x is None else x
    tensors = [t for t in (model_output, x, given) if t is not None]
    if all(t.dtype in TRITON_DTYPES for t in tensors) and _triton_ready(model_output):
        return "triton"
    if model_output.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and all(
            t.dtype == x.dtype for t in tensors):
        from ._native import native_available

        if native_available():
            return "native"
    return "reference"


def check_rows_have_elements(x: torch.Tensor) -> None:
    """A row of no elements has no mean log-prob (0/0: the reference's NaN, the Triton launch's ZeroDivisionError):
    refused in one line, with the C++ op's wrapper's words (rlcm_fast._native)."""
    if 0 in x.shape[1:]:
        raise ValueError(f"x must have shape (B, ...) with at least one element per row, got {tuple(x.shape)}")


def check_one_device(model_output: torch.Tensor, x: torch.Tensor, given: torch.Tensor) -> None:
    """Refused in one line: tensors on two devices (torch's ops fail deep inside; a Triton launch reads through
    the pointers of another GPU's memory). The scalars table may be anywhere: it is moved to the tensors'."""
    devices = [str(t.device) for t in (model_output, x, given)]
    if len(set(devices)) > 1:
        raise ValueError(f"model_output, x and noise/next_state must be on one device, got {', '.join(devices)}")


def _check_inputs(model_output, x, scalars, given) -> None:
    """One-line errors for inputs the backends would fail on deep inside (or, the reference, broadcast)."""
    for name, tensor in (("model_output", model_output), ("x", x), ("scalars", scalars), ("noise/next_state", given)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor of shape (B, ...), got {x.dtype} of shape {tuple(x.shape)}")
    check_rows_have_elements(x)
    for name, tensor in (("model_output", model_output), ("noise/next_state", given)):
        if tensor.shape != x.shape or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor of x's shape {tuple(x.shape)}, got {tensor.dtype} "
                             f"of shape {tuple(tensor.shape)}")
    if tuple(scalars.shape) != (x.shape[0], 6):
        raise ValueError(f"scalars must have shape ({x.shape[0]}, 6) (the ROW_SCALARS table of x's rows), got "
                         f"{tuple(scalars.shape)}")
    check_one_device(model_output, x, given)


def policy_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    scalars: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor | None = None,
    next_state: torch.Tensor | None = None,
    backend: str = "auto",
):
    """One policy step on the fastest available backend: returns (D, next state, per-row mean log-prob).

    Give `noise` to sample the next state, or the stored `next_state` to score it (training).
    Differentiable with respect to `model_output` and `x`, on every backend as autograd through the
    reference (the fused backends have no second derivative, and no gradient for noise, next_state or
    scalars: they raise).
    """
    check_prediction_type(prediction_type)
    if (noise is None) == (next_state is None):
        raise ValueError("give exactly one of noise (sampling) or next_state (training)")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    given = noise if noise is not None else next_state
    _check_inputs(model_output, x, scalars, given)
    if backend == "auto":
        backend = select_backend(model_output, x, given)
    if backend != "reference" and torch.is_grad_enabled() and (given.requires_grad or scalars.requires_grad):
        raise NotImplementedError(f"the {backend} policy step has no gradient with respect to the noise, "
                                  "next_state or scalars; use backend='reference'")
    scalars = scalars.to(device=model_output.device, dtype=torch.float64).contiguous()
    if backend == "triton":
        from rlcm_fast.kernels.policy_step import fused_policy_step

        return fused_policy_step(model_output, x, scalars, prediction_type, noise=noise, next_state=next_state)
    if backend == "native":
        denoised, sampled, logp = _NativePolicyStep.apply(
            model_output.contiguous(), x.contiguous(), scalars, prediction_type,
            None if noise is None else noise.contiguous(), None if next_state is None else next_state.contiguous(),
        )
        return denoised, sampled if noise is not None else next_state, logp
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return policy_step_reference(
        model_output, x, scalars, prediction_type, noise=noise, next_state=next_state, compute_dtype=compute_dtype
    )
