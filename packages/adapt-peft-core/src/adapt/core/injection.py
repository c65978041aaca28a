"""Adding an adapter: plan → apply with rollback → commit.

* **plan** validates the name and config, resolves the method, the targets (the method's
  defaults when none are named) and, for each target, the layer class that will wrap it —
  nothing is changed yet, so every refusal leaves the model as it was;
* **apply** builds new layers (not yet in the model) and adds the adapter to existing ones;
  any error deletes what was added and calls the method's ``on_delete``;
* **commit** swaps the new layers in and records the adapter.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters import AdapterSet
from .config import AdapterConfig
from .errors import AdapterStateError, ConfigError, TargetError
from .layer import AdapterLayer
from .method import Method
from .modules_to_save import ModulesToSave
from .param_injection import ParamPlan, build_parameters, configured_parameters, plan_parameters
from .parameter_layer import ParameterLayer
from .registry import get_registry
from .routing import BASE
from .saving import record_shapes
from .signature import required_inputs
from .targeting import (
    ALL_LINEAR,
    find_targets,
    matches_name,
    model_type_of,
    module_summary,
    names_hint,
)
from .trainability import apply_active
from .typenames import describe

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,99}$")  # also a folder name: <= 100


@dataclass
class Plan:
    """What adding one adapter will do, computed before anything changes."""

    name: str
    config: AdapterConfig  # with targets resolved
    given: AdapterConfig  # the user's object (gets the resolved targets at commit)
    method: Method[Any]
    modules: dict[str, nn.Module]
    #: per target path: the layer class to build, or None for an existing layer of the method
    layers: dict[str, type[AdapterLayer] | None]
    save_paths: list[str]
    #: the target_parameters part (None without it)
    params: ParamPlan | None = None
    created: dict[str, nn.Module] = field(default_factory=dict)


def validate_name(adapters: AdapterSet, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
        raise ConfigError(
            f"invalid adapter name {adapter_name!r}: use letters, digits, '_' and '-' "
            "(no dots, slashes or spaces; at most 100 characters), e.g. 'default' or 'task_b'"
        )
    if adapter_name == BASE:
        raise ConfigError(f"{BASE!r} is reserved for the base model in mixed batches")
    if adapter_name in adapters.configs:
        raise ConfigError(
            f"an adapter named {adapter_name!r} exists already; pick another name or "
            "delete_adapter() it first"
        )


def _with_default_targets(
    model: nn.Module, config: AdapterConfig, method: Method[Any]
) -> AdapterConfig:
    """A copy of ``config`` targeting the method's default modules for this model type (the
    user's object gets them only once the adapter is in)."""
    model_type = model_type_of(model)
    defaults = method.default_target_modules.get(model_type) if model_type else None
    if not defaults:
        why = (
            f"{method.package} has no default for model type {model_type!r}"
            if model_type
            else "this is not a transformers model with a model_type"
        )
        raise TargetError(
            f"target_modules is not set and {why}; name the modules to adapt, e.g. "
            f"target_modules=['q_proj', 'v_proj'], or use '{ALL_LINEAR}'. "
            f"Modules in this model: {module_summary(model)}"
        )
    resolved = copy.copy(config)
    resolved.target_modules = list(defaults)
    return resolved


def _no_layer_message(method: Method[Any], path: str, module: nn.Module) -> str:
    served = sorted(
        {
            (t if isinstance(t, str) else t.__name__).rsplit(".", 1)[-1]
            for e in get_registry().entries("adapt.layers")
            if e.obj is not None and getattr(e.obj, "method", None) == method.name
            for t in getattr(e.obj, "base_types", ())
        }
    )
    return (
        f"{path} is a {describe(module)}, which no installed {method.name} layer can adapt "
        f"({method.name} layers serve: {', '.join(served) or 'nothing'}). Remove it from "
        "target_modules, or install a plugin that provides a layer for this type"
        + get_registry().broken_note("adapt.layers")
    )


def _check_inputs(cls: type[AdapterLayer], path: str, module: nn.Module) -> None:
    """Refuse a base module whose forward takes several inputs unless the layer class says it
    handles them all (it would otherwise see only the first, and mixed batches would slice
    only that one)."""
    inputs = required_inputs(module)
    if len(inputs) > 1 and not cls.takes_all_inputs:
        raise TargetError(
            f"{path} is a {describe(module)} whose forward takes {len(inputs)} inputs "
            f"({', '.join(inputs)}), but {cls.__name__} adapts modules of one input (it would "
            "see only the first). Remove it from target_modules, or use a layer class that "
            "sets takes_all_inputs = True"
        )


