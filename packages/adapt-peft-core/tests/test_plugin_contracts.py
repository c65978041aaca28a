"""Plugins are checked against their group's contract when they load: a broken one shows as
``invalid: <reason>`` in ``adapt plugins`` (``--check`` exits 1), is skipped, and the error of
whatever needed it names its distribution and what is wrong; everything else keeps working."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from test_registry import FakeEntryPoint, fake_eps, fake_method  # noqa: F401 (a fixture)
from torch import nn

from adapt.core import AdaptedModel, MissingMethodError, TargetError
from adapt.core.cli import main as adapt_cli
from adapt.core.registry import (
    GROUP_BACKENDS,
    GROUP_LAYERS,
    GROUP_METHODS,
    Registry,
    swap_registry,
)
from adapt.core.testing import ToyConfig, ToyLayer


class Knot(nn.Module):
    """A module type no installed layer or backend serves."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class NotALayer(nn.Module):
    method: ClassVar[str] = "toy"
    base_types: ClassVar[tuple[type | str, ...]] = (Knot,)


class NoMethodLayer(ToyLayer):
    method: ClassVar[str] = ""
    base_types: ClassVar[tuple[type | str, ...]] = (Knot,)


class NoLossyBackend:
    base_types: ClassVar[tuple[type | str, ...]] = (Knot,)

    def shape(self, base: nn.Module) -> tuple[int, int]:
        return 4, 3

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        return base.weight

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> Any:
        return None

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return torch.float32


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.knot = Knot()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.knot(self.lin(x))


@pytest.fixture
def broken(fake_eps: dict[str, Any]) -> Iterator[Registry]:  # noqa: F811
    """A process-wide registry whose entry points hold one plugin of each broken kind, next to
    working toy plugins."""
    fake_eps[GROUP_METHODS] += [
        FakeEntryPoint("toy", obj=fake_method("toy", "TOY"), dist_name="adapt-toy"),
        FakeEntryPoint("not-a-method", obj=object(), dist_name="adapt-oddity"),
    ]
    fake_eps[GROUP_LAYERS] += [
        FakeEntryPoint("toy-linear", obj=ToyLayer, dist_name="adapt-toy"),
        FakeEntryPoint("knot-module", obj=NotALayer, dist_name="adapt-knots"),
        FakeEntryPoint("knot-nomethod", obj=NoMethodLayer, dist_name="adapt-knots"),
    ]
    fake_eps[GROUP_BACKENDS] += [
        FakeEntryPoint("knot-backend", obj=NoLossyBackend, dist_name="adapt-knots"),
    ]
    registry = Registry()
    previous = swap_registry(registry)
    try:
        yield registry
    finally:
        swap_registry(previous)


def _statuses(registry: Registry) -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            e.name: registry.status_of(e)
            for group in (GROUP_METHODS, GROUP_LAYERS, GROUP_BACKENDS)
            for e in registry.entries(group)
        }


def test_each_broken_contract_is_invalid_with_its_reason(broken: Registry) -> None:
    with pytest.warns(RuntimeWarning, match=r"adapt-knots 2\.3: it is invalid"):
        broken.entries(GROUP_LAYERS)
    status = _statuses(broken)
    assert status["toy"] == "ok" and status["toy-linear"] == "ok"
    assert status["not-a-method"] == (
        "invalid: builtins.object is not an adapt.core.Method (a method plugin names a Method "
        "instance or subclass)"
    )
    assert status["knot-module"] == (
        "invalid: test_plugin_contracts.NotALayer is not a subclass of adapt.core.AdapterLayer "
        "(a layer plugin names the class; subclass the method's layer base, e.g. "
        "adapt.lora.LoraLayer)"
    )
    assert status["knot-nomethod"].startswith(
        "invalid: test_plugin_contracts.NoMethodLayer.method is empty"
    )
    assert status["knot-backend"] == (
        "invalid: test_plugin_contracts.NoLossyBackend is not a weight backend: it lacks lossy "
        "(the members of adapt.core.WeightBackend)"
    )


def test_using_a_broken_plugin_names_its_distribution(broken: Registry) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MissingMethodError, match=r"adapt-oddity 2\.3.*is invalid: builtins"):
            broken.get_method("not-a-method")
        host = Host()
        with pytest.raises(TargetError) as info:
            AdaptedModel(host, ToyConfig(target_modules=["knot"]))
    message = str(info.value)
    assert "knot is a test_plugin_contracts.Knot, which no installed toy layer can adapt" in message
    assert "'knot-module' (adapt-knots 2.3): invalid:" in message
    assert "'knot-nomethod' (adapt-knots 2.3): invalid:" in message
    assert isinstance(host.knot, Knot)  # nothing applied
    # everything else keeps working
    model = AdaptedModel(Host(), ToyConfig(target_modules=["lin"]))
    assert type(model.model.lin) is ToyLayer


def test_a_missing_backend_names_the_invalid_one(broken: Registry) -> None:
    class KnotToy(ToyLayer):
        base_types: ClassVar[tuple[type | str, ...]] = (Knot,)

    broken.register_layer(KnotToy, name="knot-toy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TargetError) as info:
            AdaptedModel(Host(), ToyConfig(target_modules=["knot"]))
    assert "'knot-backend' (adapt-knots 2.3): invalid: " in str(info.value)
    assert "it lacks lossy" in str(info.value)


def _run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = adapt_cli(["plugins", *args])
    return code, out.getvalue()


def test_adapt_plugins_check_exits_non_zero_on_invalid_plugins(broken: Registry) -> None:
    code, out = _run_cli()
    assert code == 0
    assert "4 plugin(s) are invalid (see their status); they are skipped." in out
    assert "invalid: builtins.object is not an adapt.core.Method" in out
    code, out = _run_cli("--check")
    assert code == 1 and "adapt plugins --check: FAILED" in out


def test_adapt_plugins_check_passes_when_every_plugin_is_valid(
    fake_eps: dict[str, Any],  # noqa: F811
) -> None:
    fake_eps[GROUP_METHODS].append(FakeEntryPoint("toy", obj=fake_method("toy", "TOY")))
    fake_eps[GROUP_LAYERS].append(FakeEntryPoint("toy-linear", obj=ToyLayer))
    previous = swap_registry(Registry())
    try:
        code, out = _run_cli("--check")
    finally:
        swap_registry(previous)
    assert code == 0 and "invalid" not in out and "FAILED" not in out


def test_in_process_registration_refuses_the_same_contracts() -> None:
    from adapt.core import PluginError

    registry = Registry()
    with pytest.raises(PluginError, match=r"NoLossyBackend cannot be registered: .*lacks lossy"):
        registry.register_backend(NoLossyBackend())  # type: ignore[arg-type]
    with pytest.raises(PluginError, match=r"is not a subclass of adapt\.core\.AdapterLayer"):
        registry.register_layer(NotALayer)  # type: ignore[arg-type]
