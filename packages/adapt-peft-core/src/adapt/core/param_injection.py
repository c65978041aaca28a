"""The ``target_parameters`` part of adding an adapter: plan, then build (see injection).

For each module owning targeted parameters, one :class:`~adapt.core.parameter_layer.ParameterLayer`
per parameter, nested in the module's registration order (the first innermost, as PEFT nests
them). A second adapter reuses the layers of the first; as in PEFT, every adapter of a model
that targets parameters targets the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .adapters import AdapterSet
from .config import AdapterConfig
from .errors import ConfigError, TargetError
from .layer import AdapterLayer
from .method import Method
from .modules_to_save import ModulesToSave
from .param_targeting import find_parameter_targets, unwrapped_path
from .parameter_layer import ParameterLayer
from .typenames import describe


@dataclass
class ParamPlan:
    """Per owning module path: the parameters to adapt and the layers already on them."""

    cls: type[ParameterLayer]
    targets: dict[str, list[str]]
    existing: dict[str, dict[str, ParameterLayer]] = field(default_factory=dict)


def configured_parameters(config: AdapterConfig) -> list[str]:
    """The config's ``target_parameters`` (empty when the method's config has none)."""
    names = getattr(config, "target_parameters", None)
    return list(names) if names else []


def _chain(module: nn.Module) -> dict[str, ParameterLayer]:
    """Parameter name → layer, for the parameter layers wrapping a module (outermost first)."""
    chain: dict[str, ParameterLayer] = {}
    while isinstance(module, ParameterLayer):
        chain[module.parameter_name] = module
        module = module.base_layer
    return chain


def _check_same_parameters(adapters: AdapterSet, names: list[str], adapter_name: str) -> None:
    for other, cfg in adapters.configs.items():
        theirs = configured_parameters(cfg)
        if theirs and set(theirs) != set(names):
            raise ConfigError(
                f"adapter {adapter_name!r} targets parameters {sorted(names)} but adapter "
                f"{other!r} targets {sorted(theirs)}; adapters that use target_parameters must "
                "all target the same parameters (PEFT's rule: their layers nest per module)"
            )


def plan_parameters(
    adapters: AdapterSet,
    config: AdapterConfig,
    method: Method[Any],
    adapter_name: str,
    module_paths: list[str],
) -> ParamPlan | None:
    """Check the parameter targets of ``config``; change nothing."""
    names = configured_parameters(config)
    if not names:
        return None
    cls = method.parameter_layer
    if cls is None:
        raise ConfigError(
            f"{type(config).__name__} sets target_parameters, but {method.package} has no "
            f"adapter for parameters ({method.name} adapts modules only); use target_modules"
        )
    _check_same_parameters(adapters, names, adapter_name)
    targets = find_parameter_targets(adapters.model, names)
    modules = {unwrapped_path(p): p for p in module_paths}
    plan = ParamPlan(cls, targets)
    for path, pnames in targets.items():
        if path in modules:
            raise TargetError(
                f"{path} is matched by both target_modules and target_parameters "
                f"({', '.join(pnames)}); target it one way"
            )
        module = adapters.model.get_submodule(path) if path else adapters.model
        if isinstance(module, ModulesToSave) or (
            isinstance(module, AdapterLayer) and not isinstance(module, ParameterLayer)
        ):
            raise TargetError(
                f"{path} is already adapted as a module ({describe(module)}); it cannot also "
                f"have its parameters {pnames} targeted"
            )
        chain = _chain(module)
        for layer in chain.values():
            if layer.method != method.name:
                raise TargetError(
                    f"{path} holds a {layer.method} adapter; cannot add {method.name}"
                )
        if chain and set(chain) != set(pnames):
            raise TargetError(
                f"{path} has adapters on parameters {sorted(chain)}; the new adapter targets "
                f"{sorted(pnames)} there. Adapters must target the same parameters of a module"
            )
        plan.existing[path] = chain
    return plan


def build_parameters(
    adapters: AdapterSet,
    pp: ParamPlan,
    method: Method[Any],
    config: AdapterConfig,
    adapter_name: str,
    touched: list[AdapterLayer],
    created: dict[str, nn.Module],
) -> None:
    """Add the adapter to existing parameter layers (``touched``) and build new nested
    layers, not yet in the model (``created``: path → outermost layer)."""
    for path, pnames in pp.targets.items():
        module = adapters.model.get_submodule(path) if path else adapters.model
        chain = pp.existing.get(path, {})
        current = module
        for pname in pnames:
            key = f"{path}.{pname}" if path else pname
            kwargs = method.layer_kwargs(adapters.view, config, adapter_name, key)
            layer = chain.get(pname)
            if layer is not None:
                touched.append(layer)
                layer.update_layer(adapter_name, config, **kwargs)
                layer.train(module.training)
                continue
            layer = pp.cls(current, pname)
            layer.update_layer(adapter_name, config, **kwargs)
            layer.train(module.training)
            current = layer
        if current is not module:
            created[path] = current
