"""The tensors ``save_pretrained`` writes: whole, under PEFT's keys, checked against the shapes
the adapter was built with, whatever engine holds them (see :mod:`adapt.core.distributed`).

``model`` here is an :class:`~adapt.core.AdaptedModel` (typed loosely: this module sits below
``model`` and does not import it); the recorded shapes are kept by its adapter set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .distributed import (
    clean_key,
    engine_of,
    logical_shape,
    needs_collective,
    unreadable_message,
    whole_copies,
)
from .errors import CheckpointError


def record_shapes(model: Any, adapter_name: str) -> None:
    """Remember the shape of each of the adapter's tensors (called when it is built or
    reshaped for loading, before any engine shards it): the truth a save is checked against."""
    model.adapter_set.shapes[adapter_name] = {
        key: logical_shape(t) for key, t in model.adapter_state_dict(adapter_name).items()
    }


def forget_shapes(model: Any, adapter_name: str) -> None:
    model.adapter_set.shapes.pop(adapter_name, None)


def _own_names(model: Any) -> dict[int, str]:
    """Each parameter's and buffer's name in ``model``, wrapper segments removed, by identity."""
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(tensor), clean_key(name))
    return names


def _from_state_dict(
    model: Any, tensors: dict[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``tensors`` (PEFT keys -> the model's tensors) replaced by the entries of ``given``: a
    state dict of the whole model (its own keys, possibly with ``module.`` or FSDP segments) or
    one under PEFT's keys, as PEFT's ``save_pretrained(state_dict=...)`` takes."""
    by_clean: dict[str, torch.Tensor] = {}
    for raw_key, given_value in given.items():
        key = clean_key(raw_key)
        by_clean[key] = given_value
        if key.startswith("module."):
            by_clean.setdefault(key[len("module.") :], given_value)
    own = _own_names(model)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, tensor in tensors.items():
        name = own.get(id(tensor))
        value: torch.Tensor | None = by_clean.get(name) if name is not None else None
        if value is None:
            value = by_clean.get(key)
        if value is None and not key.startswith("base_model.model."):
            value = tensor  # state a method keeps outside the layers (VeRA's basis): not sharded
        if value is None:
            missing.append(name or key)
            continue
        out[key] = value
    if missing:
        raise CheckpointError(
            f"save_pretrained(state_dict=...): the state dict lacks {len(missing)} of the "
            f"adapter's tensors, e.g. {missing[:3]}; pass the whole model's state dict (its "
            "own keys, as model.state_dict() gives) or the adapter's under PEFT's keys"
        )
    return out


def _check(model: Any, name: str, tensors: dict[str, torch.Tensor], engine: str | None) -> None:
    expected = model.adapter_set.shapes.get(name, {})
    for key, tensor in tensors.items():
        want = expected.get(key)
        got = tuple(int(d) for d in tensor.shape)
        if want is not None and got != want and _looks_sharded(got, want):
            raise CheckpointError(
                unreadable_message(key, got, want, engine or "a distributed engine")
            )
        if clean_key(key) != key:
            raise CheckpointError(
                f"refusing to save {key!r}: the key carries a wrapper's path segment; "
                "save the AdaptedModel, not a module wrapped inside it"
            )


def _looks_sharded(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether a tensor of shape ``got``, recorded as ``want``, is an engine's piece of it: empty,
    flattened, or any other shape while training on several ranks. (In one process a changed
    shape with the same rank is the user's doing, e.g. resized token embeddings: written.)"""
    if len(got) != len(want) or (math.prod(got) == 0 and math.prod(want) > 0):
        return True
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collect_states(
    model: Any,
    names: Sequence[str],
    *,
    main: bool,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]] | None:
    """Per adapter, the tensors to write (after the method's ``checkpoint_state``), or None on a
    process that does not write. Every rank must call it when the tensors are sharded: gathering
    them is a collective."""
    raw = {name: model.adapter_state_dict(name) for name in names}  # refuses unknown names
    everything = [t for tensors in raw.values() for t in tensors.values()]
    engine = engine_of(everything, model)
    if state_dict is None and not main and not needs_collective(model, everything):
        return None
    whole: dict[str, dict[str, torch.Tensor]] = {}
    if state_dict is not None:
        if not main:
            return None
        whole = {n: _from_state_dict(model, t, state_dict) for n, t in raw.items()}
    else:
        for name, tensors in raw.items():
            whole[name] = whole_copies(model, tensors, copy=main)
    if not main:
        return None
    states = {}
    for name, tensors in whole.items():
        _check(model, name, tensors, engine)
        states[name] = model.method_of(name).checkpoint_state(model, name, tensors)
    return states
