"""Explain a shadowed ``adapt`` namespace instead of failing with a bare ``ModuleNotFoundError``.

adapt's packages share the PEP 420 namespace ``adapt`` (no ``adapt/__init__.py``). An unrelated
project on the public index, also called ``adapt`` (a domain-adaptation toolbox), ships a
*regular* ``adapt/__init__.py``. Python then prefers that regular package over our namespace:

* installed in another ``sys.path`` entry (editable installs, ``PYTHONPATH``, ``--user`` beside a
  venv), it hides ``adapt.core`` completely: ``No module named 'adapt.core'``;
* installed in the same site-packages, its ``__init__`` runs before every ``import adapt.core``
  and imports tensorflow (``No module named 'tensorflow'`` where tensorflow is missing).

Neither case reaches our code in ``adapt.core``, so adapt-peft-core installs this module with a
``.pth`` line: it appends one finder to the *end* of ``sys.meta_path``. The finder is asked only
about modules no other finder found, and it answers only in those two situations, with an error
that says what shadows what and how to fix it. Everything else is left to Python.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

OUR_DISTRIBUTION = "adapt-peft-core"


def _foreign_adapt() -> ModuleType | None:
    """The imported top-level ``adapt`` when it is a regular package (ours never is)."""
    module = sys.modules.get("adapt")
    if module is None or getattr(module, "__file__", None) is None:
        return None
    return module


def _our_core_dirs() -> list[str]:
    """Folders ``adapt/core`` of ours on sys.path (where adapt-peft-core really is)."""
    found = []
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "adapt", "core", "__init__.py")
        if os.path.isfile(candidate):
            found.append(os.path.dirname(candidate))
    return found


def _owner(init_file: str) -> str:
    """'distribution NAME VERSION' of the package that installed ``init_file``, if known."""
    try:
        from importlib import metadata

        target = os.path.realpath(init_file)
        for dist in metadata.distributions():
            for f in dist.files or ():
                if str(f).replace("\\", "/") == "adapt/__init__.py" and (
                    os.path.realpath(str(dist.locate_file(f))) == target
                ):
                    return f"from the distribution {dist.metadata['Name']!r} {dist.version}"
    except Exception:  # never let the explanation itself fail
        pass
    return "a folder on sys.path that pip did not install"


def explain(module: ModuleType, *, same_place: bool) -> str:
    """The human explanation of a foreign regular ``adapt`` package hiding ours."""
    init_file = str(module.__file__)
    ours = _our_core_dirs()
    where_ours = ours[0] if ours else "this environment"
    if same_place:
        how = (
            "it is installed in the same folder as adapt's namespace packages, so its __init__.py "
            "runs before every `import adapt.core` (and imports what that project needs, such as "
            "tensorflow)"
        )
    else:
        how = (
            "it is a regular package, and Python lets a regular package named `adapt` anywhere on "
            "sys.path hide the namespace package `adapt` that adapt-peft-core, adapt-lora, "
            "adapt-vera, adapt-adalora and adapt-bnb share"
        )
    return (
        f"the package `adapt` at {init_file} ({_owner(init_file)}) is another project, not "
        f"adapt's ({OUR_DISTRIBUTION}: {where_ours}): {how}. Fix: `pip uninstall adapt` "
        "(it removes only that project's files), or keep the two projects in separate virtual "
        "environments."
    )


def _ours_elsewhere(subpackage: str, foreign: ModuleType) -> bool:
    """Is ``adapt.<subpackage>`` installed in a sys.path entry other than the foreign package's?"""
    foreign_dir = os.path.dirname(os.path.realpath(str(foreign.__file__)))
    for entry in sys.path:
        base = os.path.join(entry or os.getcwd(), "adapt")
        if os.path.realpath(base) == foreign_dir:
            continue
        if os.path.isfile(os.path.join(base, subpackage, "__init__.py")) or os.path.isfile(
            os.path.join(base, subpackage + ".py")
        ):
            return True
    return False


def _is_same_place(module: ModuleType) -> bool:
    package_dir = os.path.dirname(os.path.realpath(str(module.__file__)))
    return os.path.isfile(os.path.join(package_dir, "core", "__init__.py"))


class ShadowedNamespaceFinder:
    """Last finder on sys.meta_path: turns the two shadowing failures into clear errors."""

    @classmethod
    def find_spec(
        cls,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        foreign = _foreign_adapt()
        if foreign is None:
            return None
        if fullname.startswith("adapt."):
            # `adapt` resolved to the other project's regular package, and one of our
            # subpackages, installed elsewhere on sys.path, is not inside it.
            if _is_same_place(foreign) or not _ours_elsewhere(fullname.split(".")[1], foreign):
                return None  # really not installed: Python's own error says so
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: " + explain(foreign, same_place=False),
                name=fullname,
            )
        spec = getattr(foreign, "__spec__", None)
        same_place = _is_same_place(foreign)
        if getattr(spec, "_initializing", False) and (
            same_place or _ours_elsewhere("core", foreign)
        ):
            # The other project's __init__ is running (`import adapt.core` starts it, in either
            # layout) and needs a module that is not installed.
            raise ModuleNotFoundError(
                f"No module named {fullname!r}, imported by {foreign.__file__}. If you are "
                f"importing adapt (the fine-tuning library): "
                + explain(foreign, same_place=same_place),
                name=fullname,
            )
        return None


def install() -> None:
    """Append the finder once (the .pth line calls this at interpreter start)."""
    if not any(f is ShadowedNamespaceFinder for f in sys.meta_path):
        sys.meta_path.append(ShadowedNamespaceFinder)


install()
