"""adapt-lora discovers the variant through its entry point; without it, a clear error."""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import io
import subprocess
import sys

import pytest
from torch import nn

from adapt.core import PluginError, adapt, get_registry
from adapt.core.testing import isolated_registry
from adapt.lora import METHOD, VARIANT_GROUP, LoraConfig, LoraLinear, get_variant

DIST = "adapt-example-scaled-lora"


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.target = nn.Linear(4, 3)


def test_variant_entry_point() -> None:
    from adapt_example_scaled_lora import ScaledLora

    assert VARIANT_GROUP == "adapt.lora_variants"
    found = {e.name: e for e in get_registry().entries(VARIANT_GROUP)}
    entry = found["scaled"]
    assert entry.distribution == DIST
    assert entry.version == metadata.version(DIST)
    assert entry.value == "adapt_example_scaled_lora:ScaledLora"
    assert get_variant("scaled") is get_variant("scaled")  # one instance serves every layer
    assert isinstance(get_variant("scaled"), ScaledLora)
    assert entry.error is None and not entry.broken
    assert get_registry().status_of(entry) == "ok"


def test_a_missing_variant_is_a_clear_plugin_error() -> None:
    # what a user without this package sees: an isolated registry reads no entry point
    with isolated_registry() as registry:
        registry.register_method(METHOD)
        registry.register_layer(LoraLinear, name="lora-linear")
        host = Host()
        with pytest.raises(PluginError) as info:
            adapt(host, LoraConfig(r=2, target_modules=["target"], variant="scaled"))
        assert type(host.target) is nn.Linear  # refused before anything changed
    message = str(info.value)
    assert "no LoRA variant named 'scaled' is installed" in message
    assert "'adapt.lora_variants'" in message
    assert "available: dora" in message


def test_an_unknown_variant_names_the_installed_ones() -> None:
    with pytest.raises(PluginError, match=r"adapt\.lora_variants.*available: .*scaled"):
        adapt(Host(), LoraConfig(r=2, target_modules=["target"], variant="no-such-variant"))


def plugin_rows(out: str) -> dict[tuple[str, str, str], str]:
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    return {(r[0], r[1], r[2]): " ".join(r[4:]) for r in rows if len(r) >= 5}


def test_adapt_plugins_lists_the_variant() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adapt.core.cli", "plugins", "--check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert plugin_rows(out)[("lora_variants", "scaled", DIST)] == "ok", out


def test_adapt_plugins_from_python() -> None:
    from adapt.core.cli import main as adapt_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        adapt_cli(["plugins"])
    line = next(line for line in out.getvalue().splitlines() if f" {DIST} " in line)
    assert line.split() == ["lora_variants", "scaled", DIST, metadata.version(DIST), "ok"]
