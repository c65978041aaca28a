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
import threading
from collections.abc import Container, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch

BASE = "__base__"

_batch_adapter_names: ContextVar[Sequence[str] | None] = ContextVar(
    "adapt_batch_adapter_names", default=None
)
#: How many ``route_batch`` blocks are open, in every thread together (see module doc).
_routes_in_flight = 0
_lock = threading.Lock()


def current_adapter_names() -> Sequence[str] | None:
    """The per-sample adapter names of the forward in progress, or None."""
    if not _routes_in_flight:
        return None
    return _batch_adapter_names.get()


@contextlib.contextmanager
def route_batch(adapter_names: Sequence[str] | None) -> Iterator[None]:
    global _routes_in_flight
    token = _batch_adapter_names.set(adapter_names)
    with _lock:
        _routes_in_flight += 1
    try:
        yield
    finally:
        with _lock:
            _routes_in_flight -= 1
        _batch_adapter_names.reset(token)


def sample_groups(
    batch_names: Sequence[str], known: Container[str], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(adapter name, sample indices)`` for each adapter of ``known`` named in a mixed batch,
    in order of first appearance; samples of :data:`BASE` and of unknown names are left out."""
    for name in dict.fromkeys(batch_names):
        if name == BASE or name not in known:
            continue
        yield name, torch.tensor([i for i, n in enumerate(batch_names) if n == name], device=device)


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
