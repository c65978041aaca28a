"""Typed resolution of methods and adapter layers over the plugin store (:mod:`adapt.core.plugins`).

Resolution of the layer class for a module is deterministic: the nearest base type in the
module's MRO wins, then the higher ``priority``, then the name; two plugins from different
distributions that tie on distance and priority are a conflict, reported with both names.
Weight backends resolve in :mod:`adapt.core.backends`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .backends import WeightBackend, resolve_backend
from .config import AdapterConfig
from .deprecation import moved_names
from .errors import MissingMethodError, PluginError
from .layer import AdapterLayer
from .method import Method
from .plugins import (
    GROUP_BACKENDS,
    GROUP_LAYERS,
    GROUP_METHODS,
    GROUPS,
    IN_PROCESS,
    PluginEntry,
    PluginStore,
    use_store,
)
from .typenames import describe, mro_distance

__all__ = [
    "GROUPS",
    "GROUP_BACKENDS",
    "GROUP_LAYERS",
    "GROUP_METHODS",
    "IN_PROCESS",
    "KNOWN_METHOD_PACKAGES",
    "PluginEntry",
    "Registry",
    "get_registry",
    "register_backend",
    "register_layer",
    "register_method",
    "swap_registry",
]

#: Where the methods adapt's own packages provide live, for "install X" messages.
KNOWN_METHOD_PACKAGES = {
    "lora": "adapt-lora",
    "vera": "adapt-vera",
    "adalora": "adapt-adalora",
}


# -- what a plugin of each group must be (checked when it loads, as pluggy does) ------------
#: The members of the WeightBackend protocol (``logical_numel`` is optional).
BACKEND_MEMBERS = ("base_types", "lossy", "shape", "get_weight", "set_weight", "compute_dtype")


def _types_tuple(obj: Any, what: str) -> None:
    types = getattr(obj, "base_types", None)
    if (
        not isinstance(types, tuple)
        or not types
        or not all(isinstance(t, (type, str)) and t for t in types)
    ):
        raise ValueError(
            f"{describe(obj)}.base_types must be a non-empty tuple of the module types {what} "
            f"(classes or dotted names), got {types!r}"
        )


def method_contract(obj: Any) -> Any:
    if isinstance(obj, type) and issubclass(obj, Method):
        obj = obj()  # the entry point names the class: one instance
    if not isinstance(obj, Method):
        raise ValueError(
            f"{describe(obj)} is not an adapt.core.Method (a method plugin names a Method "
            "instance or subclass)"
        )
    for attr in ("name", "peft_type"):
        value = getattr(obj, attr, "")
        if not isinstance(value, str) or not value:
            raise ValueError(f"{describe(obj)}.{attr} is empty; set it (e.g. 'ia3' / 'IA3')")
    config = getattr(obj, "config_class", None)
    if not (isinstance(config, type) and issubclass(config, AdapterConfig)) or (
        config is AdapterConfig
    ):
        raise ValueError(
            f"{describe(obj)}.config_class must be the method's own AdapterConfig subclass, "
            f"got {config!r}"
        )
    return obj


def layer_contract(obj: Any) -> Any:
    if not (isinstance(obj, type) and issubclass(obj, AdapterLayer)):
        raise ValueError(
            f"{describe(obj)} is not a subclass of adapt.core.AdapterLayer (a layer plugin names "
            "the class; subclass the method's layer base, e.g. adapt.lora.LoraLayer)"
        )
    method = getattr(obj, "method", "")
    if not isinstance(method, str) or not method:
        raise ValueError(
            f"{describe(obj)}.method is empty; set the method it belongs to (e.g. 'lora')"
        )
    _types_tuple(obj, "it wraps")
    return obj


def backend_contract(obj: Any) -> Any:
    missing = [m for m in BACKEND_MEMBERS if not hasattr(obj, m)]
    if missing:
        raise ValueError(
            f"{describe(obj)} is not a weight backend: it lacks {', '.join(missing)} (the "
            "members of adapt.core.WeightBackend)"
        )
    _types_tuple(obj, "it serves")
    not_callable = [m for m in BACKEND_MEMBERS[2:] if not callable(getattr(obj, m))]
    if not_callable:
        raise ValueError(f"{describe(obj)}: {', '.join(not_callable)} must be methods")
    return obj


CONTRACTS = {
    GROUP_METHODS: method_contract,
    GROUP_LAYERS: layer_contract,
    GROUP_BACKENDS: backend_contract,
}


class Registry(PluginStore):
    """The plugin store with typed resolvers: methods by name, layer classes by module."""

    def adopt(self, group: str, obj: Any) -> Any:
        """``obj`` checked against its group's contract (:data:`CONTRACTS`)."""
        contract = CONTRACTS.get(group)
        return contract(obj) if contract is not None else super().adopt(group, obj)

    # -- in-process registration -------------------------------------------------------------
    def register_layer(
        self, layer_cls: type[AdapterLayer], *, name: str | None = None, priority: int | None = None
    ) -> None:
        """Register an adapter-layer class without an entry point (notebooks, tests)."""
        self._register(
            GROUP_LAYERS,
            name or describe(layer_cls),
            self._adopted(GROUP_LAYERS, layer_cls),
            priority,
        )

    def register_method(self, method: Method[Any], *, name: str | None = None) -> None:
        method = self._adopted(GROUP_METHODS, method)
        self._register(GROUP_METHODS, name or method.name, method, None)

    def register_backend(
        self, backend: WeightBackend, *, name: str | None = None, priority: int | None = None
    ) -> None:
        backend = self._adopted(GROUP_BACKENDS, backend)
        self._register(GROUP_BACKENDS, name or describe(backend), backend, priority)

    def _adopted(self, group: str, obj: Any) -> Any:
        try:
            return self.adopt(group, obj)
        except ValueError as exc:
            raise PluginError(f"{describe(obj)} cannot be registered: {exc}") from exc

    # -- methods -----------------------------------------------------------------------------
    def get_method(self, name: str) -> Method[Any]:
        """The method registered under ``name`` (``"lora"``) or with that ``peft_type``."""
        key = name.lower()
        grp = self._scan(GROUP_METHODS)
        # load the entry named after the method first: importing every method is not needed
        for entry in sorted(grp.entries, key=lambda e: e.name != key):
            obj = self._load(entry)
            if obj is not None and (
                entry.name.lower() == key
                or getattr(obj, "name", "").lower() == key
                or getattr(obj, "peft_type", "").lower() == key
            ):
                return obj  # type: ignore[no-any-return]
        available = sorted(e.name for e in grp.entries if e.loaded)
        broken = [e for e in grp.entries if e.broken and e.name.lower() == key]
        if broken:
            what = (
                f"failed to import: {broken[0].error}"
                if broken[0].error
                else f"is invalid: {broken[0].invalid}"
            )
            raise MissingMethodError(
                f"the adapter method {name!r} is installed (distribution {broken[0].distribution} "
                f"{broken[0].version}) but its plugin {what}. Fix or reinstall that package"
            )
        package = KNOWN_METHOD_PACKAGES.get(key)
        hint = (
            f"install it with `pip install {package}`"
            if package
            else "adapt has no package for it; a third-party plugin must register it under "
            f"the '{GROUP_METHODS}' entry point"
        )
        raise MissingMethodError(
            f"no installed package provides the adapter method {name!r}: {hint}. "
            f"Installed methods: {', '.join(available) or 'none'}"
        )

    # -- layers ------------------------------------------------------------------------------
    def resolve_layer(self, method: str, module: nn.Module) -> type[AdapterLayer] | None:
        """The adapter-layer class of ``method`` for ``module``, or None if none serves it."""
        best: list[tuple[int, int, str, PluginEntry]] = []
        for entry in self.entries(GROUP_LAYERS):
            cls = entry.obj
            if cls is None or getattr(cls, "method", None) != method:
                continue
            dist = mro_distance(type(module), tuple(getattr(cls, "base_types", ())))
            if dist is None:
                continue
            supports = getattr(cls, "supports", None)
            if supports is not None and not supports(module):
                continue
            best.append((dist, -entry.priority, entry.name, entry))
        if not best:
            return None
        best.sort(key=lambda t: (t[0], t[1], t[2]))
        top = best[0]
        for other in best[1:]:
            if (other[0], other[1]) != (top[0], top[1]):
                break
            if other[3].obj is top[3].obj:
                continue
            if other[3].distribution != top[3].distribution:
                raise PluginError(
                    f"plugin conflict for {describe(module)} with method {method!r}: "
                    f"{top[3].name!r} ({top[3].distribution}) and {other[3].name!r} "
                    f"({other[3].distribution}) both serve it with priority {top[3].priority}; "
                    "give one of them a higher `priority` class attribute, or uninstall one"
                )
        return top[3].obj  # type: ignore[no-any-return]

    # -- backends ----------------------------------------------------------------------------
    def resolve_backend(self, module: nn.Module) -> WeightBackend | None:
        """The weight backend for ``module`` among this registry's plugins (see
        :func:`adapt.core.backends.resolve_backend`)."""
        return resolve_backend(module, self)


_REGISTRY = Registry()
use_store(_REGISTRY)


def get_registry() -> Registry:
    """The process-wide registry."""
    return _REGISTRY


def swap_registry(new: Registry) -> Registry:
    """Make ``new`` the process-wide registry (and plugin store); returns the previous one."""
    global _REGISTRY
    previous = _REGISTRY
    _REGISTRY = new
    use_store(new)
    return previous


def register_layer(
    layer_cls: type[AdapterLayer], *, name: str | None = None, priority: int | None = None
) -> None:
    """Register an adapter-layer class in this process (same effect as an entry point)."""
    _REGISTRY.register_layer(layer_cls, name=name, priority=priority)


def register_method(method: Method[Any], *, name: str | None = None) -> None:
    _REGISTRY.register_method(method, name=name)


def register_backend(
    backend: WeightBackend, *, name: str | None = None, priority: int | None = None
) -> None:
    _REGISTRY.register_backend(backend, name=name, priority=priority)


__getattr__ = moved_names(
    __name__,
    {
        "backend_hint": "adapt.core.backends:backend_hint",
        "KNOWN_BACKEND_PACKAGES": "adapt.core.backends:KNOWN_BACKEND_PACKAGES",
    },
)
