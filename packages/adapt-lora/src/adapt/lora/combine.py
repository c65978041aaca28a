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
``alpha_pattern`` (PEFT writes them empty, so its result cannot be reloaded: #3737). LoRA
biases and DoRA magnitudes combine by task arithmetic (:mod:`.combine_compute`; PEFT drops the
first and keeps the fresh magnitudes ``‖W‖``). :func:`combine_files` does the same from saved
adapters alone (``adapt combine``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch

from adapt.core import ConfigError
from adapt.core.method import CombineOptions
from adapt.core.progress import progress
from adapt.core.protocols import ModelView

from .combine_compute import FACTOR_WISE, ON_DELTA, site_tensors
from .combine_sites import PREFIX, Site, sites_from_files, sites_from_model
from .config import LoraConfig

__all__ = ["TYPES", "combine", "combine_files"]

TYPES = (*sorted(FACTOR_WISE), "cat", *ON_DELTA)


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
    kind = plan_kind(configs, sources, options)
    sites = sites_from_model(model, sources, weights)
    config, ranks = plan(kind, configs, sources, sites, options)

    def tensors() -> dict[str, torch.Tensor]:
        return compute(kind, sites, options, ranks, lora_bias=config.lora_bias)

    return config, tensors


def combine_files(
    configs: Sequence[LoraConfig],
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    options: CombineOptions,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """:func:`combine` from saved adapters' configs and tensors (keys as on disk): the same
    sites, plan and arithmetic, so the same bytes as the in-model combination, saved."""
    sources = [f"#{i + 1}" for i in range(len(configs))]  # core says which folder is which
    kind = plan_kind(configs, sources, options)
    sites = sites_from_files(configs, states, weights, sources)
    config, ranks = plan(kind, configs, sources, sites, options)
    out = compute(kind, sites, options, ranks, lora_bias=config.lora_bias, show_progress=True)
    return config, {PREFIX + key: value for key, value in out.items()}


def plan_kind(
    configs: Sequence[LoraConfig], sources: Sequence[str], options: CombineOptions
) -> str:
    refuse_unsupported(configs, sources)
    # one adapter: PEFT combines it linearly whatever the type (exact: w · ΔW, scaling 1)
    kind = "linear" if len(sources) == 1 else options.combination_type
    check_kind(kind, options)
    return kind


def plan(
    kind: str,
    configs: Sequence[LoraConfig],
    sources: Sequence[str],
    sites: list[Site],
    options: CombineOptions,
) -> tuple[LoraConfig, dict[str, int]]:
    if not sites:
        raise ConfigError(f"add_weighted_adapter: adapters {list(sources)} adapt no module")
    svd_rank = options.svd_rank or max(max(site.ranks) for site in sites)
    ranks = {site.path: planned_rank(kind, site, svd_rank) for site in sites}
    return new_config(configs, ranks), ranks


def compute(
    kind: str,
    sites: list[Site],
    options: CombineOptions,
    ranks: dict[str, int],
    *,
    lora_bias: bool,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    bar = progress(sites, desc=f"combining ({kind})", unit="module", enable=None)
    with torch.no_grad():
        for site in bar if show_progress else sites:
            tensors = site_tensors(kind, site, options, ranks[site.path], lora_bias=lora_bias)
            out.update({f"{site.path}.{name}": value for name, value in tensors.items()})
    return out


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
        ("target_parameters", "parameter targets (MoE experts) are not combined (as in PEFT)"),
        ("trainable_token_indices", "trainable tokens are not LoRA factors"),
        ("modules_to_save", "a combination has no rule for full module copies"),
    )  # fmt: skip
    for name, config in zip(sources, configs, strict=True):
        for field, reason in reasons:
            if getattr(config, field):
                raise ConfigError(
                    f"add_weighted_adapter: adapter {name!r} sets {field}={getattr(config, field)!r}"
                    f", which cannot be combined: {reason}; combine plain LoRA adapters"
                )
        if config.variant not in (None, "dora"):
            raise ConfigError(
                f"add_weighted_adapter: adapter {name!r} uses the LoRA variant "
                f"{config.variant!r}, whose extra state has no combination rule; combine plain "
                "LoRA or DoRA adapters"
            )
        if config.bias != "none":
            raise ConfigError(
                f"add_weighted_adapter: adapter {name!r} trains the model's own biases "
                f"(bias={config.bias!r}); those are base weights, not adapter factors, and have "
                "no combination rule; combine adapters trained with bias='none'"
            )
    dora = {name: config.use_dora for name, config in zip(sources, configs, strict=True)}
    if len(set(dora.values())) > 1:
        raise ConfigError(
            f"add_weighted_adapter: adapters {[n for n, d in dora.items() if d]} are DoRA "
            f"adapters and {[n for n, d in dora.items() if not d]} are not; DoRA's magnitudes "
            "have no counterpart in a plain LoRA adapter: combine adapters of one kind"
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
        lora_bias=any(c.lora_bias for c in configs),
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
    first = targets[0]
    if first is not None and all(t == first for t in targets):
        return first  # one value (``"all-linear"`` included) stays as it is
    if any(t == "all-linear" for t in targets):
        return sorted(paths)  # a keyword, not a regex: it cannot be joined
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in dict.fromkeys(targets))
    if all(isinstance(t, list) for t in targets):
        return sorted({name for t in targets for name in t or ()})
    return sorted(paths)
