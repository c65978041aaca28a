"""Which parameters a config's ``target_parameters`` names (PEFT's matching).

A name matches a parameter whose path — the owning module's path without the ``base_layer``
segments adapter layers insert, a dot, the parameter's name — equals it or ends with ``.`` +
it: ``"experts.gate_up_proj"`` matches ``model.layers.0.mlp.experts.gate_up_proj``. No
regular expressions (PEFT has none here either). Parameters inside adapter containers and
``modules_to_save`` copies are never candidates.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from .distributed import logical_shape
from .errors import ConfigError, TargetError
from .typenames import describe

__all__ = ["find_parameter_targets", "parameter_paths", "unwrapped_path"]


def unwrapped_path(path: str) -> str:
    """``path`` without the ``base_layer`` segments adapter layers insert."""
    return ".".join(p for p in path.split(".") if p != "base_layer")


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(unwrapped path, module)`` of every module that may own targeted parameters: the
    model's own modules, the innermost module of an adapter layer chain, never the adapter
    layers nor their containers, nor ``modules_to_save`` copies."""
    owners: list[tuple[str, nn.Module]] = []
    layers: list[str] = []  # adapter layers: only their base_layer chain is looked into
    wrappers: list[str] = []  # modules_to_save wrappers: nothing inside
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers) or any(
            path.startswith(f + ".") and not path.startswith(f + ".base_layer") for f in layers
        ):
            continue
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
            wrappers.append(path)
            continue
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            layers.append(path)
            continue
        owners.append((unwrapped_path(path), module))
    return owners


def parameter_paths(model: nn.Module) -> list[str]:
    """Every candidate parameter path (for near-match hints)."""
    return [
        f"{path}.{name}" if path else name
        for path, module in _owners(model)
        for name, _ in module.named_parameters(recurse=False)
    ]


def check_names(cls_name: str, names: object) -> list[str]:
    """``target_parameters`` as a list of non-empty strings, or :class:`ConfigError`."""
    if isinstance(names, str):
        raise ConfigError(
            f"{cls_name}.target_parameters must be a list of parameter names, got the string "
            f"{names!r} (PEFT matches these by suffix, not as a regular expression): write "
            f"[{names!r}]"
        )
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"{cls_name}.target_parameters must be a list of parameter names such as "
            f"['experts.gate_up_proj', 'experts.down_proj'], got {names!r}"
        )
    return names


def _refusal(key: str, param: torch.Tensor) -> str | None:
    kind = describe(type(param))
    if kind not in ("torch.nn.parameter.Parameter", "torch.Tensor"):
        return (
            f"parameter {key!r} is a {kind} (a quantised or wrapped tensor): adapters on "
            "quantised parameters are not supported; target a float parameter, or the "
            "quantised module with target_modules if a backend serves it"
        )
    if not param.is_floating_point():
        return (
            f"parameter {key!r} holds {param.dtype} values (packed or quantised integers), "
            "not floats; only floating-point parameters can be adapted"
        )
    rank = len(logical_shape(param))
    if rank not in (2, 3):
        return (
            f"parameter {key!r} has {rank} dimensions {tuple(logical_shape(param))}; "
            "target_parameters adapts 2-D matrices and 3-D stacks of expert matrices only"
        )
    return None


def find_parameter_targets(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """Owning module path (unwrapped) → the matched parameter names in the module's
    registration order (the order adapter layers nest). :class:`TargetError` for a name that
    matches nothing (with near matches) and for a parameter that cannot be adapted."""
    found: dict[str, list[str]] = {}
    hit: set[str] = set()
    for path, module in _owners(model):
        for pname, param in module.named_parameters(recurse=False):
            key = f"{path}.{pname}" if path else pname
            matched = [n for n in names if key == n or key.endswith("." + n)]
            if not matched:
                continue
            why = _refusal(key, param)
            if why is not None:
                raise TargetError(why)
            hit.update(matched)
            found.setdefault(path, []).append(pname)
    missing = [n for n in names if n not in hit]
    if missing:
        raise TargetError(_no_match_message(model, missing))
    return found


def _no_match_message(model: nn.Module, missing: Sequence[str]) -> str:
    paths = parameter_paths(model)
    # compare the last two segments ("experts.gate_up_proj") of each candidate
    tails = sorted({".".join(p.split(".")[-2:]) for p in paths})
    close: list[str] = []
    for name in missing:
        probe = ".".join(name.split(".")[-2:])
        for cand in difflib.get_close_matches(probe, tails, n=3, cutoff=0.5):
            if cand not in close:
                close.append(cand)
    msg = f"target_parameters {list(missing)!r} matched no parameter of {type(model).__name__}"
    if close:
        msg += f". Did you mean: {', '.join(repr(c) for c in close)}?"
    elif tails:
        shown = ", ".join(tails[:12]) + (", …" if len(tails) > 12 else "")
        msg += f". Parameters in this model (module.parameter): {shown}"
    return msg + " (names match the end of a parameter's path, e.g. 'experts.gate_up_proj')"
