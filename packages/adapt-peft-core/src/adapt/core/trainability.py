"""Which parameters train, which adapters apply, and how many parameters there are.

Only active adapters train (and only on a trainable model); a config's ``bias`` makes base
biases trainable too; a method may mark more (``Method.mark_trainable``). ``disabled`` switches
every adapter layer and ``modules_to_save`` wrapper off at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .adapters import AdapterSet
from .backends import WeightBackend, is_plain_weight, resolve_backend
from .errors import AdapterStateError, PluginError
from .layer import AdapterLayer
from .modules_to_save import ModulesToSave


def apply_active(adapters: AdapterSet) -> None:
    """Freeze the base, then make the active adapters (and their biases) trainable."""
    trainable = adapters.is_trainable
    for param in adapters.model.parameters():
        param.requires_grad_(False)
    for _, layer in adapters.layers():
        layer.set_adapter(adapters.active, trainable=trainable)
    for _, wrapper in adapters.wrappers():
        active = [n for n in adapters.active if n in wrapper.modules_to_save]
        wrapper.active_adapter = active[0] if active else None
        if trainable and active:
            wrapper.modules_to_save[active[0]].requires_grad_(True)
    if not trainable:
        return
    for name in adapters.active:
        config = adapters.configs[name]
        scope = config.bias_scope()
        if scope != "none":
            for param in bias_parameters(adapters, all_biases=scope == "all").values():
                param.requires_grad_(True)
        adapters.method_of(name).mark_trainable(adapters.view, config, name)


def bias_parameters(adapters: AdapterSet, *, all_biases: bool) -> dict[str, nn.Parameter]:
    """Base-model biases by path: all of them, or only those of adapted layers."""
    out: dict[str, nn.Parameter] = {}
    if all_biases:
        for pname, param in adapters.model.named_parameters():
            if pname.endswith("bias") and not (
                ".modules_to_save." in pname or ".original_module." in pname
            ):
                out[pname] = param
        return out
    for path, layer in adapters.layers():
        bias = getattr(layer.get_base_layer(), "bias", None)
        if isinstance(bias, nn.Parameter):
            out[f"{path}.base_layer.bias"] = bias
    return out


def switchable(adapters: AdapterSet) -> list[AdapterLayer | ModulesToSave]:
    """Every module that ``disabled`` switches off: adapter layers and modules_to_save."""
    layers = [layer for _, layer in adapters.layers()]
    wrappers = [w for _, w in adapters.wrappers()]
    return [*layers, *wrappers]


def _backend_of(module: nn.Module) -> WeightBackend | None:
    try:
        return resolve_backend(module)
    except PluginError:  # a conflict is reported where it matters (adapting the module)
        return None


def logical_numel(module: nn.Module, param: nn.Parameter) -> int:
    """How many values ``param`` (a direct parameter of ``module``) holds: its storage size,
    unless it is a packed or quantised tensor whose backend reports more (``logical_numel``:
    bitsandbytes' 4-bit weights hold two values per byte)."""
    if is_plain_weight(param):
        return param.numel()
    count = getattr(_backend_of(module), "logical_numel", None)
    return int(count(param)) if callable(count) else param.numel()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each tensor once, packed weights counted as
    the values they hold (the weight backend says; core knows no quantiser)."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = logical_numel(module, param)
            total += n
            if param.requires_grad:
                trainable += n
    return trainable, total


def set_active(adapters: AdapterSet, names: str | Sequence[str]) -> None:
    """Make ``names`` (one or several) the active adapters; only active adapters train."""
    active = [names] if isinstance(names, str) else list(names)
    for name in active:
        adapters.require(name)
    adapters.active = active
    apply_active(adapters)


def set_disabled(adapters: AdapterSet, disabled: bool) -> None:
    for module in switchable(adapters):
        module.disabled = disabled


@contextlib.contextmanager
def all_disabled(adapters: AdapterSet) -> Iterator[None]:
    """Every adapter (and modules_to_save copy) bypassed inside; the previous flags after."""
    modules = switchable(adapters)
    previous = [m.disabled for m in modules]
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for mod, was in zip(modules, previous, strict=True):
            mod.disabled = was


def update_and_allocate(adapters: AdapterSet, global_step: int) -> None:
    """Each trainable active adapter's method step (AdaLoRA's rank allocation)."""
    names = [n for n in adapters.active if not adapters.configs[n].inference_mode]
    if not names:
        raise AdapterStateError(
            "update_and_allocate needs a trainable adapter; the active adapters "
            f"{adapters.active} are in inference mode (load with is_trainable=True)"
        )
    for name in names:
        adapters.method_of(name).update_and_allocate(adapters.view, global_step)
