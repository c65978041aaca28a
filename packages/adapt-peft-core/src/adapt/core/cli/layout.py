"""What ``adapt inspect`` reads of a saved adapter, and how it asks the method to read it.

Core names no method here. The installed method that provides the file's ``peft_type`` (found
through the registry) says which config keys matter (:attr:`~adapt.core.Method.summary_keys`),
where a checkpoint key's adapter part begins (:attr:`~adapt.core.Method.tensor_prefixes`) and
what a module's rank is (:meth:`~adapt.core.Method.rank_of`). When no installed method
provides it, or its plugin is broken, the generic rule applies: print ``r``; the adapter part
of a key begins at its first segment that starts with ``<peft_type in lower case>_`` (PEFT's
naming: ``ia3_l``, ``oft_r``), else it is the key's last segment; no rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import split_key

if TYPE_CHECKING:
    from ..method import Method

#: the config keys ``adapt inspect`` prints for a method it cannot ask
GENERIC_SUMMARY_KEYS = ("r",)

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class MethodView:
    """The answers ``adapt inspect`` needs, from the installed method or the generic rule."""

    method: Method[Any] | None
    summary_keys: tuple[str, ...]
    tensor_prefixes: tuple[str, ...]

    def rank_of(self, tensors: Mapping[str, tuple[int, ...]]) -> int | None:
        """The method's rank of one module's adapter; None when unknown (or it fails)."""
        if self.method is None:
            return None
        try:
            rank = self.method.rank_of(tensors)
        except Exception:
            return None
        return rank if isinstance(rank, int) and not isinstance(rank, bool) else None


def generic_prefixes(peft_type: str) -> tuple[str, ...]:
    return (f"{peft_type.lower()}_",) if peft_type else ()


def find_method(peft_type: str) -> Method[Any] | None:
    """The installed method with this ``peft_type`` (or registry name); None when none
    provides it or its plugin fails to load."""
    if not peft_type:
        return None
    from ..registry import get_registry

    try:
        return get_registry().get_method(peft_type.lower())
    except Exception:
        return None


def method_view(config: Mapping[str, Any]) -> MethodView:
    """Ask the method of ``config``'s ``peft_type`` what to show; the generic rule without one."""
    peft_type = str(config.get("peft_type", "") or "")
    method = find_method(peft_type)
    generic = MethodView(None, GENERIC_SUMMARY_KEYS, generic_prefixes(peft_type))
    if method is None:
        return generic
    try:
        keys = tuple(k for k in method.summary_keys if isinstance(k, str))
        prefixes = tuple(p for p in method.tensor_prefixes if isinstance(p, str))
    except Exception:  # a plugin's declarations are not sequences of names: as if unknown
        return MethodView(method, generic.summary_keys, generic.tensor_prefixes)
    return MethodView(method, keys, prefixes or generic.tensor_prefixes)


def tensor_shapes(weights: Path) -> Shapes:
    """Each tensor's shape in the safetensors file ``weights``, read from its header."""
    from safetensors import safe_open

    from ..errors import CheckpointError

    shapes: Shapes = {}
    try:
        with safe_open(str(weights), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    except Exception as exc:
        raise CheckpointError(f"{weights} is corrupt and cannot be read: {exc}") from exc
    return shapes


def by_module(shapes: Shapes, prefixes: tuple[str, ...]) -> tuple[dict[str, Shapes], Shapes]:
    """The tensors per adapted module (module path → tensor name → shape), and the shared
    ones (``base_model.<name>``, outside the model, e.g. VeRA's basis)."""
    modules: dict[str, Shapes] = defaultdict(dict)
    shared: Shapes = {}
    for key, shape in shapes.items():
        if key.startswith("base_model.") and not key.startswith("base_model.model."):
            shared[key] = shape
            continue
        module, tensor = split_key(key, prefixes)
        modules[module][tensor] = shape
    return modules, shared
