"""What a hot-swap will change, worked out and checked before anything changes.

:func:`check_configs` refuses adapter pairs whose difference a swap of tensors cannot carry;
:func:`build_plan` maps the saved tensors onto the loaded adapter's ("slots"), refuses any
that do not fit, and returns the in-place copies, the layers to zero and the new ranks and
scalings. Nothing here touches the model: :mod:`adapt.lora.hotswap` applies the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from adapt.core import AdapterStateError, CheckpointError, ConfigError
from adapt.core.adapters import AdapterSet
from adapt.core.distributed import clean_key
from adapt.core.state_dict import PREFIX, embedding_parameter, normalise_peft_keys

from .config import LoraConfig, weight_init
from .layer import LoraLayer
from .parameters import LoraParameter
from .variants import variant_name

__all__ = ["RANK_AXIS", "Plan", "Slot", "build_plan", "check_configs", "rank_axis", "slots_of"]

#: The axis that holds the rank, by a tensor's container (the first part of its suffix).
RANK_AXIS = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}

_PREPARE = (
    "call prepare_model_for_compiled_hotswap(model, target_rank=R) with R at least the largest "
    "rank you will swap in, after loading the first adapter and before compiling"
)


def rank_axis(suffix: str) -> int | None:
    """The rank axis of the tensor stored under ``suffix`` (``lora_A.weight`` → 0), or None
    (``lora_B.bias``, a variant's tensors)."""
    head, _, tail = suffix.partition(".")
    return RANK_AXIS.get(head) if tail in ("", "weight") else None


@dataclasses.dataclass
class Plan:
    """The changes of one swap: ``copies`` (live tensor, value of its shape), tensors to
    ``zero``, per layer ``(layer, r, alpha, scaling)``, and each slot's new rank (0: the new
    adapter does not target it)."""

    copies: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)
    zero: list[torch.Tensor] = dataclasses.field(default_factory=list)
    layers: list[tuple[LoraLayer, int, float, float]] = dataclasses.field(default_factory=list)
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)


def _unsupported(config: LoraConfig) -> str | None:
    """Why an adapter with ``config`` cannot take part in a swap, or None."""
    if config.modules_to_save:
        return f"modules_to_save={list(config.modules_to_save)} (whole modules, not LoRA tensors)"
    if config.trainable_token_indices is not None:
        return "trainable_token_indices (a token-embedding layer, not LoRA tensors)"
    if config.target_parameters:
        return f"target_parameters={list(config.target_parameters)}"
    if config.bias != "none":
        return f"bias={config.bias!r} (it trains the base model's biases)"
    if weight_init(config.init_lora_weights) is not None:
        return f"init_lora_weights={config.init_lora_weights!r} (it changes the base weights)"
    return None


def check_configs(old: LoraConfig, new: LoraConfig, adapter_name: str, source: str) -> None:
    """Refuse a pair of adapters a swap of tensors cannot turn one into the other."""
    for who, config in ((f"the loaded adapter {adapter_name!r}", old), (source, new)):
        reason = _unsupported(config)
        if reason is not None:
            raise ConfigError(
                f"cannot hot-swap: {who} uses {reason}; hot-swapping replaces plain LoRA, DoRA "
                "and lora_bias tensors in place. Load the adapter beside the others with "
                "model.load_adapter(path, adapter_name=...) instead"
            )
    same = {
        "the LoRA variant (use_dora / variant)": (variant_name(old), variant_name(new)),
        "variant_options": (dict(old.variant_options), dict(new.variant_options)),
        "lora_bias": (old.lora_bias, new.lora_bias),
        "fan_in_fan_out": (old.fan_in_fan_out, new.fan_in_fan_out),
    }
    for what, (was, now) in same.items():
        if was != now:
            raise ConfigError(
                f"cannot hot-swap {source} into adapter {adapter_name!r}: {what} differs "
                f"(loaded {was!r}, new {now!r}), so the layers would need other tensors or "
                "another forward. Swap only between adapters that agree on it, or load the new "
                "one with model.load_adapter(path, adapter_name=...)"
            )
    if old.lora_dropout != new.lora_dropout:
        raise ConfigError(
            f"cannot hot-swap {source} into adapter {adapter_name!r}: lora_dropout differs "
            f"(loaded {old.lora_dropout}, new {new.lora_dropout}); the layers' dropout modules "
            "would change (a compiled model recompiles on that). Dropout does not act in eval "
            f'mode: to serve the new adapter, set "lora_dropout": {old.lora_dropout} in its '
            "adapter_config.json, or load it with model.load_adapter(path, adapter_name=...)"
        )


