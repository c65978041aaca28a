"""``GatedLoraLinear``: LoRA on :class:`GatedLinear`, registered under ``adapt.layers``.

The base computes ``(x Wᵀ + b) · σ(g)``. The LoRA path is gated the same way,
``((dropout(x) Aᵀ) Bᵀ) · scaling · σ(g)``, so that the adapted output equals
``(x (W + ΔW)ᵀ + b) · σ(g)`` with ``ΔW = B A · scaling``: merging ΔW into ``weight`` is exact,
and adapt's own merge (through :class:`~adapt_gated_linear.backend.GatedLinearBackend`) is all
this layer needs.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import nn

from adapt.lora import LoraLayer

from .modules import GatedLinear


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


class GatedLoraLinear(LoraLayer):
    """LoRA on ``GatedLinear``: A ``(r × in)`` and B ``(out × r)`` as ``nn.Linear`` modules,
    under PEFT's names ``lora_A`` / ``lora_B``.

    :class:`~adapt.lora.LoraLayer` handles rank, ``lora_alpha`` scaling, dropout,
    initialisation (B = 0, so a new adapter is the identity) and deletion; this class says how
    A and B are shaped and applied.
    """

    #: The module types this layer wraps (the registry matches them along the module's MRO).
    base_types: ClassVar[tuple[type | str, ...]] = (GatedLinear,)

    def create_adapter(
        self, adapter_name: str, r: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.lora_A[adapter_name] = nn.Linear(
            self.in_features, r, bias=False, dtype=dtype, device=device
        )
        self.lora_B[adapter_name] = nn.Linear(
            r, self.out_features, bias=False, dtype=dtype, device=device
        )

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lora_a = self.lora_A[adapter_name]
        lora_b = self.lora_B[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        out: torch.Tensor = lora_b(lora_a(dropout(x.to(_weight(lora_a).dtype))))
        gate = cast(GatedLinear, self.get_base_layer()).gate
        return out * self.scaling[adapter_name] * torch.sigmoid(gate).to(out.dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_a = _weight(self.lora_A[adapter_name])
        weight_b = _weight(self.lora_B[adapter_name])
        delta: torch.Tensor = (weight_b @ weight_a) * self.scaling[adapter_name]
        return delta
