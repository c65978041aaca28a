"""The combined adapter's tensors at one module (:class:`~.combine_sites.Site`).

* factors: ``cat`` stacks them (exact), the factor-wise types combine A and B separately (as
  PEFT), the ``svd`` types combine the ``ΔWᵢ`` and truncate by SVD — plain ``svd`` (without
  ``svd_clamp``) through the exact low-rank route (QR of the stacked factors, SVD of an R × R
  core), never forming ΔW;
* LoRA biases (``lora_bias``): the adapter adds ``sᵢ·bᵢ`` to the output, so the combination's
  bias is ``Σ wᵢ sᵢ bᵢ`` (scaling 1), whatever the type;
* DoRA magnitudes: task arithmetic on their change from the base's row norms ``m₀``:
  ``m = m₀ + Σ wᵢ (mᵢ − m₀) = Σ wᵢ mᵢ + (1 − Σ wᵢ) m₀`` (with weights summing to 1, ``m₀``
  drops out, so saved adapters combine without the base).
"""

from __future__ import annotations

import math

import torch

from adapt.core import ConfigError
from adapt.core.method import CombineOptions

from .combine_math import combine_tasks, lowrank_svd_factors, svd_factors
from .combine_sites import Site

__all__ = ["FACTOR_WISE", "ON_DELTA", "site_tensors"]

#: factor-wise types; the ΔW types (the task combination each applies before the SVD)
FACTOR_WISE = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
ON_DELTA = {
    "svd": "linear",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def site_tensors(
    kind: str, site: Site, options: CombineOptions, rank: int, *, lora_bias: bool
) -> dict[str, torch.Tensor]:
    """The combined adapter's tensors at ``site``, keyed relative to it (``lora_A.weight``)."""
    if kind == "cat":
        a, b = cat(site)
    elif kind in FACTOR_WISE:
        a, b = factor_wise(kind, site, options)
    else:
        a, b = on_delta(ON_DELTA[kind], site, options, rank)
    out = {site.keys[0]: a.contiguous(), site.keys[1]: b.contiguous()}
    if lora_bias and not site.embedding:
        out["lora_B.bias"] = bias(site, b)
    if any(m is not None for m in site.magnitudes):
        out["lora_magnitude_vector"] = magnitude(site)
    return out


def cat(site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = site.factors[0][0].dtype
    pairs = zip(site.factors, site.weights, site.scalings, strict=True)
    a = torch.cat([a.to(_work_dtype(a)) * (w * s) for (a, _), w, s in pairs])
    b = torch.cat([b for _, b in site.factors], dim=1)
    return a.to(dtype), b.to(dtype)


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
    factors = None
    if kind == "linear" and options.svd_clamp is None:
        # the clamp's quantile depends on the singular vectors' signs, which only the dense
        # SVD gives as PEFT has them: with svd_clamp, the dense route
        factors = _lowrank(site, options, rank)
    if factors is None:
        factors = _dense(kind, site, options, rank)
    b, a = factors
    a = a.reshape((rank, *a0.shape[1:]))
    b = b.reshape((b0.shape[0], rank, *b0.shape[2:]))
    return a.to(a0.dtype), b.to(b0.dtype)


def _lowrank(
    site: Site, options: CombineOptions, rank: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    pairs = zip(site.factors, site.weights, site.scalings, strict=True)
    a_cat = torch.cat([a.flatten(1).to(_work_dtype(a)) * (w * s) for (a, _), w, s in pairs])
    b_cat = torch.cat([b.flatten(1).to(_work_dtype(b)) for _, b in site.factors], dim=1)
    return lowrank_svd_factors(b_cat, a_cat, rank, options.svd_clamp, options.svd_driver)


def _dense(
    kind: str, site: Site, options: CombineOptions, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
    return svd_factors(
        mixed, rank, options.svd_clamp, options.svd_full_matrices, options.svd_driver
    )


def bias(site: Site, b: torch.Tensor) -> torch.Tensor:
    """``Σ wᵢ sᵢ bᵢ`` over the sources with a LoRA bias here (zeros when none has one)."""
    total = torch.zeros(b.shape[0], dtype=_work_dtype(b), device=b.device)
    terms = zip(site.biases, site.weights, site.scalings, strict=True)
    for value, w, s in terms:
        if value is not None:
            total = total + value.to(total.dtype) * (w * s)
    return total.to(b.dtype)


def weights_sum_to_one(weights: list[float]) -> bool:
    return abs(math.fsum(weights) - 1.0) <= 1e-9


def magnitude(site: Site) -> torch.Tensor:
    """``Σ wᵢ mᵢ + (1 − Σ wᵢ) m₀`` (``m₀`` only needed when the weights do not sum to 1)."""
    values = [m for m in site.magnitudes if m is not None]
    if len(values) != len(site.magnitudes):
        raise ConfigError(
            f"add_weighted_adapter: at {site.path} some adapters are DoRA adapters and some "
            "are not; combine adapters of one kind"
        )
    first = values[0]
    total = torch.zeros(first.shape, dtype=_work_dtype(first), device=first.device)
    for value, w in zip(values, site.weights, strict=True):
        total = total + value.to(total.dtype) * w
    if not weights_sum_to_one(site.weights):
        if site.base_norm is None:
            raise ConfigError(
                f"combine: DoRA magnitudes combine as m₀ + Σ wᵢ (mᵢ − m₀), which needs the base "
                f"weight's row norms m₀ unless the weights sum to 1 (at {site.path} they sum "
                f"to {math.fsum(site.weights):g}); combine in the model (add_weighted_adapter) "
                "or use weights that sum to 1"
            )
        base = site.base_norm().to(total.dtype).view(first.shape)
        total = total + base * (1.0 - math.fsum(site.weights))
    return total.to(first.dtype)
