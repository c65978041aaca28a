"""Registry helpers for tests: an isolated, empty process-wide registry, and a layer class
registered above every other one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .. import registry as _registry_module
from ..layer import AdapterLayer
from ..registry import GROUP_LAYERS, Registry, get_registry


@contextlib.contextmanager
def isolated_registry() -> Iterator[Registry]:
    """Replace the process-wide registry with an empty one for the duration of the block.

    The replacement never reads entry points, so installed plugins (working or broken) are
    invisible; only in-process registrations count. The previous registry is restored after.
    """
    fresh = Registry(read_entry_points=False)
    previous = _registry_module.swap_registry(fresh)
    try:
        yield fresh
    finally:
        _registry_module.swap_registry(previous)


@contextlib.contextmanager
def registered_first(layer_cls: type[AdapterLayer], name: str) -> Iterator[str]:
    """Register ``layer_cls`` as ``name`` in the process-wide registry, above every other
    layer, for the duration of the block; yields ``name``."""
    reg = get_registry()
    reg.register_layer(layer_cls, name=name, priority=10**6)
    try:
        yield name
    finally:
        reg.unregister(GROUP_LAYERS, name)
