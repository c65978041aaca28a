"""Applying PiSSA, OLoRA and LoftQ to an adapter's layers (``LoraMethod.initialise``).

Runs once the layers exist and before they go into the model. Everything that could refuse is
checked on every layer first; then each layer reads its base weight through its weight backend,
gets its factors (:mod:`adapt.lora.inits`) and writes the new base weight back through the
backend. If anything fails part-way the layers done so far get their base weights back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch

from adapt.core import ConfigError, MergeReport, TargetError
from adapt.core.distributed import is_partitioned
from adapt.core.errors import warn_user
from adapt.core.merge import worst
from adapt.core.progress import progress
from adapt.core.quantisers import quantiser_for
from adapt.core.typenames import describe

from .config import LoraConfig, weight_init
from .corda import corda_factors, corda_forget, corda_refusal
from .init_state import forget_init, restore_base, store_init
from .inits import full_float32, loftq_factors, olora_factors, pissa_factors
from .layer import LoraLinear
from .tokens import TrainableTokensLayer

__all__ = ["initialise"]


def kind_name(kind: str) -> str:
    return {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA", "loftq": "LoftQ"}[kind]


def _label(config: LoraConfig) -> str:
    return f"init_lora_weights={config.init_lora_weights!r}"


def _refusal(layer: LoraLinear, kind: str, adapter_name: str, config: LoraConfig) -> str | None:
    base = layer.get_base_layer()
    weight = cast(torch.Tensor, getattr(base, "weight", None))
    r = layer.r[adapter_name]
    if isinstance(weight, torch.Tensor) and (weight.is_meta or is_partitioned(weight)):
        return (
            f"{_label(config)} reads the base weight, and {describe(base)}'s is not here "
            "(meta device or a ZeRO-3 partition): create the adapter on the loaded model, "
            "outside deepspeed.zero.Init"
        )
    if kind in ("pissa", "olora") and r > min(layer.out_features, layer.in_features):
        return (
            f"rank r={r} is larger than the weight allows ({layer.out_features} × "
            f"{layer.in_features}: at most {min(layer.out_features, layer.in_features)}); "
            f"{kind.upper()} takes r directions of the weight: lower r (rank_pattern for this module)"
        )
    if kind == "corda":
        why = corda_refusal(layer, adapter_name, config)
        if why is not None:
            return why
    if not layer.backend.lossy:
        return None
    if kind in ("pissa", "corda"):
        return (
            f"{kind_name(kind)} on a quantised layer ({describe(base)}) would requantise the residual and "
            f"change the model's output (PEFT refuses PiSSA there too): initialise {kind_name(kind)} on the float "
            "model, save or keep the residual model, then quantise it"
        )
    if kind == "loftq":
        return (
            f"init_lora_weights='loftq' quantises a float model itself, and {describe(base)} is "
            "already quantised: for a quantised model use replace_lora_weights_loftq(model, "
            "model_path=<folder of the float model's safetensors>)"
        )
    return None


def _split(layers: Mapping[str, Any]) -> tuple[dict[str, LoraLinear], list[str]]:
    chosen = {
        p: layer
        for p, layer in layers.items()
        if isinstance(layer, LoraLinear) and layer.initialised_from_weight
    }
    others = [
        p for p in layers if p not in chosen and not isinstance(layers[p], TrainableTokensLayer)
    ]
    return chosen, others


def _factors(
    layer: LoraLinear,
    adapter_name: str,
    kind: str,
    niter: int | None,
    config: LoraConfig,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, new base weight)`` for one layer (float32, canonical layout)."""
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if kind == "loftq":
        options = cast(dict[str, Any], config.loftq_config)  # a dict once validated
        roundtrip = quantiser_for(int(options["loftq_bits"]))
        return loftq_factors(weight, r, scaling, int(options.get("loftq_iter", 1)), roundtrip)
    if kind == "pissa":
        a, b = pissa_factors(weight, r, scaling, niter)
    elif kind == "corda":
        a, b = corda_factors(layer, weight, r, scaling)
    else:
        a, b = olora_factors(weight, r)
    return a, b, torch.addmm(weight, b, a, alpha=-scaling)


