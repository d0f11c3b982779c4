"""The fused policy step in Triton: forward (sampling or training) and backward, one pass over memory each.

The math is `rlcm_fast.policy_step.policy_step_reference` (compute dtype float32): per row b of a batch,
D = c_out * pred_x0 + c_skip * x, x_next = alpha_next * D + sigma_next * z, and logp = the row's MEAN
Gaussian log-density of x_next, with mean alpha_next * D and std sigma_next. Inputs may be fp32, bf16 or
fp16; all arithmetic and accumulation is fp32; D and x_next come back in x's dtype, logp in fp32.

Layout of the work: every (B, ...) tensor is viewed as (B, n) rows and cut into chunks of BLOCK
elements; the grid is (chunks, rows), so one program streams one chunk of every operand. We do not use
one program per row looping over its chunks: at the batch sizes of this workload (B = 2..16 latents of
4x96x96 = 36864 elements) that would keep at most 16 of an H100's 132 SMs busy on an op that is pure
memory traffic. The per-row sum of squares is therefore split: each program writes its chunk's partial
sum to a (B, chunks) buffer and a second, tiny kernel reduces each row's partials in a fixed order and
applies the log-density formula. No atomics, so logp is bitwise reproducible run to run; the cost is
one more launch of B programs, negligible inside the sampler's CUDA graph.

The backward recomputes D from (model_output, x) rather than saving it: the saved D is rounded to x's
dtype, and x_next - alpha_next * D, only sigma_next * z in size, needs the fp32 mean (a bf16 D would put
an error of up to 2^-9 |D| into it). The recompute reads inputs that are kept alive anyway.

The kernels are compiled without FMA contraction (`_LAUNCH_OPTIONS`): a sampling pass and a training-mode
recompute then round `mean` identically on every backend, so logp is reproduced bit for bit for the same
rows per call; the op is memory-bound, so FMAs would buy no time. BLOCK follows the rows (`_launch_config`
fills the GPU), and with it the order of the row's sum: on a GPU a call of other rows (training's 2 against
sampling's 4) may differ in logp's last bits, as the UNet's own kernels may between batch sizes.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from rlcm_fast.policy_step import (
    LOG_SQRT_2PI, TRITON_DTYPES, check_one_device, check_prediction_type, check_rows_have_elements,
    policy_step_reference, refuse_second_derivative,
)

# Chunk sizes: powers of two (tl.arange needs them). A chunk of 512+ elements gives each thread at
# least one 16-byte vector per operand at the warp counts below; 4096 bounds registers per program.
_MIN_BLOCK = 512
_MAX_BLOCK = 4096
# Aim for two resident programs per SM so each SM keeps two chunks' loads in flight.
_PROGRAMS_PER_SM = 2


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    # Under TRITON_INTERPRET=1 on CPU tensors programs run one after another, so one "SM" (few, large
    # chunks) is the fastest configuration there.
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(rows: int, n: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): the largest chunk that still gives enough programs to fill the device."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(n))
    target_programs = _PROGRAMS_PER_SM * _multiprocessor_count(device)
    while block > _MIN_BLOCK and rows * triton.cdiv(n, block) < target_programs:
        block //= 2
    # 256 elements per warp: 8 per thread, one 16-byte load of bf16 or two of fp32.
    return block, min(8, max(1, block // 256))


@triton.jit
def _load_row_scalars(scalars_ptr, row):
    """Row `row` of the (B, 6) float64 ROW_SCALARS table, rounded to fp32 like the reference does."""
    base = scalars_ptr + row * 6
    alpha_t = tl.load(base + 0).to(tl.float32)
    sigma_t = tl.load(base + 1).to(tl.float32)
    c_skip = tl.load(base + 2).to(tl.float32)
    c_out = tl.load(base + 3).to(tl.float32)
    alpha_next = tl.load(base + 4).to(tl.float32)
    sigma_next = tl.load(base + 5).to(tl.float32)
    return alpha_t, sigma_t, c_skip, c_out, alpha_next, sigma_next


@triton.jit
def _denoised(model_output, x, alpha_t, sigma_t, c_skip, c_out, PREDICTION_TYPE: tl.constexpr):
    """D = c_out * pred_x0 + c_skip * x, in the reference's order of operations."""
    if PREDICTION_TYPE == "epsilon":
        pred_x0 = (x - sigma_t * model_output) / alpha_t
    elif PREDICTION_TYPE == "v_prediction":
        pred_x0 = alpha_t * x - sigma_t * model_output
    else:
        pred_x0 = model_output
    return c_out * pred_x0 + c_skip * x


