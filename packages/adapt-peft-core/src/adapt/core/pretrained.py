"""Adapter folders and the Hub: ``save_pretrained`` writes PEFT's files, the loaders read them.

Writing goes through :mod:`adapt.core.saving` (whole tensors under any engine, checked against
the shapes the adapter was built with) and :mod:`adapt.core.checkpoint` (atomic, crash-safe
files); reading resolves a folder or a Hub repo id, builds the config of the method the file
names, and hands the tensors to :mod:`adapt.core.state_dict` for validated loading.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from .adapters import AdapterSet
from .checkpoint import (
    adapter_folder,
    read_config,
    read_tensors,
    resolve_adapter_dir,
    write_adapter,
)
from .config import AdapterConfig
from .distributed import clean_key
from .errors import CheckpointError, ConfigError
from .injection import validate_name
from .registry import get_registry
from .saving import collect_states, record_shapes
from .state_dict import PREFIX, load_tensors


class _Adapted(Protocol):
    @property
    def adapter_set(self) -> AdapterSet: ...

    def unload(self) -> nn.Module: ...


M = TypeVar("M", bound=_Adapted)

SAVE_OPTIONS = {
    "safe_serialization",
    "is_main_process",
    "state_dict",
    "path_initial_model_for_weight_conversion",
}


def load_config(model_id: str | os.PathLike[str], **hub: Any) -> AdapterConfig:
    """Read ``adapter_config.json`` (a local folder or a Hub repo id) and build the config of
    the method it names."""
    model_id = resolve_adapter_dir(model_id, caller="load_config", **hub)
    data = read_config(model_id)
    peft_type = data["peft_type"]
    if not isinstance(peft_type, str):
        raise CheckpointError(f"{model_id}: peft_type must be a string, got {peft_type!r}")
    method = get_registry().get_method(peft_type)
    source = str(Path(model_id) / "adapter_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return method.config_class.from_dict(data, source=source)


def read_adapter(
    model_id: str | os.PathLike[str],
    config: AdapterConfig | None,
    *,
    is_trainable: bool,
    allow_pickle: bool,
    caller: str,
    **hub: Any,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config (read from the folder unless given) and the tensors of a saved adapter."""
    folder = resolve_adapter_dir(model_id, allow_pickle=allow_pickle, caller=caller, **hub)
    if config is None:
        config = load_config(folder)
    config.inference_mode = not is_trainable
    return config, read_tensors(folder, allow_pickle=allow_pickle)


def fill(
    adapters: AdapterSet, adapter_name: str, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Give the new adapter ``adapter_name`` a checkpoint's tensors (the method first shapes
    it, e.g. AdaLoRA's kept ranks); the caller rolls back on failure."""
    config = adapters.configs[adapter_name]
    method = adapters.method_of(adapter_name)
    method.before_load(adapters.view, config, adapter_name)
    if method.layers_may_be_absent(config):
        _drop_absent_layers(adapters, adapter_name, set(tensors))
    record_shapes(adapters.view, adapter_name)  # the shapes the checkpoint was saved with
    load_tensors(adapters, adapter_name, tensors, source=source)


def _drop_absent_layers(adapters: AdapterSet, adapter_name: str, keys: set[str]) -> None:
    """Take ``adapter_name`` off the layers none of whose tensors the checkpoint has."""
    for path, layer in reversed(list(adapters.layers())):
        if adapter_name not in layer.adapter_names:
            continue
        wanted = {clean_key(f"{PREFIX}{path}.{s}") for s in layer.adapter_tensors(adapter_name)}
        if wanted and not wanted & keys:
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                adapters.replace(path, layer.base_layer)


def _file_config(adapters: AdapterSet, name: str) -> dict[str, Any]:
    config = adapters.configs[name].to_dict()
    config["inference_mode"] = True
    config.setdefault("base_model_name_or_path", None)
    if config.get("base_model_name_or_path") is None:
        model_config = getattr(adapters.model, "config", None)
        config["base_model_name_or_path"] = getattr(model_config, "name_or_path", None) or None
    return config


def save_pretrained(
    adapters: AdapterSet,
    save_directory: str | os.PathLike[str],
    selected_adapters: Sequence[str] | None,
    options: dict[str, Any],
) -> None:
    """Write each adapter in PEFT's format (see ``AdaptedModel.save_pretrained``)."""
    unknown = sorted(set(options) - SAVE_OPTIONS)
    if unknown:
        raise TypeError(f"save_pretrained got unexpected arguments {unknown}")
    if options.get("safe_serialization") is False:
        raise ConfigError("adapt writes safetensors only; drop safe_serialization=False")
    main = options.get("is_main_process", True) is not False
    names = list(selected_adapters) if selected_adapters is not None else list(adapters.configs)
    states = collect_states(adapters.view, names, main=main, state_dict=options.get("state_dict"))
    if states is None:
        return
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"cannot save into {str(root)!r}: it is a file, not a folder")
    initial = options.get("path_initial_model_for_weight_conversion")
    files = {name: (_file_config(adapters, name), states[name]) for name in names}
    if initial is not None:
        files = {name: _converted(adapters, name, *files[name], initial) for name in names}
    for name in names:
        write_adapter(adapter_folder(root, name), *files[name])


def _converted(
    adapters: AdapterSet,
    name: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    initial: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``path_initial_model_for_weight_conversion``: the method turns the trained adapter and
    the one saved at ``initial`` before training into what to write (nothing is written if it
    refuses)."""
    folder = Path(initial)
    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(
            f"path_initial_model_for_weight_conversion={str(initial)!r} is not an adapter "
            "folder (no adapter_config.json): save the adapter there right after creating it, "
            "before training"
        )
    method = adapters.method_of(name)
    return method.convert_for_initial(
        config, tensors, read_config(folder), read_tensors(folder), str(folder)
    )


def load_new_model(
    build: Callable[[AdapterConfig], M],
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    config: AdapterConfig | None,
    *,
    is_trainable: bool,
    allow_pickle: bool,
    hub: dict[str, Any],
) -> M:
    """``AdaptedModel.from_pretrained``: ``build(config)`` adapts ``model``, then the saved
    tensors go in; on any error ``model`` is as it was (adapters out, the user's flags back)."""
    config, tensors = read_adapter(
        model_id, config, is_trainable=is_trainable, allow_pickle=allow_pickle,
        caller="from_pretrained", **hub,
    )  # fmt: skip
    # injecting freezes the base; a failed load gives the user's flags back
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    adapted = build(config)
    try:
        fill(adapted.adapter_set, adapter_name, tensors, source=str(model_id))
    except BaseException:
        adapted.unload()
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise
    return adapted


def load_next_to(
    adapters: AdapterSet,
    add: Callable[[str, AdapterConfig], None],
    delete: Callable[[str], None],
    model_id: str | os.PathLike[str],
    adapter_name: str,
    config: AdapterConfig | None,
    *,
    is_trainable: bool,
    allow_pickle: bool,
    hub: dict[str, Any],
) -> None:
    """``AdaptedModel.load_adapter``: add the saved adapter beside the others, or nothing."""
    validate_name(adapters, adapter_name)
    config, tensors = read_adapter(
        model_id, config, is_trainable=is_trainable, allow_pickle=allow_pickle,
        caller="load_adapter", **hub,
    )  # fmt: skip
    add(adapter_name, config)
    try:
        fill(adapters, adapter_name, tensors, source=str(model_id))
    except BaseException:
        delete(adapter_name)
        raise
