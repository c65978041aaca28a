"""adapt discovers the plugin through its entry points: no import, no registration by hand."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys

import pytest
from torch import nn

from adapt.core import get_registry
from adapt.core.testing import isolated_registry

DIST = "adapt-gated-linear"


def entry(group: str, name: str):  # type: ignore[no-untyped-def]
    found = {e.name: e for e in get_registry().entries(group)}
    assert name in found, f"{name!r} not among {sorted(found)} in {group}"
    return found[name]


def test_layer_entry_point() -> None:
    from adapt_gated_linear import GatedLoraLinear

    layer = entry("adapt.layers", "gated-lora-linear")
    assert layer.distribution == DIST
    assert layer.version == metadata.version(DIST)
    assert layer.obj is GatedLoraLinear
    assert layer.error is None
    assert get_registry().status_of(layer) == "ok"


def test_backend_entry_point() -> None:
    from adapt_gated_linear import GatedLinearBackend

    backend = entry("adapt.backends", "gated-linear")
    assert backend.distribution == DIST
    assert backend.error is None
    assert isinstance(backend.obj, GatedLinearBackend) or backend.obj is GatedLinearBackend
    assert get_registry().status_of(backend) == "ok"


def test_registry_resolves_gated_linear() -> None:
    from adapt_gated_linear import GatedLinear, GatedLinearBackend, GatedLoraLinear

    module = GatedLinear(4, 3)
    assert get_registry().resolve_layer("lora", module) is GatedLoraLinear
    assert isinstance(get_registry().resolve_backend(module), GatedLinearBackend)
    # the plugin claims nothing else: nn.Linear still goes to adapt-lora's layer
    assert get_registry().resolve_layer("lora", nn.Linear(4, 3)) is not GatedLoraLinear


def test_without_the_plugin_adapt_says_what_is_missing() -> None:
    from adapt_gated_linear import GatedLinear

    from adapt.core import TargetError, adapt
    from adapt.lora import METHOD, LoraConfig

    with isolated_registry() as registry:  # sees no installed entry point at all
        registry.register_method(METHOD)
        model = nn.Sequential(GatedLinear(4, 3))
        with pytest.raises(TargetError, match="no installed lora layer can adapt"):
            adapt(model, LoraConfig(r=2, target_modules=["0"]))


def test_adapt_plugins_lists_the_plugin() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adapt.core.cli", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {tuple(line.split()[:3]): line.split()[-1] for line in out.splitlines()[2:] if line}
    assert rows[("layers", "gated-lora-linear", DIST)] == "ok", out
    assert rows[("backends", "gated-linear", DIST)] == "ok", out
