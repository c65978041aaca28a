"""The LoRA variant ``"scaled"``: one learnable scalar gate per adapter per layer.

::

    out = base(x) + g · s·B(A(dropout(x)))        merged: W ← W + g · s·BA

``g`` is the layer's ``lora_gate[adapter_name]``, shape ``(1,)``, saved as
``base_model.model.<module path>.lora_gate``; it starts at ``variant_options["gate_init"]``
(default 1.0: a new adapter computes exactly plain LoRA, so it is still the identity).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from adapt.core import ConfigError, adapter_dtype_device
from adapt.lora import LoraVariant

if TYPE_CHECKING:
    from adapt.lora import LoraConfig, LoraLayer

#: The gate's value in a new adapter when ``variant_options`` does not set ``gate_init``.
DEFAULT_GATE_INIT = 1.0


class ScaledLora(LoraVariant):
    """LoRA whose contribution is multiplied by a learned scalar gate, on every LoRA layer
    type (Linear and transformers ``Conv1D``, Embedding, Conv1d/2d/3d): it only rescales what
    the layer computes, so it needs no layer of its own."""

    name: ClassVar[str] = "scaled"
    tensor_names: ClassVar[tuple[str, ...]] = ("lora_gate",)

    def check_options(self, options: dict[str, Any]) -> None:
        """``variant_options`` may set ``gate_init`` (a finite number), nothing else."""
        unknown = sorted(set(options) - {"gate_init"})
        if unknown:
            raise ConfigError(
                f"LoRA variant 'scaled' takes only the variant_options key 'gate_init', got "
                f"{unknown}"
            )
        self.gate_init(options)

    @staticmethod
    def gate_init(options: dict[str, Any]) -> float:
        value = options.get("gate_init", DEFAULT_GATE_INIT)
        # bool is an int subclass: refuse it, True is not a gate value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(
                "LoRA variant 'scaled': variant_options['gate_init'] must be a finite number "
                f"(the gate's initial value), got {value!r}"
            )
        return float(value)

    @staticmethod
    def gates(layer: LoraLayer) -> nn.ParameterDict:
        """The layer's ``lora_gate`` container (adapt-lora creates it from ``tensor_names``)."""
        return layer.variant_tensors("lora_gate")

    def gate(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        return cast(torch.Tensor, self.gates(layer)[adapter_name])

    def init(self, layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
        dtype, device = adapter_dtype_device(layer)  # float32 for half-precision bases
        value = self.gate_init(config.variant_options)
        gate = torch.full((1,), value, dtype=dtype, device=device)
        self.gates(layer)[adapter_name] = nn.Parameter(gate)

    def adapter_effect(
        self, layer: LoraLayer, x: torch.Tensor, adapter_name: str, base_output: torch.Tensor
    ) -> torch.Tensor:
        # the layer's own plain-LoRA contribution, s·B(A(dropout(x))), with dropout where LoRA
        # applies it (an embedding's input is token ids: no dropout)
        lora = layer.adapter_output(x, adapter_name)
        return self.gate(layer, adapter_name).to(lora.dtype) * lora

    def delta_weight(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        # merge_weight / unmerge_weight / merged_form of LoraVariant add and subtract this
        delta = layer.delta_weight(adapter_name)
        return self.gate(layer, adapter_name).to(delta.dtype) * delta
