"""Weight backends: how a layer reads and writes its base module's dense weight.

Adapter layers never touch ``base_layer.weight`` directly. They ask the backend for the
weight in the *canonical layout* and write the merged result back through it:

* linear-like modules (``nn.Linear``, transformers ``Conv1D``, quantised linears):
  ``(out_features, in_features)``;
* convolutions: ``(out_channels, in_channels // groups, *kernel_size)``;
* embeddings: ``(num_embeddings, embedding_dim)``, as stored.

So one method layer serves dense, transposed (``Conv1D``, fan-in/fan-out) and quantised base
layers alike. Backends are found through the ``adapt.backends`` entry-point group; the
dense backend ships with core.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
from typing import ClassVar, Protocol, cast, runtime_checkable

import torch
from torch import nn

from .distributed import is_partitioned, logical_shape
from .errors import PluginError, TargetError
from .merge import MergeReport
from .plugins import GROUP_BACKENDS, PluginStore, current_store
from .typenames import CONV1D_TRANSFORMERS, describe, mro_distance, type_names

__all__ = [
    "CONV1D_TRANSFORMERS",
    "DENSE_WEIGHT_TYPES",
    "KNOWN_BACKEND_PACKAGES",
    "DenseBackend",
    "MergeReport",
    "WeightBackend",
    "backend_hint",
    "describe",
    "is_plain_weight",
    "mro_distance",
    "no_backend_message",
    "require_backend",
    "resolve_backend",
    "type_names",
]

#: Weight tensor types the dense backend can really read and write back (exact types, by name:
#: a subclass may store anything). Plain tensors and parameters (DeepSpeed ZeRO-3 partitions
#: are plain parameters with ``ds_*`` attributes), FSDP2's DTensor shards, FSDP1's flat
#: parameters, and the meta / fake / functional tensors of tracing. Anything else — optimum-quanto
#: ``QTensor``, torchao ``AffineQuantizedTensor`` / ``Int8Tensor``, HQQ, ... — reports a float
#: dtype over quantised storage: reading it as dense and writing a merge back would lose the
#: adapter silently, so only a backend that claims it may serve it.
DENSE_WEIGHT_TYPES = frozenset(
    {
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.distributed.tensor.DTensor",
        "torch.distributed.fsdp._flat_param.FlatParameter",
        "torch._subclasses.fake_tensor.FakeTensor",
        "torch._subclasses.functional_tensor.FunctionalTensor",
    }
)


def is_plain_weight(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is one of :data:`DENSE_WEIGHT_TYPES` (its exact type, not a subclass)."""
    return describe(type(weight)) in DENSE_WEIGHT_TYPES


