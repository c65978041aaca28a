"""Names that moved: the old spelling keeps working, with a ``DeprecationWarning`` naming the
new one (tier 0: no adapt imports; the target module is imported when the old name is used).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving each old name of ``moved`` (old name -> ``"new.module:name"``)
    from its new home."""

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_module, _, new_name = target.partition(":")
        warnings.warn(
            f"{module}.{name} is deprecated; use {new_module}.{new_name} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
