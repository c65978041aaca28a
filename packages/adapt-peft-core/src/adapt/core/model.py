"""``AdaptedModel``: a model with named adapters injected, and the ``adapt()`` entry point.

The wrapped model sits at ``adapted.base_model.model`` so that state-dict keys read
``base_model.model.<module path>...`` exactly as in HF PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .backends import MergeReport, describe
from .checkpoint import (
    adapter_folder,
    read_config,
    read_tensors,
    resolve_adapter_dir,
    write_adapter,
)
from .config import AdapterConfig
from .distributed import clean_key
from .errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    IntegrationError,
    TargetError,
    warn_user,
)
from .foreign import (
    PLAIN_TRAINER_SAVE_MESSAGE,
    PLAIN_TRL_MESSAGE,
    called_by_plain_trainer_save,
    is_trl_fused_head,
)
from .layer import AdapterLayer, fits_dtype
from .method import Method
from .progress import progress
from .registry import get_registry
from .routing import BASE, current_adapter_names, route_batch
from .saving import collect_states, forget_shapes, record_shapes
from .targeting import ALL_LINEAR, find_targets, matches_name, model_type_of, module_summary
from .wrapped import guard_direct_save, remove_guard

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,99}$")  # also a folder name: <= 100

logger = logging.getLogger("adapt")


class ModulesToSave(nn.Module):
    """A module trained in full: one copy per adapter, the original kept for the base model."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def get_base_layer(self) -> nn.Module:
        return self.original_module

    def _current(self) -> nn.Module:
        if (
            self.disabled
            or self.active_adapter is None
            or self.active_adapter not in self.modules_to_save
        ):
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = current_adapter_names()
        if names is None or self.disabled:
            return self._current()(*args, **kwargs)
        x = args[0]
        result = self.original_module(*args, **kwargs)
        for name in dict.fromkeys(names):
            if name == BASE or name not in self.modules_to_save:
                continue
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            sub = self.modules_to_save[name](x.index_select(0, index), *args[1:], **kwargs)
            result = result.index_copy(0, index, sub.to(result.dtype))
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._current(), name)


