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
from .fixed_mixing import ATTRIBUTE as FIXED_MIXING
from .fixed_mixing import FixedMixing
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


def prepare_fixed(adapters: AdapterSet) -> FixedMixing:
    """Fix the adapters mixed batches may name and give every layer the routing tensors."""
    if any(layer.merged for _, layer in adapters.layers()):
        raise AdapterStateError(
            "prepare_mixed_batches_for_compile needs unmerged adapters; call unmerge_adapter() "
            "first"
        )
    mixing = FixedMixing(list(adapters.configs))
    for _, layer in adapters.layers():
        setattr(layer, FIXED_MIXING, mixing)
    return mixing


def _enter_fixed(adapters: AdapterSet, mixing: FixedMixing, names: Sequence[str]) -> None:
    check_batch_names(adapters, names)
    layers = [layer for _, layer in adapters.layers()]
    if any(getattr(layer, FIXED_MIXING, None) is not mixing for layer in layers):
        raise AdapterStateError(
            "the model's adapter layers changed since prepare_mixed_batches_for_compile(); "
            "call it again"
        )
    device = next((p.device for layer in layers for p in layer.parameters()), torch.device("cpu"))
    mixing.fill(names, layers, device)
    with torch.no_grad():
        for layer in layers:
            layer.refresh_gathered(mixing.key_of(layer))
    mixing.on = True


def _exit_fixed(mixing: FixedMixing) -> None:
    mixing.on = False


enter_fixed: Callable[[AdapterSet, FixedMixing, Sequence[str]], None] = _disable(_enter_fixed)
exit_fixed: Callable[[FixedMixing], None] = _disable(_exit_fixed)
