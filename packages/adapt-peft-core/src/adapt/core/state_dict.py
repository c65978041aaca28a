"""Adapter tensors under PEFT's on-disk keys, and validated, all-or-nothing loading of them.

Keys read ``base_model.model.<module path>.<tensor>`` (adapter name removed, wrapper segments
of FSDP / activation checkpointing / ``torch.compile`` dropped); state a method keeps outside
the layers (VeRA's projection) sits under ``base_model.<key>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from .adapters import AdapterSet
from .distributed import clean_key
from .errors import CheckpointError
from .layer import AdapterLayer
from .trainability import bias_parameters

PREFIX = "base_model.model."


def adapter_state_dict(
    adapters: AdapterSet, adapter_name: str, *, include_shared: bool = True
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys; ``include_shared`` adds the method's own."""
    config = adapters.require(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapters.layers():
        for suffix, tensor in layer.adapter_tensors(adapter_name).items():
            out[clean_key(f"{PREFIX}{path}.{suffix}")] = tensor
    for path, wrapper in adapters.wrappers():
        if adapter_name in wrapper.modules_to_save:
            module = wrapper.modules_to_save[adapter_name]
            for pname, tensor in module.state_dict(keep_vars=True).items():
                out[clean_key(f"{PREFIX}{path}.{pname}")] = tensor
    scope = config.bias_scope()
    if scope != "none":
        for pname, param in bias_parameters(adapters, all_biases=scope == "all").items():
            out.setdefault(clean_key(f"{PREFIX}{pname}"), param)
    if include_shared:
        method = adapters.method_of(adapter_name)
        for key, tensor in method.extra_state(adapters.view, adapter_name).items():
            out[f"base_model.{key}"] = tensor
    return out


_MTS_KEY = re.compile(r"^(?P<head>.*)\.modules_to_save\.[^.]+\.(?P<tail>.*)$")


def normalise_peft_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo a PEFT quirk: with ``bias="all"`` it also saves biases of modules_to_save wrappers
    under ``<m>.original_module.<p>`` and ``<m>.modules_to_save.<adapter>.<p>``. The first is
    the frozen base, the second duplicates ``<m>.<p>``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if ".original_module." in key:
            continue
        m = _MTS_KEY.match(key)
        if m:
            plain = f"{m['head']}.{m['tail']}"
            if plain in tensors:
                continue
            key = plain
        out[key] = value
    return out


def embedding_parameter(model: nn.Module, key: str) -> torch.Tensor | None:
    """The base-model embedding weight that on-disk ``key`` names, or None (PEFT saves
    embedding weights when embeddings are targets, for vocabulary resizing)."""
    if not key.startswith(PREFIX) or not key.endswith(".weight"):
        return None
    try:
        owner = model.get_submodule(key[len(PREFIX) : -len(".weight")])
    except AttributeError:
        return None
    heads = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            head = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            heads.add(id(head.get_base_layer() if isinstance(head, AdapterLayer) else head))
    if isinstance(owner, nn.Embedding) or id(owner) in heads:
        return cast(torch.Tensor, owner.weight)
    return None


def _targets(
    adapters: AdapterSet, adapter_name: str, file_keys: set[str]
) -> dict[str, torch.Tensor]:
    """The model's tensors the file's keys go to (embedding weights PEFT saved included)."""
    targets = adapter_state_dict(adapters, adapter_name, include_shared=False)
    for key in file_keys - set(targets):
        embedding = embedding_parameter(adapters.model, key)
        if embedding is not None:
            targets[key] = embedding
    return targets


def _validate(
    tensors: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], source: str
) -> None:
    """Refuse a file whose keys, shapes, dtypes or values do not fit the model."""
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensor(s) in the checkpoint match no module of this "
            f"model, e.g. {unexpected[:3]}; was the adapter saved for a different base model?"
        )
    if missing:
        raise CheckpointError(
            f"{source}: the checkpoint lacks {len(missing)} tensor(s) this model needs, e.g. "
            f"{missing[:3]}; was the adapter saved for a different base model or config?"
        )
    for key, target in targets.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} but the model "
                f"expects {tuple(target.shape)}; the checkpoint and its config disagree, "
                "or it was saved for another base model"
            )
        if not value.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {key!r} has dtype {value.dtype}; adapter tensors are "
                "floating point"
            )
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: tensor {key!r} holds NaN or Inf values")


def load_tensors(
    adapters: AdapterSet, adapter_name: str, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Copy a checkpoint's tensors into adapter ``adapter_name`` after checking all of them."""
    method = adapters.method_of(adapter_name)
    extra_keys = {k for k in tensors if k.startswith("base_model.") and not k.startswith(PREFIX)}
    extra = {k[len("base_model.") :]: tensors[k] for k in extra_keys}
    tensors = normalise_peft_keys(tensors)
    layer_tensors = {k: v for k, v in tensors.items() if k not in extra_keys}
    targets = _targets(adapters, adapter_name, set(layer_tensors))
    _validate(layer_tensors, targets, source)
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
    used = set(method.load_extra_state(adapters.view, adapter_name, extra))
    leftover = sorted(set(extra) - used)
    if leftover:
        raise CheckpointError(
            f"{source}: unexpected tensors {['base_model.' + k for k in leftover[:3]]} for a "
            f"{method.name} adapter"
        )


def load_state_dict_into(
    adapters: AdapterSet, state_dict: Mapping[str, torch.Tensor], adapter_name: str
) -> None:
    """PEFT's ``set_peft_model_state_dict`` for an existing adapter: all or nothing."""
    adapters.require(adapter_name, ". Add it first (add_adapter), then load its tensors")
    backup = {k: v.detach().clone() for k, v in adapter_state_dict(adapters, adapter_name).items()}
    try:
        load_tensors(adapters, adapter_name, dict(state_dict), source="state_dict")
    except BaseException:
        current = adapter_state_dict(adapters, adapter_name)
        with torch.no_grad():
            for key, value in backup.items():
                if key in current and current[key].shape == value.shape:
                    current[key].copy_(value)
        raise