class _Host(nn.Module):
    """Holds the wrapped model as ``.model`` (the ``base_model`` of PEFT's key layout) and any
    state a method shares across layers (e.g. VeRA's ``vera_A``/``vera_B``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class AdaptedModel(nn.Module):
    """A model with adapters. Forward, ``generate`` and attribute access pass through to the
    wrapped model."""

    #: transformers' Trainer refuses "purely quantized" models unless adapters are attached;
    #: this is the flag it reads (transformers' own PEFT integration sets it the same way).
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        adapter_name: str = "default",
        *,
        is_trainable: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise AdapterStateError(
                "this model is already adapted; use model.add_adapter(name, config) to add "
                "another adapter"
            )
        self.base_model = _Host(model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self.is_trainable = is_trainable
        self.add_adapter(adapter_name, config)
        _expose_forward_signature(self)
        guard_direct_save(model)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and is_trl_fused_head(value):
            # TRL's fused LM head; adapt's TRL integration installs a handler that puts it on
            # the wrapped transformers model instead (see adapt.core.foreign)
            handler = self.__dict__.get("_fused_head_handler")
            if handler is None:
                raise IntegrationError(PLAIN_TRL_MESSAGE)
            handler(self, value)
            return
        super().__setattr__(name, value)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if not self.__dict__.get("_warned_plain_save") and called_by_plain_trainer_save(
            sys._getframe(1)
        ):
            self.__dict__["_warned_plain_save"] = True
            warn_user(PLAIN_TRAINER_SAVE_MESSAGE)
        return super().state_dict(*args, **kwargs)

    # -- pass-through -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules"):
                raise
            return getattr(self.base_model.model, name)

    @property
    def model(self) -> nn.Module:
        """The wrapped model (with adapter layers inside)."""
        inner: nn.Module = self.base_model.model
        return inner

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            output = self.model(*args, **kwargs)
        else:
            output = _mixed_batch_call(self, adapter_names, args, kwargs)
        for name in self._postprocessing:
            if name in self.peft_config:
                output = self.method_of(name).postprocess_output(self, name, output)
        return output

    @property
    def _postprocessing(self) -> list[str]:
        """Active adapters whose method post-processes the model's output."""
        return [
            name
            for name in self.active_adapters
            if name in self.peft_config
            and type(self.method_of(name)).postprocess_output is not Method.postprocess_output
        ]

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank-allocation step for the trainable adapter: call it after
        ``loss.backward()`` and ``optimizer.step()``, before ``zero_grad()``, every step."""
        names = [n for n in self.active_adapters if not self.peft_config[n].inference_mode]
        if not names:
            raise AdapterStateError(
                "update_and_allocate needs a trainable adapter; the active adapters "
                f"{self.active_adapters} are in inference mode (load with is_trainable=True)"
            )
        for name in names:
            self.method_of(name).update_and_allocate(self, global_step)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        model: Any = self.model
        generate = model.generate
        if adapter_names is None:
            return generate(*args, **kwargs)
        self._check_batch_names(adapter_names)
        with route_batch(list(adapter_names)):
            return generate(*args, **kwargs)

    def _check_batch_names(self, adapter_names: Sequence[str]) -> None:
        if isinstance(adapter_names, str):
            raise ValueError(
                "adapter_names takes one adapter name per sample (a list), not a string"
            )
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise AdapterStateError(
                f"adapter_names names unknown adapters {unknown}; known: "
                f"{sorted(self.peft_config)} (use '{BASE}' for the base model)"
            )
        if any(layer.merged for _, layer in self.adapter_layers()):
            raise AdapterStateError(
                "a mixed-batch forward (adapter_names=...) needs unmerged adapters; call "
                "unmerge_adapter() first"
            )

    # -- walking the model --------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(path, layer)`` for every adapter layer; paths relative to the wrapped model."""
        for path, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield path, module

    def _modules_to_save(self) -> Iterator[tuple[str, ModulesToSave]]:
        for path, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield path, module

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, child, new)

    def method_of(self, adapter_name: str) -> Method:
        """The method object of ``adapter_name`` (resolved once, then cached per adapter)."""
        peft_type = self.peft_config[adapter_name].peft_type
        cache: dict[str, tuple[str, Method]] = self.__dict__.setdefault("_method_cache", {})
        hit = cache.get(adapter_name)
        if hit is not None and hit[0] == peft_type:
            return hit[1]
        method = get_registry().get_method(peft_type)
        cache[adapter_name] = (peft_type, method)
        return method

    # -- adding, selecting, deleting ----------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Inject a new adapter. On any error the model is left exactly as it was."""
        self._validate_new_name(adapter_name)
        if not isinstance(config, AdapterConfig):
            raise ConfigError(
                f"expected an adapter config (e.g. LoraConfig), got {type(config).__name__}"
            )
        config.validate()
        method = get_registry().get_method(config.peft_type)
        given = config
        if config.target_modules is None:
            config = self._with_default_targets(config, method)
        for other, other_cfg in self.peft_config.items():
            if other_cfg.peft_type != config.peft_type:
                raise ConfigError(
                    f"adapter {other!r} uses {other_cfg.peft_type} and {adapter_name!r} uses "
                    f"{config.peft_type}; one model holds adapters of one method"
                )
        paths = find_targets(
            self.model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            skip=(AdapterLayer, ModulesToSave),
        )
        modules = {p: self.model.get_submodule(p) for p in paths}
        plan: dict[str, type[AdapterLayer] | None] = {}
        for path, module in modules.items():
            if isinstance(module, AdapterLayer):
                if module.method != method.name:
                    raise TargetError(
                        f"{path} already holds a {module.method} adapter; cannot add {method.name}"
                    )
                plan[path] = None
            elif isinstance(module, ModulesToSave):
                raise TargetError(
                    f"{path} is in modules_to_save and cannot also be a target module"
                )
            else:
                cls = get_registry().resolve_layer(method.name, module)
                if cls is None:
                    raise TargetError(self._no_layer_message(method, path, module))
                plan[path] = cls
        save_paths = self._find_modules_to_save(config, set(paths))

        method.prepare(self, config, adapter_name, modules)
        touched: list[AdapterLayer] = []
        touched_mts: list[ModulesToSave] = []
        created: dict[str, nn.Module] = {}
        try:
            for path, cls in plan.items():
                kwargs = method.layer_kwargs(self, config, adapter_name, path)
                module = modules[path]
                if cls is None:
                    assert isinstance(module, AdapterLayer)
                    touched.append(module)
                    module.update_layer(adapter_name, config, **kwargs)
                    module.train(module.base_layer.training)  # new dropout follows the mode
                else:
                    try:
                        layer = cls(module)
                    except TargetError as error:  # e.g. no backend: say which module it was
                        raise TargetError(f"cannot adapt {path!r}: {error}") from error
                    layer.update_layer(adapter_name, config, **kwargs)
                    if not module.training:  # new modules start in training mode
                        layer.train(False)
                    created[path] = layer
            for path in save_paths:
                module = self.model.get_submodule(path)
                wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
                if wrapper is module:
                    touched_mts.append(wrapper)
                else:
                    created[path] = wrapper
                wrapper.add(adapter_name)
        except BaseException:
            for layer in touched:
                # unconditionally: a half-built adapter may hold state only in
                # other_param_names containers, which adapter_names does not list
                layer.delete_adapter(adapter_name)
            for wrapper in touched_mts:
                if adapter_name in wrapper.modules_to_save:
                    del wrapper.modules_to_save[adapter_name]
            method.on_delete(self, adapter_name)
            raise
        for path, new in created.items():
            self._replace(path, new)
        if config is not given:  # defaults resolved: now the user's config says which (as PEFT)
            given.target_modules = config.target_modules
            config = given
        self.peft_config[adapter_name] = config
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._apply_active()
        record_shapes(self, adapter_name)

    def _with_default_targets(self, config: AdapterConfig, method: Method) -> AdapterConfig:
        """A copy of ``config`` targeting the method's default modules for this model type; the
        user's object gets them only once the adapter is in (a failed call leaves it as it
        was)."""
        model_type = model_type_of(self.model)
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
                f"Modules in this model: {module_summary(self.model)}"
            )
        resolved = copy.copy(config)
        resolved.target_modules = list(defaults)
        return resolved

    def _validate_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not _ADAPTER_NAME.match(adapter_name):
            raise ConfigError(
                f"invalid adapter name {adapter_name!r}: use letters, digits, '_' and '-' "
                "(no dots, slashes or spaces; at most 100 characters), e.g. 'default' or 'task_b'"
            )
        if adapter_name == BASE:
            raise ConfigError(f"{BASE!r} is reserved for the base model in mixed batches")
        if adapter_name in self.__dict__.get("peft_config", {}):
            raise ConfigError(
                f"an adapter named {adapter_name!r} exists already; pick another name or "
                "delete_adapter() it first"
            )

    def _no_layer_message(self, method: Method, path: str, module: nn.Module) -> str:
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
        )

    def _find_modules_to_save(self, config: AdapterConfig, target_paths: set[str]) -> list[str]:
        names = config.modules_to_save
        if not names:
            return []
        found: list[str] = []
        for path, module in self.model.named_modules():
            if not path or any(path.startswith(p + ".") for p in found):
                continue
            if matches_name(path, names):
                if path in target_paths or isinstance(module, AdapterLayer):
                    raise TargetError(
                        f"{path} is both a target module and in modules_to_save; choose one"
                    )
                found.append(path)
        missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in found)]
        if missing:
            raise TargetError(
                f"modules_to_save {missing} matched no module; "
                + find_targets_hint(self.model, missing)
            )
        return found

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or several) active; only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise AdapterStateError(
                    f"no adapter named {name!r}; this model has {sorted(self.peft_config)}"
                )
        self.active_adapters = names
        self._apply_active()

    def _apply_active(self) -> None:
        trainable = self.is_trainable
        for param in self.model.parameters():
            param.requires_grad_(False)
        for _, layer in self.adapter_layers():
            layer.set_adapter(self.active_adapters, trainable=trainable)
        for _, wrapper in self._modules_to_save():
            active = [n for n in self.active_adapters if n in wrapper.modules_to_save]
            wrapper.active_adapter = active[0] if active else None
            if trainable and active:
                wrapper.modules_to_save[active[0]].requires_grad_(True)
        if not trainable:
            return
        for name in self.active_adapters:
            config = self.peft_config[name]
            bias = getattr(config, "bias", "none")
            if bias == "all":
                for pname, param in self._bias_parameters(all_biases=True).items():
                    param.requires_grad_(True)
                    del pname
            elif bias in ("lora_only", "vera_only", "adapter_only"):
                for param in self._bias_parameters(all_biases=False).values():
                    param.requires_grad_(True)
            self.method_of(name).mark_trainable(self, config, name)

    def _bias_parameters(self, *, all_biases: bool) -> dict[str, nn.Parameter]:
        """Base-model biases by path: all of them, or only those of adapted layers."""
        out: dict[str, nn.Parameter] = {}
        if all_biases:
            for pname, param in self.model.named_parameters():
                if pname.endswith("bias") and not (
                    ".modules_to_save." in pname or ".original_module." in pname
                ):
                    out[pname] = param
            return out
        for path, layer in self.adapter_layers():
            bias = getattr(layer.get_base_layer(), "bias", None)
            if isinstance(bias, nn.Parameter):
                out[f"{path}.base_layer.bias"] = bias
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left with no adapter go back to their base module."""
        if adapter_name not in self.peft_config:
            raise AdapterStateError(
                f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}"
            )
        layers = list(self.adapter_layers())
        for _, layer in layers:
            if adapter_name in layer.merged_adapters:
                raise AdapterStateError(
                    f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it"
                )
        method = self.method_of(adapter_name)
        for path, layer in layers:
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    self._replace(path, layer.base_layer)
        for path, wrapper in list(self._modules_to_save()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
            if not len(wrapper.modules_to_save):
                self._replace(path, wrapper.original_module)
        method.on_delete(self, adapter_name)
        forget_shapes(self, adapter_name)
        del self.peft_config[adapter_name]
        self.__dict__.get("_method_cache", {}).pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
        self._apply_active()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: every adapter (and modules_to_save copy) is bypassed inside."""
        modules = self._switchable()
        previous = [m.disabled for m in modules]
        for module in modules:
            module.disabled = True
        try:
            yield
        finally:
            for mod, was in zip(modules, previous, strict=True):
                mod.disabled = was

    def disable_adapter_layers(self) -> None:
        """Bypass every adapter (and modules_to_save copy) until :meth:`enable_adapter_layers`;
        PEFT's call of the same name. :meth:`disable_adapter` is the scoped form."""
        for module in self._switchable():
            module.disabled = True

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the active adapters apply again."""
        for module in self._switchable():
            module.disabled = False

    def _switchable(self) -> list[AdapterLayer | ModulesToSave]:
        """Every module that ``disabled`` switches off: adapter layers and modules_to_save."""
        layers = [layer for _, layer in self.adapter_layers()]
        wrappers = [w for _, w in self._modules_to_save()]
        return [*layers, *wrappers]

    @property
    def peft_type(self) -> str | None:
        """The method of the active adapter as PEFT names it (``"LORA"``), as on PEFT's model."""
        name = self.active_adapter
        if name is None or name not in self.peft_config:
            return None
        return self.peft_config[name].peft_type

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's name for :meth:`trainable_parameters`."""
        return self.trainable_parameters()

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (quantised weights counted unpacked)."""
        trainable = total = 0
        for param in self.parameters():
            n = param.numel()
            if hasattr(param, "quant_state") or param.__class__.__name__ == "Params4bit":
                n *= 2  # 4-bit: two values per stored byte
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(
        self,
        adapter_names: Sequence[str] | None = None,
        safe_merge: bool = False,
        *,
        progress_bar: bool | None = None,
    ) -> MergeReport:
        """Fold adapters (default: the active ones) into the base weights.

        With ``safe_merge`` every merged weight is computed and checked for NaN/Inf before any
        layer changes. Returns the worst error the writes introduced (non-zero only for
        quantised base layers).
        """
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        for name in names:
            if name not in self.peft_config:
                raise AdapterStateError(
                    f"no adapter named {name!r}; this model has {sorted(self.peft_config)}"
                )
        layers = [layer for _, layer in self.adapter_layers()]
        if safe_merge:
            for layer in layers:
                todo = [
                    n for n in names if n in layer.adapter_names and n not in layer.merged_adapters
                ]
                if todo and not fits_dtype(
                    layer.merged_weight(todo),
                    layer.backend.get_weight(layer.base_layer).dtype,
                ):
                    raise AdapterStateError(
                        f"safe_merge: merging {todo} into {describe(layer.get_base_layer())} gives "
                        "NaN or Inf weights (or values beyond the weight's dtype); nothing was merged (check the adapter's weights)"
                    )
        worst = MergeReport()
        for layer in progress(layers, desc="merging", unit="layer", enable=progress_bar):
            todo = [n for n in names if n in layer.adapter_names]
            report = layer.merge(todo)
            if report is not None:
                worst = MergeReport(
                    max(report.max_abs_error, worst.max_abs_error),
                    max(report.rel_error, worst.rel_error),
                    report.lossy or worst.lossy,
                )
        if worst.lossy:
            logger.info(
                "merged %s into quantised layers: requantisation changed the weights by up to "
                "%.3g (max abs), %.2f%% (relative, Frobenius)",
                names,
                worst.max_abs_error,
                100 * worst.rel_error,
            )
        return worst

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool | None = None,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        progress_bar: bool | None = None,
    ) -> nn.Module:
        """Merge the adapters and return the base model with plain modules again.

        The arguments are PEFT's, in PEFT's order (``merge_and_unload(True)`` shows the progress
        bar); ``progress_bar`` is the spelling of :meth:`merge_adapter`. Without either the bar
        shows when stderr is a terminal.
        """
        if progressbar is not None and not isinstance(progressbar, bool):
            raise TypeError(
                f"merge_and_unload's first argument is progressbar (a bool, as in PEFT), got "
                f"{progressbar!r}; pass adapters by keyword: adapter_names=[...]"
            )
        if progressbar is not None and progress_bar is not None and progressbar != progress_bar:
            raise TypeError(
                "merge_and_unload got both progressbar and progress_bar with different values; "
                "pass one of them"
            )
        show = progress_bar if progress_bar is not None else progressbar
        self.merge_adapter(adapter_names, safe_merge=safe_merge, progress_bar=show)
        return self._unload(keep_modules_to_save=True)

    def unload(self) -> nn.Module:
        """Return the base model without any adapter (merged adapters are taken out first)."""
        self.unmerge_adapter()
        return self._unload(keep_modules_to_save=False)

    def _unload(self, *, keep_modules_to_save: bool) -> nn.Module:
        for path, layer in list(self.adapter_layers()):
            self._replace(path, layer.base_layer)
        for path, wrapper in list(self._modules_to_save()):
            keep = wrapper._current() if keep_modules_to_save else wrapper.original_module
            self._replace(path, keep)
        for name in list(self.peft_config):
            method = self.method_of(name)
            del self.peft_config[name]
            self.__dict__.get("_method_cache", {}).pop(name, None)
            method.on_delete(self, name)
        model = self.model
        self.active_adapters = []
        remove_guard(model)
        return model

    # -- checkpoints --------------------------------------------------------------------------
    def adapter_state_dict(
        self, adapter_name: str, *, include_shared: bool = True
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's on-disk keys (adapter name removed).

        ``include_shared`` adds state a method keeps outside the layers (VeRA's projection).
        """
        if adapter_name not in self.peft_config:
            raise AdapterStateError(
                f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}"
            )
        out: dict[str, torch.Tensor] = {}
        prefix = "base_model.model."
        for path, layer in self.adapter_layers():
            for suffix, tensor in layer.adapter_tensors(adapter_name).items():
                out[clean_key(f"{prefix}{path}.{suffix}")] = tensor
        for path, wrapper in self._modules_to_save():
            if adapter_name in wrapper.modules_to_save:
                module = wrapper.modules_to_save[adapter_name]
                for pname, tensor in module.state_dict(keep_vars=True).items():
                    out[clean_key(f"{prefix}{path}.{pname}")] = tensor
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        if bias != "none":
            for pname, param in self._bias_parameters(all_biases=bias == "all").items():
                out.setdefault(clean_key(f"{prefix}{pname}"), param)
        if include_shared:
            for key, tensor in self.method_of(adapter_name).extra_state(self, adapter_name).items():
                out[f"base_model.{key}"] = tensor
        return out

    def load_adapter_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
    ) -> None:
        """Copy tensors under PEFT's keys (what :meth:`adapter_state_dict` and PEFT's
        ``get_peft_model_state_dict`` give) into the existing adapter ``adapter_name``: PEFT's
        ``set_peft_model_state_dict``. Every tensor is checked first (names, shapes, dtypes,
        finite values) and all of the adapter's tensors must be there; on any error the adapter
        is left as it was."""
        if adapter_name not in self.peft_config:
            raise AdapterStateError(
                f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}. "
                "Add it first (add_adapter), then load its tensors"
            )
        backup = {k: v.detach().clone() for k, v in self.adapter_state_dict(adapter_name).items()}
        try:
            self._load_tensors(adapter_name, dict(state_dict), source="state_dict")
        except BaseException:
            current = self.adapter_state_dict(adapter_name)
            with torch.no_grad():
                for key, value in backup.items():
                    if key in current and current[key].shape == value.shape:
                        current[key].copy_(value)
            raise

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter in PEFT's format: ``default`` in ``save_directory``, any other in
        ``save_directory/<name>/``. Files are replaced atomically.

        In distributed training call it on every rank with ``is_main_process=(rank == 0)``:
        only the main process writes; when an engine shards the adapter tensors (FSDP2, FSDP1
        units inside the model, DeepSpeed ZeRO-3 partitions) every rank first takes part in
        gathering them. ``state_dict=`` (as in PEFT) takes an already gathered state dict of
        the whole model, or of the adapter under PEFT's keys, and writes the adapter from it."""
        unknown = sorted(set(kwargs) - {"safe_serialization", "is_main_process", "state_dict"})
        if unknown:
            raise TypeError(f"save_pretrained got unexpected arguments {unknown}")
        if kwargs.get("safe_serialization") is False:
            raise ConfigError("adapt writes safetensors only; drop safe_serialization=False")
        main = kwargs.get("is_main_process", True) is not False
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        states = collect_states(self, names, main=main, state_dict=kwargs.get("state_dict"))
        if states is None:
            return
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"cannot save into {str(root)!r}: it is a file, not a folder")
        for name in names:
            config = self.peft_config[name].to_dict()
            config["inference_mode"] = True
            config.setdefault("base_model_name_or_path", None)
            if config.get("base_model_name_or_path") is None:
                config["base_model_name_or_path"] = (
                    getattr(getattr(self.model, "config", None), "name_or_path", None) or None
                )
            write_adapter(adapter_folder(root, name), config, states[name])

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        *,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> AdaptedModel:
        """Load a saved adapter (adapt's or PEFT's) onto ``model``.

        The method is read from ``adapter_config.json`` and resolved through entry points. On
        any error ``model`` is left as it was. ``allow_pickle=True`` accepts an old
        ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``; trusted files only).
        ``model_id`` is a local folder or, when no such folder exists, a Hugging Face Hub repo
        id; ``subfolder``, ``revision``, ``cache_dir``, ``token``, ``local_files_only`` and
        ``force_download`` are passed to the download as in PEFT.
        """
        folder = resolve_adapter_dir(
            model_id, allow_pickle=allow_pickle, caller="from_pretrained", **kwargs
        )
        if config is None:
            config = load_config(folder)
        config.inference_mode = not is_trainable
        tensors = read_tensors(folder, allow_pickle=allow_pickle)
        # injecting freezes the base; a failed load gives the user's flags back
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        adapted = cls(model, config, adapter_name, is_trainable=is_trainable)
        try:
            adapted._before_load(adapter_name)
            adapted._load_tensors(adapter_name, tensors, source=str(model_id))
        except BaseException:
            adapted.unload()
            for param, flag in requires_grad:
                param.requires_grad_(flag)
            raise
        return adapted

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        config: AdapterConfig | None = None,
        *,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter next to the existing ones (not made active). ``model_id`` and
        the Hub arguments are as for :meth:`from_pretrained`."""
        self._validate_new_name(adapter_name)
        folder = resolve_adapter_dir(
            model_id, allow_pickle=allow_pickle, caller="load_adapter", **kwargs
        )
        if config is None:
            config = load_config(folder)
        config.inference_mode = not is_trainable
        tensors = read_tensors(folder, allow_pickle=allow_pickle)
        self.add_adapter(adapter_name, config)
        try:
            self._before_load(adapter_name)
            self._load_tensors(adapter_name, tensors, source=str(model_id))
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def _before_load(self, adapter_name: str) -> None:
        method = self.method_of(adapter_name)
        method.before_load(self, self.peft_config[adapter_name], adapter_name)
        record_shapes(self, adapter_name)  # the shapes the checkpoint was saved with

    def _load_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str
    ) -> None:
        method = self.method_of(adapter_name)
        extra_keys = {
            k
            for k in tensors
            if k.startswith("base_model.") and not k.startswith("base_model.model.")
        }
        extra = {k[len("base_model.") :]: tensors[k] for k in extra_keys}
        targets = self.adapter_state_dict(adapter_name, include_shared=False)
        tensors = _normalise_peft_keys(tensors)
        file_keys = set(tensors) - extra_keys
        for key in file_keys - set(targets):
            embedding = self._embedding_parameter(key)
            if embedding is not None:
                # PEFT saves embedding weights when embeddings are targets (vocab resizing);
                # it loads them back into the base model, and so do we
                targets[key] = embedding
        missing = sorted(set(targets) - file_keys)
        unexpected = sorted(file_keys - set(targets))
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
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
        used = set(method.load_extra_state(self, adapter_name, extra))
        leftover = sorted(set(extra) - used)
        if leftover:
            raise CheckpointError(
                f"{source}: unexpected tensors {['base_model.' + k for k in leftover[:3]]} for a "
                f"{method.name} adapter"
            )

    def _embedding_parameter(self, key: str) -> torch.Tensor | None:
        """The base-model embedding weight that on-disk ``key`` names, or None."""
        prefix = "base_model.model."
        if not key.startswith(prefix) or not key.endswith(".weight"):
            return None
        owner_path = key[len(prefix) : -len(".weight")]
        try:
            owner = self.model.get_submodule(owner_path)
        except AttributeError:
            return None
        heads = set()
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            fn = getattr(self.model, getter, None)
            try:
                head = fn() if callable(fn) else None
            except (NotImplementedError, AttributeError):
                head = None
            if head is not None:
                heads.add(id(head.get_base_layer() if isinstance(head, AdapterLayer) else head))
        if isinstance(owner, nn.Embedding) or id(owner) in heads:
            weight = cast(torch.Tensor, owner.weight)
            return weight
        return None

    # -- training helpers ---------------------------------------------------------------------
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Enable the wrapped transformers model's gradient checkpointing (transformers'
        signature), with input grads on so a frozen embedding still lets gradients reach the
        adapters (once: re-enabling, as TRL does around reference passes, adds no hook)."""
        model: Any = self.model
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        )
        enable = getattr(self.model, "enable_input_require_grads", None)
        if callable(enable) and not self.__dict__.get("_input_grads_on"):
            enable()
            self.__dict__["_input_grads_on"] = True


