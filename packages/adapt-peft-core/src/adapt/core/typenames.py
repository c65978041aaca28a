"""Type names: how plugins name the module types they serve, and how near a type is to one.

Tier 0: no adapt imports. Plugins may declare base types by class or by dotted name
(``"transformers.pytorch_utils.Conv1D"``), so that declaring one never imports its library.
"""

from __future__ import annotations

from typing import Any

#: transformers' ``Conv1D`` (GPT-2's fused linear, weight stored transposed), by name.
CONV1D_TRANSFORMERS = "transformers.pytorch_utils.Conv1D"


def describe(obj: Any) -> str:
    """``module.qualname`` of ``obj``'s class (or of ``obj`` itself when it is a class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def type_label(t: type | str) -> str:
    """A declared base type as its dotted name, whether it was declared by class or by name."""
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def type_names(cls: type) -> list[str]:
    """``module.qualname`` of each class in ``cls``'s MRO, nearest first."""
    return [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__]


def mro_distance(obj_type: type, base_types: tuple[type | str, ...]) -> int | None:
    """How far up ``obj_type``'s MRO the nearest of ``base_types`` is (0 = exact), or None."""
    names = type_names(obj_type)
    best: int | None = None
    for want in base_types:
        for dist, cls in enumerate(obj_type.__mro__):
            if (isinstance(want, str) and names[dist] == want) or cls is want:
                best = dist if best is None else min(best, dist)
                break
    return best
