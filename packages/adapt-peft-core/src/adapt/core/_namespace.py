"""The one check adapt.core can make itself: is ``adapt`` our namespace or another project?

When another project's regular ``adapt`` package sits in the same folder as ours, Python runs its
``__init__.py`` first and then still finds ``adapt.core`` inside it: everything works, but every
import of adapt pays for that project (it imports tensorflow). Say so once, with the fix. (When it
sits elsewhere on sys.path, adapt.core is not reached at all; ``_adapt_peft_core_guard`` explains
that case.)
"""

from __future__ import annotations

import sys

from .errors import warn_user


def check_namespace() -> None:
    namespace = sys.modules.get("adapt")
    if namespace is None or getattr(namespace, "__file__", None) is None:
        return
    try:
        from _adapt_peft_core_guard import explain
    except ImportError:  # the guard ships beside adapt.core; only a broken install lacks it
        message = f"the package `adapt` at {namespace.__file__} is another project's"
    else:
        message = explain(namespace, same_place=True)
    warn_user(f"adapt.core: {message}")
