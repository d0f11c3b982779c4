"""Triton kernels of rlcm-fast (shipped in the wheel as `rlcm_fast.kernels`).

Importing this package never needs triton; the kernels themselves are reached lazily, so
`from rlcm_fast.kernels import fused_policy_step` raises ImportError only where triton is missing.
"""

from __future__ import annotations

import functools

_POLICY_STEP_EXPORTS = ("FusedPolicyStep", "fused_policy_step")


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (kernels then run on CUDA tensors, or on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name: str):
    if name in _POLICY_STEP_EXPORTS:
        from . import policy_step

        return getattr(policy_step, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["triton_available", *_POLICY_STEP_EXPORTS]