def _extra_layers(
    adapters: AdapterSet,
    config: AdapterConfig,
    method: Method[Any],
    adapter_name: str,
    modules: dict[str, nn.Module],
    layers: dict[str, type[AdapterLayer] | None],
) -> list[str]:
    """The method's layers beyond the targets (:meth:`Method.extra_layers`), added to the plan."""
    extra = method.extra_layers(adapters.view, config, adapter_name)
    for path, cls in extra.items():
        if path in modules:
            raise TargetError(
                f"{path!r} is a target module and also gets a {cls.__name__} from the config "
                "(e.g. trainable_token_indices on a LoRA-targeted embedding); drop one of them"
            )
        module = adapters.model.get_submodule(path)
        if isinstance(module, AdapterLayer) and not isinstance(module, cls):
            raise TargetError(
                f"{path!r} holds {type(module).__name__} adapters and cannot also get a "
                f"{cls.__name__}"
            )
        modules[path] = module
        layers[path] = None if isinstance(module, cls) else cls
    return list(extra)


def _layer_plan(
    method: Method[Any], modules: dict[str, nn.Module]
) -> dict[str, type[AdapterLayer] | None]:
    plan: dict[str, type[AdapterLayer] | None] = {}
    for path, module in modules.items():
        if isinstance(module, ParameterLayer):
            raise TargetError(
                f"{path} holds adapters on its parameters ({module.parameter_name}, ...); "
                "target it with target_parameters, not target_modules"
            )
        if isinstance(module, AdapterLayer):
            if module.method != method.name:
                raise TargetError(
                    f"{path} already holds a {module.method} adapter; cannot add {method.name}"
                )
            plan[path] = None
        elif isinstance(module, ModulesToSave):
            raise TargetError(f"{path} is in modules_to_save and cannot also be a target module")
        else:
            cls = get_registry().resolve_layer(method.name, module)
            if cls is None:
                raise TargetError(_no_layer_message(method, path, module))
            _check_inputs(cls, path, module)
            plan[path] = cls
    return plan


def _modules_to_save(model: nn.Module, config: AdapterConfig, targets: set[str]) -> list[str]:
    names = config.modules_to_save
    if not names:
        return []
    found: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        if matches_name(path, names):
            if path in targets or isinstance(module, AdapterLayer):
                raise TargetError(
                    f"{path} is both a target module and in modules_to_save; choose one"
                )
            found.append(path)
    missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in found)]
    if missing:
        raise TargetError(
            f"modules_to_save {missing} matched no module; " + names_hint(model, missing)
        )
    return found


def plan(adapters: AdapterSet, adapter_name: str, config: AdapterConfig) -> Plan:
    """Check everything adding ``config`` as ``adapter_name`` needs; change nothing."""
    validate_name(adapters, adapter_name)
    if not isinstance(config, AdapterConfig):
        raise ConfigError(
            f"expected an adapter config (e.g. LoraConfig), got {type(config).__name__}"
        )
    config.validate()
    method = get_registry().get_method(config.peft_type)
    given = config
    with_params = bool(configured_parameters(config))
    if config.target_modules is None and with_params:
        config = copy.copy(config)  # parameters only: saved with target_modules [], as PEFT's
        config.target_modules = []
    elif config.target_modules is None:
        config = _with_default_targets(adapters.model, config, method)
    config = method.resolve_config(adapters.view, config)
    if config is not given:
        config.validate()  # the defaults filled in must hold too
    for other, other_cfg in adapters.configs.items():
        if other_cfg.peft_type != config.peft_type:
            raise ConfigError(
                f"adapter {other!r} uses {other_cfg.peft_type} and {adapter_name!r} uses "
                f"{config.peft_type}; one model holds adapters of one method"
            )
    paths = (
        find_targets(
            adapters.model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            skip=(AdapterLayer, ModulesToSave),
        )
        if config.target_modules or not with_params
        else []
    )
    modules = {p: adapters.model.get_submodule(p) for p in paths}
    layers = _layer_plan(method, modules)
    extra = _extra_layers(adapters, config, method, adapter_name, modules, layers)
    params = plan_parameters(adapters, config, method, adapter_name, paths)
    save_paths = _modules_to_save(
        adapters.model, config, set(paths) | set(extra) | set(params.targets if params else ())
    )
    return Plan(adapter_name, config, given, method, modules, layers, save_paths, params)


