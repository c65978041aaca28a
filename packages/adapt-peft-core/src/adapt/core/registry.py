"""Plugin registry over the entry-point groups ``adapt.methods``, ``adapt.layers``, ``adapt.backends``.

Discovery is lazy: a group is read the first time it is needed and cached. A plugin that fails
to import is skipped with one warning naming its distribution and the error. Resolution of the
layer class for a module is deterministic: the nearest base type in the module's MRO wins,
then the higher ``priority``, then the name; two plugins from different distributions that tie
on distance and priority are a conflict, reported with both names.
"""

from __future__ import annotations

import importlib.metadata as metadata
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .backends import DenseBackend, WeightBackend, describe, mro_distance, type_names
from .errors import MissingMethodError, PluginError, warn_user

if TYPE_CHECKING:
    from .layer import AdapterLayer
    from .method import Method

GROUP_METHODS = "adapt.methods"
GROUP_LAYERS = "adapt.layers"
GROUP_BACKENDS = "adapt.backends"
GROUPS = (GROUP_METHODS, GROUP_LAYERS, GROUP_BACKENDS)

#: Where the methods adapt's own packages provide live, for "install X" messages.
KNOWN_METHOD_PACKAGES = {
    "lora": "adapt-lora",
    "vera": "adapt-vera",
    "adalora": "adapt-adalora",
}

#: Base-layer types whose weights only a plugin can read, and the package that adds the backend.
#: Matched by dotted name anywhere in a module's MRO, so subclasses (``LinearNF4``) count.
KNOWN_BACKEND_PACKAGES = {
    "bitsandbytes.nn.modules.Linear8bitLt": "adapt-bnb",
    "bitsandbytes.nn.modules.Linear4bit": "adapt-bnb",
}

IN_PROCESS = "<in-process>"


def _type_label(t: type | str) -> str:
    """A base type as its dotted name, whether it was declared by class or by name."""
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def backend_hint(module: nn.Module) -> tuple[str, str] | None:
    """``(type name, package)`` when ``module`` is a quantised type a known package supports."""
    for name in type_names(type(module)):
        if name in KNOWN_BACKEND_PACKAGES:
            return name, KNOWN_BACKEND_PACKAGES[name]
    return None


@dataclass
class PluginEntry:
    """One plugin: where it came from and, once loaded, the object it provides."""

    group: str
    name: str
    value: str
    distribution: str
    version: str
    obj: Any = None
    error: str | None = None
    priority: int = 0
    loaded: bool = False

    @property
    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        return "ok" if self.loaded else "not loaded"


@dataclass
class _Group:
    entries: list[PluginEntry] = field(default_factory=list)
    scanned: bool = False


