"""``add_weighted_adapter``: a new adapter that combines existing ones, weighted.

Core checks the call (names, weights, one method) and owns the all-or-nothing add; the math is
the method's (:meth:`~adapt.core.method.Method.combine_adapters`), so core knows no method. The
result is an ordinary adapter: added from the config the method returns (the usual add path;
its initialisation draws from the global RNG first, as in PEFT), then its tensors computed and
loaded with every tensor checked, together with the shared tensors the new adapter uses in the
model (:meth:`~adapt.core.method.Method.extra_state`, e.g. VeRA's basis); on any error the model
is as it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from . import injection, state_dict
from .adapters import AdapterSet
from .errors import AdapterStateError, ConfigError
from .method import CombineOptions

__all__ = ["CombineOptions", "add_weighted_adapter"]

PREFIX = "base_model.model."


def add_weighted_adapter(
    adapters: AdapterSet,
    sources: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    options: CombineOptions,
) -> None:
    """Add ``adapter_name``: ``sources`` combined with ``weights`` as ``options`` say."""
    names = check_sources(adapters, sources)
    values = check_weights(weights, len(names))
    check_new_name(adapters, adapter_name)
    method = adapters.method_of(names[0])
    for name in names[1:]:
        other = adapters.method_of(name)
        if other.name != method.name:
            raise ConfigError(
                f"add_weighted_adapter: adapters of one method only; {names[0]!r} is "
                f"{method.name}, {name!r} is {other.name}"
            )
    config, compute = method.combine_adapters(adapters.view, names, values, options)
    injection.add_adapter(adapters, adapter_name, config)
    try:
        loaded = {PREFIX + key: value for key, value in compute().items()}
        with warnings.catch_warnings():  # what it says about saving, save_pretrained says
            warnings.simplefilter("ignore")
            shared = method.extra_state(adapters.view, adapter_name)
        for key, tensor in shared.items():  # the shared tensors it uses, as a load brings them
            loaded.setdefault(f"base_model.{key}", tensor)
        state_dict.load_state_dict_into(adapters, loaded, adapter_name)
    except BaseException:
        injection.delete_adapter(adapters, adapter_name)
        raise


def check_sources(adapters: AdapterSet, sources: Sequence[str]) -> list[str]:
    if isinstance(sources, str) or not isinstance(sources, Sequence):
        raise ConfigError(
            f"add_weighted_adapter: adapters must be a list of adapter names, got {sources!r}; "
            "e.g. add_weighted_adapter(['a', 'b'], [0.7, 0.3], 'ab')"
        )
    names = list(sources)
    if not names:
        raise ConfigError("add_weighted_adapter: adapters is empty; name at least one adapter")
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"add_weighted_adapter: adapter names are strings, got {name!r}")
        adapters.require(name)
    return names


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ConfigError(
            f"add_weighted_adapter: weights must be a list of numbers, got {weights!r}"
        )
    if len(weights) != count:
        raise ConfigError(
            f"add_weighted_adapter: {len(weights)} weights for {count} adapters; give one "
            "weight per adapter, in the same order"
        )
    values = []
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"add_weighted_adapter: weights are numbers, got {weight!r}")
        if not math.isfinite(weight):
            raise ConfigError(f"add_weighted_adapter: weights must be finite, got {weight!r}")
        values.append(float(weight))
    return values


def check_new_name(adapters: AdapterSet, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ConfigError(
            f"add_weighted_adapter: adapter_name must be a non-empty string, got {adapter_name!r}"
        )
    if adapter_name in adapters.configs:
        raise AdapterStateError(
            f"add_weighted_adapter: an adapter named {adapter_name!r} exists already (PEFT "
            "silently does nothing here); pick a new name or delete_adapter() it first"
        )
