"""Mixed batches in an adapter layer: one adapter per sample (``adapter_names=``).

The base layer runs once on the whole batch. A layer's adapters that add to the output then
serve their rows either all at once (:meth:`AdapterLayer.gathered_adapter_effect`: stacked
factors, one gathered product, added to the rows in place where the base output allows it) or
one adapter at a time (its rows selected, its effect added). The row indices come from the
forward's :class:`~adapt.core.routing.BatchRoute`, built once per forward, not per layer.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import AdapterStateError
from .routing import BatchRoute, put_rows, rows_of

__all__ = ["add_per_adapter", "mixed_batch_forward", "mixed_per_adapter"]


def mixed_batch_forward(
    layer: Any, x: torch.Tensor, route: BatchRoute, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """A layer's forward for a mixed batch (one adapter name per sample, ``route``)."""
    if layer.merged:
        raise AdapterStateError(
            "a mixed-batch forward (adapter_names=...) needs unmerged adapters; call "
            "unmerge_adapter() first"
        )
    if len(route.names) != x.shape[0]:
        raise ValueError(
            f"adapter_names has {len(route.names)} entries but the batch has {x.shape[0]} "
            "samples; give one adapter name (or '__base__') per sample"
        )
    inputs = (x, *args) if layer.takes_all_inputs else x
    if layer._transforms_input or layer.composition != "sum":
        return mixed_per_adapter(layer, inputs, route, x.device, args, kwargs)
    result: torch.Tensor = layer._base_forward(inputs, args, kwargs)
    gathered = route.gathered(layer.adapter_names, x.device)
    if gathered is None:
        return result
    if gathered.rows is None and len(gathered.adapters) == 1:
        # the whole batch on one adapter: the single-adapter path (fused, in place)
        name = gathered.adapters[0]
        if layer._add_sees_base:
            return layer.add_adapter_output(result, inputs, name, base_output=result)  # type: ignore[no-any-return]
        return layer.add_adapter_output(result, inputs, name)  # type: ignore[no-any-return]
    in_place = layer.may_add_in_place(result)
    if gathered.rows is None and in_place:
        added = layer.add_gathered_adapter_effect(result, inputs, gathered)
        if added is not None:
            return added  # type: ignore[no-any-return]
    effect = layer.gathered_adapter_effect(
        rows_of(inputs, gathered.rows) if gathered.rows is not None else inputs,
        gathered,
        result,
    )
    if effect is None:
        return add_per_adapter(layer, result, inputs, route, x.device)
    effect = effect.to(result.dtype)
    if gathered.rows is None:
        return result.add_(effect) if in_place else result + effect
    if in_place:
        return result.index_add_(0, gathered.rows, effect)
    return result.index_add(0, gathered.rows, effect)


def add_per_adapter(
    layer: Any, result: torch.Tensor, inputs: Any, route: BatchRoute, device: torch.device
) -> torch.Tensor:
    """``result`` plus each adapter's effect on its rows, one adapter at a time (rows of
    different adapters are disjoint, so adding in place leaves the others' base rows)."""
    in_place = layer.may_add_in_place(result)
    for name, index in route.groups(layer.adapter_names, device):
        effect = layer.adapter_effect(rows_of(inputs, index), name, result.index_select(0, index))
        if effect is None:
            continue
        if in_place:
            result.index_add_(0, index, effect.to(result.dtype))
        else:
            result = result.index_add(0, index, effect.to(result.dtype))
    return result


def mixed_per_adapter(
    layer: Any,
    inputs: Any,
    route: BatchRoute,
    device: torch.device,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Layers that transform their input or multiply their output, per adapter."""
    groups = route.groups(layer.adapter_names, device)
    seen = inputs
    if layer._transforms_input:
        for name, index in groups:
            seen = put_rows(seen, index, layer.adapter_input(rows_of(inputs, index), name))
    result: torch.Tensor = layer._base_forward(seen, args, kwargs)
    base_out = result
    for name, index in groups:
        effect = layer.adapter_effect(rows_of(inputs, index), name, base_out.index_select(0, index))
        if effect is None:
            continue
        if layer.composition == "product":
            rows = (result.index_select(0, index) * effect).to(result.dtype)
            result = result.index_copy(0, index, rows)
        else:
            result = result.index_add(0, index, effect.to(result.dtype))
    return result