class Registry:
    """Holds every plugin found through entry points or registered in-process."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {g: _Group() for g in GROUPS}
        self._lock = threading.RLock()
        self._dense = DenseBackend()

    # -- discovery ---------------------------------------------------------------------------
    def _scan(self, group: str) -> _Group:
        grp = self._groups[group]
        if grp.scanned:
            return grp
        with self._lock:
            if grp.scanned:
                return grp
            found: list[PluginEntry] = []
            for ep in metadata.entry_points(group=group):
                dist = getattr(ep, "dist", None)
                found.append(
                    PluginEntry(
                        group=group,
                        name=ep.name,
                        value=ep.value,
                        distribution=dist.metadata["Name"] if dist is not None else "?",
                        version=dist.version if dist is not None else "?",
                        obj=ep,
                    )
                )
            # in-process registrations made before the scan stay, after entry points
            grp.entries = found + [e for e in grp.entries if e.distribution == IN_PROCESS]
            grp.scanned = True
        return grp

    def _load(self, entry: PluginEntry) -> Any:
        if entry.loaded or entry.error:
            return entry.obj if entry.loaded else None
        ep = entry.obj
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin never breaks the rest
            entry.error = f"{type(exc).__name__}: {exc}"
            entry.obj = None
            warn_user(
                f"adapt: skipping plugin {entry.name!r} ({entry.group}) from distribution "
                f"{entry.distribution} {entry.version}: it failed to import: {entry.error}",
                RuntimeWarning,
            )
            return None
        entry.obj = obj
        entry.loaded = True
        entry.priority = int(getattr(obj, "priority", 0) or 0)
        return obj

    def entries(self, group: str, *, load: bool = True) -> list[PluginEntry]:
        grp = self._scan(group)
        if load:
            for entry in grp.entries:
                self._load(entry)
        return list(grp.entries)

    def _entry_named(self, group: str, name: str) -> PluginEntry | None:
        return next((e for e in self.entries(group) if e.name == name), None)

    def status_of(self, entry: PluginEntry) -> str:
        """What ``adapt plugins`` shows for ``entry``: ok, failed (with the error), shadowed by
        another plugin for some base type, or in conflict with one."""
        if entry.error or not entry.loaded or entry.group == GROUP_METHODS:
            return entry.status
        method = getattr(entry.obj, "method", None)
        rivals = [
            e
            for e in self.entries(entry.group)
            if e is not entry
            and e.obj is not None
            and e.obj is not entry.obj
            and getattr(e.obj, "method", None) == method
        ]
        notes: list[str] = []
        for want in getattr(entry.obj, "base_types", ()):
            label = _type_label(want)
            for other in rivals:
                if label not in {_type_label(t) for t in getattr(other.obj, "base_types", ())}:
                    continue
                if other.priority > entry.priority:
                    notes.append(f"shadowed by {other.name} for {label.rsplit('.', 1)[-1]}")
                elif other.priority == entry.priority:
                    if other.distribution != entry.distribution:
                        notes.append(
                            f"conflict with {other.name} ({other.distribution}) for "
                            f"{label.rsplit('.', 1)[-1]}: same priority"
                        )
                    elif other.name < entry.name:
                        notes.append(f"shadowed by {other.name} for {label.rsplit('.', 1)[-1]}")
        return "; ".join(dict.fromkeys(notes)) or "ok"

    # -- in-process registration -------------------------------------------------------------
    def _register(self, group: str, name: str, obj: Any, priority: int | None) -> PluginEntry:
        entry = PluginEntry(
            group=group,
            name=name,
            value=describe(obj) if not isinstance(obj, str) else obj,
            distribution=IN_PROCESS,
            version="",
            obj=obj,
            loaded=True,
            priority=int(priority if priority is not None else getattr(obj, "priority", 0) or 0),
        )
        with self._lock:
            grp = self._groups[group]
            grp.entries = [
                e for e in grp.entries if not (e.distribution == IN_PROCESS and e.name == name)
            ]
            grp.entries.append(entry)
        return entry

    def register_layer(
        self, layer_cls: type[AdapterLayer], *, name: str | None = None, priority: int | None = None
    ) -> None:
        """Register an adapter-layer class without an entry point (notebooks, tests)."""
        method = getattr(layer_cls, "method", None)
        if not method or not getattr(layer_cls, "base_types", None):
            raise PluginError(
                f"{describe(layer_cls)} cannot be registered: an adapter layer class needs class "
                "attributes `method` (e.g. 'lora') and `base_types` (the module types it wraps)"
            )
        self._register(GROUP_LAYERS, name or describe(layer_cls), layer_cls, priority)

    def register_method(self, method: Method, *, name: str | None = None) -> None:
        self._register(GROUP_METHODS, name or method.name, method, None)

    def register_backend(
        self, backend: WeightBackend, *, name: str | None = None, priority: int | None = None
    ) -> None:
        self._register(GROUP_BACKENDS, name or describe(backend), backend, priority)

    def unregister(self, group: str, name: str) -> None:
        with self._lock:
            grp = self._groups[group]
            grp.entries = [
                e for e in grp.entries if not (e.distribution == IN_PROCESS and e.name == name)
            ]

    # -- methods -----------------------------------------------------------------------------
    def get_method(self, name: str) -> Method:
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
        broken = [e for e in grp.entries if e.error and e.name.lower() == key]
        if broken:
            raise MissingMethodError(
                f"the adapter method {name!r} is installed (distribution {broken[0].distribution} "
                f"{broken[0].version}) but its plugin failed to import: {broken[0].error}. "
                "Fix or reinstall that package"
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
        candidates: list[tuple[int, int, str, WeightBackend]] = []
        for entry in self.entries(GROUP_BACKENDS):
            backend = entry.obj
            if backend is None:
                continue
            if isinstance(backend, type):  # entry point names the class: instantiate once
                backend = backend()
                entry.obj = backend
            dist = mro_distance(type(module), tuple(backend.base_types))
            if dist is not None:
                candidates.append((dist, -entry.priority, entry.name, backend))
        dist = mro_distance(type(module), DenseBackend.base_types)
        if dist is not None and DenseBackend.accepts(module):
            candidates.append((dist, 1, "~dense", self._dense))
        if not candidates:
            return None
        candidates.sort(key=lambda t: (t[0], t[1], t[2]))
        best_dist, best_prio, best_name, best = candidates[0]
        for dist, prio, name, other in candidates[1:]:
            if (dist, prio) != (best_dist, best_prio):
                break
            if other is best or type(other) is type(best):
                continue
            a, b = (
                self._entry_named(GROUP_BACKENDS, best_name),
                self._entry_named(GROUP_BACKENDS, name),
            )
            if a is not None and b is not None and a.distribution != b.distribution:
                raise PluginError(
                    f"plugin conflict for {describe(module)}: weight backends {a.name!r} "
                    f"({a.distribution}) and {b.name!r} ({b.distribution}) both serve it with "
                    f"priority {a.priority}; give one of them a higher `priority`, or uninstall one"
                )
        hint = backend_hint(module)
        if hint is not None and best_dist > type_names(type(module)).index(hint[0]):
            # Only a parent type (nn.Linear) is served: its reading of the packed weight
            # would be wrong, so there is no backend for this module.
            return None
        return best


_REGISTRY = Registry()


def get_registry() -> Registry:
    """The process-wide registry."""
    return _REGISTRY


def register_layer(
    layer_cls: type[AdapterLayer], *, name: str | None = None, priority: int | None = None
) -> None:
    """Register an adapter-layer class in this process (same effect as an entry point)."""
    _REGISTRY.register_layer(layer_cls, name=name, priority=priority)


def register_method(method: Method, *, name: str | None = None) -> None:
    _REGISTRY.register_method(method, name=name)


def register_backend(
    backend: WeightBackend, *, name: str | None = None, priority: int | None = None
) -> None:
    _REGISTRY.register_backend(backend, name=name, priority=priority)
