"""Progress bars for long work (loading, merging): shown on a terminal, silent elsewhere."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    *,
    desc: str,
    unit: str = "it",
    enable: bool | None = None,
    min_items: int = 16,
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar when ``enable`` (None: only on a terminal and for
    at least ``min_items`` items)."""
    seq = list(items)
    if enable is False or (enable is None and len(seq) < min_items):
        yield from seq
        return
    from tqdm.auto import tqdm

    yield from tqdm(seq, desc=desc, unit=unit, disable=None if enable is None else not enable)
