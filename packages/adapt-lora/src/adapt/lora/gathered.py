"""Mixed batches on a LoRA linear layer at single-adapter cost: one gathered product.

The adapters a batch uses are stacked once — ``A`` as ``(N, r, in)``, ``(s·B)ᵀ`` as
``(N, r, out)`` (ranks zero-padded to the largest: the padding adds exact zeros), LoRA biases
``s·b`` as ``(N, out)``, DoRA scales ``c = m / ‖W + s·BA‖`` as ``(N, out)`` (1 for plain
adapters) — and each sample's factors are gathered by its slot: two products for the whole
batch (:func:`adapt.core.kernels.gathered_low_rank`), whatever the number of adapters, instead
of one pair of products and one scattered sum per adapter. DoRA's effect is
``c ⊙ s·BAx + (c − 1) ⊙ x Wᵀ``, the base output without its bias. In no-grad forwards the stacks are cached on the layer for the last
mix of adapters while no factor, scaling or magnitude changes (each tensor's version counter is
part of the key); with gradients they are built (differentiably) per forward.

Falls back to the per-adapter path (None) for what it does not cover: active dropout,
variants other than DoRA, embeddings (a different layer class), merged adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from adapt.core.kernels import gathered_low_rank, stack_factors
from adapt.core.lowrank_linear import scaling_stamp
from adapt.core.routing import Gathered

from .dora import DoraVariant
from .lora_bias import lora_bias_of

if TYPE_CHECKING:
    from .layer import LoraLayer

__all__ = ["add_gathered_effect", "gathered_effect"]

CACHE = "_lora_gathered_stacks"


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def supported(layer: LoraLayer, names: tuple[str, ...]) -> bool:
    if layer.merged_adapters or not set(names) <= layer.lora_A.keys():
        return False
    if layer.training and any(layer.dropout_active(n) for n in names):
        return False
    variants = layer.lora_variant
    return not any(n in variants and not isinstance(variants[n], DoraVariant) for n in names)


def _tensors(layer: LoraLayer, names: tuple[str, ...]) -> list[torch.Tensor]:
    """Every tensor the stacks of ``names`` are made of."""
    tensors: list[torch.Tensor] = []
    for name in names:
        tensors += [_weight(layer.lora_A[name]), _weight(layer.lora_B[name])]
        bias = lora_bias_of(layer, name)
        if bias is not None:
            tensors.append(bias)
        if name in layer.lora_variant:
            tensors += [
                layer.lora_variant[name].magnitude(layer, name),  # type: ignore[attr-defined]
                _weight(layer.get_base_layer()),
            ]
    return tensors


def _stamp(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(t._version, t.data_ptr()) for t in tensors]


def _scalings(layer: LoraLayer, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(scaling_stamp(layer.scaling[n]) for n in names)


def invalidate(layer: LoraLayer) -> None:
    """Forget the cached stacks (an adapter was added to or deleted from the layer)."""
    if getattr(layer, CACHE, None) is not None:
        setattr(layer, CACHE, None)


def _fresh(cached: Any, layer: LoraLayer, names: tuple[str, ...]) -> bool:
    """Whether the cache holds the stacks of ``names`` made of tensors unchanged since (same
    versions and storage; the tensors themselves are kept: the layer's adapters did not change,
    or :func:`invalidate` would have cleared it) and the same scalings."""
    if cached is None or cached["names"] != names:
        return False
    if cached["scalings"] != _scalings(layer, names):
        return False
    return all(
        t._version == v and t.data_ptr() == p
        for t, (v, p) in zip(cached["tensors"], cached["stamp"], strict=True)
    )


def stacks(layer: LoraLayer, names: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    """The stacked factors (cached in no-grad forwards, see the module doc)."""
    if torch.is_grad_enabled():
        return _build(layer, names)
    cached: Any = getattr(layer, CACHE, None)
    if torch.compiler.is_compiling():
        # a prepared model (prepare_mixed_batches_for_compile): refreshed before the graph runs
        if cached is not None and cached["names"] == names:
            return cast("dict[str, torch.Tensor | None]", cached["built"])
        return _build(layer, names)
    if _fresh(cached, layer, names):
        return cast("dict[str, torch.Tensor | None]", cached["built"])
    built = _build(layer, names)
    if cached is not None and cached["names"] == names and _same_shapes(cached["built"], built):
        for name, tensor in built.items():  # in place: a compiled graph holds these tensors
            if tensor is not None:
                cast(torch.Tensor, cached["built"][name]).copy_(tensor)
        built = cached["built"]
    tensors = _tensors(layer, names)
    entry = {"names": names, "tensors": tensors, "stamp": _stamp(tensors),
             "scalings": _scalings(layer, names), "built": built}  # fmt: skip
    setattr(layer, CACHE, entry)  # one mix per layer: the last one
    return built


def _same_shapes(old: dict[str, torch.Tensor | None], new: dict[str, torch.Tensor | None]) -> bool:
    def shape(t: torch.Tensor | None) -> Any:
        return None if t is None else (t.shape, t.dtype, t.device)

    return old.keys() == new.keys() and all(shape(old[k]) == shape(new[k]) for k in old)


def _build(layer: LoraLayer, names: tuple[str, ...]) -> dict[str, torch.Tensor | None]:
    a_list = [_weight(layer.lora_A[n]) for n in names]
    b_list = [_weight(layer.lora_B[n]) * layer.scaling[n] for n in names]
    a, b = stack_factors(a_list, b_list)
    out: dict[str, torch.Tensor | None] = {"A": a, "B": b}
    biases = [lora_bias_of(layer, n) for n in names]
    out["bias"] = None
    if any(b is not None for b in biases):
        zeros = torch.zeros(layer.out_features, dtype=b_list[0].dtype, device=b_list[0].device)
        out["bias"] = torch.stack(
            [
                zeros if b is None else b * layer.scaling[n]
                for b, n in zip(biases, names, strict=True)
            ]
        )
    out["c"] = None
    if any(n in layer.lora_variant for n in names):
        ones = torch.ones(layer.out_features, dtype=b_list[0].dtype, device=b_list[0].device)
        scales = [
            layer.lora_variant[n].scale(layer, n).to(ones.dtype)  # type: ignore[attr-defined]
            if n in layer.lora_variant
            else ones
            for n in names
        ]
        out["c"] = torch.stack(scales)
    return out


def gathered_effect(
    layer: LoraLayer, x: torch.Tensor, gathered: Gathered, base_output: torch.Tensor
) -> torch.Tensor | None:
    """Every selected row's adapter effect at once (see the module doc), or None."""
    names = gathered.adapters
    if x.dim() < 2 or not supported(layer, names):
        return None
    parts = stacks(layer, names)
    a, b = cast(torch.Tensor, parts["A"]), cast(torch.Tensor, parts["B"])
    slots = gathered.slots
    rows = x.shape[0]
    y = gathered_low_rank(x, a, b, slots).reshape(rows, -1, b.shape[2])  # (rows, tokens, out)
    bias = parts["bias"]
    if bias is not None:
        y = y + bias.index_select(0, slots).unsqueeze(1).to(y.dtype)
    c = parts["c"]
    if c is not None:
        base = gathered.select(base_output).reshape(rows, -1, y.shape[-1])
        base_bias = layer.bias
        if base_bias is not None:
            base = base - base_bias.to(base.dtype)
        c_rows = c.index_select(0, slots).unsqueeze(1).to(y.dtype)
        y = c_rows * y + (c_rows - 1) * base.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def add_gathered_effect(
    layer: LoraLayer, result: torch.Tensor, x: torch.Tensor, gathered: Gathered
) -> torch.Tensor | None:
    """Plain adapters' gathered product added into the base output in place (one ``baddbmm_``
    instead of a product-sized buffer and a sum), or None (DoRA, LoRA biases, other dtypes)."""
    names = gathered.adapters
    if x.dim() < 2 or not result.is_contiguous() or not supported(layer, names):
        return None
    if torch.is_grad_enabled():
        # decided before the stacks are built: with gradients they are built per call
        plain = all(n not in layer.lora_variant and lora_bias_of(layer, n) is None for n in names)
        if not plain or result.dtype != _weight(layer.lora_B[names[0]]).dtype:
            return None
    parts = stacks(layer, names)  # no grad: cached, and read again by gathered_effect
    a, b = cast(torch.Tensor, parts["A"]), cast(torch.Tensor, parts["B"])
    if parts["bias"] is not None or parts["c"] is not None or result.dtype != b.dtype:
        return None
    return gathered_low_rank(x, a, b, gathered.slots, out=result)
