"""Quantised models and layers for the adapt-torchao tests (real torchao, on the CPU)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torchao.quantization import (
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerGroup,
    PerTensor,
    quantize_,
)

from adapt.core.testing import tiny_llama, token_ids
from adapt.torchao import Int8WeightOnlyBackend, IntxWeightOnlyBackend

#: name -> a torchao config that quantises weights only (runs forward and backward on the CPU)
CONFIGS: dict[str, Callable[[], Any]] = {
    "int8": Int8WeightOnlyConfig,
    "int8-group": lambda: Int8WeightOnlyConfig(granularity=PerGroup(32)),
    "int8-tensor": lambda: Int8WeightOnlyConfig(granularity=PerTensor()),
    "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4),
    "int4-group-asym": lambda: IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=MappingType.ASYMMETRIC
    ),
}
#: name -> the backend that serves it
BACKENDS: dict[str, type[Int8WeightOnlyBackend | IntxWeightOnlyBackend]] = {
    name: Int8WeightOnlyBackend if name.startswith("int8") else IntxWeightOnlyBackend
    for name in CONFIGS
}
MAIN = ["int8", "int4"]


def quantise(module: nn.Module, kind: str = "int8") -> nn.Module:
    """``module`` with every ``nn.Linear`` quantised by torchao's ``quantize_`` (in place)."""
    quantize_(module, CONFIGS[kind]())
    return module


def linear(
    kind: str = "int8",
    in_features: int = 64,
    out_features: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Linear:
    """A seeded ``nn.Linear`` (with bias), quantised."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features).to(dtype)
    quantise(layer, kind)
    return layer


def quantised_llama(
    kind: str = "int8", seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The kit's tiny Llama (every Linear, lm_head included, quantised), in eval mode."""
    model = tiny_llama(seed).to(dtype)
    return quantise(model, kind).eval()


def quantised_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the codes and scales of every quantised weight, by module path."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        weight: Any = getattr(module, "weight", None)
        if hasattr(weight, "qdata"):
            for part in ("qdata", "scale", "zero_point"):
                value = getattr(weight, part, None)
                if isinstance(value, torch.Tensor):
                    out[f"{path}.{part}"] = value.detach().clone()
    return out


def plain_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter that is not a quantised weight."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if not hasattr(param, "qdata")
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ‖a − b‖ / ‖b‖."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


#: 2 sequences of 12 ids in [0, 128), seed 5
ids = partial(token_ids, batch=2, length=12, seed=5)
