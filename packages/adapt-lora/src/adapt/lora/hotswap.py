"""Hot-swapping LoRA adapters: replace a loaded adapter's tensors in place with a saved
adapter's, so a ``torch.compile``-d model keeps its graph (PEFT's ``peft.utils.hotswap``).

* :func:`hotswap_adapter` checks everything first, then copies the new tensors into the
  existing parameters (``copy_``: same storage), updates each layer's scaling and replaces
  ``model.peft_config[adapter_name]`` with the new adapter's config as stored (its own ``r``,
  ``lora_alpha`` and patterns). The new adapter may target fewer modules than the loaded one
  (those layers are zeroed), never more. Without preparation its ranks must equal the loaded
  ones.
* :func:`prepare_model_for_compiled_hotswap`, called after loading the first adapter and
  before compiling, zero-pads every LoRA factor to ``target_rank`` (exact: the padded rows of
  A and columns of B are zero) and holds the scalings as 0-d tensors, updated in place, so
  that adapters of any rank up to ``target_rank`` and any alpha swap in without recompiling.

After padding, a layer's tensors are wider than its adapter's rank: ``peft_config`` and
``layer.r`` keep the true rank, and :func:`checkpoint_tensors` cuts the padding (and the
tensors of layers a swap zeroed) off again, so a saved adapter is the one that was loaded.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Literal, cast

import torch
from torch import nn

from adapt.core import AdaptedModel, AdapterStateError, CheckpointError, ConfigError
from adapt.core.checkpoint import read_config, read_tensors, resolve_adapter_dir
from adapt.core.distributed import clean_key
from adapt.core.protocols import ModelView
from adapt.core.saving import record_shapes
from adapt.core.state_dict import PREFIX

from .config import LoraConfig
from .hotswap_plan import RANK_AXIS, Plan, build_plan, check_configs, rank_axis
from .layer import LoraLayer
from .parameters import LoraParameter

__all__ = ["checkpoint_tensors", "hotswap_adapter", "prepare_model_for_compiled_hotswap"]

#: Where the true ranks of padded or swapped adapters are kept (``AdapterSet.state``).
_STATE_KEY = "adapt.lora.hotswap"
#: Per adapter, per layer path: the true rank (0: no longer targeted) and the tensor it is
#: for (a weak reference, so a deleted and re-added adapter is not trimmed by mistake).
_Ranks = dict[str, dict[str, tuple[int, "weakref.ref[torch.Tensor]"]]]


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper or was compiled in place."""
    from torch._dynamo.eval_frame import OptimizedModule

    return (
        isinstance(model, OptimizedModule)
        or "_orig_mod" in dict(model.named_children())
        or getattr(model, "_compiled_call_impl", None) is not None
    )


def _adapted(model: nn.Module, caller: str) -> AdaptedModel:
    """The :class:`AdaptedModel` ``model`` is or wraps (``torch.compile``'s ``_orig_mod``)."""
    inner = dict(model.named_children()).get("_orig_mod", model)
    if not isinstance(inner, AdaptedModel):
        raise TypeError(
            f"{caller} takes a model adapted by adapt (adapt(...) or AdaptedModel.from_pretrained"
            f"), or torch.compile of one; got {type(model).__name__}"
        )
    return inner


def _ranks(model: ModelView) -> _Ranks:
    return model.adapter_set.state(_STATE_KEY, dict)


def _first_factor(layer: LoraLayer, name: str) -> torch.Tensor:
    """The adapter's A factor at ``layer`` (what a rank record is for)."""
    if name in layer.lora_A:
        return cast(torch.Tensor, layer.lora_A[name].weight)
    return cast(torch.Tensor, layer.lora_embedding_A[name])


def _remember(model: AdaptedModel, name: str, ranks: Mapping[str, int]) -> None:
    layers = dict(model.adapter_layers())
    _ranks(model)[name] = {
        path: (r, weakref.ref(_first_factor(cast(LoraLayer, layers[path]), name)))
        for path, r in ranks.items()
    }


