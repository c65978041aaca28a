"""Combining saved adapters without the base model (``adapt combine``).

Only the adapter folders are read (``adapter_config.json``, ``adapter_model.safetensors``; no
pickle). Core checks what it can know without the method: one method, one base model, the same
adapted modules (or their union, when asked); the method then computes the combination from
configs and tensors (:meth:`~adapt.core.method.Method.combine_checkpoints`) and core writes it
atomically, as ``save_pretrained`` would have written the in-model combination.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_config, read_tensors, resolve_adapter_dir, write_adapter
from .combine import check_weights
from .config import AdapterConfig
from .errors import AdaptError, CheckpointError, ConfigError
from .files import split_key
from .method import CombineOptions, Method
from .registry import get_registry

__all__ = ["combine_saved_adapters"]

PREFIX = "base_model.model."


def combine_saved_adapters(
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    out: str | os.PathLike[str],
    *,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
    union_targets: bool = False,
    overwrite: bool = False,
) -> Path:
    """Combine the adapters saved in the folders ``adapters`` with ``weights`` and write the
    result to ``out`` (a folder ``save_pretrained`` could have written), reading only the
    adapter files. The options are ``add_weighted_adapter``'s, and the result is the one it
    gives in a model holding these adapters, saved (byte for byte for the deterministic types;
    the DARE types draw their masks from ``generator``, or the global RNG). Adapters that adapt
    different modules are refused unless ``union_targets=True`` (then each module combines the
    adapters present there, as ``add_weighted_adapter`` does). Returns ``out``."""
    folders = _folders(adapters)
    values = check_weights(weights, len(folders))
    options = CombineOptions(
        combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density,
        majority_sign_method, generator,
    )  # fmt: skip
    target = _output_folder(out, folders, overwrite)
    raw = [read_config(folder) for folder in folders]
    method = _one_method(raw, folders)
    base = _one_base(raw, folders)
    configs: list[AdapterConfig] = [
        method.config_class.from_dict(data, source=str(folder / "adapter_config.json"))
        for data, folder in zip(raw, folders, strict=True)
    ]
    tensors = [read_tensors(folder) for folder in folders]
    for folder, state in zip(folders, tensors, strict=True):
        _check_keys(folder, state)
    if not union_targets:
        _same_modules(folders, tensors, method)
    try:
        config, combined = method.combine_checkpoints(configs, tensors, values, options)
    except AdaptError as exc:  # the method numbers the adapters: say which folder is which
        legend = ", ".join(f"#{i + 1} = {str(f)!r}" for i, f in enumerate(folders))
        raise type(exc)(f"{exc} [{legend}]") from exc
    data = config.to_dict()
    data["inference_mode"] = True
    data["base_model_name_or_path"] = base
    return write_adapter(target, data, combined)


def _folders(adapters: Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence):
        raise ConfigError(
            f"combine: adapters must be a list of adapter folders, got {adapters!r}; "
            "e.g. combine_saved_adapters(['out/a', 'out/b'], [0.7, 0.3], 'out/ab')"
        )
    if not adapters:
        raise ConfigError("combine: no adapters given; name at least one adapter folder")
    return [resolve_adapter_dir(a, caller="combine_saved_adapters") for a in adapters]


def _output_folder(out: str | os.PathLike[str], folders: list[Path], overwrite: bool) -> Path:
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot write into {str(target)!r}: it is a file, not a folder")
    resolved = target.resolve()
    if any(folder.resolve() == resolved for folder in folders):
        raise ConfigError(
            f"combine: the output folder {str(target)!r} is one of the adapters being "
            "combined; write the combination to a new folder"
        )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"combine: the output folder {str(target)!r} is not empty; pick a new folder or "
            "pass overwrite=True (--overwrite) to replace the adapter there"
        )
    return target


def _one_method(raw: list[dict[str, Any]], folders: list[Path]) -> Method[Any]:
    types = [str(data["peft_type"]) for data in raw]
    for folder, kind in zip(folders[1:], types[1:], strict=True):
        if kind.upper() != types[0].upper():
            raise ConfigError(
                f"combine: adapters of one method only; {str(folders[0])!r} is {types[0]}, "
                f"{str(folder)!r} is {kind}"
            )
    return get_registry().get_method(types[0])


def _one_base(raw: list[dict[str, Any]], folders: list[Path]) -> str | None:
    """The base model the adapters were trained on (refused when two name different ones)."""
    named = [
        (folder, data.get("base_model_name_or_path"), data.get("revision"))
        for folder, data in zip(folders, raw, strict=True)
        if data.get("base_model_name_or_path")
    ]
    for folder, base, revision in named[1:]:
        first, first_base, first_revision = named[0]
        if (base, revision) != (first_base, first_revision):
            raise ConfigError(
                f"combine: the adapters were trained on different base models: "
                f"{str(first)!r} on {_model(first_base, first_revision)}, {str(folder)!r} on "
                f"{_model(base, revision)}; only adapters of one base model can be combined"
            )
    return str(named[0][1]) if named else None


def _model(base: Any, revision: Any) -> str:
    return f"{base!r}" + (f" (revision {revision!r})" if revision else "")


def _check_keys(folder: Path, state: dict[str, torch.Tensor]) -> None:
    stray = [key for key in state if not key.startswith("base_model.")]
    if stray:
        raise CheckpointError(
            f"{str(folder)!r}: tensor {stray[0]!r} is not named as PEFT names adapter tensors "
            "(base_model.model.<module>.<tensor>); is this an adapter folder?"
        )


def _modules(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> set[str]:
    # shared tensors (base_model.vera_A) are not a module's
    return {split_key(key, prefixes)[0] for key in state if key.startswith(PREFIX)}


def _same_modules(
    folders: list[Path], tensors: list[dict[str, torch.Tensor]], method: Method[Any]
) -> None:
    prefixes = tuple(method.tensor_prefixes) or (f"{method.name.lower()}_",)
    sets = [_modules(state, prefixes) for state in tensors]
    for folder, modules in zip(folders[1:], sets[1:], strict=True):
        if modules == sets[0]:
            continue
        only_first = sorted(sets[0] - modules)
        only_other = sorted(modules - sets[0])
        detail = "; ".join(
            f"only {str(where)!r} adapts {names[:3]}" + (" …" if len(names) > 3 else "")
            for where, names in ((folders[0], only_first), (folder, only_other))
            if names
        )
        raise ConfigError(
            f"combine: the adapters adapt different modules ({detail}). If that is intended, "
            "pass union_targets=True (--union-targets): each module then combines the adapters "
            "that adapt it, as add_weighted_adapter does in a model"
        )
