"""Merge numerics as functions over tensors, apart from the module plumbing that calls them.

``W ← W + Σ ΔW`` and its inverse are summed in (at least) float32, so a half-precision weight
is rounded once, at the end. :class:`MergeReport` says what writing the result back cost, and
:func:`unsafe_merge_error` is the one refusal of a merge whose result is not finite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import AdapterStateError


@dataclass(frozen=True)
class MergeReport:
    """What writing a merged weight cost: zero for dense layers, requantisation error otherwise."""

    max_abs_error: float = 0.0
    rel_error: float = 0.0
    lossy: bool = False


def worst(reports: Iterable[MergeReport | None]) -> MergeReport:
    """The largest errors of ``reports`` (None: a layer that merged nothing)."""
    out = MergeReport()
    for report in reports:
        if report is not None:
            out = MergeReport(
                max(report.max_abs_error, out.max_abs_error),
                max(report.rel_error, out.rel_error),
                report.lossy or out.lossy,
            )
    return out


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision weights, the weight's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def add_deltas(
    weight: torch.Tensor, deltas: Iterable[torch.Tensor], sign: float = 1.0
) -> torch.Tensor:
    """``weight + sign · Σ deltas`` as a new tensor in :func:`accumulation_dtype`."""
    new = weight.detach().to(accumulation_dtype(weight.dtype), copy=True)
    for delta in deltas:
        if sign > 0:
            new += delta.detach().to(new.dtype)
        else:
            new -= delta.detach().to(new.dtype)
    return new


def fits_dtype(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``weight`` is finite and stays finite when stored as ``dtype``."""
    if not torch.isfinite(weight).all():
        return False
    if dtype.is_floating_point and weight.dtype != dtype:
        return bool(weight.abs().max() <= torch.finfo(dtype).max) if weight.numel() else True
    return True


def unsafe_merge_error(names: Sequence[str], where: str, outcome: str) -> AdapterStateError:
    """The refusal of a safe merge whose result holds NaN/Inf (or overflows the weight's dtype);
    ``outcome`` says what was left as it was."""
    return AdapterStateError(
        f"safe_merge: merging {list(names)} into {where} gives NaN or Inf weights (or values "
        f"beyond the weight's dtype); {outcome} (check the adapter's weights)"
    )
