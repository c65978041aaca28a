"""LoRA's ``add_weighted_adapter``: PEFT's combination types, computed right.

Per adapted module, with ``s_i`` each source's scaling and ``ΔW_i = s_i · B_i A_i``:

* ``cat``: ``A = [w_i s_i A_i]`` stacked by rows, ``B = [B_i]`` by columns, so ``B A = Σ w_i ΔW_i``
  exactly (rank: the sum of the sources' ranks at that module);
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: *factor-wise*, as
  PEFT: A and B are combined separately with weights ``±√|w_i s_i|`` (sign on A) and
  ``√|w_i s_i|``. ``B A`` then has cross terms ``B_i A_j`` (PEFT #3004): not ``Σ w_i ΔW_i``;
* ``svd`` and the ``*_svd`` types: on ΔW: the ``ΔW_i`` are combined (task arithmetic, TIES, DARE,
  magnitude pruning), then truncated to ``svd_rank`` (default: the largest source rank) by SVD.

The new adapter's scaling is 1 at every module (α = r; with rsLoRA α = √r, where PEFT's α = r
scales by √r: #3761), and its per-module ranks are written to ``rank_pattern`` /
``alpha_pattern`` (PEFT writes them empty, so its result cannot be reloaded: #3737).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from adapt.core import ConfigError
from adapt.core.method import CombineOptions
from adapt.core.protocols import ModelView

from .combine_math import combine_tasks, svd_factors
from .config import LoraConfig
from .layer import LoraLayer

__all__ = ["FACTOR_WISE", "ON_DELTA", "TYPES", "combine"]

#: factor-wise types; the ΔW types (the task combination each applies before the SVD)
FACTOR_WISE = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
ON_DELTA = {
    "svd": "linear",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
TYPES = (*sorted(FACTOR_WISE), "cat", *ON_DELTA)


@dataclasses.dataclass
class Site:
    """One adapted module: its sources' factors there, with each source's weight and scaling."""

    path: str
    keys: tuple[str, str]  # the on-disk names of A and B
    transposed: bool  # PEFT's ΔW of this layer is (B A)ᵀ (embeddings, transformers Conv1D)
    factors: list[tuple[torch.Tensor, torch.Tensor]]  # (A, B) per source present
    weights: list[float]
    scalings: list[float]

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a, _ in self.factors]


def combine(
    model: ModelView,
    configs: Sequence[LoraConfig],
    sources: Sequence[str],
    weights: Sequence[float],
    options: CombineOptions,
) -> tuple[LoraConfig, Callable[[], dict[str, torch.Tensor]]]:
    """The combined adapter's config, checked and planned (ranks per module) before anything
    changes, and the function that computes its tensors (on-disk keys relative to the model)
    once it is added: PEFT draws DARE's masks after the new adapter's initialisation, so the
    same seed gives the same masks only in that order."""
    refuse_unsupported(configs, sources)
    # one adapter: PEFT combines it linearly whatever the type (exact: w · ΔW, scaling 1)
    kind = "linear" if len(sources) == 1 else options.combination_type
    check_kind(kind, options)
    sites = collect(model, sources, weights)
    if not sites:
        raise ConfigError(f"add_weighted_adapter: adapters {list(sources)} adapt no module")
    svd_rank = options.svd_rank or max(max(site.ranks) for site in sites)
    ranks = {site.path: planned_rank(kind, site, svd_rank) for site in sites}

    def tensors() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for site in sites:
                a, b = combine_site(kind, site, options, ranks[site.path])
                out[f"{site.path}.{site.keys[0]}"] = a.contiguous()
                out[f"{site.path}.{site.keys[1]}"] = b.contiguous()
        return out

    return new_config(configs, ranks), tensors


def planned_rank(kind: str, site: Site, svd_rank: int) -> int:
    """The combined adapter's rank at ``site``; refuses factor-wise types of unequal ranks."""
    if kind == "cat":
        return sum(site.ranks)
    if kind in FACTOR_WISE:
        if len(set(site.ranks)) > 1:
            raise ConfigError(
                f"add_weighted_adapter: combination_type {kind!r} combines A and B entry by "
                f"entry, so the adapters need one rank at each module, but {site.path} has "
                f"ranks {site.ranks}; use 'cat' or 'svd' (or a '*_svd' type) for adapters of "
                "different ranks"
            )
        return site.ranks[0]
    a, b = site.factors[0]
    return min(svd_rank, b.shape[0], a[0].numel())


def refuse_unsupported(configs: Sequence[LoraConfig], sources: Sequence[str]) -> None:
    """Refuse what a combination cannot do right, naming the adapter and the reason."""
    reasons = (
        ("use_dora", "DoRA's magnitude vectors normalise each adapter's own W + ΔW; a weighted "
         "sum of them is not the magnitude of the combined weight"),
        ("lora_bias", "its bias terms would need their own weighted sum, which PEFT drops"),
        ("target_parameters", "parameter targets (MoE experts) are not combined (as in PEFT)"),
        ("trainable_token_indices", "trainable tokens are not LoRA factors"),
        ("modules_to_save", "a combination has no rule for full module copies"),
        ("variant", "a LoRA variant's extra state has no combination rule"),
    )  # fmt: skip
    for name, config in zip(sources, configs, strict=True):
        for field, reason in reasons:
            if getattr(config, field):
                raise ConfigError(
                    f"add_weighted_adapter: adapter {name!r} sets {field}={getattr(config, field)!r}"
                    f", which cannot be combined: {reason}; combine plain LoRA adapters"
                )