@triton.jit
def _denoised_partials(alpha_t, sigma_t, c_skip, c_out, PREDICTION_TYPE: tl.constexpr):
    """(dD/d model_output, dD/dx): D is linear in both, so these are per-row constants."""
    if PREDICTION_TYPE == "epsilon":
        d_model_output = -c_out * sigma_t / alpha_t
        d_x = c_out / alpha_t + c_skip
    elif PREDICTION_TYPE == "v_prediction":
        d_model_output = -c_out * sigma_t
        d_x = c_out * alpha_t + c_skip
    else:
        d_model_output = c_out
        d_x = c_skip
    return d_model_output, d_x


@triton.jit
def _policy_step_forward_kernel(
    model_output_ptr,
    x_ptr,
    noise_or_next_ptr,  # the noise z (sampling) or the stored next state (training)
    scalars_ptr,
    denoised_ptr,
    next_out_ptr,  # written in sampling mode only
    sq_partials_ptr,  # (B, num_chunks) fp32: sum over the chunk of (x_next - mean)^2
    n,
    num_chunks,
    PREDICTION_TYPE: tl.constexpr,
    SAMPLING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    row_start = row.to(tl.int64) * n
    alpha_t, sigma_t, c_skip, c_out, alpha_next, sigma_next = _load_row_scalars(scalars_ptr, row)

    model_output = tl.load(model_output_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
    denoised = _denoised(model_output, x, alpha_t, sigma_t, c_skip, c_out, PREDICTION_TYPE)
    state_dtype = denoised_ptr.dtype.element_ty
    tl.store(denoised_ptr + row_start + offsets, denoised.to(state_dtype), mask=mask)

    mean = alpha_next * denoised
    if SAMPLING:
        noise = tl.load(noise_or_next_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        x_next_stored = (mean + sigma_next * noise).to(state_dtype)
        tl.store(next_out_ptr + row_start + offsets, x_next_stored, mask=mask)
        # The log-prob is of the state as stored, so a training-mode recompute reproduces it exactly.
        x_next = x_next_stored.to(tl.float32)
    else:
        x_next = tl.load(noise_or_next_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
    diff = tl.where(mask, x_next - mean, 0.0)
    tl.store(sq_partials_ptr + row * num_chunks + chunk, tl.sum(diff * diff, axis=0))


@triton.jit
def _row_log_prob_kernel(
    sq_partials_ptr, scalars_ptr, logp_ptr, n, num_chunks, LOG_SQRT_2PI: tl.constexpr, BLOCK_CHUNKS: tl.constexpr
):
    """logp[row] = -mean((x_next - mean)^2) / (2 sigma_next^2) - log(sigma_next) - log(sqrt(2 pi))."""
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    partials = tl.load(sq_partials_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=0.0)
    mean_sq = tl.sum(partials, axis=0) / n
    sigma_next = tl.load(scalars_ptr + row * 6 + 5).to(tl.float32)
    logp = -mean_sq / (2.0 * sigma_next * sigma_next) - tl.log(sigma_next) - LOG_SQRT_2PI
    tl.store(logp_ptr + row, logp)


@triton.jit
def _policy_step_backward_kernel(
    model_output_ptr,
    x_ptr,
    next_ptr,
    scalars_ptr,
    grad_logp_ptr,
    grad_denoised_ptr,
    grad_next_ptr,
    grad_model_output_ptr,
    grad_x_ptr,
    n,
    PREDICTION_TYPE: tl.constexpr,
    LOGP_TERM: tl.constexpr,  # training mode with a gradient for logp
    HAS_GRAD_DENOISED: tl.constexpr,
    HAS_GRAD_NEXT: tl.constexpr,  # sampling mode with a gradient for x_next
    WRITE_GRAD_MODEL_OUTPUT: tl.constexpr,
    WRITE_GRAD_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    row_start = row.to(tl.int64) * n
    alpha_t, sigma_t, c_skip, c_out, alpha_next, sigma_next = _load_row_scalars(scalars_ptr, row)

    # Everything reaches the inputs through D, so first accumulate dL/dD.
    grad_denoised = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GRAD_DENOISED:
        grad_denoised += tl.load(grad_denoised_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_NEXT:
        grad_denoised += alpha_next * tl.load(grad_next_ptr + row_start + offsets, mask=mask, other=0.0).to(
            tl.float32
        )
    if LOGP_TERM:
        model_output = tl.load(model_output_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        x_next = tl.load(next_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = alpha_next * _denoised(model_output, x, alpha_t, sigma_t, c_skip, c_out, PREDICTION_TYPE)
        # d logp / dD_i = alpha_next * (x_next_i - mean_i) / (n * sigma_next^2)
        logp_scale = tl.load(grad_logp_ptr + row).to(tl.float32) * alpha_next / (n * sigma_next * sigma_next)
        grad_denoised += logp_scale * (x_next - mean)

    d_model_output, d_x = _denoised_partials(alpha_t, sigma_t, c_skip, c_out, PREDICTION_TYPE)
    if WRITE_GRAD_MODEL_OUTPUT:
        grad_model_output = (grad_denoised * d_model_output).to(grad_model_output_ptr.dtype.element_ty)
        tl.store(grad_model_output_ptr + row_start + offsets, grad_model_output, mask=mask)
    if WRITE_GRAD_X:
        grad_x = (grad_denoised * d_x).to(grad_x_ptr.dtype.element_ty)
        tl.store(grad_x_ptr + row_start + offsets, grad_x, mask=mask)


def _rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor.contiguous().view(batch, -1)


# No FMA contraction: the module docstring says why.
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def _forward(model_output, x, scalars, noise, next_state, prediction_type):
    batch = x.shape[0]
    sampling = noise is not None
    model_output_rows, x_rows = _rows(model_output, batch), _rows(x, batch)
    noise_or_next = _rows(noise if sampling else next_state, batch)
    n = x_rows.shape[1]
    denoised = torch.empty_like(x_rows)
    x_next = torch.empty_like(x_rows) if sampling else None
    block, num_warps = _launch_config(batch, n, x.device)
    num_chunks = triton.cdiv(n, block)
    sq_partials = torch.empty(batch, num_chunks, dtype=torch.float32, device=x.device)
    logp = torch.empty(batch, dtype=torch.float32, device=x.device)
    _policy_step_forward_kernel[(num_chunks, batch)](
        model_output_rows,
        x_rows,
        noise_or_next,
        scalars,
        denoised,
        x_next if sampling else denoised,  # not written in training mode
        sq_partials,
        n,
        num_chunks,
        PREDICTION_TYPE=prediction_type,
        SAMPLING=sampling,
        BLOCK=block,
        num_warps=num_warps,
        **_LAUNCH_OPTIONS,
    )
    _row_log_prob_kernel[(batch,)](
        sq_partials,
        scalars,
        logp,
        n,
        num_chunks,
        LOG_SQRT_2PI=LOG_SQRT_2PI,
        BLOCK_CHUNKS=triton.next_power_of_2(num_chunks),
        num_warps=1,
        **_LAUNCH_OPTIONS,
    )
    return denoised.view(x.shape), (x_next.view(x.shape) if sampling else None), logp


def _backward(ctx, grad_denoised, grad_next, grad_logp):
    model_output, x, scalars, next_state = ctx.saved_tensors
    need_model_output, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    logp_term = grad_logp is not None and not ctx.sampling
    if not (need_model_output or need_x):
        return None, None
    batch, n = ctx.batch, ctx.row_numel
    rows = functools.partial(_rows, batch=batch)
    # Inputs the kernel does not read (its constexpr flags are off) get a placeholder pointer.
    placeholder = scalars
    grad_model_output = (
        torch.empty(ctx.model_output_shape, dtype=ctx.model_output_dtype, device=scalars.device)
        if need_model_output
        else None
    )
    grad_x = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=scalars.device) if need_x else None
    block, num_warps = _launch_config(batch, n, scalars.device)
    _policy_step_backward_kernel[(triton.cdiv(n, block), batch)](
        rows(model_output) if logp_term else placeholder,
        rows(x) if logp_term else placeholder,
        rows(next_state) if logp_term else placeholder,
        scalars,
        grad_logp.contiguous() if logp_term else placeholder,
        rows(grad_denoised) if grad_denoised is not None else placeholder,
        rows(grad_next) if grad_next is not None else placeholder,
        grad_model_output if need_model_output else placeholder,
        grad_x if need_x else placeholder,
        n,
        PREDICTION_TYPE=ctx.prediction_type,
        LOGP_TERM=logp_term,
        HAS_GRAD_DENOISED=grad_denoised is not None,
        HAS_GRAD_NEXT=grad_next is not None,
        WRITE_GRAD_MODEL_OUTPUT=need_model_output,
        WRITE_GRAD_X=need_x,
        BLOCK=block,
        num_warps=num_warps,
        **_LAUNCH_OPTIONS,
    )
    return grad_model_output, grad_x


class FusedPolicyStep(torch.autograd.Function):
    """Autograd wrapper of the fused kernels, with the gradients of autograd through the reference.

    Outputs: (D, x_next, logp) in sampling mode (`noise` given), (D, logp) in training mode.
    Gradients flow to model_output and x. In training mode logp's gradient is the score of the fixed
    stored action. In sampling mode x_next = alpha_next * D + sigma_next * z moves with D (the
    reparameterised, pathwise gradient, as autograd through the reference gives): D and x_next carry
    gradient and logp's is exactly zero, since x_next - mean = sigma_next * z does not depend on the
    inputs. Only inputs are saved, and in sampling mode only the scalars (the gradient is linear there).
    """

    @staticmethod
    def forward(ctx, model_output, x, scalars, noise, next_state, prediction_type):
        with on_tensors_device(x):
            denoised, x_next, logp = _forward(model_output, x, scalars, noise, next_state, prediction_type)
        ctx.set_materialize_grads(False)
        ctx.sampling = noise is not None
        ctx.prediction_type = prediction_type
        ctx.batch, ctx.row_numel = x.shape[0], x.numel() // x.shape[0]
        ctx.model_output_shape, ctx.model_output_dtype = model_output.shape, model_output.dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        if ctx.sampling:
            ctx.save_for_backward(None, None, scalars, None)
            return denoised, x_next, logp
        ctx.save_for_backward(model_output, x, scalars, next_state)
        return denoised, logp

    @staticmethod
    def backward(ctx, *grad_outputs):
        # Not @once_differentiable: with constant incoming gradients its double-backward error never fires and a
        # second derivative would be silent zeros; refuse_second_derivative raises instead.
        refuse_second_derivative()
        if ctx.sampling:
            grad_denoised, grad_next, grad_logp = grad_outputs
        else:
            (grad_denoised, grad_logp), grad_next = grad_outputs, None
        with on_tensors_device(ctx.saved_tensors[2]):  # scalars: saved in both modes
            grad_model_output, grad_x = _backward(ctx, grad_denoised, grad_next, grad_logp)
        return grad_model_output, grad_x, None, None, None, None


# The launch grids put the batch in their second dimension, at most 65535 on CUDA: a larger batch runs in
# slices of rows.
_MAX_GRID_ROWS = 65535


def on_tensors_device(tensor: torch.Tensor):
    """The context a kernel launch needs for `tensor`'s GPU: Triton launches on the thread's current CUDA device,
    not the tensors' (and a new thread's is device 0, as on the reward's worker thread), so tensors on another
    GPU would be run on by the wrong one. torch's own ops take this device guard themselves."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _interpreting() -> bool:
    try:
        from triton import knobs  # Triton >= 3.4 reads TRITON_INTERPRET here
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def fused_policy_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    scalars: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor | None = None,
    next_state: torch.Tensor | None = None,
):
    """The policy step in Triton, same contract as `policy_step_reference` with compute dtype float32, for
    float32, bfloat16 and float16 tensors (float64 is refused: `policy_step` sends it to the reference).

    Give `noise` (sampling) or `next_state` (training), not both; `scalars` is the (B, 6) ROW_SCALARS
    table (moved to x's device as float64 if it is not already). Returns (denoised D in x's dtype, next
    state in x's dtype (the given tensor in training mode), per-row mean log-prob in float32).
    Differentiable w.r.t. model_output and x (see `FusedPolicyStep`). Runs on CUDA tensors, or on CPU
    tensors under TRITON_INTERPRET=1.
    """
    check_prediction_type(prediction_type)
    if (noise is None) == (next_state is None):
        raise ValueError("give exactly one of noise (sampling) or next_state (training)")
    given = noise if noise is not None else next_state
    if model_output.shape != x.shape or given.shape != x.shape:
        raise ValueError(
            f"model_output {tuple(model_output.shape)}, x {tuple(x.shape)} and noise/next_state "
            f"{tuple(given.shape)} must have the same shape"
        )
    if scalars.shape != (x.shape[0], 6):
        raise ValueError(f"scalars must have shape ({x.shape[0]}, 6), got {tuple(scalars.shape)}")
    check_rows_have_elements(x)
    check_one_device(model_output, x, given)
    # The kernels compute in float32: a float64 input would silently lose its precision, an integer one its type.
    for name, tensor in (("model_output", model_output), ("x", x), ("noise/next_state", given)):
        if tensor.dtype not in TRITON_DTYPES:
            raise ValueError(f"{name} is {tensor.dtype}; the Triton policy step takes "
                             f"{', '.join(str(d) for d in TRITON_DTYPES)} (float64: policy_step_reference)")
    if torch.is_grad_enabled() and (given.requires_grad or scalars.requires_grad):
        raise NotImplementedError("gradients w.r.t. the noise, next_state or scalars are not implemented")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton policy step runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), "
                         f"got device {x.device}")
    if x.shape[0] == 0:  # no rows, no launch (the grid would be empty and the row views undefined)
        return policy_step_reference(model_output, x, scalars, prediction_type, noise=noise, next_state=next_state)
    per_launch = _MAX_GRID_ROWS
    if x.shape[0] > per_launch:
        parts = [
            fused_policy_step(model_output[rows], x[rows], scalars[rows], prediction_type,
                              noise=None if noise is None else noise[rows],
                              next_state=None if next_state is None else next_state[rows])
            for rows in (slice(start, start + per_launch) for start in range(0, x.shape[0], per_launch))
        ]
        denoised, sampled, logp = (torch.cat(outputs) for outputs in zip(*parts))
        return denoised, sampled if noise is not None else next_state, logp
    scalars = scalars.to(device=x.device, dtype=torch.float64).contiguous()
    outputs = FusedPolicyStep.apply(model_output, x, scalars, noise, next_state, prediction_type)
    if noise is not None:
        return outputs
    denoised, logp = outputs
    return denoised, next_state, logp
