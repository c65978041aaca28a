"""Mixed batches at the model level: one adapter name per sample (``adapter_names=``).

The names travel to the layers in a ContextVar (:mod:`adapt.core.routing`); under
``torch.compile`` the call that sets it is the one place an adapted forward breaks the graph —
it runs eagerly, everything around it stays compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .adapters import AdapterSet
from .errors import AdapterStateError
from .routing import BASE, route_batch


def check_batch_names(adapters: AdapterSet, adapter_names: Sequence[str]) -> None:
    """Refuse a string, unknown names, or merged adapters."""
    if isinstance(adapter_names, str):
        raise ValueError("adapter_names takes one adapter name per sample (a list), not a string")
    unknown = sorted({n for n in adapter_names if n != BASE and n not in adapters.configs})
    if unknown:
        raise AdapterStateError(
            f"adapter_names names unknown adapters {unknown}; known: "
            f"{sorted(adapters.configs)} (use '{BASE}' for the base model)"
        )
    if any(layer.merged for _, layer in adapters.layers()):
        raise AdapterStateError(
            "a mixed-batch forward (adapter_names=...) needs unmerged adapters; call "
            "unmerge_adapter() first"
        )


def _call_eager(
    adapters: AdapterSet, call: Callable[..., Any], names: Sequence[str], args: Any, kwargs: Any
) -> Any:
    check_batch_names(adapters, names)
    with route_batch(list(names)):
        return call(*args, **kwargs)


_disable: Any = torch.compiler.disable  # untyped in torch
#: ``call(*args, **kwargs)`` with per-sample adapters, run eagerly under ``torch.compile``.
call_mixed: Callable[[AdapterSet, Callable[..., Any], Sequence[str], Any, Any], Any] = _disable(
    _call_eager
)
