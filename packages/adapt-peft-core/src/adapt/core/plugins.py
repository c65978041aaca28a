"""The generic entry-point store under ``adapt.methods``, ``adapt.layers`` and ``adapt.backends``,
and under the groups other packages declare in ``adapt.plugin_groups`` (adapt-lora's
``adapt.lora_variants``).

Discovery is lazy: a group is read the first time it is needed and cached. A plugin that fails
to import is skipped with one warning naming its distribution and the error. In-process
registrations (notebooks, tests) sit beside the entry points. What a plugin *is* (a method, a
layer class, a weight backend) is the typed resolvers' business: :mod:`adapt.core.registry`
for methods and layers, :mod:`adapt.core.backends` for backends.
"""

from __future__ import annotations

import importlib.metadata as metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import PluginError, warn_user
from .typenames import describe, type_label

GROUP_METHODS = "adapt.methods"
GROUP_LAYERS = "adapt.layers"
GROUP_BACKENDS = "adapt.backends"
GROUPS = (GROUP_METHODS, GROUP_LAYERS, GROUP_BACKENDS)
#: Entry points naming a :class:`PluginGroup`: a group of plugins a package owns (adapt-lora's
#: LoRA variants), listed by ``adapt plugins`` and checked when they load like core's own.
GROUP_PLUGIN_GROUPS = "adapt.plugin_groups"

IN_PROCESS = "<in-process>"


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
    #: Why the loaded object breaks its group's contract (then it is not used), or None.
    invalid: str | None = None

    @property
    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.invalid:
            return f"invalid: {self.invalid}"
        return "ok" if self.loaded else "not loaded"

    @property
    def broken(self) -> bool:
        """Whether it failed to import or is invalid (either way, it is skipped)."""
        return bool(self.error or self.invalid)

    def label(self) -> str:
        """``'name' (distribution version)``, for messages."""
        return f"{self.name!r} ({self.distribution} {self.version})".replace(" )", ")")


@dataclass(frozen=True)
class PluginGroup:
    """A group of plugins a package owns: its entry-point ``group`` and the ``contract`` a
    loaded plugin must meet (returns what to use, or raises ``ValueError`` saying what is
    wrong), published under :data:`GROUP_PLUGIN_GROUPS`."""

    group: str
    contract: Callable[[Any], Any] | None = None


@dataclass
class _Group:
    entries: list[PluginEntry] = field(default_factory=list)
    scanned: bool = False


