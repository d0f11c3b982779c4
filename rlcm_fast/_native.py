"""Torch-tensor wrapper over the C++ CPU policy step in `rlcm_fast._C`.

`_C` takes raw buffer addresses and sizes (it is not built against libtorch); this module validates
CPU tensors, makes them contiguous, allocates the outputs and passes `data_ptr()`s. No autograd here:
`policy_step_backward_cpu` is the hand-written backward for an autograd.Function to call.

Numerics (see csrc/policy_step.cpp): identical to `policy_step_reference(..., compute_dtype=x.dtype)`
for the denoised output and the next state; the log-prob's sum of squares is accumulated in double and
the log-prob is returned in x's dtype (float32 or float64), the dtype the reference returns.
"""

from __future__ import annotations

import math

import torch

from .policy_step import PREDICTION_TYPES, check_prediction_type

try:
    from . import _C
except ImportError as error:  # a source checkout without the built extension
    _C = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None

_ELEMENT_TYPES = {torch.float32: "float32", torch.float64: "float64"}


def native_available() -> bool:
    """Whether the compiled extension `rlcm_fast._C` could be imported."""
    return _C is not None


def native_import_error() -> ImportError | None:
    return _IMPORT_ERROR


def _native_module():
    if _C is None:
        raise RuntimeError(
            "the native extension rlcm_fast._C is not available (install the package with `pip install .`, "
            f"or build it into the source tree with the command at the top of CMakeLists.txt): {_IMPORT_ERROR}"
        )
    return _C


def _check_cpu_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {tensor.device}")


def _check_state(x) -> None:
    _check_cpu_tensor("x", x)
    if x.dtype not in _ELEMENT_TYPES:
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if x.dim() < 2 or any(size == 0 for size in x.shape[1:]):
        raise ValueError(f"x must have shape (B, ...) with at least one element per row, got {tuple(x.shape)}")


def _like_state(name: str, tensor, x: torch.Tensor) -> torch.Tensor:
    """`tensor` checked to match x (device, dtype, shape), detached and contiguous."""
    _check_cpu_tensor(name, tensor)
    if tensor.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {tensor.dtype} but x has dtype {x.dtype}; they must match")
    if tensor.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but x has shape {tuple(x.shape)}; they must match")
    return tensor.detach().contiguous()


def _row_scalars(scalars, rows: int) -> torch.Tensor:
    _check_cpu_tensor("scalars", scalars)
    if scalars.dtype != torch.float64:
        raise ValueError(f"scalars must be float64 (the ROW_SCALARS table), got {scalars.dtype}")
    if tuple(scalars.shape) != (rows, 6):
        raise ValueError(f"scalars must have shape ({rows}, 6), got {tuple(scalars.shape)}")
    return scalars.detach().contiguous()


def _row_gradient(grad_logp, rows: int) -> torch.Tensor:
    """grad_logp as the contiguous float64 vector the kernel reads (upcasting loses nothing)."""
    _check_cpu_tensor("grad_logp", grad_logp)
    if not grad_logp.is_floating_point() or tuple(grad_logp.shape) != (rows,):
        raise ValueError(
            f"grad_logp must be a floating tensor of shape ({rows},), "
            f"got dtype {grad_logp.dtype} shape {tuple(grad_logp.shape)}"
        )
    return grad_logp.detach().to(torch.float64).contiguous()


def _prediction_code(prediction_type: str) -> int:
    check_prediction_type(prediction_type)
    return PREDICTION_TYPES.index(prediction_type)


