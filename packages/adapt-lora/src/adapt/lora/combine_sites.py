"""What a LoRA combination reads per adapted module: each source's factors, scaling, LoRA bias
and DoRA magnitude there — from the layers of a model, or from saved adapters' tensors alone.

Both routes give the same :class:`Site` for the same adapters (the same tensors, the same
scalings computed the same way), so combining in a model and on disk give the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch

from adapt.core import CheckpointError
from adapt.core.files import split_key
from adapt.core.protocols import ModelView

from .config import LoraConfig
from .layer import LoraLayer

__all__ = ["PREFIX", "Site", "sites_from_files", "sites_from_model"]

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"
LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")
EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")


@dataclasses.dataclass
class Site:
    """One adapted module: its sources' factors there, with each source's weight and scaling."""

    path: str
    keys: tuple[str, str]  # the on-disk names of A and B
    transposed: bool  # PEFT's ΔW of this layer is (B A)ᵀ (embeddings, transformers Conv1D)
    factors: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    weights: list[float] = dataclasses.field(default_factory=list)
    scalings: list[float] = dataclasses.field(default_factory=list)
    biases: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    magnitudes: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    #: the DoRA magnitude of the base weight alone (its row norms), when the base is at hand
    base_norm: Callable[[], torch.Tensor] | None = None

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a, _ in self.factors]

    @property
    def embedding(self) -> bool:
        return self.keys == EMBEDDING_KEYS


def sites_from_model(
    model: ModelView, sources: Sequence[str], weights: Sequence[float]
) -> list[Site]:
    sites = []
    for path, layer in model.adapter_layers():
        if not isinstance(layer, LoraLayer):
            continue
        embedding = any(name in layer.lora_embedding_A for name in sources)
        keys = EMBEDDING_KEYS if embedding else LINEAR_KEYS
        site = Site(path, keys, embedding or _is_conv1d(layer))
        site.base_norm = _base_norm(layer)
        for name, weight in zip(sources, weights, strict=True):
            if name in layer.lora_A:
                pair = (_weight(layer.lora_A[name]), _weight(layer.lora_B[name]))
                bias = getattr(layer.lora_B[name], "bias", None)
            elif name in layer.lora_embedding_A:
                pair, bias = (layer.lora_embedding_A[name], layer.lora_embedding_B[name]), None
            else:
                continue
            site.factors.append(pair)
            site.weights.append(weight)
            # float: a layer prepared for hot-swapping holds its scaling as a 0-d tensor
            site.scalings.append(float(layer.scaling[name]))
            site.biases.append(bias if isinstance(bias, torch.Tensor) else None)
            magnitudes = layer.variant_tensors(MAGNITUDE) if _has_dora(layer) else None
            held = magnitudes is not None and name in magnitudes
            site.magnitudes.append(magnitudes[name] if held else None)  # type: ignore[index]
        if site.factors:
            sites.append(site)
    return sites


def _has_dora(layer: LoraLayer) -> bool:
    try:
        layer.variant_tensors(MAGNITUDE)
    except (KeyError, AttributeError):
        return False
    return True


def _base_norm(layer: LoraLayer) -> Callable[[], torch.Tensor]:
    def norm() -> torch.Tensor:
        weight = layer.original_weight()
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        rows: torch.Tensor = weight.movedim(layer.output_axis, 0).flatten(1).norm(dim=1)
        return rows

    return norm


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _is_conv1d(layer: LoraLayer) -> bool:
    base: Any = layer.get_base_layer()
    return any(cls.__name__ == "Conv1D" for cls in type(base).__mro__)


def _split(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<tensor>`` → ``(module, tensor)``, the tensor part from the
    first ``lora_`` segment."""
    module, tensor = split_key(key, ("lora_",))
    if not key.startswith(PREFIX) or not tensor.startswith("lora_"):
        raise CheckpointError(
            f"tensor {key!r} is not a LoRA tensor (base_model.model.<module>.lora_...); the "
            "adapter holds tensors a combination has no rule for (modules_to_save, trained "
            "biases?)"
        )
    return module, tensor


def _by_module(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(state):
        module, tensor = _split(key)
        modules.setdefault(module, {})[tensor] = state[key]
    return modules


def sites_from_files(
    configs: Sequence[LoraConfig],
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    names: Sequence[str],
) -> list[Site]:
    """The sites of saved adapters (``names`` say which adapter an error is about)."""
    per_source = [_by_module(state) for state in states]
    paths = sorted({path for modules in per_source for path in modules})
    sites = []
    for path in paths:
        held = [(i, modules[path]) for i, modules in enumerate(per_source) if path in modules]
        embedding = any(EMBEDDING_KEYS[0] in tensors for _, tensors in held)
        site = Site(path, EMBEDDING_KEYS if embedding else LINEAR_KEYS, embedding)
        for i, tensors in held:
            a, b = _factors_of(tensors, site.keys, names[i], path)
            r, alpha = configs[i].rank_and_alpha(path)
            if a.shape[0] != r:
                raise CheckpointError(
                    f"adapter {names[i]!r}: {path} has rank {a.shape[0]} in its tensors but "
                    f"{r} in its config (r / rank_pattern); the checkpoint is inconsistent"
                )
            if site.factors:
                _same_shapes(site, (a, b), names[held[0][0]], names[i])
            site.factors.append((a, b))
            site.weights.append(weights[i])
            site.scalings.append(configs[i].scaling(r, alpha))
            site.biases.append(tensors.get("lora_B.bias"))
            site.magnitudes.append(tensors.get(MAGNITUDE))
        sites.append(site)
    return sites


def _factors_of(
    tensors: dict[str, torch.Tensor], keys: tuple[str, str], name: str, path: str
) -> tuple[torch.Tensor, torch.Tensor]:
    known = {*keys, "lora_B.bias", MAGNITUDE}
    stray = sorted(set(tensors) - known)
    missing = [key for key in keys if key not in tensors]
    if stray or missing:
        what = f"has {stray[0]!r}" if stray else f"lacks {missing[0]!r}"
        raise CheckpointError(
            f"adapter {name!r}: {path} {what}; a LoRA module holds {list(keys)} (and "
            "lora_B.bias, lora_magnitude_vector), so the adapters differ in kind here "
            "(an embedding in one, a linear layer in another?) or the file is damaged"
        )
    return tensors[keys[0]], tensors[keys[1]]


def _same_shapes(
    site: Site, pair: tuple[torch.Tensor, torch.Tensor], first: str, name: str
) -> None:
    """The sources' factors at one module fit the same base weight (rank aside)."""
    (a0, b0), (a, b) = site.factors[0], pair
    if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]:
        raise CheckpointError(
            f"{site.path}: adapter {first!r} fits a weight of shape {_fits(a0, b0)} there, "
            f"adapter {name!r} one of shape {_fits(a, b)}; adapters trained on different base "
            "models cannot be combined"
        )


def _fits(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    return (b.shape[0], *a.shape[1:])
