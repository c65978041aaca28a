"""The toy method: the smallest complete adapter method (config, layer, method object), and
:func:`registered_toy`, which registers it in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..layer import AdapterLayer, adapter_dtype_device
from ..method import Method
from ..registry import GROUP_LAYERS, GROUP_METHODS, Registry, get_registry

#: Registry names :func:`registered_toy` uses.
TOY_METHOD_NAME = "toy"
TOY_LAYER_NAME = "toy-linear"

_TOY_BIAS = ("none", "all", "adapter_only")


@dataclasses.dataclass
class ToyConfig(AdapterConfig):
    """Config of the toy method (``peft_type`` ``"TOY"``).

    * ``r``: rank of ``A`` (r × in) and ``B`` (out × r);
    * ``init_identity``: start with ``B = 0`` (the adapter changes nothing) when True,
      random ``B`` otherwise;
    * ``bias``: ``"none"``, ``"all"`` or ``"adapter_only"`` (which base biases train).
    """

    peft_type: ClassVar[str] = "TOY"
    adapted_bias_values: ClassVar[tuple[str, ...]] = ("adapter_only",)

    r: int = 2
    init_identity: bool = True
    bias: str = "none"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self._check_number(name, "r", self.r, kind=int, low=1)
        if not isinstance(self.init_identity, bool):
            raise ConfigError(
                f"{name}.init_identity must be true or false, got {self.init_identity!r}"
            )
        if self.bias not in _TOY_BIAS:
            raise ConfigError(f"{name}.bias must be one of {list(_TOY_BIAS)}, got {self.bias!r}")


class ToyLayer(AdapterLayer):
    """Toy adapter on ``nn.Linear``: ``out = base(x) + x @ Aᵀ @ Bᵀ``, ``ΔW = B @ A``."""

    method: ClassVar[str] = TOY_METHOD_NAME
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("toy_A", "toy_B")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.toy_A = nn.ParameterDict()
        self.toy_B = nn.ParameterDict()
        self.r: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Create ``toy_A[adapter_name]`` (random) and ``toy_B[adapter_name]`` (zero when
        ``config.init_identity``). ``r=`` in ``kwargs`` overrides ``config.r``."""
        r = kwargs.get("r", config.r)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"toy rank must be a positive integer, got r={r!r}")
        dtype, device = adapter_dtype_device(self)
        weight_a = torch.randn(r, self.in_features, dtype=dtype, device=device)
        weight_a /= math.sqrt(self.in_features)
        if config.init_identity:
            weight_b = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        else:
            weight_b = torch.randn(self.out_features, r, dtype=dtype, device=device) / math.sqrt(r)
        self.toy_A[adapter_name] = nn.Parameter(weight_a)
        self.toy_B[adapter_name] = nn.Parameter(weight_b)
        self.r[adapter_name] = r

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weight_a = self.toy_A[adapter_name]
        weight_b = self.toy_B[adapter_name]
        out: torch.Tensor = x.to(weight_a.dtype) @ weight_a.T @ weight_b.T
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta: torch.Tensor = self.toy_B[adapter_name] @ self.toy_A[adapter_name]
        return delta

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.r.pop(adapter_name, None)


class ToyMethod(Method[ToyConfig]):
    """The toy method object (what a method package publishes under ``adapt.methods``)."""

    name: ClassVar[str] = TOY_METHOD_NAME
    peft_type: ClassVar[str] = "TOY"
    package: ClassVar[str] = "adapt-peft-core"
    config_class: ClassVar[type[AdapterConfig]] = ToyConfig


@contextlib.contextmanager
def registered_toy(
    registry: Registry | None = None,
    *,
    method: Method[Any] | None = None,
    layer: type[AdapterLayer] = ToyLayer,
) -> Iterator[Method[Any]]:
    """Register the toy method and layer in ``registry`` (default: the process-wide one)
    for the duration of the block; yields the method object.

    ``method`` and ``layer`` replace the toy ones (e.g. a subclass whose hooks fail); they
    are registered under the same names, :data:`TOY_METHOD_NAME` and :data:`TOY_LAYER_NAME`.
    """
    reg = registry if registry is not None else get_registry()
    obj = method if method is not None else ToyMethod()
    reg.register_method(obj, name=TOY_METHOD_NAME)
    reg.register_layer(layer, name=TOY_LAYER_NAME)
    try:
        yield obj
    finally:
        reg.unregister(GROUP_LAYERS, TOY_LAYER_NAME)
        reg.unregister(GROUP_METHODS, TOY_METHOD_NAME)
