"""Loading an EVA state dict into an adapter (:func:`adapt.lora.eva.initialize_lora_eva_weights`).

Everything is checked first (each entry names a LoRA linear layer of the adapter, by adapt's
path or PEFT's, and has that layer's ``in_features`` columns); then each layer is changed: rank 0
gives the base module back (or deletes just this adapter from a layer that holds others), a new
rank re-creates the adapter's tensors, ``lora_A`` takes the components and ``lora_B`` is zeroed.
If anything fails part-way, the layers done so far are put back as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from adapt.core import AdaptedModel, ConfigError
from adapt.core.errors import warn_user
from adapt.core.parameter_layer import ParameterLayer
from adapt.core.saving import record_shapes
from adapt.core.trainability import apply_active

from .config import LoraConfig
from .eva_fit import PEFT_PREFIX
from .layer import LoraLayer, LoraLinear

_TABLES = ("r", "lora_alpha", "scaling")


@dataclass
class _Change:
    path: str
    layer: LoraLayer
    rank: int
    alpha: float
    rows: torch.Tensor | None  # None: not in the state dict (default init)


@dataclass
class Plan:
    """What loading does: per-layer changes and the adapter config's new fields."""

    changes: list[_Change] = field(default_factory=list)
    target_modules: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _by_path(
    state_dict: Any, linear: dict[str, LoraLinear], others: list[str]
) -> dict[str, torch.Tensor]:
    """The entries by adapt path, each checked against its layer."""
    if not isinstance(state_dict, Mapping):
        raise ConfigError(
            f"eva_state_dict must map layer paths to tensors, got {type(state_dict).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        path = key
        if key not in linear and isinstance(key, str) and key.startswith(PEFT_PREFIX):
            path = key[len(PEFT_PREFIX) :]
        if path not in linear:
            unknown.append(key)
            continue
        if path in out:
            raise ConfigError(f"eva_state_dict has {path!r} twice (by adapt's and PEFT's name)")
        width = linear[path].in_features
        if (
            not isinstance(value, torch.Tensor)
            or value.dim() != 2
            or value.shape[1] != width
            or not value.is_floating_point()
        ):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(
                f"eva_state_dict[{key!r}] must be a float tensor of shape (rank, {width}) "
                f"(the layer's in_features), got {got}; compute it with get_eva_state_dict on "
                "this model"
            )
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(f"eva_state_dict[{key!r}] holds NaN or infinite values")
        out[path] = value
    if unknown:
        hint = [k for k in unknown if k in others]
        raise ConfigError(
            f"eva_state_dict has {len(unknown)} entries that name no LoRA linear layer of the "
            f"adapter, e.g. {unknown[:3]}"
            + (f" ({hint[:3]} are not linear: EVA initialises linear layers only)" if hint else "")
            + f"; its keys are layer paths such as {list(linear)[:2]} (PEFT's "
            f"'{PEFT_PREFIX}' + path works too)"
        )
    return out


def plan_eva(model: AdaptedModel, config: LoraConfig, name: str, state_dict: Any) -> Plan:
    """Check ``state_dict`` and work out every change (PEFT's ``_load_eva_state_dict``)."""
    layers = [
        (p, layer)
        for p, layer in model.adapter_set.layers()
        if isinstance(layer, LoraLayer)
        and not isinstance(layer, ParameterLayer)
        and name in layer.adapter_names
    ]
    linear = {p: layer for p, layer in layers if isinstance(layer, LoraLinear)}
    given = _by_path(state_dict, linear, [p for p, _ in layers if p not in linear])
    plan = Plan()
    eva = config.eva_config
    for path, layer in layers:
        rows = given.get(path)
        if rows is None:
            rank, alpha = layer.r[name], layer.lora_alpha[name]
            plan.missing.append(path)
        else:
            r, alpha = config.rank_and_alpha(path)
            rank = int(rows.shape[0])
            if rank == 0:
                plan.changes.append(_Change(path, layer, 0, alpha, rows))
                continue
            if rank != r and (eva is None or eva.adjust_scaling_factors):
                alpha *= rank / r
            plan.target_modules.append(path)
        plan.changes.append(_Change(path, layer, rank, alpha, rows))
        if rank != config.r:
            plan.rank_pattern[path] = rank
        if alpha != config.lora_alpha:
            plan.alpha_pattern[path] = alpha
    plan.target_modules += plan.missing
    if not plan.target_modules:
        raise ConfigError(
            "every layer of the adapter would get rank 0 from eva_state_dict: the adapter "
            "would be empty"
        )
    return plan


@dataclass
class _Snapshot:
    """One adapter's state on one layer, to put back if loading fails."""

    entries: dict[str, Any]
    tables: dict[str, Any]
    variant: Any
    variant_state: dict[Any, Any]
    active: list[str]
    names: tuple[str, ...]
    data: list[tuple[torch.Tensor, torch.Tensor]]


def _containers(layer: LoraLayer) -> tuple[str, ...]:
    return (*layer.adapter_layer_names, *layer.other_param_names)


def _snapshot(layer: LoraLayer, name: str) -> _Snapshot:
    entries = {a: getattr(layer, a)[name] for a in _containers(layer) if name in getattr(layer, a)}
    tensors = [
        t
        for e in entries.values()
        for t in (e.parameters() if isinstance(e, nn.Module) else [e])
        if not t.is_meta
    ]
    return _Snapshot(
        entries=entries,
        tables={t: getattr(layer, t).get(name) for t in _TABLES},
        variant=layer.lora_variant.get(name),
        variant_state=dict(layer.variant_state),
        active=list(layer.active_adapters),
        names=tuple(layer.adapter_layer_names),
        data=[(t, t.detach().clone()) for t in tensors],
    )


def _restore(layer: LoraLayer, name: str, snap: _Snapshot) -> None:
    for attr in {*_containers(layer), *snap.entries}:
        container = getattr(layer, attr, None)
        if container is not None and name in container:
            del container[name]
    for attr, entry in snap.entries.items():
        getattr(layer, attr)[name] = entry
    for tensor, saved in snap.data:
        tensor.copy_(saved)
    for table, value in snap.tables.items():
        getattr(layer, table).pop(name, None)
        if value is not None:
            getattr(layer, table)[name] = value
    layer.lora_variant.pop(name, None)
    if snap.variant is not None:
        layer.lora_variant[name] = snap.variant
    layer.variant_state.clear()
    layer.variant_state.update(snap.variant_state)
    layer.active_adapters = snap.active
    # the layer's own list (a variant may have extended the class's)
    object.__setattr__(layer, "adapter_layer_names", snap.names)


def _change(
    model: AdaptedModel, config: LoraConfig, name: str, c: _Change, undo: list[Callable[[], None]]
) -> None:
    layer = c.layer
    if c.rank == 0 and layer.adapter_names == [name]:
        model.adapter_set.replace(c.path, layer.base_layer)
        undo.append(lambda: model.adapter_set.replace(c.path, layer))
        return
    snap = _snapshot(layer, name)
    undo.append(lambda: _restore(layer, name, snap))
    if c.rank == 0:
        layer.delete_adapter(name)
        return
    if c.rows is None:  # not in the state dict: the default init, as PEFT falls back to
        layer.reset_lora_parameters(name, True)
        return
    weight_a = cast(torch.Tensor, layer.lora_A[name].weight)
    if c.rank != layer.r[name] or weight_a.is_meta:
        training = layer.training
        layer.delete_adapter(name)
        layer.update_layer(name, config, r=c.rank, lora_alpha=c.alpha)
        layer.train(training)
        weight_a = cast(torch.Tensor, layer.lora_A[name].weight)
    else:
        layer.lora_alpha[name] = c.alpha
        layer.scaling[name] = config.scaling(c.rank, c.alpha)
    weight_a.copy_(c.rows.to(weight_a.dtype))
    cast(torch.Tensor, layer.lora_B[name].weight).zero_()


@torch.no_grad()
def apply_eva(model: AdaptedModel, config: LoraConfig, name: str, plan: Plan) -> None:
    """Make the changes of ``plan``; all of them, or (on any error) none."""
    undo: list[Callable[[], None]] = []
    try:
        for change in plan.changes:
            _change(model, config, name, change, undo)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    config.target_modules = plan.target_modules
    config.rank_pattern = plan.rank_pattern
    config.alpha_pattern = plan.alpha_pattern
    apply_active(model.adapter_set)
    record_shapes(model, name)
    if plan.missing:
        warn_user(
            f"EVA: {plan.missing[:5]} ({len(plan.missing)} layers) were not in the EVA state "
            "dict and have the default initialisation (init_lora_weights=True); EVA "
            "initialises linear layers only"
        )
