"""adapt discovers the method and the layer through their entry points."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys

from torch import nn

from adapt.core import get_registry

DIST = "adapt-example-ia3"


def test_method_entry_point() -> None:
    from adapt_example_ia3 import METHOD, IA3Config

    found = {e.name: e for e in get_registry().entries("adapt.methods")}
    entry = found["ia3"]
    assert entry.distribution == DIST
    assert entry.version == metadata.version(DIST)
    assert entry.obj is METHOD and entry.error is None
    # by name, and by the peft_type an adapter_config.json carries
    assert get_registry().get_method("ia3") is METHOD
    assert get_registry().get_method("IA3") is METHOD
    assert METHOD.config_class is IA3Config


def test_layer_entry_point_serves_linear_and_conv1d() -> None:
    from adapt_example_ia3 import IA3Linear
    from transformers.pytorch_utils import Conv1D

    found = {e.name: e for e in get_registry().entries("adapt.layers")}
    assert found["ia3-linear"].distribution == DIST
    assert get_registry().status_of(found["ia3-linear"]) == "ok"
    assert get_registry().resolve_layer("ia3", nn.Linear(4, 3)) is IA3Linear
    assert get_registry().resolve_layer("ia3", Conv1D(3, 4)) is IA3Linear
    assert get_registry().resolve_layer("ia3", nn.Embedding(4, 3)) is None


def test_adapt_plugins_lists_the_plugin() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adapt.core.cli", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {tuple(line.split()[:3]): line.split()[-1] for line in out.splitlines()[2:] if line}
    assert rows[("methods", "ia3", DIST)] == "ok", out
    assert rows[("layers", "ia3-linear", DIST)] == "ok", out