class PluginStore:
    """Every plugin found through entry points or registered in-process, by group; knows
    nothing of what the plugins are (:class:`adapt.core.registry.Registry` does)."""

    def __init__(self, *, read_entry_points: bool = True) -> None:
        self._groups: dict[str, _Group] = {g: _Group() for g in GROUPS}
        self._lock = threading.RLock()
        #: False for an isolated store (tests): only in-process registrations count.
        self.read_entry_points = read_entry_points

    def _group(self, group: str) -> _Group:
        with self._lock:
            return self._groups.setdefault(group, _Group())

    def plugin_groups(self) -> list[PluginGroup]:
        """The groups packages declared under :data:`GROUP_PLUGIN_GROUPS` (loaded ones)."""
        return [e.obj for e in self.entries(GROUP_PLUGIN_GROUPS) if isinstance(e.obj, PluginGroup)]

    def all_groups(self) -> list[str]:
        """Core's groups, then every declared one: what ``adapt plugins`` lists."""
        return [*GROUPS, *(g.group for g in self.plugin_groups() if g.group not in GROUPS)]

    # -- discovery ---------------------------------------------------------------------------
    def _scan(self, group: str) -> _Group:
        grp = self._group(group)
        if grp.scanned:
            return grp
        with self._lock:
            if grp.scanned:
                return grp
            found: list[PluginEntry] = []
            eps = metadata.entry_points(group=group) if self.read_entry_points else ()
            for ep in eps:
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

    def adopt(self, group: str, obj: Any) -> Any:
        """The object a plugin of ``group`` provides, checked against the group's contract:
        return it (or what to use instead, e.g. an instance of a class), or raise
        ``ValueError`` saying what is wrong. The generic store knows the contracts of declared
        groups (:class:`PluginGroup`); the typed registry (:class:`adapt.core.registry.Registry`)
        adds core's own."""
        if group == GROUP_PLUGIN_GROUPS:
            if not isinstance(obj, PluginGroup) or not obj.group.startswith("adapt."):
                raise ValueError(
                    f"{describe(obj)} is not an adapt.core.plugins.PluginGroup whose group "
                    "starts with 'adapt.'"
                )
            return obj
        for declared in self.plugin_groups() if group not in GROUPS else ():
            if declared.group == group and declared.contract is not None:
                return declared.contract(obj)
        return obj

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
        entry.loaded = True
        try:
            obj = self.adopt(entry.group, obj)
        except ValueError as exc:
            entry.invalid = str(exc)
            entry.obj = None
            warn_user(
                f"adapt: skipping plugin {entry.name!r} ({entry.group}) from distribution "
                f"{entry.distribution} {entry.version}: it is invalid: {entry.invalid}",
                RuntimeWarning,
            )
            return None
        entry.obj = obj
        entry.priority = int(getattr(obj, "priority", 0) or 0)
        return obj

    def broken_entries(self, group: str) -> list[PluginEntry]:
        """The plugins of ``group`` that failed to import or are invalid."""
        return [e for e in self.entries(group) if e.broken]

    def broken_note(self, group: str) -> str:
        """``" Skipped …"`` naming every broken plugin of ``group`` and why, or ``""``: for the
        message of an error that such a plugin may be the cause of."""
        broken = self.broken_entries(group)
        if not broken:
            return ""
        listed = "; ".join(f"{e.label()}: {e.status}" for e in broken)
        return f". Skipped {group} plugins that are broken: {listed}"

    def entries(self, group: str, *, load: bool = True) -> list[PluginEntry]:
        grp = self._scan(group)
        if load:
            for entry in grp.entries:
                self._load(entry)
        return list(grp.entries)

    def entry_named(self, group: str, name: str) -> PluginEntry | None:
        return next((e for e in self.entries(group) if e.name == name), None)

    def status_of(self, entry: PluginEntry) -> str:
        """What ``adapt plugins`` shows for ``entry``: ok, failed (with the error), shadowed by
        another plugin for some base type, or in conflict with one."""
        if entry.broken or not entry.loaded or entry.group == GROUP_METHODS:
            return entry.status
        method = getattr(entry.obj, "method", None)
        rivals = [
            e
            for e in self.entries(entry.group)
            if e is not entry
            and e.obj is not None
            and e.obj is not entry.obj
            and getattr(e.obj, "method", None) == method
            # backends that claim modules case by case (supports()) share types by design
            and not (
                entry.group == GROUP_BACKENDS
                and hasattr(e.obj, "supports")
                and hasattr(entry.obj, "supports")
            )
        ]
        notes: list[str] = []
        for want in getattr(entry.obj, "base_types", ()):
            label = type_label(want)
            for other in rivals:
                if label not in {type_label(t) for t in getattr(other.obj, "base_types", ())}:
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
    def register(self, group: str, name: str, obj: Any, *, priority: int | None = None) -> Any:
        """Register ``obj`` as plugin ``name`` of ``group`` in this process (notebooks, tests),
        checked against the group's contract first; returns what was registered."""
        try:
            obj = self.adopt(group, obj)
        except ValueError as exc:
            raise PluginError(f"cannot register {name!r} in {group}: {exc}") from exc
        self._register(group, name, obj, priority)
        return obj

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
            grp = self._group(group)
            grp.entries = [
                e for e in grp.entries if not (e.distribution == IN_PROCESS and e.name == name)
            ]
            grp.entries.append(entry)
        return entry

    def unregister(self, group: str, name: str) -> None:
        with self._lock:
            grp = self._group(group)
            grp.entries = [
                e for e in grp.entries if not (e.distribution == IN_PROCESS and e.name == name)
            ]


_current: list[PluginStore] = []


def current_store() -> PluginStore:
    """The process-wide store (the registry :func:`adapt.core.get_registry` returns)."""
    if not _current:
        _current.append(PluginStore())
    return _current[0]


def use_store(store: PluginStore) -> PluginStore:
    """Make ``store`` the process-wide one; returns the previous one."""
    previous = current_store()
    _current[0] = store
    return previous
