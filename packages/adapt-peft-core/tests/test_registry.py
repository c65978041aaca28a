"""The plugin registry: lazy discovery, in-process registration, deterministic resolution,
broken plugins, missing methods and weight-backend resolution."""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from adapt.core import (
    AdapterLayer,
    DenseBackend,
    Method,
    MissingMethodError,
    PluginError,
    TargetError,
)
from adapt.core import plugins as plugins_mod
from adapt.core.backends import MergeReport, mro_distance
from adapt.core.registry import (
    GROUP_BACKENDS,
    GROUP_LAYERS,
    GROUP_METHODS,
    IN_PROCESS,
    PluginEntry,
    Registry,
)
from adapt.core.testing import ToyLayer, ToyMethod

# -- fakes -------------------------------------------------------------------------------------


@dataclass
class FakeDist:
    name: str
    version: str = "1.0"

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


@dataclass
class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint; ``load()`` returns ``obj`` or raises."""

    name: str
    obj: Any = None
    dist_name: str = "adapt-fake"
    error: BaseException | None = None
    value: str = "fake.module:OBJ"
    loads: int = 0
    dist: FakeDist = field(init=False)

    def __post_init__(self) -> None:
        self.dist = FakeDist(self.dist_name, "2.3")

    def load(self) -> Any:
        self.loads += 1
        if self.error is not None:
            raise self.error
        return self.obj


def fake_method(name: str, peft_type: str) -> Method[Any]:
    """A method object named ``name`` (the toy config class)."""
    cls = type(f"{name.title()}Method", (ToyMethod,), {"name": name, "peft_type": peft_type})
    return cls()  # type: ignore[no-any-return]


@pytest.fixture
def fake_eps(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[FakeEntryPoint]]]:
    """Entry points the registry module sees, by group; ``calls`` counts scans per group."""
    eps: dict[str, list[FakeEntryPoint]] = {GROUP_METHODS: [], GROUP_LAYERS: [], GROUP_BACKENDS: []}
    calls: dict[str, int] = {}

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        calls[group] = calls.get(group, 0) + 1
        return list(eps.get(group, []))

    monkeypatch.setattr(plugins_mod, "metadata", types.SimpleNamespace(entry_points=entry_points))
    eps["calls"] = calls  # type: ignore[assignment]
    yield eps


class SubLinear(nn.Linear):
    pass


class SubSubLinear(SubLinear):
    pass


def make_layer(name: str, base: tuple[type | str, ...], prio: int = 0) -> type[AdapterLayer]:
    return type(
        name,
        (AdapterLayer,),
        {"method": "toy", "base_types": base, "priority": prio, "__module__": __name__},
    )


LinearA = make_layer("LinearA", (nn.Linear,))
LinearB = make_layer("LinearB", (nn.Linear,))
LinearHigh = make_layer("LinearHigh", (nn.Linear,), prio=10)
SubLayer = make_layer("SubLayer", (SubLinear,))


# -- discovery ---------------------------------------------------------------------------------


def test_scanning_is_lazy_and_cached(fake_eps: dict[str, Any]) -> None:
    ep = FakeEntryPoint("toy-linear", obj=LinearA)
    fake_eps[GROUP_LAYERS].append(ep)
    reg = Registry()
    assert fake_eps["calls"] == {}  # nothing read at construction
    reg.register_layer(SubLayer, name="in-process")
    assert fake_eps["calls"] == {}  # registering does not scan either

    entries = reg.entries(GROUP_LAYERS, load=False)
    assert fake_eps["calls"] == {GROUP_LAYERS: 1}  # only the group asked for
    assert ep.loads == 0  # scanned, not imported
    # in-process registrations made before the scan stay, after the entry points
    assert [e.name for e in entries] == ["toy-linear", "in-process"]
    assert entries[0].distribution == "adapt-fake" and entries[0].version == "2.3"
    assert entries[0].status == "not loaded"
    assert entries[1].distribution == IN_PROCESS

    reg.resolve_layer("toy", nn.Linear(2, 2))
    reg.resolve_layer("toy", nn.Linear(2, 2))
    assert fake_eps["calls"] == {GROUP_LAYERS: 1}  # cached
    assert ep.loads == 1  # imported once
    assert reg.entries(GROUP_LAYERS)[0].status == "ok"


def test_get_method_imports_only_the_method_asked_for(fake_eps: dict[str, Any]) -> None:
    alpha = FakeEntryPoint("alpha", obj=fake_method("alpha", "ALPHA"))
    beta = FakeEntryPoint("beta", obj=fake_method("beta", "BETA"))
    fake_eps[GROUP_METHODS] += [alpha, beta]
    reg = Registry()
    assert reg.get_method("beta") is beta.obj
    assert (alpha.loads, beta.loads) == (0, 1)
    # by peft_type, case-insensitively
    assert reg.get_method("ALPHA") is alpha.obj
    assert reg.get_method("Beta") is beta.obj


def test_in_process_registration_replaces_same_name_and_unregisters() -> None:
    reg = Registry()
    for group in (GROUP_METHODS, GROUP_LAYERS, GROUP_BACKENDS):
        reg._groups[group].scanned = True
    method = ToyMethod()
    reg.register_method(method)
    assert reg.get_method("toy") is method
    assert reg.get_method("TOY") is method  # peft_type

    reg.register_layer(LinearA, name="x")
    reg.register_layer(LinearB, name="x")  # same name: replaced, not duplicated
    assert [e.obj for e in reg.entries(GROUP_LAYERS)] == [LinearB]
    assert reg.resolve_layer("toy", nn.Linear(2, 2)) is LinearB
    reg.unregister(GROUP_LAYERS, "x")
    assert reg.resolve_layer("toy", nn.Linear(2, 2)) is None
    reg.unregister(GROUP_LAYERS, "never-registered")  # no error


def test_unregister_leaves_entry_point_plugins(fake_eps: dict[str, Any]) -> None:
    fake_eps[GROUP_LAYERS].append(FakeEntryPoint("x", obj=LinearA))
    reg = Registry()
    reg.register_layer(LinearB, name="x")
    reg.unregister(GROUP_LAYERS, "x")
    assert [e.obj for e in reg.entries(GROUP_LAYERS)] == [LinearA]


def test_module_level_register_functions_use_the_process_registry(registry: Registry) -> None:
    from adapt.core import get_registry, register_layer, register_method

    assert get_registry() is registry
    register_layer(LinearHigh, name="high")
    register_method(ToyMethod(), name="toy2")
    assert registry.resolve_layer("toy", nn.Linear(2, 2)) is LinearHigh
    assert registry.get_method("toy2").name == "toy"


def test_register_layer_without_method_or_base_types_is_refused() -> None:
    class NoMethod(AdapterLayer):
        base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)

    class NoTypes(AdapterLayer):
        method: ClassVar[str] = "toy"

    for bad, why in ((NoMethod, ".method is empty"), (NoTypes, ".base_types must be")):
        with pytest.raises(PluginError) as info:
            Registry().register_layer(bad)
        msg = str(info.value)
        assert bad.__qualname__ in msg and "cannot be registered" in msg
        assert why in msg


# -- layer resolution --------------------------------------------------------------------------


def test_mro_distance() -> None:
    assert mro_distance(nn.Linear, (nn.Linear,)) == 0
    assert mro_distance(SubSubLinear, (nn.Linear,)) == 2
    assert mro_distance(SubSubLinear, (nn.Linear, SubLinear)) == 1
    assert mro_distance(SubSubLinear, (f"{__name__}.SubLinear",)) == 1  # dotted names
    assert mro_distance(nn.Embedding, (nn.Linear, "no.such.Type")) is None


def test_most_specific_base_type_wins_over_priority(registry: Registry) -> None:
    # LinearHigh has priority 10 but serves the base class; SubLayer serves the subclass
    registry.register_layer(LinearHigh, name="high")
    registry.register_layer(SubLayer, name="sub")
    assert registry.resolve_layer("toy", SubSubLinear(2, 2)) is SubLayer
    assert registry.resolve_layer("toy", SubLinear(2, 2)) is SubLayer
    assert registry.resolve_layer("toy", nn.Linear(2, 2)) is LinearHigh
    assert registry.resolve_layer("toy", nn.Embedding(2, 2)) is None
    assert registry.resolve_layer("other-method", nn.Linear(2, 2)) is None


def test_dotted_name_base_types_resolve(registry: Registry) -> None:
    by_name = make_layer("ByName", (f"{__name__}.SubLinear",))
    registry.register_layer(by_name, name="by-name")
    assert registry.resolve_layer("toy", SubSubLinear(2, 2)) is by_name


def test_priority_breaks_ties_at_equal_distance(fake_eps: dict[str, Any]) -> None:
    fake_eps[GROUP_LAYERS] += [
        FakeEntryPoint("a-low", obj=LinearA, dist_name="adapt-one"),
        FakeEntryPoint("z-high", obj=LinearHigh, dist_name="adapt-two"),
    ]
    reg = Registry()
    # different distributions, but priority decides: no conflict
    assert reg.resolve_layer("toy", nn.Linear(2, 2)) is LinearHigh


def test_priority_keyword_of_register_layer() -> None:
    reg = Registry()
    for group in (GROUP_METHODS, GROUP_LAYERS, GROUP_BACKENDS):
        reg._groups[group].scanned = True
    reg.register_layer(LinearA, name="a")
    reg.register_layer(LinearB, name="b", priority=3)
    assert reg.resolve_layer("toy", nn.Linear(2, 2)) is LinearB


def test_name_breaks_ties_within_one_distribution(fake_eps: dict[str, Any]) -> None:
    fake_eps[GROUP_LAYERS] += [
        FakeEntryPoint("b-linear", obj=LinearB, dist_name="adapt-same"),
        FakeEntryPoint("a-linear", obj=LinearA, dist_name="adapt-same"),
    ]
    reg = Registry()
    assert reg.resolve_layer("toy", nn.Linear(2, 2)) is LinearA


def test_conflict_between_two_distributions_names_both(fake_eps: dict[str, Any]) -> None:
    fake_eps[GROUP_LAYERS] += [
        FakeEntryPoint("fast-linear", obj=LinearA, dist_name="adapt-fast"),
        FakeEntryPoint("cool-linear", obj=LinearB, dist_name="cool-plugins"),
    ]
    reg = Registry()
    with pytest.raises(PluginError) as info:
        reg.resolve_layer("toy", nn.Linear(2, 2))
    msg = str(info.value)
    for part in ("fast-linear", "adapt-fast", "cool-linear", "cool-plugins", "'toy'"):
        assert part in msg
    assert "torch.nn.modules.linear.Linear" in msg
    assert "priority" in msg  # says how to resolve it


def test_conflict_with_constructed_plugin_entries() -> None:
    reg = Registry()
    grp = reg._groups[GROUP_LAYERS]
    grp.scanned = True
    grp.entries = [
        PluginEntry(GROUP_LAYERS, "one", "m:One", "dist-one", "1", obj=LinearA, loaded=True),
        PluginEntry(GROUP_LAYERS, "two", "m:Two", "dist-two", "1", obj=LinearB, loaded=True),
    ]
    with pytest.raises(PluginError, match=r"'one' \(dist-one\) and 'two' \(dist-two\)"):
        reg.resolve_layer("toy", nn.Linear(2, 2))
    # a subclass target is still served without ambiguity by a more specific layer
    grp.entries.append(
        PluginEntry(GROUP_LAYERS, "sub", "m:Sub", "dist-three", "1", obj=SubLayer, loaded=True)
    )
    assert reg.resolve_layer("toy", SubLinear(2, 2)) is SubLayer


def test_same_class_from_two_distributions_is_not_a_conflict(fake_eps: dict[str, Any]) -> None:
    fake_eps[GROUP_LAYERS] += [
        FakeEntryPoint("x", obj=LinearA, dist_name="dist-one"),
        FakeEntryPoint("y", obj=LinearA, dist_name="dist-two"),
    ]
    assert Registry().resolve_layer("toy", nn.Linear(2, 2)) is LinearA


def test_supports_can_refuse_a_module(registry: Registry) -> None:
    class OnlyWide(AdapterLayer):
        method: ClassVar[str] = "toy"
        base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
        priority: ClassVar[int] = 5

        @classmethod
        def supports(cls, module: nn.Module) -> bool:
            return isinstance(module, nn.Linear) and module.in_features > 4

    registry.register_layer(OnlyWide, name="wide")
    assert registry.resolve_layer("toy", nn.Linear(8, 2)) is OnlyWide
    assert registry.resolve_layer("toy", nn.Linear(2, 2)) is ToyLayer


# -- broken plugins ----------------------------------------------------------------------------


def test_broken_plugin_is_skipped_with_one_warning(fake_eps: dict[str, Any]) -> None:
    broken = FakeEntryPoint(
        "bnb-linear",
        dist_name="adapt-broken",
        error=ImportError("No module named 'bitsandbytes'"),
    )
    fake_eps[GROUP_LAYERS] += [broken, FakeEntryPoint("ok", obj=LinearA, dist_name="adapt-ok")]
    reg = Registry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # duplicates would show
        assert reg.resolve_layer("toy", nn.Linear(2, 2)) is LinearA
        assert reg.resolve_layer("toy", nn.Linear(3, 3)) is LinearA
        reg.entries(GROUP_LAYERS)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert issubclass(caught[0].category, RuntimeWarning)
    assert "adapt-broken" in msg and "2.3" in msg
    assert "bnb-linear" in msg
    assert "ImportError" in msg and "bitsandbytes" in msg
    assert broken.loads == 1
    entry = next(e for e in reg.entries(GROUP_LAYERS) if e.name == "bnb-linear")
    assert entry.status.startswith("failed: ImportError")
    assert entry.obj is None


def test_broken_method_plugin_does_not_hide_others(fake_eps: dict[str, Any]) -> None:
    good = fake_method("good", "GOOD")
    bad = FakeEntryPoint("vera", dist_name="adapt-vera", error=RuntimeError("boom"))
    fake_eps[GROUP_METHODS] += [bad, FakeEntryPoint("good", obj=good)]
    reg = Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg.get_method("GOOD") is good  # the broken plugin is not even imported
    assert bad.loads == 0
    with (
        pytest.warns(RuntimeWarning, match=r"adapt-vera 2\.3.*RuntimeError: boom"),
        pytest.raises(MissingMethodError) as info,
    ):
        reg.get_method("vera")
    # installed but broken: the error says so instead of "pip install adapt-vera"
    msg = str(info.value)
    assert "is installed" in msg and "adapt-vera" in msg and "RuntimeError: boom" in msg
    assert "pip install" not in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert reg.get_method("good") is good
        with pytest.raises(MissingMethodError, match="failed to import: RuntimeError: boom"):
            reg.get_method("VERA")
    assert bad.loads == 1


# -- missing methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "package"),
    [("vera", "adapt-vera"), ("LORA", "adapt-lora"), ("adalora", "adapt-adalora")],
)
def test_missing_known_method_says_what_to_install(
    fake_eps: dict[str, Any], name: str, package: str
) -> None:
    with pytest.raises(MissingMethodError) as info:
        Registry().get_method(name)
    msg = str(info.value)
    assert f"pip install {package}" in msg
    assert repr(name) in msg
    assert "Installed methods: none" in msg
    assert isinstance(info.value, PluginError)


def test_missing_unknown_method_points_to_the_entry_point_group(fake_eps: dict[str, Any]) -> None:
    fake_eps[GROUP_METHODS].append(FakeEntryPoint("toy", obj=ToyMethod()))
    with pytest.raises(MissingMethodError) as info:
        Registry().get_method("dora")
    msg = str(info.value)
    assert "'dora'" in msg
    assert "third-party plugin" in msg and "'adapt.methods'" in msg
    assert "Installed methods: toy" in msg


def test_missing_method_from_the_process_registry(registry: Registry) -> None:
    with pytest.raises(MissingMethodError, match="pip install adapt-vera"):
        registry.get_method("vera")


# -- weight backends ---------------------------------------------------------------------------


def test_dense_backend_for_standard_layers(registry: Registry) -> None:
    from transformers.pytorch_utils import Conv1D

    for module in (
        nn.Linear(2, 3),
        SubLinear(2, 3),
        nn.Embedding(4, 2),
        nn.Conv1d(2, 3, 1),
        nn.Conv2d(2, 3, 1),
        nn.Conv3d(2, 3, 1),
        Conv1D(3, 2),
    ):
        assert isinstance(registry.resolve_backend(module), DenseBackend), type(module)
    assert registry.resolve_backend(nn.LayerNorm(3)) is None
    assert registry.resolve_backend(nn.Tanh()) is None


class Fancy(nn.Linear):
    pass


class FancyBackend(DenseBackend):
    base_types: ClassVar[tuple[type | str, ...]] = (Fancy,)
    instances: ClassVar[int] = 0

    def __init__(self) -> None:
        FancyBackend.instances += 1

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        super().set_weight(base, weight)
        return MergeReport(max_abs_error=0.5, lossy=True)


def test_plugin_backend_beats_dense_for_its_type(fake_eps: dict[str, Any]) -> None:
    # an entry point may name the class: it is instantiated once
    FancyBackend.instances = 0
    fake_eps[GROUP_BACKENDS].append(FakeEntryPoint("fancy", obj=FancyBackend))
    reg = Registry()
    first = reg.resolve_backend(Fancy(2, 2))
    assert isinstance(first, FancyBackend)
    assert reg.resolve_backend(Fancy(3, 3)) is first
    assert FancyBackend.instances == 1
    assert type(reg.resolve_backend(nn.Linear(2, 2))) is DenseBackend


def test_registered_backend_is_used_by_adapter_layers(registry: Registry) -> None:
    registry.register_backend(FancyBackend())
    layer = ToyLayer(Fancy(3, 2))
    assert isinstance(layer.backend, FancyBackend)
    assert isinstance(ToyLayer(nn.Linear(3, 2)).backend, DenseBackend)


def test_adapter_layer_without_backend_says_what_to_install() -> None:
    with pytest.raises(TargetError) as info:
        ToyLayer(nn.LayerNorm(4))
    msg = str(info.value)
    assert "no weight backend" in msg and "torch.nn.modules.normalization.LayerNorm" in msg
    assert "install" in msg


def test_status_shows_shadowing_and_failures(capsys: pytest.CaptureFixture[str]) -> None:
    from adapt.core import cli
    from adapt.core.testing import ToyLayer, isolated_registry, registered_toy

    class Better(ToyLayer):
        priority = 5

    with isolated_registry() as reg, registered_toy():
        reg.register_layer(Better, name="better-linear")
        entries = {e.name: e for e in reg.entries(GROUP_LAYERS)}
        assert reg.status_of(entries["better-linear"]) == "ok"
        assert reg.status_of(entries["toy-linear"]) == "shadowed by better-linear for Linear"
        assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "shadowed by better-linear for Linear" in out


def test_status_treats_a_type_named_by_string_as_the_same_type() -> None:
    from adapt.core.testing import ToyLayer, isolated_registry, registered_toy

    class ByName(ToyLayer):
        base_types = ("torch.nn.modules.linear.Linear",)

    with isolated_registry() as reg, registered_toy():
        reg.register_layer(ByName, name="by-name")
        entries = {e.name: e for e in reg.entries(GROUP_LAYERS)}
        # same distribution and priority: the name decides, and the loser says by whom
        assert reg.status_of(entries["by-name"]) == "ok"
        assert reg.status_of(entries["toy-linear"]) == "shadowed by by-name for Linear"


def test_backends_tying_across_distributions_are_a_conflict() -> None:
    from adapt.core.registry import GROUP_BACKENDS, PluginEntry
    from adapt.core.testing import isolated_registry

    class LinearBackend(DenseBackend):
        base_types = (nn.Linear,)

    class OtherBackend(DenseBackend):
        base_types = (nn.Linear,)

    with isolated_registry() as reg:
        reg.register_backend(LinearBackend(), name="first")
        reg.register_backend(OtherBackend(), name="second")
        # pretend "second" came from another distribution
        entry = next(e for e in reg.entries(GROUP_BACKENDS) if e.name == "second")
        assert isinstance(entry, PluginEntry)
        entry.distribution = "someone-else"
        with pytest.raises(PluginError, match=r"'first' .* and 'second' \(someone-else\)"):
            reg.resolve_backend(nn.Linear(2, 2))
        entry.priority = 1  # a higher priority settles it
        assert type(reg.resolve_backend(nn.Linear(2, 2))) is OtherBackend
