"""What the conformance checks run on: a model made of the one base module under test, and
seeded adapter weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layer import AdapterLayer


class SingleTargetModel(nn.Module):
    """A one-module model: ``target`` is the base module under test."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: Any) -> Any:
        return self.target(x)


def randomise_adapter(layer: AdapterLayer, adapter_name: str, seed: int) -> None:
    """Overwrite the floating-point parameters of ``adapter_name`` in ``layer`` with seeded
    noise (standard deviation 0.1), so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(layer.adapter_tensors(adapter_name).items()):
            if tensor.is_floating_point() and isinstance(tensor, nn.Parameter):
                noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
                tensor.copy_((noise * 0.1).to(tensor.dtype))
