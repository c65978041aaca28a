"""Per-call state the model hands down to its adapter layers (mixed-batch routing).

The per-sample adapter names of a mixed-batch forward live in a ``ContextVar``: each thread
(and each asyncio task) sees only its own call's names, so two threads running the same model
with different ``adapter_names`` get their own outputs.

``torch.compile`` cannot trace ``ContextVar.get`` (a graph break in every adapter layer). So
the layers first read :data:`_routes_in_flight`, a plain module global that dynamo guards on:
while no mixed-batch forward runs anywhere in the process (the common case, and always in a
compiled graph, see ``AdaptedModel.forward``) it is 0 and the ContextVar is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Collection, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch

BASE = "__base__"

_batch_route: ContextVar[BatchRoute | None] = ContextVar("adapt_batch_route", default=None)
#: How many ``route_batch`` blocks are open, in every thread together (see module doc).
_routes_in_flight = 0
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Gathered:
    """The rows of a mixed batch that one layer's adapters serve, gathered once per forward.

    ``adapters``: the layer's adapters the batch uses, in order of first appearance; ``slots``:
    for each selected row, its adapter's position in ``adapters`` (int64, on the batch's
    device); ``rows``: the selected rows' indices, or None when every row is selected (no
    sample goes to :data:`BASE` or to an adapter the layer lacks) — then ``slots`` covers the
    whole batch in order."""

    adapters: tuple[str, ...]
    slots: torch.Tensor
    rows: torch.Tensor | None

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """The selected rows of ``tensor`` (batch on dim 0): ``tensor`` itself when all are."""
        return tensor if self.rows is None else tensor.index_select(0, self.rows)


class BatchRoute:
    """One mixed-batch forward's per-sample adapter names, and the index tensors built from
    them — once per forward and device, shared by every layer with the same adapters (the
    layers of a model usually all have the same)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._groups: dict[Any, list[tuple[str, torch.Tensor]]] = {}
        self._gathered: dict[Any, Gathered | None] = {}

    def groups(
        self, known: Collection[str], device: torch.device
    ) -> list[tuple[str, torch.Tensor]]:
        """``(adapter name, sample indices)`` for each adapter of ``known`` named in the batch,
        in order of first appearance; samples of :data:`BASE` and of unknown names are left out."""
        key = (frozenset(known), device)
        found = self._groups.get(key)
        if found is None:
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                if name != BASE and name in known:
                    rows.setdefault(name, []).append(i)
            found = [(n, torch.tensor(r, device=device)) for n, r in rows.items()]
            self._groups[key] = found
        return found

    def gathered(self, known: Collection[str], device: torch.device) -> Gathered | None:
        """The rows ``known`` adapters serve and their slots; None when none is used."""
        key = (frozenset(known), device)
        if key not in self._gathered:
            self._gathered[key] = self._gather(known, device)
        return self._gathered[key]

    def _gather(self, known: Collection[str], device: torch.device) -> Gathered | None:
        adapters: dict[str, int] = {}
        rows, slots = [], []
        for i, name in enumerate(self.names):
            if name == BASE or name not in known:
                continue
            rows.append(i)
            slots.append(adapters.setdefault(name, len(adapters)))
        if not rows:
            return None
        every = len(rows) == len(self.names)
        index = None if every else torch.tensor(rows, device=device)
        return Gathered(tuple(adapters), torch.tensor(slots, device=device), index)


def current_route() -> BatchRoute | None:
    """The routing of the mixed-batch forward in progress, or None."""
    if not _routes_in_flight:
        return None
    return _batch_route.get()


def current_adapter_names() -> Sequence[str] | None:
    """The per-sample adapter names of the forward in progress, or None."""
    route = current_route()
    return None if route is None else route.names


@contextlib.contextmanager
def route_batch(adapter_names: Sequence[str] | None) -> Iterator[None]:
    global _routes_in_flight
    token = _batch_route.set(None if adapter_names is None else BatchRoute(adapter_names))
    with _lock:
        _routes_in_flight += 1
    try:
        yield
    finally:
        with _lock:
            _routes_in_flight -= 1
        _batch_route.reset(token)


def rows_of(inputs: Any, index: torch.Tensor) -> Any:
    """The samples ``index`` of an input, or of each tensor of a tuple of inputs."""
    if isinstance(inputs, tuple):
        return tuple(rows_of(t, index) for t in inputs)
    return inputs.index_select(0, index) if isinstance(inputs, torch.Tensor) else inputs


def put_rows(inputs: Any, index: torch.Tensor, rows: Any) -> Any:
    """``inputs`` with the samples ``index`` replaced by ``rows`` (out of place)."""
    if isinstance(inputs, tuple):
        return tuple(put_rows(t, index, r) for t, r in zip(inputs, rows, strict=True))
    if not isinstance(inputs, torch.Tensor):
        return inputs
    return inputs.index_copy(0, index, rows.to(inputs.dtype))
