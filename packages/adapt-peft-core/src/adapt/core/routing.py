"""Per-call state the model hands down to its adapter layers (mixed-batch routing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

BASE = "__base__"

_batch_adapter_names: ContextVar[Sequence[str] | None] = ContextVar(
    "adapt_batch_adapter_names", default=None
)


def current_adapter_names() -> Sequence[str] | None:
    """The per-sample adapter names of the forward in progress, or None."""
    return _batch_adapter_names.get()


@contextlib.contextmanager
def route_batch(adapter_names: Sequence[str] | None) -> Iterator[None]:
    token = _batch_adapter_names.set(adapter_names)
    try:
        yield
    finally:
        _batch_adapter_names.reset(token)
