"""EVA (Explained Variance Adaptation; Paischer et al., 2024): LoRA's A from the data, PEFT's API.

``adapt(model, LoraConfig(init_lora_weights="eva", ...))`` creates the layers with the default
init (A random, B = 0). :func:`initialize_lora_eva_weights` then runs the base model (adapters
off, eval mode) over a dataloader and fits, for every LoRA linear layer, an incremental PCA
(:mod:`adapt.lora.incremental_pca`) to its input tokens (padding, and tokens whose label is
``label_mask_value``, left out) until each component it needs is stable: cosine similarity
with the previous fit ≥ ``tau``, two fits at least. The rank budget ``Σ r_layer`` is shared
out by explained-variance ratio (a layer gets at most ``round(rho·r)``); ``lora_A`` becomes the
layer's top components (``whiten``: divided by √singular value) and B = 0, so the model's
output is unchanged; rank-0 layers go back to their base module; ``lora_alpha`` follows the new
rank (``adjust_scaling_factors``: ``α·new/r``, so ``α/r`` stays). Layers with bit-identical
inputs (q/k/v) share one decomposition. The adapter's config gets the new ``rank_pattern``,
``alpha_pattern`` and ``target_modules``: the checkpoint reloads the same shapes, in PEFT too.

As PEFT (``peft.tuners.lora.eva``), except: state dicts keyed by adapt's module paths and by
PEFT's (``base_model.model.`` + path) both load, so a dict computed on the plain base model
works (in PEFT it silently falls back to random A); the caller's dicts are not emptied;
``whiten`` divides each layer's rows once (PEFT divides the rows shared by a group of
equal-input layers once per layer of the group); EVA stops with a :class:`ConfigError` after
:data:`MAX_EPOCHS` passes over the dataloader (PEFT loops forever); a refused or failed call
leaves the model as it was; ``target_modules`` is written as the full list of paths (PEFT
shortens lists of 20 or more to suffixes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapt.core import AdaptedModel, AdapterStateError, ConfigError
from adapt.core.errors import warn_user
from adapt.core.targeting import find_targets, is_linear

from .config import LoraConfig
from .eva_apply import apply_eva, plan_eva
from .eva_fit import (
    MAX_EPOCHS,
    ForwardFn,
    LayerInputsFn,
    components,
    distributed,
    find_equal_inputs,
    first_tensor,
    fit,
    plan_run,
)
from .layer import LoraLinear

__all__ = [
    "MAX_EPOCHS",
    "forward_fn_dict",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
]

ModelInputsFn = Callable[[Any, LoraConfig], Any]
LayerInputs = LayerInputsFn | Mapping[str, LayerInputsFn | None] | None


def forward_fn_dict(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: LoraConfig) -> Any:
    """The ``(batch, position)`` index of every token to decompose: attention mask on, and (with
    ``use_label_mask``, when the batch has ``labels``) label ≠ ``label_mask_value`` (the same
    position: no shift)."""
    if not isinstance(model_input, Mapping):
        raise TypeError(
            "EVA's default input preparation takes dict batches (input_ids, attention_mask, "
            f"labels), got {type(model_input).__name__}; for other batches pass "
            "prepare_model_inputs_fn=None and prepare_layer_inputs_fn=None (every position)"
        )
    eva = peft_config.eva_config
    mask = model_input.get("attention_mask")
    mask = (torch.ones_like(model_input["input_ids"]) if mask is None else mask).bool()
    if eva is not None and eva.use_label_mask and "labels" in model_input:
        mask = torch.logical_and(mask, model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: Any, layer_name: str
) -> torch.Tensor:
    """The layer's input at the tokens :func:`prepare_model_inputs_fn_language_modeling` kept:
    ``(tokens, in_features)``."""
    return first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warn_user(
            f"EVA: the model's parameters are on several devices ({sorted(map(str, devices))}); "
            "the batches are passed to forward_fn as the dataloader gives them"
        )
        return None
    return next(iter(devices), None)


def _to_device(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor) or callable(getattr(inputs, "to", None)):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})  # type: ignore[call-arg]
    if isinstance(inputs, list):
        return [_to_device(v, device) for v in inputs]
    if isinstance(inputs, tuple):
        items = [_to_device(v, device) for v in inputs]
        return type(inputs)(*items) if hasattr(inputs, "_fields") else tuple(items)
    return inputs


def _check_model(model: AdaptedModel, adapter_name: str) -> None:
    model.adapter_set.require(adapter_name)
    merged = [p for p, layer in model.adapter_set.layers() if layer.merged_adapters]
    if merged:
        raise AdapterStateError(
            f"EVA runs the base model, and adapters are merged into {merged[:3]}: call "
            "model.unmerge_adapter() first"
        )


def _targets(
    model: nn.Module, peft_config: LoraConfig | None, adapter_name: str
) -> tuple[LoraConfig, dict[str, nn.Module]]:
    """The config to read and the layers to decompose, by path."""
    if isinstance(model, AdaptedModel):
        _check_model(model, adapter_name)
        config: Any = model.peft_config[adapter_name] if peft_config is None else peft_config
        layers: dict[str, nn.Module] = {
            p: layer
            for p, layer in model.adapter_set.layers()
            if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A
        }
    else:
        if peft_config is None:
            raise ConfigError(
                "get_eva_state_dict on a model that is not adapted needs peft_config="
                "LoraConfig(init_lora_weights='eva', target_modules=[...], ...)"
            )
        config = peft_config
        names = getattr(config, "target_modules", None)
        paths = (
            [p for p, _ in model.named_modules()]
            if names is None
            else find_targets(
                model,
                names,
                exclude_modules=config.exclude_modules,
                layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern,
            )
        )
        layers = {p: model.get_submodule(p) for p in paths}
        layers = {p: m for p, m in layers.items() if is_linear(m)}
    if not isinstance(config, LoraConfig) or config.eva_config is None:
        raise ConfigError(
            "EVA needs a LoraConfig with init_lora_weights='eva' (and eva_config=EvaConfig(...) "
            f"for other than the defaults), got {config!r}"
        )
    if not layers:
        where = (
            f"LoRA linear layer of adapter {adapter_name!r}"
            if isinstance(model, AdaptedModel)
            else "linear layer among peft_config.target_modules"
        )
        raise ConfigError(
            f"EVA found no {where} to initialise (it initialises nn.Linear and transformers "
            "Conv1D layers)"
        )
    return config, layers


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: LoraConfig | None = None,
    forward_fn: ForwardFn | None = forward_fn_dict,
    prepare_model_inputs_fn: ModelInputsFn | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: LayerInputs = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's ``lora_A`` for every LoRA linear layer, by module path: ``(rank, in_features)``
    float64 tensors, the ranks summing to ``Σ r_layer`` (some may be 0).

    ``model`` is an adapted model (its adapter ``adapter_name`` is read and switched off for
    the forwards) or a plain one with ``peft_config`` (its ``target_modules`` among the linear
    layers; all of them if None). ``dataloader`` needs a length; its first pass is kept and
    replayed until every needed component converged, :data:`MAX_EPOCHS` passes at most (then a
    :class:`ConfigError`). ``forward_fn(model, batch)`` runs a batch (default
    ``model(**batch)``). ``prepare_model_inputs_fn(batch, peft_config)`` turns a batch into what
    ``prepare_layer_inputs_fn(layer_input, that, layer_path)`` (one function, or a dict by layer
    path) needs to return a layer's 2-D input; the defaults keep the tokens of language
    modelling batches (attention mask, label mask). ``None`` for both takes every position.
    Under ``torch.distributed`` the inputs of all ranks are gathered
    (``gather_distributed_inputs``). ``show_progress_bar``: a bar per pass, on a terminal.
    """
    config, layers = _targets(model, peft_config, adapter_name)
    try:
        n_batches = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"EVA needs a dataloader with a length (a DataLoader or a list of batches), got "
            f"{type(dataloader).__name__}"
        ) from None
    if n_batches == 0:
        raise ConfigError("dataloader is empty: EVA needs batches of the data to adapt to")
    gather = gather_distributed_inputs and distributed()
    if gather:
        warn_user(
            "torch.distributed is initialised: EVA gathers the layer inputs of every rank (give "
            "each rank different batches, or pass gather_distributed_inputs=False)"
        )
    show = show_progress_bar and (not distributed() or dist.get_rank() == 0)
    forward = forward_fn_dict if forward_fn is None else forward_fn
    context = model.disable_adapter() if isinstance(model, AdaptedModel) else None
    with context or contextlib.nullcontext():
        return _compute(model, config, layers, dataloader, forward, prepare_model_inputs_fn,
                        prepare_layer_inputs_fn, gather, show)  # fmt: skip


