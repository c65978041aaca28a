"""Autocast (automatic mixed precision) for fused kernels.

Custom autograd Functions and in-place kernels (``addmm_``) are not covered by autocast: under
``torch.autocast`` their inputs keep their dtypes and mixed float32 / bfloat16 operands fail.
A fused path asks :func:`autocast_dtype` for the dtype autocast would run its matmuls in on
the input's device type, casts its floating inputs to it (:func:`cast_floating`; autograd
carries the casts, so float32 parameters get float32 gradients) and runs with autocast off
(:func:`autocast_off`) — what ``torch.amp.custom_fwd(cast_inputs=...)`` does, for the device
type of the call rather than one fixed at definition (CPU and CUDA alike).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device_type`` ('cpu', 'cuda', ...), or None when
    autocast is off there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: per-device getters
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def cast_floating(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` if it is a floating tensor (None and integer tensors unchanged)."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Autocast disabled on ``device_type`` for the block (inputs already cast by the caller)."""
    with torch.autocast(device_type, enabled=False):
        yield
