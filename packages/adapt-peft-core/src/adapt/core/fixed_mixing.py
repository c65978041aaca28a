"""Mixed batches with fixed shapes, for ``torch.compile``: the mix is data, not code.

``AdaptedModel.prepare_mixed_batches_for_compile()`` fixes the set of adapters a mixed batch
may name (the model's adapters at that moment, in order). From then on, a mixed-batch forward
turns ``adapter_names`` into index tensors *outside* the compiled graph (:func:`enter`, a graph
break) and fills them in place into tensors the layers read, so the graph sees the same tensors
with other values: a new mix runs the graph already compiled — no recompile. Every layer adds
every row's adapter effect through its :meth:`~adapt.core.layer.AdapterLayer.
gathered_adapter_effect` over all rows, times a 0/1 mask (rows for ``__base__``, or for an
adapter the layer does not have, get exact zeros added). A new batch size gets new tensors
(one compile per batch size, as for any compiled model); adding or deleting an adapter needs a
new call to ``prepare_mixed_batches_for_compile`` (the graphs are recompiled then).

The layers find the routing through a plain attribute (:data:`ATTRIBUTE`); a Python flag on it
says whether a mixed forward is in progress (two graphs: mixed and not).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .errors import AdapterStateError
from .routing import BASE, Gathered

__all__ = ["ATTRIBUTE", "FixedMixing", "fixed_mixed_forward"]

#: the layer attribute holding the model's :class:`FixedMixing` (None: not prepared)
ATTRIBUTE = "fixed_mixing"


class FixedMixing:
    """The routing tensors of a prepared model's mixed batches (one per adapter set)."""

    def __init__(self, adapters: Sequence[str]) -> None:
        self.adapters = tuple(adapters)
        self.on = False
        #: per layer adapter set: the Gathered the layers read (slots filled in place) and the
        #: row mask, as a (rows,) float tensor
        self.routes: dict[tuple[str, ...], tuple[Gathered, torch.Tensor]] = {}

    def key_of(self, layer: Any) -> tuple[str, ...]:
        return tuple(n for n in self.adapters if n in layer.adapter_names)

    def fill(self, names: Sequence[str], layers: Iterable[Any], device: torch.device) -> None:
        """Write the slots and masks of ``names`` (one per sample) for every layer's set."""
        unknown = sorted({n for n in names if n != BASE and n not in self.adapters})
        if unknown:
            raise AdapterStateError(
                f"adapter_names names {unknown}, which were not adapters of the model when "
                f"prepare_mixed_batches_for_compile() was called (it fixed {list(self.adapters)}); "
                "call it again after adding adapters"
            )
        for key in {self.key_of(layer) for layer in layers}:
            slots = [key.index(n) if n in key else 0 for n in names]
            mask = [1.0 if n in key else 0.0 for n in names]
            self._write(key, slots, mask, device)

    def _write(
        self, key: tuple[str, ...], slots: list[int], mask: list[float], device: torch.device
    ) -> None:
        new_slots = torch.tensor(slots, dtype=torch.int64, device=device)
        new_mask = torch.tensor(mask, dtype=torch.float32, device=device)
        held = self.routes.get(key)
        if held is not None and held[0].slots.shape == new_slots.shape:
            held[0].slots.copy_(new_slots)
            held[1].copy_(new_mask)
            return
        self.routes[key] = (Gathered(key, new_slots, None), new_mask)


def fixed_mixed_forward(
    layer: Any, x: torch.Tensor, mixing: FixedMixing, args: tuple[Any, ...], kwargs: Any
) -> torch.Tensor:
    """A prepared layer's mixed-batch forward: the base on the whole batch plus every row's
    effect (masked), through the layer's gathered path; fixed shapes throughout."""
    inputs = (x, *args) if layer.takes_all_inputs else x
    result: torch.Tensor = layer._base_forward(inputs, args, kwargs)
    key = mixing.key_of(layer)
    if not key:
        return result
    gathered, mask = mixing.routes[key]
    effect: torch.Tensor | None = layer.gathered_adapter_effect(inputs, gathered, result)
    if effect is None:
        raise AdapterStateError(
            f"{type(layer).__name__} cannot serve a prepared mixed batch now (dropout active, "
            "or a kind of adapter its gathered path does not cover); run it in eval mode, or "
            "without prepare_mixed_batches_for_compile()"
        )
    rows = mask.view(-1, *([1] * (effect.dim() - 1))).to(effect.dtype)
    return result + (effect * rows).to(result.dtype)