def _compute(
    model: nn.Module,
    config: LoraConfig,
    layers: dict[str, nn.Module],
    dataloader: Iterable[Any],
    forward_fn: ForwardFn,
    model_fn: ModelInputsFn | None,
    layer_fn: LayerInputs,
    gather: bool,
    show: bool,
) -> dict[str, torch.Tensor]:
    run = plan_run(model, config, layers, layer_fn, gather)
    device = _device(model)

    def step(batch: Any) -> tuple[Any, Any]:
        inputs = _to_device(batch, device)
        return inputs, deepcopy(inputs) if model_fn is None else model_fn(inputs, config)

    training = model.training
    model.eval()
    try:
        first, first_input = step(next(iter(dataloader)))
        find_equal_inputs(model, run, first, first_input, forward_fn)
        ranks = fit(model, run, dataloader, step, forward_fn, show)
    finally:
        model.train(training)
    whiten = config.eva_config is not None and config.eva_config.whiten
    out = components(run, ranks, whiten)
    return out if device is None else {k: v.to(device) for k, v in out.items()}


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: Mapping[str, torch.Tensor] | None = None,
    forward_fn: ForwardFn | None = forward_fn_dict,
    prepare_model_inputs_fn: ModelInputsFn | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: LayerInputs = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> None:
    """Initialise adapter ``adapter_name`` (``init_lora_weights="eva"``) by EVA: from
    ``eva_state_dict`` (by adapt's module paths or PEFT's names), or computed from
    ``dataloader`` by :func:`get_eva_state_dict` (the other arguments are its). Layers get their
    new rank (rank 0: removed), ``lora_A`` the components, ``lora_B`` zero; the adapter's
    ``rank_pattern``, ``alpha_pattern`` and ``target_modules`` are rewritten (PEFT's rules).
    Nothing changes if the call is refused or fails."""
    if not isinstance(model, AdaptedModel):
        raise ConfigError(
            "initialize_lora_eva_weights needs an adapted model: adapt(model, LoraConfig("
            f"init_lora_weights='eva', ...)), got a {type(model).__name__}"
        )
    _check_model(model, adapter_name)
    config = model.peft_config[adapter_name]
    if not isinstance(config, LoraConfig) or config.init_lora_weights != "eva":
        raise ConfigError(
            f"adapter {adapter_name!r} was not created with init_lora_weights='eva' "
            f"(it has {getattr(config, 'init_lora_weights', type(config).__name__)!r}): create "
            "it with LoraConfig(init_lora_weights='eva', ...)"
        )
    if len(model.active_adapters) > 1:
        raise AdapterStateError(
            f"EVA works with one active adapter, this model has {model.active_adapters}: "
            "model.set_adapter(name) first"
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, None, forward_fn, prepare_model_inputs_fn,
            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs, show_progress_bar,
        )  # fmt: skip
    apply_eva(model, config, adapter_name, plan_eva(model, config, adapter_name, eva_state_dict))
