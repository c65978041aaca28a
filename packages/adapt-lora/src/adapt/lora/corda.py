"""CorDA (Yang et al., 2024): context-oriented decomposition (placeholder until implemented)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["corda_factors", "corda_forget", "corda_refusal"]


def corda_refusal(layer: Any) -> str | None:
    return "CorDA is not implemented yet"


def corda_factors(
    layer: Any, weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError


def corda_forget(layer: Any) -> None:
    return None