@dataclasses.dataclass
class Slot:
    """One layer holding the loaded adapter: its path, the layer, and by on-disk key the
    suffix and live tensor of each of the adapter's tensors there."""

    path: str
    layer: LoraLayer
    tensors: dict[str, tuple[str, torch.Tensor]]


def slots_of(adapters: AdapterSet, name: str) -> dict[str, Slot]:
    """The layers holding adapter ``name``, by path; refuses layers a swap cannot serve."""
    slots: dict[str, Slot] = {}
    for path, layer in adapters.layers():
        if name not in layer.adapter_names:
            continue
        if not isinstance(layer, LoraLayer) or isinstance(layer, LoraParameter):
            raise ConfigError(
                f"cannot hot-swap adapter {name!r}: {path} holds it in a "
                f"{type(layer).__name__}, which hot-swapping does not support (LoRA layers on "
                "modules only)"
            )
        if name in layer.merged_adapters:
            raise AdapterStateError(
                f"cannot hot-swap adapter {name!r}: it is merged into {path}; call "
                "model.unmerge_adapter() first (swapping merged weights would corrupt them)"
            )
        tensors = layer.adapter_tensors(name).items()
        keys = {clean_key(f"{PREFIX}{path}.{s}"): (s, t) for s, t in tensors}
        slots[path] = Slot(path, layer, keys)
    return slots


def _module_of(key: str) -> str:
    """The module path an on-disk LoRA key belongs to (``base_model.model.`` removed)."""
    tail = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    head, sep, _ = tail.partition(".lora_")
    return head if sep else tail


def _refuse_strays(strays: list[str], slots: dict[str, Any], name: str, source: str) -> None:
    if not strays:
        return
    new = sorted({_module_of(k) for k in strays} - set(slots))
    if new:
        raise CheckpointError(
            f"{source} targets {len(new)} module(s) that adapter {name!r} does not: "
            f"{new[:5]}. Hot-swapping replaces tensors in place, so the new adapter must target "
            "the same modules or fewer: load the adapter with the most targets first, or load "
            "this one beside the others with model.load_adapter(path, adapter_name=...)"
        )
    raise CheckpointError(
        f"{source}: tensor(s) {sorted(strays)[:3]} have no counterpart in adapter {name!r} "
        "(a different LoRA layer type, or tensors of another kind); was it saved for another "
        "base model?"
    )


def _check_value(key: str, value: torch.Tensor, source: str) -> None:
    if not value.is_floating_point():
        raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}, not a float")
    if not torch.isfinite(value).all():
        raise CheckpointError(f"{source}: tensor {key!r} holds NaN or Inf values")


