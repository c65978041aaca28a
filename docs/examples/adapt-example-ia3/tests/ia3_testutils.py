"""Shared by the tests: a small model of plain layers, IA³ vectors set around 1, logits."""

from __future__ import annotations

from typing import Any

import torch
from adapt_example_ia3 import IA3Config, IA3Linear
from torch import nn

from adapt.core import AdaptedModel
from adapt.core.testing import output_tensor, randomise_adapters


class TwoLayers(nn.Module):
    """``ff(tanh(proj(x)))``: ``proj`` 8 → 6 and ``ff`` 6 → 4, both with a bias."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(8, 6)
        self.ff = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(torch.tanh(self.proj(x)))  # type: ignore[no-any-return]


def is_ia3(name: str, param: nn.Parameter) -> bool:
    return ".ia3_l." in f"{name}."


def randomise_ia3(model: nn.Module, seed: int = 1, scale: float = 0.3) -> int:
    """Every IA³ vector of ``model`` (adapt's or PEFT's) set to ``1 + scale · N(0, 1)``, seeded:
    factors that change the output but stay away from 0. Returns how many were set."""
    count = randomise_adapters(model, seed=seed, scale=scale, where=is_ia3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_ia3(name, param):
                param.add_(1.0)
    return count


def logits(model: nn.Module, batch: Any, **kwargs: Any) -> torch.Tensor:
    """The main output of ``model(batch, **kwargs)`` (``.logits`` for transformers), no grad."""
    with torch.no_grad():
        return output_tensor(model(batch, **kwargs)).detach().clone()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def layer_at(model: AdaptedModel, path: str) -> IA3Linear:
    """The IA³ layer at ``path`` of the wrapped model (``model.layers.0.mlp.down_proj``)."""
    layer = model.model.get_submodule(path)
    assert isinstance(layer, IA3Linear), type(layer)
    return layer


def config_of(model: AdaptedModel, adapter_name: str = "default") -> IA3Config:
    config = model.peft_config[adapter_name]
    assert isinstance(config, IA3Config)
    return config


def ia3_vector(model: AdaptedModel, path: str, adapter_name: str = "default") -> torch.Tensor:
    """The live IA³ vector of ``adapter_name`` at ``path`` (an ``nn.Parameter``)."""
    vector: torch.Tensor = layer_at(model, path).ia3_l[adapter_name]
    return vector
