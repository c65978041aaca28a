"""Core asks its plugins, never names them: a third-party method's bias spelling and a
third-party backend's packed parameters come out right in bias handling and parameter counts.

Everything here is defined in this file, as an outside package would: a config with its own
"adapted layers only" bias value, a layer and method for it, a module whose weight is packed
(four values per stored element) and the backend that reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from adapt.core import AdapterConfig, ConfigError, MergeReport, Method, adapt
from adapt.core.testing import ToyLayer, isolated_registry


@dataclasses.dataclass
class ScopedConfig(AdapterConfig):
    peft_type: ClassVar[str] = "SCOPED"
    adapted_bias_values: ClassVar[tuple[str, ...]] = ("scoped_layers",)
    r: int = 2
    init_identity: bool = True
    bias: str = "none"

    def validate(self) -> None:
        super().validate()
        if self.bias not in ("none", "all", "scoped_layers"):
            raise ConfigError(f"ScopedConfig.bias: unknown value {self.bias!r}")


class ScopedMethod(Method[ScopedConfig]):
    name: ClassVar[str] = "scoped"
    peft_type: ClassVar[str] = "SCOPED"
    package: ClassVar[str] = "scoped-adapters"
    config_class: ClassVar[type[AdapterConfig]] = ScopedConfig


class PackedParam(nn.Parameter):
    """Storage for four values per element (what a quantiser's packed tensor looks like)."""


class Packed(nn.Module):
    """A linear layer whose weight is packed: ``out × in/4`` stored, ``out × in`` meant."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = PackedParam(torch.randn(n_out, n_in // 4), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def dense(self) -> torch.Tensor:
        return self.weight.repeat_interleave(4, dim=1) / 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dense(), self.bias)


class ScopedLayer(ToyLayer):
    method: ClassVar[str] = "scoped"
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear, Packed)


class PackedBackend:
    base_types: ClassVar[tuple[type | str, ...]] = (Packed,)
    lossy: ClassVar[bool] = True

    def shape(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def get_weight(self, base: Any) -> torch.Tensor:
        return base.dense()

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        raise NotImplementedError

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return torch.float32

    def logical_numel(self, param: torch.Tensor) -> int:
        return param.numel() * 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.packed = Packed(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.packed(self.dense(x)))


@pytest.fixture(autouse=True)
def scoped() -> Any:
    with isolated_registry() as registry:
        registry.register_method(ScopedMethod())
        registry.register_layer(ScopedLayer)
        registry.register_backend(PackedBackend())
        yield registry


def _trained(model: Any) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_methods_own_bias_value_trains_and_saves_the_adapted_layers_biases() -> None:
    model = adapt(Net(), ScopedConfig(target_modules=["dense"], bias="scoped_layers"))
    trained = _trained(model)
    assert "base_model.model.dense.base_layer.bias" in trained
    assert not any(name.endswith("head.bias") for name in trained)
    saved = model.adapter_state_dict("default")
    assert "base_model.model.dense.base_layer.bias" in saved
    assert not any(key.endswith("head.bias") for key in saved)


def test_all_and_none_mean_what_they_say() -> None:
    everything = adapt(Net(), ScopedConfig(target_modules=["dense"], bias="all"))
    assert {"base_model.model.head.bias", "base_model.model.packed.bias"} <= _trained(everything)
    nothing = adapt(Net(), ScopedConfig(target_modules=["dense"]))
    assert not any(name.endswith("bias") for name in _trained(nothing))
    assert ScopedConfig(bias="scoped_layers").bias_scope() == "adapted"
    assert ScopedConfig(bias="all").bias_scope() == "all"
    assert ScopedConfig().bias_scope() == "none"


def test_parameter_counts_ask_the_backend_for_packed_weights() -> None:
    net = Net()
    dense_total = sum(p.numel() for n, p in net.named_parameters() if "packed.weight" not in n)
    model = adapt(net, ScopedConfig(target_modules=["dense", "packed"], r=2))
    trainable, total = model.get_nb_trainable_parameters()
    adapters = 2 * (2 * 8 + 8 * 2)  # A (r × in) and B (out × r) on two layers
    # the packed weight holds 8 × 8 values in 8 × 2 stored elements: counted as 64
    assert total == dense_total + 64 + adapters
    assert trainable == adapters


def test_a_tied_parameter_is_counted_once() -> None:
    net = Net()
    net.head = nn.Linear(8, 8)
    net.head.weight = net.dense.weight  # tied, as input and output embeddings often are
    model = adapt(net, ScopedConfig(target_modules=["packed"]))
    _, total = model.get_nb_trainable_parameters()
    unique = {id(p): p for p in net.parameters()}
    expected = sum(p.numel() * (4 if isinstance(p, PackedParam) else 1) for p in unique.values())
    assert total == expected
