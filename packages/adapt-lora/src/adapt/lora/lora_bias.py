"""``lora_bias=True``: a bias on ``lora_B`` (PEFT's), so the adapter's output is
``s·(B A x + b_B)``; merged into the base bias (``b ← b + s·b_B``).

Linear-like layers (``nn.Linear``, transformers ``Conv1D``, quantised linears) and convolutions
take it; embeddings and parameter targets refuse it, as in PEFT. Merging into a base layer that
has no bias is refused before anything is written (PEFT raises too, after it has already added
ΔW to the weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from adapt.core import AdapterStateError, TargetError
from adapt.core.typenames import describe

__all__ = ["add_lora_bias", "check_bias_merge", "lora_bias_of"]


def lora_bias_of(layer: Any, adapter_name: str) -> torch.Tensor | None:
    """``lora_B``'s bias of ``adapter_name`` (None without ``lora_bias``)."""
    container = layer.lora_B
    module = container[adapter_name] if adapter_name in container else None  # noqa: SIM401
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def add_lora_bias(layer: Any, adapter_name: str, init: object) -> None:
    """Give ``lora_B[adapter_name]`` a bias: zero (the adapter starts as the identity), or for
    ``init_lora_weights=False`` ``nn.Linear``'s default U(−1/√r, 1/√r)."""
    if adapter_name not in layer.lora_B or not isinstance(layer.lora_B[adapter_name], nn.Module):
        raise TargetError(
            f"lora_bias=True is not supported on {describe(layer.get_base_layer())} (a bias on "
            "lora_B exists for linear and convolution layers only, as in PEFT): drop lora_bias "
            "or this module from target_modules"
        )
    module = layer.lora_B[adapter_name]
    weight = cast(torch.Tensor, module.weight)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if init is False:
        bound = 1 / math.sqrt(weight.shape[1])
        bias.uniform_(-bound, bound)
    module.bias = nn.Parameter(bias)


def check_bias_merge(layer: Any, adapter_names: Sequence[str]) -> None:
    """:class:`AdapterStateError` (nothing merged) when an adapter with a LoRA bias would be
    merged into a base layer without a bias to hold it."""
    with_bias = [n for n in adapter_names if lora_bias_of(layer, n) is not None]
    if with_bias and getattr(layer.get_base_layer(), "bias", None) is None:
        raise AdapterStateError(
            f"cannot merge {with_bias}: the adapter has lora_bias, and "
            f"{describe(layer.get_base_layer())} has no bias to merge it into (merging would lose "
            "it); keep the adapter unmerged, or train without lora_bias on layers without a bias"
        )
