"""Model-level merging: every layer's ``W ← W + ΔW``, checked first when asked, and unloading.

The numerics live in :mod:`adapt.core.merge` and in each layer's ``merge``; this module walks
the model, checks everything before it writes anything (``safe_merge``) and reports the worst
requantisation error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from .adapters import AdapterSet
from .errors import AdapterStateError
from .merge import MergeReport, unsafe_merge_error, worst
from .progress import progress
from .typenames import describe
from .wrapped import remove_guard

logger = logging.getLogger("adapt")


def _check_first(adapters: AdapterSet, names: Sequence[str], *, safe_merge: bool) -> None:
    """Compute, before anything is written, the merge of every layer that could refuse: all
    of them with ``safe_merge`` (NaN/Inf), else the layers whose merge runs a method's own
    hooks (which may raise). A refusal merges nothing rather than half the model."""
    for path, layer in adapters.layers():
        if not (safe_merge or layer.merge_depends_on_weight()):
            continue
        todo = [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]
        if not todo:
            continue
        try:
            safe = layer.merge_is_safe(todo)
        except AdapterStateError as exc:
            raise AdapterStateError(f"{path}: {exc}; nothing was merged") from exc
        if safe_merge and not safe:
            raise unsafe_merge_error(todo, describe(layer.get_base_layer()), "nothing was merged")


def merge_adapters(
    adapters: AdapterSet,
    adapter_names: Sequence[str] | None,
    *,
    safe_merge: bool,
    progress_bar: bool | None,
) -> MergeReport:
    """Fold ``adapter_names`` (default: the active ones) into the base weights."""
    names = list(adapter_names) if adapter_names is not None else list(adapters.active)
    for name in names:
        adapters.require(name)
    _check_first(adapters, names, safe_merge=safe_merge)
    layers = [layer for _, layer in adapters.layers()]
    bar = progress(layers, desc="merging", unit="layer", enable=progress_bar)
    report = worst(layer.merge([n for n in names if n in layer.adapter_names]) for layer in bar)
    if report.lossy:
        logger.info(
            "merged %s into quantised layers: requantisation changed the weights by up to "
            "%.3g (max abs), %.2f%% (relative, Frobenius)",
            names,
            report.max_abs_error,
            100 * report.rel_error,
        )
    return report


def unmerge_all(adapters: AdapterSet) -> None:
    """Unmerge every layer, or none: layers whose unmerge runs a method's own hooks (which may
    refuse, e.g. IA³ dividing by a zero factor) are checked first, so a refusal leaves the whole
    model merged rather than half."""
    layers = [(path, layer) for path, layer in adapters.layers() if layer.merged]
    for path, layer in layers:
        if layer.unmerge_depends_on_weight():
            try:
                layer.unmerged_tensors()
            except AdapterStateError as exc:
                raise AdapterStateError(
                    f"{path}: {exc}; nothing was unmerged (every layer is still merged)"
                ) from exc
    for _, layer in layers:
        layer.unmerge()


def unload(adapters: AdapterSet, *, keep_modules_to_save: bool) -> nn.Module:
    """Plain modules back in place of adapter layers (merged weights stay merged); every
    adapter forgotten. Returns the wrapped model."""
    for path, layer in reversed(list(adapters.layers())):  # nested ones inside first
        layer.on_unload()
        adapters.replace(path, layer.base_layer)
    for path, wrapper in list(adapters.wrappers()):
        keep = wrapper.current() if keep_modules_to_save else wrapper.original_module
        adapters.replace(path, keep)
    for name in list(adapters.configs):
        method = adapters.method_of(name)
        adapters.forget(name)
        method.on_delete(adapters.view, name)
    model = adapters.model
    adapters.active = []
    remove_guard(model)
    return model


def progress_flag(progressbar: bool | None, progress_bar: bool | None) -> bool | None:
    """One progress-bar flag from PEFT's ``progressbar`` and adapt's ``progress_bar``."""
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
    return progress_bar if progress_bar is not None else progressbar
