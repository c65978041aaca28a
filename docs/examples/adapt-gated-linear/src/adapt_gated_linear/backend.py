"""The weight backend for :class:`GatedLinear`, registered under ``adapt.backends``.

adapt's layers never touch ``base_layer.weight`` themselves: they read the weight, and write a
merged one back, through the backend the registry finds for the module. adapt's dense backend
serves ``nn.Linear``, ``nn.Embedding``, convolutions and transformers ``Conv1D``; anything else
needs its own.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from adapt.core import MergeReport, TargetError

from .modules import GatedLinear


def _gated(base: nn.Module) -> GatedLinear:
    if not isinstance(base, GatedLinear):
        raise TargetError(f"GatedLinearBackend serves GatedLinear modules, not {type(base)}")
    return base


class GatedLinearBackend:
    """Reads and writes ``GatedLinear.weight`` in adapt's canonical linear layout,
    ``(out_features, in_features)`` — which is how GatedLinear stores it, so no transposing."""

    #: Module types served: classes, or dotted names ("pkg.mod.Class") to avoid an import.
    base_types: ClassVar[tuple[type | str, ...]] = (GatedLinear,)
    #: Writing a weight is exact (no quantisation), so unmerging restores it to round-off.
    lossy: ClassVar[bool] = False

    def shape(self, base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)``."""
        layer = _gated(base)
        return layer.in_features, layer.out_features

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        return _gated(base).weight

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        target = _gated(base).weight
        if tuple(weight.shape) != tuple(target.shape):
            raise TargetError(
                f"cannot write a weight of shape {tuple(weight.shape)} into a GatedLinear whose "
                f"weight is {tuple(target.shape)} (out_features, in_features)"
            )
        with torch.no_grad():
            target.copy_(weight.to(device=target.device, dtype=target.dtype))
        return MergeReport()  # exact: no error introduced

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        dtype = _gated(base).weight.dtype
        return dtype if dtype.is_floating_point else torch.float32