def _fitted(value: torch.Tensor, live: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``value`` in ``live``'s dtype, device and shape (zero past its rank along ``axis``)."""
    value = value.to(device=live.device, dtype=live.dtype)
    if axis is None or value.shape == live.shape:
        return value
    out = torch.zeros_like(live)
    out.narrow(axis, 0, value.shape[axis]).copy_(value)
    return out


def _shape_problem(
    suffix: str, value: torch.Tensor, live: torch.Tensor, rank: int, prepared: bool
) -> str | None:
    """What is wrong with the shape of ``value`` for the slot ``live``, or None; a message
    starting with "rank" is a rank that does not fit the slot."""
    axis = rank_axis(suffix)
    want = list(live.shape)
    if axis is not None and value.dim() == live.dim():
        got = value.shape[axis]
        if got != rank:
            return f"shape {tuple(value.shape)} disagrees with the rank {rank} its config gives"
        if got > live.shape[axis] or (got < live.shape[axis] and not prepared):
            return f"rank {got}, the loaded slot holds {live.shape[axis]}"
        want[axis] = got
    if tuple(value.shape) != tuple(want):
        return f"shape {tuple(value.shape)}, the model expects {tuple(want)}"
    return None


def _plan_layer(
    plan: Plan, name: str, slot: Slot, given: dict[str, torch.Tensor], config: LoraConfig,
    source: str,
) -> list[str]:  # fmt: skip
    """Add one layer's copies and scaling to ``plan``; returns its rank problems."""
    layer_missing = sorted(set(slot.tensors) - set(given))
    if layer_missing:
        raise CheckpointError(
            f"{source} lacks {layer_missing[:3]}, which adapter {name!r} has at {slot.path}; "
            "the adapters differ in kind (DoRA, lora_bias) or the file is incomplete"
        )
    r, alpha = config.rank_and_alpha(slot.path)
    prepared = isinstance(slot.layer.scaling[name], torch.Tensor)
    ranks: list[str] = []
    for key, (suffix, live) in slot.tensors.items():
        value = given[key]
        _check_value(key, value, source)
        problem = _shape_problem(suffix, value, live, r, prepared)
        if problem is not None and problem.startswith("rank"):
            ranks.append(f"{slot.path} ({problem})")
        elif problem is not None:
            raise CheckpointError(
                f"{source}: tensor {key!r} has {problem}; the checkpoint and its config "
                "disagree, or it was saved for another base model"
            )
        else:
            plan.copies.append((live, _fitted(value, live, rank_axis(suffix))))
    plan.layers.append((slot.layer, r, alpha, config.scaling(r, alpha)))
    plan.ranks[slot.path] = r
    return ranks


def build_plan(
    adapters: AdapterSet,
    name: str,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    source: str,
) -> Plan:
    """Check ``tensors`` (a saved adapter with ``config``) against adapter ``name`` and return
    what swapping them in changes; raises before any change if they do not fit."""
    slots = slots_of(adapters, name)
    plan = Plan()
    owner = {key: path for path, slot in slots.items() for key in slot.tensors}
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    strays: list[str] = []
    for key, value in normalise_peft_keys(tensors).items():
        if key in owner:
            by_path.setdefault(owner[key], {})[key] = value
            continue
        embedding = embedding_parameter(adapters.model, key)
        if embedding is None:
            strays.append(key)
            continue
        if tuple(value.shape) != tuple(embedding.shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the model's embedding "
                f"{tuple(embedding.shape)}; was the adapter saved for another base model?"
            )
        _check_value(key, value, source)
        plan.copies.append((embedding, value.to(embedding.device, embedding.dtype)))
    _refuse_strays(strays, slots, name, source)
    rank_problems: list[str] = []
    for path, slot in slots.items():
        if path in by_path:
            rank_problems += _plan_layer(plan, name, slot, by_path[path], config, source)
        else:
            plan.zero.extend(t for _, t in slot.tensors.values())
            plan.ranks[path] = 0
    _refuse_ranks(rank_problems, name, source)
    if plan.zero and variant_name(config) is not None:
        missing = sorted(p for p, r in plan.ranks.items() if r == 0)
        raise ConfigError(
            f"cannot hot-swap {source} into adapter {name!r}: it does not target {missing[:5]}, "
            f"and a {variant_name(config)!r} adapter cannot be zeroed there (its magnitudes "
            "rescale the base output); swap between adapters with the same targets"
        )
    return plan


def _refuse_ranks(problems: list[str], name: str, source: str) -> None:
    if problems:
        raise CheckpointError(
            f"cannot hot-swap {source} into adapter {name!r}: its ranks do not fit the loaded "
            f"slots at {len(problems)} layer(s), e.g. {problems[:3]}. Without preparation the "
            f"ranks must be equal; to swap other ranks (up to R), {_PREPARE}"
        )