@runtime_checkable
class WeightBackend(Protocol):
    """Reads and writes a base module's weight as a dense tensor in the canonical layout."""

    #: Base-module types this backend serves: classes or dotted names (``"pkg.mod.Class"``).
    base_types: ClassVar[tuple[type | str, ...]]
    #: Whether writing a weight loses precision (quantised storage).
    lossy: ClassVar[bool]

    def shape(self, base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the module (from the module, not the storage)."""
        ...

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        """The dense weight in the canonical layout (a copy or a view; callers do not mutate it)."""
        ...

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        """Store ``weight`` (canonical layout) as the module's weight."""
        ...

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        """The dtype adapters on this module compute in."""
        ...

    # Optional (not part of the protocol's required members):
    # * ``supports(module) -> bool``: whether this backend claims ``module`` (default: every
    #   module of its ``base_types``); a backend for a library that keeps ``nn.Linear`` and
    #   swaps the weight tensor says yes only for its own weights;
    # * ``max_rel_error: float``: the relative (Frobenius) error writing a weight may introduce
    #   (default 0.0 when not ``lossy``; a lossy backend declares it, and
    #   ``adapt.core.testing.check_backend`` holds it to it);
    # * ``logical_numel(param) -> int``: how many values a packed or quantised parameter of a
    #   served module holds, for parameter counts (``print_trainable_parameters``); without it
    #   the storage size counts.


def backend_supports(backend: WeightBackend, module: nn.Module) -> bool:
    """The backend's optional ``supports(module)`` (True when it has none)."""
    supports = getattr(backend, "supports", None)
    return True if supports is None else bool(supports(module))


def declared_error(backend: WeightBackend) -> float | None:
    """The backend's declared ``max_rel_error``: 0.0 for an exact one that declares nothing,
    None for a lossy one that declares nothing."""
    value = getattr(backend, "max_rel_error", None)
    if value is None:
        return None if backend.lossy else 0.0
    return float(value)


class DenseBackend:
    """Backend for ordinary float weights: Linear, Embedding, Conv1d/2d/3d, transformers Conv1D."""

    base_types: ClassVar[tuple[type | str, ...]] = (
        nn.Linear,
        nn.Embedding,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        CONV1D_TRANSFORMERS,
    )
    lossy: ClassVar[bool] = False
    max_rel_error: ClassVar[float] = 0.0

    @staticmethod
    def accepts(base: nn.Module) -> bool:
        """Whether the module holds an ordinary floating-point weight this backend can read and
        write back: one of :data:`DENSE_WEIGHT_TYPES` (a layer that packs its weight into
        integers, or a quantised tensor subclass, needs its own backend)."""
        return DenseBackend.refusal(base) is None

    @staticmethod
    def refusal(base: nn.Module) -> str | None:
        """Why this backend cannot serve ``base`` (for error messages), or None if it can."""
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return f"it has no weight tensor (weight is {describe(weight)})"
        if not is_plain_weight(weight):
            return (
                f"its weight is a {describe(type(weight))} (reporting {weight.dtype}), not a "
                "plain tensor: a quantised or otherwise wrapped weight that the dense backend "
                "cannot write a merge back into"
            )
        if not (weight.is_floating_point() or weight.device.type == "meta"):
            return f"its weight is a {weight.dtype} tensor (packed integers, not floats)"
        return None

    @staticmethod
    def _is_transposed(base: nn.Module) -> bool:
        return CONV1D_TRANSFORMERS in type_names(type(base))

    def shape(self, base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Embedding):
            return base.num_embeddings, base.embedding_dim
        if isinstance(base, nn.modules.conv._ConvNd):
            return base.in_channels, base.out_channels
        # logical_shape: under DeepSpeed ZeRO-3 the weight may already be partitioned to (0,)
        shape = logical_shape(cast(torch.Tensor, base.weight))
        if self._is_transposed(base):
            return shape[0], shape[1]
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        return shape[1], shape[0]

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        weight = cast(torch.Tensor, base.weight)
        if is_partitioned(weight):
            raise TargetError(
                f"the weight of this {type(base).__name__} is partitioned by DeepSpeed ZeRO-3 "
                f"(shape {tuple(weight.shape)} on this rank, {logical_shape(weight)} in all); "
                "merging needs it whole: merge inside deepspeed.zero.GatheredParameters("
                "model.parameters(), modifier_rank=0), or load the saved adapter into a model "
                "outside DeepSpeed and merge there"
            )
        return weight.T if self._is_transposed(base) else weight

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        target = cast(torch.Tensor, base.weight)
        new = weight.T if self._is_transposed(base) else weight
        if new.shape != target.shape:
            raise TargetError(
                f"cannot write a weight of shape {tuple(new.shape)} into "
                f"{type(base).__name__} whose weight is {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(new.to(target.dtype))
        return MergeReport()

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        dtype = cast(torch.Tensor, base.weight).dtype
        return dtype if dtype.is_floating_point else torch.float32


_DENSE = DenseBackend()

#: Base-layer types whose weights only a plugin can read, and the package that adds the backend.
#: Matched by dotted name anywhere in a module's MRO, so subclasses (``LinearNF4``) count.
KNOWN_BACKEND_PACKAGES = {
    "bitsandbytes.nn.modules.Linear8bitLt": "adapt-bnb",
    "bitsandbytes.nn.modules.Linear4bit": "adapt-bnb",
    # torchao keeps nn.Linear and swaps the weight tensor: keyed by the weight's type
    "torchao.quantization.Int8Tensor": "adapt-torchao",
    "torchao.quantization.IntxUnpackedToInt8Tensor": "adapt-torchao",
}


#: The entry-point group through which installed distributions add install hints: the entry
#: point's name is a dotted type name (of a module, or of its weight tensor), its value the
#: distribution that serves it (``"torchao.quantization.Int8Tensor" = "adapt-torchao"``).
GROUP_INSTALL_HINTS = "adapt.install_hints"


def install_hints() -> dict[str, str]:
    """Type name → the distribution to install: core's table of well-known quantisers
    (:data:`KNOWN_BACKEND_PACKAGES`), extended by installed distributions' entry points in
    :data:`GROUP_INSTALL_HINTS` (read as metadata: nothing is imported)."""
    hints = dict(KNOWN_BACKEND_PACKAGES)
    for name, value in _declared_hints():
        hints.setdefault(name, value)
    return hints


@functools.lru_cache(maxsize=1)
def _declared_hints() -> tuple[tuple[str, str], ...]:
    """The installed distributions' hints, read once per process (``cache_clear()`` rereads)."""
    return tuple(
        (ep.name, ep.value.strip()) for ep in metadata.entry_points(group=GROUP_INSTALL_HINTS)
    )


def backend_hint(module: nn.Module) -> tuple[str, str] | None:
    """``(type name, package)`` when ``module`` (or its weight tensor) is a type a known
    package supports."""
    hints = install_hints()
    weight = getattr(module, "weight", None)
    names = [*type_names(type(module))]
    if isinstance(weight, torch.Tensor):
        names += type_names(type(weight))
    for name in names:
        if name in hints:
            return name, hints[name]
    return None


def _candidates(module: nn.Module, store: PluginStore) -> list[tuple[int, int, str, WeightBackend]]:
    """Every backend serving ``module``'s type: ``(MRO distance, -priority, name, backend)``."""
    candidates: list[tuple[int, int, str, WeightBackend]] = []
    for entry in store.entries(GROUP_BACKENDS):
        backend = entry.obj
        if backend is None:
            continue
        if isinstance(backend, type):  # entry point names the class: instantiate once
            backend = backend()
            entry.obj = backend
        dist = mro_distance(type(module), tuple(backend.base_types))
        if dist is not None and backend_supports(backend, module):
            candidates.append((dist, -entry.priority, entry.name, backend))
    dist = mro_distance(type(module), DenseBackend.base_types)
    if dist is not None and DenseBackend.accepts(module):
        candidates.append((dist, 1, "~dense", _DENSE))
    candidates.sort(key=lambda t: (t[0], t[1], t[2]))
    return candidates


def resolve_backend(module: nn.Module, store: PluginStore | None = None) -> WeightBackend | None:
    """The weight backend for ``module`` (nearest type, then priority, then name), or None.

    Two backends of different distributions tied on both are a conflict (:class:`PluginError`
    naming both); a quantised type served only through a parent type (``nn.Linear``) has none.
    """
    store = store if store is not None else current_store()
    candidates = _candidates(module, store)
    if not candidates:
        return None
    best_dist, best_prio, best_name, best = candidates[0]
    for dist, prio, name, other in candidates[1:]:
        if (dist, prio) != (best_dist, best_prio):
            break
        if other is best or type(other) is type(best):
            continue
        a, b = store.entry_named(GROUP_BACKENDS, best_name), store.entry_named(GROUP_BACKENDS, name)
        if a is not None and b is not None and a.distribution != b.distribution:
            raise PluginError(
                f"plugin conflict for {describe(module)}: weight backends {a.name!r} "
                f"({a.distribution}) and {b.name!r} ({b.distribution}) both serve it with "
                f"priority {a.priority}; give one of them a higher `priority`, or uninstall one"
            )
    hint = backend_hint(module)
    names = type_names(type(module))
    if hint is not None and hint[0] in names and best_dist > names.index(hint[0]):
        # Only a parent type (nn.Linear) is served: its reading of the packed weight
        # would be wrong, so there is no backend for this module.
        return None
    return best


def require_backend(module: nn.Module) -> WeightBackend:
    """The weight backend for ``module``; :class:`TargetError` saying what to install if none
    (and which installed backend plugins were skipped as broken)."""
    backend = resolve_backend(module)
    if backend is None:
        refused = _refusals(module, current_store())
        message = refused or no_backend_message(module)
        raise TargetError(message + current_store().broken_note(GROUP_BACKENDS))
    return backend


def _refusals(module: nn.Module, store: PluginStore) -> str:
    """Why the installed backends serving ``module``'s type said no (``supports()`` False),
    from their optional ``refusal(module)``, or ``""`` when none did."""
    reasons = []
    for entry in store.entries(GROUP_BACKENDS):
        backend = entry.obj
        if backend is None or mro_distance(type(module), tuple(backend.base_types)) is None:
            continue
        if backend_supports(backend, module):
            continue
        why = getattr(backend, "refusal", None)
        detail = why(module) if callable(why) else None
        reasons.append(f"{entry.name!r} ({entry.distribution}) does not serve it" + (
            f": {detail}" if detail else ""))  # fmt: skip
    if not reasons:
        return ""
    return f"no weight backend can adapt {describe(module)}: " + "; ".join(reasons)


def no_backend_message(module: nn.Module) -> str:
    """Why no weight backend serves ``module``, and what to install."""
    hint = backend_hint(module)
    if hint is not None:
        type_name, package = hint
        return (
            f"no weight backend can read the weight of {describe(module)} (a {type_name} "
            f"stores a quantised, packed weight): install it with `pip install {package}`"
        )
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not is_plain_weight(weight):
        return (
            f"no weight backend can read the weight of {describe(module)}: "
            f"{DenseBackend.refusal(module)}. Install the adapt package for that quantisation "
            f"library if there is one, or write a weight backend for {describe(type(weight))} "
            "(get_weight / set_weight; docs/guides/writing-a-plugin.md) and register it under "
            "the 'adapt.backends' entry point"
        )
    stored = (
        f" (its weight is a {weight.dtype} tensor of shape {tuple(weight.shape)})"
        if isinstance(weight, torch.Tensor)
        else ""
    )
    return (
        f"no weight backend can read the weight of {describe(module)}{stored}; install the "
        "package that supports this layer type (e.g. adapt-bnb for bitsandbytes layers), or "
        "register a weight backend for it under the 'adapt.backends' entry point"
    )