def _mixed_batch_call_eager(
    adapted: AdaptedModel, adapter_names: Sequence[str], args: Any, kwargs: Any
) -> Any:
    """The wrapped model's forward with per-sample adapters (``adapter_names=``). Under
    ``torch.compile`` this is the one place an adapted forward breaks the graph: it runs
    eagerly, because the names travel to the layers in a ContextVar (per thread, per call),
    which dynamo cannot trace; everything around it stays compiled."""
    adapted._check_batch_names(adapter_names)
    with route_batch(list(adapter_names)):
        return adapted.model(*args, **kwargs)


_disable: Any = torch.compiler.disable  # untyped in torch
_mixed_batch_call: Callable[[AdaptedModel, Sequence[str], Any, Any], Any] = _disable(
    _mixed_batch_call_eager
)


_MTS_KEY = re.compile(r"^(?P<head>.*)\.modules_to_save\.[^.]+\.(?P<tail>.*)$")


def _normalise_peft_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _expose_forward_signature(adapted: AdaptedModel) -> None:
    """Give ``adapted.forward`` the wrapped model's signature (plus ``adapter_names``).

    transformers' ``Trainer`` keeps only the batch columns the model's ``forward`` names; a
    bare ``(*args, **kwargs)`` would make it drop ``input_ids``. The bound method is rebuilt per
    instance on a function carrying ``__signature__``; copies rebind to the copy.
    """
    try:
        sig = inspect.signature(adapted.model.forward)
    except (TypeError, ValueError):
        return
    kind = inspect.Parameter
    params = [kind("self", kind.POSITIONAL_OR_KEYWORD)]
    var_kw = None
    for p in sig.parameters.values():
        if p.kind is kind.VAR_KEYWORD:
            var_kw = p
        elif p.name not in ("self", "adapter_names"):
            params.append(p)
    params.append(kind("adapter_names", kind.KEYWORD_ONLY, default=None))
    if var_kw is not None:
        params.append(var_kw)
    try:
        new_sig = sig.replace(parameters=params)
    except ValueError:
        return
    impl = AdaptedModel.forward
    func = types.FunctionType(
        impl.__code__, impl.__globals__, "forward", impl.__defaults__, impl.__closure__
    )
    func.__kwdefaults__ = impl.__kwdefaults__
    func.__qualname__ = impl.__qualname__
    func.__doc__ = impl.__doc__
    func.__signature__ = new_sig  # type: ignore[attr-defined]
    object.__setattr__(adapted, "forward", types.MethodType(func, adapted))


def load_config(model_id: str | os.PathLike[str], **hub: Any) -> AdapterConfig:
    """Read ``adapter_config.json`` (a local folder or a Hub repo id, see
    :meth:`AdaptedModel.from_pretrained`) and build the config of the method it names."""
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


def find_targets_hint(model: nn.Module, names: Sequence[str]) -> str:
    import difflib

    leaves = sorted({p.split(".")[-1] for p, _ in model.named_modules() if p})
    close = sorted(
        {c for n in names for c in difflib.get_close_matches(n, leaves, n=3, cutoff=0.5)}
    )
    return f"did you mean {close}?" if close else f"module names in this model: {leaves[:12]}"


def adapt(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = "default",
) -> AdaptedModel:
    """Inject ``config``'s adapter into ``model`` and return the trainable ``AdaptedModel``."""
    # getattr: a non-config is refused by add_adapter with a clear ConfigError
    is_trainable = not getattr(config, "inference_mode", False)
    return AdaptedModel(model, config, adapter_name, is_trainable=is_trainable)
