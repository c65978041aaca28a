"""``replace_lora_weights_loftq``: LoftQ for a model that is already quantised (PEFT's API).

For each LoRA layer on a quantised base (bitsandbytes 4-bit, and 8-bit too), the float weight
``W`` is read from the original model's safetensors file(s), the layer's own dequantised weight
``Q`` through its weight backend, and A, B set so that ``s·BA`` is the best rank-r part of
``W − Q`` (one LoftQ step: the quantised base stays as it is). ``callback(model, name)`` may
reject a layer's replacement (it is rolled back). Every tensor needed is found and checked
before any layer changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from adapt.core import AdaptedModel, CheckpointError, ConfigError
from adapt.core.progress import progress

from .inits import full_float32, top_singular
from .layer import LoraLinear

__all__ = ["replace_lora_weights_loftq"]


def _weight_files(model: AdaptedModel, model_path: str | os.PathLike[str] | None) -> list[Path]:
    if model_path is None:
        base_config = getattr(model.get_base_model(), "config", None)
        model_path = getattr(base_config, "_name_or_path", None) or None
        if model_path is None or not Path(model_path).is_dir():
            raise ConfigError(
                "replace_lora_weights_loftq needs the float model's weights: pass "
                "model_path=<its folder or model.safetensors> (the model does not say where it "
                f"was loaded from locally: {model_path!r})"
            )
    path = Path(model_path)
    if path.is_file():
        return [path]
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    raise CheckpointError(
        f"{str(path)!r} has no model.safetensors (or sharded index): replace_lora_weights_loftq "
        "reads safetensors only (pickle files are never loaded)"
    )


def _read_weights(files: list[Path], wanted: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """``layer path → float32 weight``, each found under one of its candidate keys."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            for path, candidates in wanted.items():
                key = next((k for k in candidates if k in keys), None)
                if key is not None and path not in found:
                    found[path] = handle.get_tensor(key).float()
    missing = [wanted[p][0] for p in wanted if p not in found]
    if missing:
        raise CheckpointError(
            f"the float model's weights have no {missing[:3]} ({len(missing)} missing) in "
            f"{[str(f) for f in files]}: model_path must be the original model these layers "
            "were quantised from"
        )
    return found


def _lora_layers(model: AdaptedModel, adapter_name: str) -> dict[str, LoraLinear]:
    model.adapter_set.require(adapter_name)
    layers = {
        path: layer
        for path, layer in model.adapter_set.layers()
        if isinstance(layer, LoraLinear) and layer.backend.lossy and adapter_name in layer.lora_A
    }
    if not layers:
        raise ConfigError(
            f"replace_lora_weights_loftq found no LoRA layer of adapter {adapter_name!r} on a "
            "quantised base (load the model with BitsAndBytesConfig(load_in_4bit=True) first)"
        )
    return layers


@torch.no_grad()
def replace_lora_weights_loftq(
    model: AdaptedModel,
    model_path: str | os.PathLike[str] | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Set A, B of ``adapter_name``'s quantised LoRA layers from the quantisation error."""
    layers = _lora_layers(model, adapter_name)
    prefix = getattr(model.get_base_model(), "base_model_prefix", "") or ""
    wanted = {
        path: (f"{path}.weight",)
        + (
            (f"{path[len(prefix) + 1 :]}.weight",)
            if prefix and path.startswith(prefix + ".")
            else ()
        )
        for path in layers
    }
    originals = _read_weights(_weight_files(model, model_path), wanted)
    for path, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        if tuple(originals[path].shape) != shape:
            raise CheckpointError(
                f"{wanted[path][0]} has shape {tuple(originals[path].shape)} in the float model, "
                f"but the quantised layer is {shape}: not the model it was quantised from"
            )
    for path, layer in progress(layers.items(), desc="LoftQ", unit="layer", min_items=8):
        _replace(model, path, layer, adapter_name, originals.pop(path), callback)


def _replace(
    model: AdaptedModel,
    path: str,
    layer: LoraLinear,
    adapter_name: str,
    original: torch.Tensor,
    callback: Callable[[nn.Module, str], bool] | None,
) -> None:
    dequantised = layer.backend.get_weight(layer.get_base_layer()).float()
    with full_float32():
        error = original.to(dequantised.device) - dequantised
        u, s, vh = top_singular(error, layer.r[adapter_name])
    root = (s / layer.scaling[adapter_name]).sqrt()
    weight_a = cast(torch.Tensor, layer.lora_A[adapter_name].weight)
    weight_b = cast(torch.Tensor, layer.lora_B[adapter_name].weight)
    before = (weight_a.clone(), weight_b.clone())
    weight_a.copy_((root[:, None] * vh).to(weight_a.dtype))
    weight_b.copy_((u * root).to(weight_b.dtype))
    keep: Any = True if callback is None else callback(model, path)
    if not keep:
        weight_a.copy_(before[0])
        weight_b.copy_(before[1])
