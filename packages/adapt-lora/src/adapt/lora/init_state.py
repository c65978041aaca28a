"""What a PiSSA / OLoRA initialisation took out of a base weight, so it can be put back.

Those initialisations move ``s·B₀A₀`` from the base weight into the adapter (``W ← W − s·B₀A₀``).
The layer keeps ``A₀``, ``B₀`` (float32, non-persistent buffers: never in a state dict or a
checkpoint; they follow ``.to()``) so that removing the adapter without merging it —
``delete_adapter``, ``unload()``, a failed load rolled back — gives the original base back,
instead of leaving the model with a residual weight nobody asked for (PEFT leaves it).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from .inits import full_float32

__all__ = ["InitFactors", "forget_init", "restore_base", "store_init"]


class InitFactors(nn.Module):
    """``A₀`` (r, in), ``B₀`` (out, r) and the scaling they were taken out with."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.register_buffer("a", a.detach().float().clone(), persistent=False)
        self.register_buffer("b", b.detach().float().clone(), persistent=False)
        self.scaling = scaling


def _table(layer: Any) -> nn.ModuleDict:
    return cast(nn.ModuleDict, layer.lora_init)


def store_init(
    layer: Any, adapter_name: str, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> None:
    _table(layer)[adapter_name] = InitFactors(a, b, scaling)


def forget_init(layer: Any, adapter_name: str) -> None:
    table = _table(layer)
    if adapter_name in table:
        del table[adapter_name]


def restore_base(layer: Any, adapter_name: str) -> None:
    """Put ``s·B₀A₀`` back into the base weight (once: the record is dropped)."""
    table = _table(layer)
    if adapter_name not in table:
        return
    record = cast(InitFactors, table[adapter_name])
    base = layer.get_base_layer()
    weight = layer.backend.get_weight(base).detach().float()
    with full_float32():
        restored = torch.addmm(
            weight, record.b.to(weight.device), record.a.to(weight.device), alpha=record.scaling
        )
    layer.backend.set_weight(base, restored)
    del table[adapter_name]