def checkpoint_tensors(
    model: ModelView, adapter_name: str, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``tensors`` (adapter ``adapter_name``'s, under on-disk keys) as they are to be saved:
    each padded tensor cut back to its adapter's rank, and the tensors of layers a hot-swap
    zeroed (the new adapter did not target them) left out; exact, since what is cut is zero
    (checked: training keeps it zero, its gradients are). Unchanged for an adapter never
    padded or swapped."""
    record = _ranks(model).get(adapter_name)
    if not record:
        return tensors
    out = dict(tensors)
    for path, layer in model.adapter_layers():
        entry = record.get(path)
        if entry is None or not isinstance(layer, LoraLayer):
            continue
        rank, ref = entry
        if adapter_name not in layer.adapter_names or ref() is not _first_factor(
            layer, adapter_name
        ):
            continue  # the adapter was replaced since: the record is stale
        for suffix in layer.adapter_tensors(adapter_name):
            key = clean_key(f"{PREFIX}{path}.{suffix}")
            if key in out:
                _trim(out, key, rank, rank_axis(suffix))
    return out


def _trim(out: dict[str, torch.Tensor], key: str, rank: int, axis: int | None) -> None:
    """Cut ``out[key]`` to ``rank`` along ``axis`` (rank 0: drop it), refusing to lose values."""
    tensor = out[key]
    kept: torch.Tensor | None = None
    if rank == 0:
        cut = tensor
    elif axis is not None and tensor.shape[axis] > rank:
        kept = tensor.narrow(axis, 0, rank)
        cut = tensor.narrow(axis, rank, tensor.shape[axis] - rank)
    else:
        return
    if cut.any():
        raise CheckpointError(
            f"cannot save {key!r}: its part beyond the adapter's rank ({rank}) is not zero; it "
            "was written after prepare_model_for_compiled_hotswap or a hot-swap padded or "
            "zeroed it. Save the tensors you want with save_pretrained(state_dict=...)"
        )
    if kept is None:
        del out[key]
    else:
        out[key] = kept


# -- hotswap_adapter ---------------------------------------------------------------------------
def _apply(model: AdaptedModel, name: str, plan: Plan) -> None:
    with torch.no_grad():
        for live, value in plan.copies:
            live.copy_(value)
        for live in plan.zero:
            live.zero_()
        for layer, r, alpha, scaling in plan.layers:
            layer.r[name] = r
            layer.lora_alpha[name] = alpha
            current = layer.scaling[name]
            if isinstance(current, torch.Tensor):
                current.fill_(scaling)  # in place: a compiled graph reads the same tensor
            elif current != scaling:
                layer.scaling[name] = scaling
    _remember(model, name, plan.ranks)


def _new_config(folder: os.PathLike[str] | str, source: str) -> LoraConfig:
    data = read_config(folder)
    if data["peft_type"] != LoraConfig.peft_type:
        raise ConfigError(
            f"cannot hot-swap {source}: it is a {data['peft_type']} adapter, and hot-swapping "
            "replaces a LoRA adapter with another LoRA adapter; load it with "
            "model.load_adapter(path, adapter_name=...) instead"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return LoraConfig.from_dict(data, source=f"{source}/adapter_config.json")


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    torch_device: str | torch.device | None = None,
    **hub_kwargs: Any,
) -> None:
    """Replace adapter ``adapter_name`` of ``model`` (an :class:`~adapt.core.AdaptedModel`, or
    ``torch.compile`` of one) by the LoRA adapter saved at ``model_name_or_path`` (a folder or
    a Hub repo id; ``hub_kwargs``: ``subfolder``, ``revision``, ``token``, ...), in place.

    Everything is checked before anything changes; a refusal leaves the model as it was.
    The new adapter must target the same modules as the loaded one or fewer (the others are
    zeroed), agree with it on DoRA, ``lora_bias``, ``fan_in_fan_out`` and ``lora_dropout``,
    and have the same ranks, or ranks up to the padded width after
    :func:`prepare_model_for_compiled_hotswap`. Afterwards the outputs are those of a fresh
    ``AdaptedModel.from_pretrained(base, model_name_or_path)`` and
    ``model.peft_config[adapter_name]`` is the new adapter's config as stored.
    ``torch_device`` is where the file's tensors are staged (default: the CPU); each is then
    copied to its layer's device. Safetensors files only.
    """
    adapted = _adapted(model, "hotswap_adapter")
    old = adapted.adapter_set.require(
        adapter_name, ". hot-swapping replaces a loaded adapter: load the first one with "
        "AdaptedModel.from_pretrained(...) or model.load_adapter(...)",
    )  # fmt: skip
    source = str(model_name_or_path)
    if not isinstance(old, LoraConfig) or old.peft_type != LoraConfig.peft_type:
        raise ConfigError(
            f"cannot hot-swap adapter {adapter_name!r}: it is a {old.peft_type} adapter; "
            "hot-swapping replaces LoRA adapters only"
        )
    folder = resolve_adapter_dir(model_name_or_path, caller="hotswap_adapter", **hub_kwargs)
    new = _new_config(folder, source)
    check_configs(old, new, adapter_name, source)
    tensors = read_tensors(folder)
    if torch_device is not None:
        tensors = {k: v.to(torch_device) for k, v in tensors.items()}
    plan = build_plan(adapted.adapter_set, adapter_name, new, tensors, source)
    _apply(adapted, adapter_name, plan)
    new.inference_mode = old.inference_mode
    adapted.adapter_set.configs[adapter_name] = new


# -- prepare_model_for_compiled_hotswap --------------------------------------------------------
def _config_ranks(config: LoraConfig | Mapping[str, LoraConfig] | None) -> list[int]:
    if config is None:
        return []
    configs = list(config.values()) if isinstance(config, Mapping) else [config]
    ranks: list[int] = []
    for c in configs:
        if not isinstance(c, LoraConfig):
            raise TypeError(f"config must be a LoraConfig or a dict of them, got {type(c)}")
        ranks += [int(c.r), *(int(v) for v in c.rank_pattern.values())]
    return ranks


def _lora_layers(model: AdaptedModel) -> list[tuple[str, LoraLayer]]:
    layers = [(p, m) for p, m in model.adapter_layers() if isinstance(m, LoraLayer)]
    for path, layer in layers:
        if isinstance(layer, LoraParameter):
            raise ConfigError(
                f"{path}: LoRA on target_parameters cannot be padded for hot-swapping (its "
                "factors interleave the experts' ranks); prepare only models without such "
                "adapters"
            )
    if not layers:
        raise AdapterStateError(
            "prepare_model_for_compiled_hotswap found no LoRA layer: call it after loading the "
            "first adapter (AdaptedModel.from_pretrained) and before compiling the model"
        )
    return layers


def _widths(layers: list[tuple[str, LoraLayer]]) -> dict[tuple[str, str], int]:
    """The current rank width of every (layer path, adapter) pair."""
    out = {}
    for path, layer in layers:
        for name in layer.adapter_names:
            out[(path, name)] = int(_first_factor(layer, name).shape[0])
    return out


def _padded(tensor: torch.Tensor, axis: int, width: int) -> nn.Parameter:
    shape = list(tensor.shape)
    shape[axis] = width
    out = tensor.new_zeros(shape)
    out.narrow(axis, 0, tensor.shape[axis]).copy_(tensor)
    return nn.Parameter(out, requires_grad=tensor.requires_grad)


_SIZE_ATTRS = {0: ("out_features", "out_channels"), 1: ("in_features", "in_channels")}


def _pad(layer: LoraLayer, name: str, width: int) -> None:
    """Zero-pad adapter ``name``'s factors at ``layer`` to rank ``width``."""
    for attr, axis in RANK_AXIS.items():
        container = getattr(layer, attr)
        if name not in container:
            continue
        item = container[name]
        if not isinstance(item, nn.Module):
            if item.shape[axis] != width:
                container[name] = _padded(item, axis, width)
            continue
        weight = cast(torch.Tensor, item.weight)
        if weight.shape[axis] == width:
            continue
        item.weight = _padded(weight, axis, width)
        for size in _SIZE_ATTRS[axis]:
            if hasattr(item, size):
                setattr(item, size, width)


def _scalings_to_tensors(layer: LoraLayer) -> None:
    """Hold each scaling as a 0-d tensor (filled in place by a swap: a compiled graph reads it
    as an input instead of guarding on a Python float). The layer's fused kernels take such a
    scale as it is (they multiply a small factor by it instead of passing it as a GEMM's
    ``alpha``), so the layer keeps its fast path."""
    table = cast(dict[str, Any], layer.scaling)
    for name, value in table.items():
        if not isinstance(value, torch.Tensor):
            factor = _first_factor(layer, name)
            dtype = torch.float64 if factor.dtype == torch.float64 else torch.float32
            table[name] = torch.tensor(float(value), dtype=dtype, device=factor.device)


def _check_compiled(model: nn.Module, check_compiled: str) -> None:
    if check_compiled not in ("error", "warn", "ignore"):
        raise ConfigError(
            f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}"
        )
    if check_compiled == "ignore" or not _is_compiled(model):
        return
    message = (
        "prepare_model_for_compiled_hotswap was called on a compiled model; padding and "
        "tensor scalings change what the graph was compiled for (it recompiles): call it "
        "before torch.compile"
    )
    if check_compiled == "error":
        raise AdapterStateError(message + " (or pass check_compiled='warn' / 'ignore')")
    warnings.warn(message, UserWarning, stacklevel=3)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    target_rank: int | None = None,
    config: LoraConfig | Mapping[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare ``model`` (after its first adapter is loaded, before ``torch.compile``) so that
    :func:`hotswap_adapter` can swap in adapters of other ranks and alphas without a
    recompile: every LoRA factor of every adapter is zero-padded to ``target_rank`` (default:
    the largest rank of the model's adapters and of ``config``, the configs of the adapters
    you will swap in) and the scalings become 0-d tensors.

    Unlike PEFT, the configs (``config`` and ``model.peft_config``) keep their true ranks;
    saving cuts the padding off (:func:`checkpoint_tensors`). ``check_compiled`` says what to
    do when ``model`` is already compiled: ``"error"`` (default), ``"warn"`` or ``"ignore"``.
    The padded layers' parameters are new objects: create optimizers afterwards.
    """
    _check_compiled(model, check_compiled)
    adapted = _adapted(model, "prepare_model_for_compiled_hotswap")
    layers = _lora_layers(adapted)
    widths = _widths(layers)
    wanted = _config_ranks(config)
    if target_rank is None:
        target_rank = max([*widths.values(), *wanted])
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0:
        raise ConfigError(f"target_rank must be a positive integer, got {target_rank!r}")
    wider = sorted((w, f"{p} ({n!r})") for (p, n), w in widths.items() if w > target_rank)
    if wider:
        raise ConfigError(
            f"target_rank={target_rank} is smaller than the rank {wider[-1][0]} of "
            f"{wider[-1][1]}; pass target_rank >= {wider[-1][0]} (padding cannot shrink)"
        )
    true = {name: _true_ranks(adapted, name, widths) for name in adapted.peft_config}
    for _, layer in layers:
        for name in layer.adapter_names:
            _pad(layer, name, target_rank)
        _scalings_to_tensors(layer)
    for name, ranks in true.items():
        _remember(adapted, name, ranks)
        record_shapes(adapted, name)


def _true_ranks(
    model: AdaptedModel, name: str, widths: Mapping[tuple[str, str], int]
) -> dict[str, int]:
    """Adapter ``name``'s rank at each layer: what an earlier padding or swap recorded, else
    its current width."""
    record = _ranks(model).get(name, {})
    layers = dict(model.adapter_layers())
    ranks = {}
    for (path, owner), width in widths.items():
        if owner != name:
            continue
        entry = record.get(path)
        live = _first_factor(cast(LoraLayer, layers[path]), name)
        ranks[path] = entry[0] if entry is not None and entry[1]() is live else width
    return ranks