def _thread_count(num_threads) -> int:
    """0: torch's own thread count (torch.set_num_threads; it follows the machine's CPU limits)."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be an int >= 0 (0 = torch.get_num_threads()), got {num_threads!r}")
    # The C++ op takes a C int and never starts more threads than it has work items: cap, rather than let a
    # count past 2**31 - 1 fail in pybind11's argument conversion.
    return min(num_threads or torch.get_num_threads(), 2**31 - 1)


def policy_step_forward_cpu(
    model_output: torch.Tensor,
    x: torch.Tensor,
    scalars: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor | None = None,
    next_state: torch.Tensor | None = None,
    num_threads: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy step on CPU tensors: returns (denoised, next_state, logp).

    Give `noise` (sampling: the next state is computed and returned) or `next_state` (training: it is
    read and returned as given), not both. All state tensors share x's shape (B, ...) and dtype
    (float32 or float64); `scalars` is the (B, 6) float64 ROW_SCALARS table; logp has shape (B,) and
    x's dtype. `num_threads` 0 uses torch.get_num_threads() (small inputs run on the calling thread anyway).
    """
    native = _native_module()
    if (noise is None) == (next_state is None):
        raise ValueError("give exactly one of noise (sampling) or next_state (training)")
    _check_state(x)
    x_in = x.detach().contiguous()
    model_output_in = _like_state("model_output", model_output, x)
    scalars_in = _row_scalars(scalars, x.shape[0])
    code = _prediction_code(prediction_type)
    threads = _thread_count(num_threads)

    denoised = torch.empty_like(x_in)
    logp = torch.empty(x.shape[0], dtype=x.dtype)
    if noise is not None:
        noise_in = _like_state("noise", noise, x)
        next_state_buffer = torch.empty_like(x_in)
        next_state_out = next_state_buffer
        noise_address = noise_in.data_ptr()
    else:
        next_state_buffer = _like_state("next_state", next_state, x)
        next_state_out = next_state
        noise_address = 0
    forward = getattr(native, f"policy_step_forward_{_ELEMENT_TYPES[x.dtype]}")
    forward(
        model_output_in.data_ptr(),
        x_in.data_ptr(),
        noise_address,
        next_state_buffer.data_ptr(),
        scalars_in.data_ptr(),
        denoised.data_ptr(),
        logp.data_ptr(),
        x.shape[0],
        math.prod(x.shape[1:]),
        code,
        threads,
    )
    return denoised, next_state_out, logp


def policy_step_backward_cpu(
    model_output: torch.Tensor,
    x: torch.Tensor,
    next_state: torch.Tensor | None,
    scalars: torch.Tensor,
    prediction_type: str,
    grad_logp: torch.Tensor | None,
    grad_denoised: torch.Tensor | None = None,
    grad_next: torch.Tensor | None = None,
    need_model_output: bool = True,
    need_x: bool = False,
    num_threads: int = 0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the policy step with respect to model_output and x: (grad_model_output, grad_x), each
    None when not asked for (`need_model_output`, `need_x`), in x's shape and dtype.

    Training mode: `grad_logp` is a (B,) floating tensor (used in float64), the stored `next_state` is
    the action it scores, and `grad_denoised` (matching x) may be given. Sampling mode: `grad_logp` is
    None, since the log-prob of next_state = mean + std * z does not depend on the inputs, and
    `grad_next`, the gradient of the sampled next state, may be given with `grad_denoised`.
    Intermediates are recomputed from the inputs.
    """
    native = _native_module()
    _check_state(x)
    if not (need_model_output or need_x):
        raise ValueError("ask for at least one gradient (need_model_output or need_x)")
    scalars_in = _row_scalars(scalars, x.shape[0])
    code = _prediction_code(prediction_type)
    threads = _thread_count(num_threads)
    kept = []  # the contiguous inputs, alive until the kernel has run

    def address(name: str, tensor: torch.Tensor | None) -> int:
        if tensor is None:
            return 0
        kept.append(_like_state(name, tensor, x))
        return kept[-1].data_ptr()

    if grad_logp is not None:
        if next_state is None:
            raise ValueError("next_state is needed with grad_logp (training mode)")
        grad_logp_in = _row_gradient(grad_logp, x.shape[0])
        kept.append(grad_logp_in)
        inputs = (address("model_output", model_output), address("x", x), address("next_state", next_state),
                  grad_logp_in.data_ptr())
    else:
        inputs = (0, 0, 0, 0)
    grad_model_output = torch.empty_like(x, memory_format=torch.contiguous_format) if need_model_output else None
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    backward = getattr(native, f"policy_step_backward_{_ELEMENT_TYPES[x.dtype]}")
    backward(
        inputs[0], inputs[1], inputs[2], scalars_in.data_ptr(), inputs[3],
        address("grad_denoised", grad_denoised),
        address("grad_next", grad_next),
        0 if grad_model_output is None else grad_model_output.data_ptr(),
        0 if grad_x is None else grad_x.data_ptr(),
        x.shape[0],
        math.prod(x.shape[1:]),
        code,
        threads,
    )
    return grad_model_output, grad_x