def check_kind(kind: str, options: CombineOptions) -> None:
    if kind not in TYPES:
        raise ConfigError(
            f"add_weighted_adapter: unknown combination_type {kind!r}; LoRA has {list(TYPES)}"
        )
    needs_density = kind not in ("linear", "cat", "svd")
    if needs_density and options.density is None:
        raise ConfigError(
            f"add_weighted_adapter: combination_type {kind!r} prunes, so it needs density= "
            "(the fraction of entries kept, in [0, 1], e.g. density=0.5)"
        )


def collect(model: ModelView, sources: Sequence[str], weights: Sequence[float]) -> list[Site]:
    sites = []
    for path, layer in model.adapter_layers():
        if not isinstance(layer, LoraLayer):
            continue
        embedding = any(name in layer.lora_embedding_A for name in sources)
        keys = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        site = Site(path, keys, embedding or _is_conv1d(layer), [], [], [])
        for name, weight in zip(sources, weights, strict=True):
            if name in layer.lora_A:
                site.factors.append((_weight(layer.lora_A[name]), _weight(layer.lora_B[name])))
            elif name in layer.lora_embedding_A:
                site.factors.append((layer.lora_embedding_A[name], layer.lora_embedding_B[name]))
            else:
                continue
            site.weights.append(weight)
            site.scalings.append(layer.scaling[name])
        if site.factors:
            sites.append(site)
    return sites


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _is_conv1d(layer: LoraLayer) -> bool:
    base: Any = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    return any(cls.__name__ == "Conv1D" for cls in type(base).__mro__)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def combine_site(
    kind: str, site: Site, options: CombineOptions, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the combined adapter at ``site`` (in the sources' dtype)."""
    dtype = site.factors[0][0].dtype
    if kind == "cat":
        pairs = zip(site.factors, site.weights, site.scalings, strict=True)
        a = torch.cat([a.to(_work_dtype(a)) * (w * s) for (a, _), w, s in pairs])
        b = torch.cat([b for _, b in site.factors], dim=1)
        return a.to(dtype), b.to(dtype)
    if kind in FACTOR_WISE:
        return factor_wise(kind, site, options)
    return on_delta(ON_DELTA[kind], site, options, rank)


def factor_wise(
    kind: str, site: Site, options: CombineOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    products = [w * s for w, s in zip(site.weights, site.scalings, strict=True)]
    root = [math.sqrt(abs(p)) for p in products]
    signed = [r if p >= 0 else -r for r, p in zip(root, products, strict=True)]
    dtype = site.factors[0][0].dtype
    out = []
    for index, factor_weights in ((0, signed), (1, root)):
        tasks = [pair[index].to(_work_dtype(pair[index])) for pair in site.factors]
        density = 1.0 if options.density is None else options.density
        mixed = combine_tasks(
            kind, tasks, factor_weights, density, options.majority_sign_method, options.generator
        )
        out.append(mixed.to(dtype))
    return out[0], out[1]


def on_delta(
    kind: str, site: Site, options: CombineOptions, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    a0, b0 = site.factors[0]
    deltas = []
    for (a, b), s in zip(site.factors, site.scalings, strict=True):
        delta = (b.flatten(1).to(_work_dtype(b)) @ a.flatten(1).to(_work_dtype(a))) * s
        deltas.append(delta.T if site.transposed else delta)  # PEFT's layout, for DARE's draws
    density = 1.0 if options.density is None else options.density
    mixed = combine_tasks(
        kind, deltas, site.weights, density, options.majority_sign_method, options.generator
    )
    if site.transposed:
        mixed = mixed.T
    b, a = svd_factors(
        mixed, rank, options.svd_clamp, options.svd_full_matrices, options.svd_driver
    )
    a = a.reshape((rank, *a0.shape[1:]))
    b = b.reshape((b0.shape[0], rank, *b0.shape[2:]))
    return a.to(a0.dtype), b.to(b0.dtype)


def new_config(configs: Sequence[LoraConfig], ranks: dict[str, int]) -> LoraConfig:
    """The first source's config with scaling 1 at every module and the per-module ranks."""
    first = configs[0]
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank (ties: the larger)

    def alpha(rank: int) -> float:
        return math.sqrt(rank) if first.use_rslora else rank  # α/√r or α/r = 1

    differing = {path: rank for path, rank in ranks.items() if rank != r}
    return dataclasses.replace(
        first,
        r=r,
        lora_alpha=alpha(r),
        target_modules=union_of_targets(configs, list(ranks)),
        rank_pattern={re.escape(p): k for p, k in differing.items()},
        alpha_pattern={re.escape(p): alpha(k) for p, k in differing.items()},
        init_lora_weights=plain_init(first.init_lora_weights),
        loftq_config={},
        eva_config=None,
        corda_config=None,
    )


def plain_init(init: bool | str) -> bool | str:
    """The first source's init when it is a plain random one (PEFT runs it too, so the global
    RNG advances as in PEFT before DARE's draws); else ``True``: the tensors are overwritten, and
    no init may read or rewrite the base weights (PiSSA, LoftQ, EVA, CorDA, OLoRA)."""
    return init if init in (True, False, "gaussian") else True


def union_of_targets(configs: Sequence[LoraConfig], paths: list[str]) -> list[str] | str:
    """PEFT's union of ``target_modules`` (names merged, or regexes joined by ``|``); for a
    mix of the two, the adapted modules' paths."""
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in dict.fromkeys(targets))
    if all(isinstance(t, list) for t in targets):
        return sorted({name for t in targets for name in t or ()})
    return sorted(paths)
