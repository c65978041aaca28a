"""``adapt inspect PATH``: describe a saved adapter from its config and safetensors header."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ._format import human_bytes, numel, table
from .layout import MethodView, Shapes, by_module, method_view, tensor_shapes

#: modules listed without ``--all``
MODULE_LIMIT = 20


def _unsupported_note(view: MethodView, config: dict[str, Any]) -> str:
    """' — uses use_dora=True, which adapt does not implement: ...' for a folder adapt cannot
    load, '' otherwise (also when the method's package is not installed)."""
    if view.method is None:
        return ""
    found = view.method.config_class.unsupported_features(config)
    if not found:
        return ""
    uses = ", ".join(f"{k}={v!r}" for k, v in found.items())
    return f" — uses {uses}, a PEFT feature adapt does not implement: adapt cannot load it"


def _print_summary(
    path: Path,
    config: dict[str, Any],
    view: MethodView,
    shapes: Shapes,
    n_modules: int,
    weights: Path,
) -> None:
    """The first lines of ``adapt inspect``: the method, the base model, the config values
    that matter (the method's :attr:`~adapt.core.Method.summary_keys`), the tensor count and
    the size on disk."""
    n_params = sum(numel(shape) for shape in shapes.values())
    print(f"adapter:      {path}")
    print(f"method:       {config.get('peft_type')}{_unsupported_note(view, config)}")
    print(f"base model:   {config.get('base_model_name_or_path') or '(not recorded)'}")
    print(f"targets:      {config.get('target_modules')}")
    if config.get("target_parameters"):
        print(f"parameters:   {config['target_parameters']}")
    for key in view.summary_keys:
        if key in config:
            print(f"{key + ':':<13} {config[key]}")
    if config.get("modules_to_save"):
        print(f"modules_to_save: {config['modules_to_save']}")
    print(f"tensors:      {len(shapes)} in {n_modules} modules, {n_params:,} parameters")
    print(f"size on disk: {human_bytes(weights.stat().st_size)}")


def _module_rows(
    view: MethodView, modules: dict[str, Shapes], config: dict[str, Any]
) -> list[list[str]]:
    """One ``[module, rank, tensors]`` row per adapted module, sorted by module path; the rank
    is the method's :meth:`~adapt.core.Method.rank_of`, blank when it has none."""
    rows = []
    for module, tensors in sorted(modules.items()):
        rank = view.rank_of(tensors)
        desc = ", ".join(f"{n} {list(s)}" for n, s in sorted(tensors.items()))
        rows.append([module, _rank_text(rank, module, config), desc])
    return rows


def _rank_text(rank: int | None, module: str, config: dict[str, Any]) -> str:
    """The rank column: ``"4 × 8 experts"`` for a parameter target whose stacked factors
    hold r·E rows (the module owns a ``target_parameters`` entry), else the rank."""
    if rank is None:
        return ""
    r = config.get("r")
    owners = [n.rpartition(".")[0] for n in config.get("target_parameters") or []]
    bare = ".".join(p for p in module.split(".") if p != "base_layer")
    owned = any(o and (bare == o or bare.endswith("." + o)) for o in owners)
    if owned and isinstance(r, int) and r > 0 and rank % r == 0 and rank > r:
        return f"{r} × {rank // r} experts"
    return str(rank)


def _print_modules(rows: list[list[str]], show_all: bool) -> None:
    """The table of modules: the first :data:`MODULE_LIMIT`, or every one with ``show_all``."""
    limit = None if show_all else MODULE_LIMIT
    shown = rows if limit is None else rows[:limit]
    if shown:
        print()
        print(table(shown, ["module", "rank", "tensors"]))
        if limit is not None and len(rows) > limit:
            print(f"… {len(rows) - limit} more modules (use --all to list every one)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..checkpoint import WEIGHTS_NAME, read_config
    from ..errors import CheckpointError

    path = Path(args.path)
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} holds no {WEIGHTS_NAME}")
    shapes = tensor_shapes(weights)
    view = method_view(config)
    modules, shared = by_module(shapes, view.tensor_prefixes)
    _print_summary(path, config, view, shapes, len(modules), weights)
    rows = _module_rows(view, modules, config)
    _print_modules(rows, args.all)
    if shared:
        print("\nshared tensors: " + ", ".join(f"{k} {list(v)}" for k, v in sorted(shared.items())))
    if args.plot:
        from .plot import plot_ranks

        ranks = {row[0]: int(row[1]) for row in rows if row[1] != ""}
        out = plot_ranks(ranks, Path(args.plot), title=f"{config.get('peft_type')} ranks: {path}")
        print(f"\nrank heat map written to {out}")
    if args.json:
        print(
            json.dumps(
                {"config": config, "tensors": {k: list(v) for k, v in shapes.items()}}, indent=2
            )
        )
    return 0