def _initialise_layer(
    layer: LoraLinear, adapter_name: str, kind: str, niter: int | None, config: LoraConfig
) -> MergeReport:
    base = layer.get_base_layer()
    weight = layer.backend.get_weight(base).detach().float()
    with full_float32():
        a, b, new_base = _factors(layer, adapter_name, kind, niter, config, weight)
    weight_a = cast(torch.Tensor, layer.lora_A[adapter_name].weight)
    weight_b = cast(torch.Tensor, layer.lora_B[adapter_name].weight)
    with torch.no_grad():
        weight_a.copy_(a.to(weight_a.dtype))
        weight_b.copy_(b.to(weight_b.dtype))
    if kind != "loftq":
        store_init(layer, adapter_name, a, b, layer.scaling[adapter_name])
    report = layer.backend.set_weight(base, new_base.to(weight.device))
    variant = layer.lora_variant.get(adapter_name)
    if variant is not None:  # DoRA's magnitude: of the new base + s·BA, as in PEFT
        variant.init(layer._lora, adapter_name, config)
    return report


def initialise(config: LoraConfig, adapter_name: str, layers: Mapping[str, Any]) -> None:
    """PiSSA / OLoRA / LoftQ on the adapter's linear layers (others keep the default
    initialisation, as in PEFT, with a warning). Refusals before anything changes; a failure
    part-way gives the finished layers their base weights back."""
    found = weight_init(config.init_lora_weights)
    if found is None:
        return
    kind, niter = found
    chosen, others = _split(layers)
    for path, layer in chosen.items():
        why = _refusal(layer, kind, adapter_name, config)
        if why is not None:
            raise TargetError(f"cannot initialise {path!r}: {why}")
    if kind == "loftq":
        bits = cast(dict[str, Any], config.loftq_config)["loftq_bits"]
        quantiser_for(int(bits))  # installed? (before any change)
    if others:
        shown = ", ".join(repr(p) for p in others[:3]) + (" …" if len(others) > 3 else "")
        warn_user(
            f"{_label(config)} initialises linear layers only; {len(others)} other targeted "
            f"module(s) ({shown}) get the default initialisation (as in PEFT)"
        )
    if kind == "loftq" and not chosen:
        raise ConfigError(f"{_label(config)}: no linear layer among the targets to initialise")
    _run(config, adapter_name, kind, niter, chosen)


def _run(
    config: LoraConfig,
    adapter_name: str,
    kind: str,
    niter: int | None,
    chosen: dict[str, LoraLinear],
) -> None:
    done: list[tuple[LoraLinear, torch.Tensor | None]] = []
    reports: list[MergeReport] = []
    try:
        bar = progress(chosen.values(), desc=f"{kind} init", unit="layer", min_items=8)
        for layer in bar:
            # LoftQ's new base is not W − s·BA, and a quantised base does not come back
            # exactly from W − s·BA + s·BA: keep the original until every layer is done
            keep = None
            if kind == "loftq" or layer.backend.lossy:
                keep = layer.backend.get_weight(layer.get_base_layer()).detach().clone()
            reports.append(_initialise_layer(layer, adapter_name, kind, niter, config))
            done.append((layer, keep))
    except BaseException:
        for layer, original in reversed(done):
            if original is None:
                restore_base(layer, adapter_name)
            else:
                layer.backend.set_weight(layer.get_base_layer(), original)
            forget_init(layer, adapter_name)
        raise
    if kind == "corda":
        for layer in chosen.values():
            corda_forget(layer)  # the decomposition is used up (PEFT deletes it too)
    cost = worst(reports)
    if cost.lossy:
        warn_user(
            f"{_label(config)} on quantised layers: their residual weights were quantised "
            f"again, so the model's output at init differs from the base's (largest relative "
            f"weight error {cost.rel_error:.3g}, as in PEFT)"
        )