def _build_layers(
    adapters: AdapterSet, p: Plan, touched: list[AdapterLayer], built: dict[str, AdapterLayer]
) -> None:
    for path, cls in p.layers.items():
        kwargs = p.method.layer_kwargs(adapters.view, p.config, p.name, path)
        module = p.modules[path]
        if cls is None:
            assert isinstance(module, AdapterLayer)
            touched.append(module)
            module.update_layer(p.name, p.config, **kwargs)
            module.train(module.base_layer.training)  # new dropout follows the mode
            built[path] = module
            continue
        try:
            layer = cls(module)
        except TargetError as error:  # e.g. no backend: say which module it was
            raise TargetError(f"cannot adapt {path!r}: {error}") from error
        layer.update_layer(p.name, p.config, **kwargs)
        if not module.training:  # new modules start in training mode
            layer.train(False)
        p.created[path] = layer
        built[path] = layer


def _wrap_modules_to_save(adapters: AdapterSet, p: Plan, touched: list[ModulesToSave]) -> None:
    for path in p.save_paths:
        module = adapters.model.get_submodule(path)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        if wrapper is module:
            touched.append(wrapper)
        else:
            p.created[path] = wrapper
        wrapper.add(p.name)


def apply(adapters: AdapterSet, p: Plan) -> None:
    """Build the adapter's layers; on any error undo what was added (the model is untouched:
    new layers are not in it yet)."""
    p.method.prepare(adapters.view, p.config, p.name, p.modules)
    touched: list[AdapterLayer] = []
    touched_wrappers: list[ModulesToSave] = []
    built: dict[str, AdapterLayer] = {}
    try:
        _build_layers(adapters, p, touched, built)
        if p.params is not None:
            build_parameters(adapters, p.params, p.method, p.config, p.name, touched, p.created)
        _wrap_modules_to_save(adapters, p, touched_wrappers)
        # last: an initialisation that rewrites base weights undoes itself if it fails
        p.method.initialise(adapters.view, p.config, p.name, built)
    except BaseException:
        for layer in touched:
            # unconditionally: a half-built adapter may hold state only in
            # other_param_names containers, which adapter_names does not list
            layer.delete_adapter(p.name)
        for wrapper in touched_wrappers:
            if p.name in wrapper.modules_to_save:
                del wrapper.modules_to_save[p.name]
        p.method.on_delete(adapters.view, p.name)
        raise


def commit(adapters: AdapterSet, p: Plan) -> None:
    """Swap the new layers in and record the adapter (active if it is the first)."""
    for path, new in p.created.items():
        adapters.replace(path, new)
    config = p.config
    if config is not p.given:  # defaults resolved: now the user's config says which (as PEFT)
        for key in config.saved_fields():
            setattr(p.given, key, getattr(config, key))
        config = p.given
    adapters.configs[p.name] = config
    if not adapters.active:
        adapters.active = [p.name]
    apply_active(adapters)
    record_shapes(adapters.view, p.name)


def add_adapter(adapters: AdapterSet, adapter_name: str, config: AdapterConfig) -> None:
    """Inject a new adapter. On any error the model is left exactly as it was."""
    p = plan(adapters, adapter_name, config)
    apply(adapters, p)
    commit(adapters, p)


def delete_adapter(adapters: AdapterSet, adapter_name: str) -> None:
    """Remove an adapter; layers left with no adapter go back to their base module."""
    adapters.require(adapter_name)
    layers = list(adapters.layers())
    for _, layer in layers:
        if adapter_name in layer.merged_adapters:
            raise AdapterStateError(
                f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it"
            )
    method = adapters.method_of(adapter_name)
    for path, layer in reversed(layers):  # nested layers (parameter targets) inside first
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                adapters.replace(path, layer.base_layer)
    for path, wrapper in list(adapters.wrappers()):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
        if not len(wrapper.modules_to_save):
            adapters.replace(path, wrapper.original_module)
    method.on_delete(adapters.view, adapter_name)
    adapters.forget(adapter_name)
    if not adapters.active and adapters.configs:
        adapters.active = [next(iter(adapters.configs))]
    apply_active(adapters)
