"""The ``adapt`` command line: ``plugins``, ``inspect PATH``, ``merge --base --adapter --out``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AdaptError


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def cmd_plugins(args: argparse.Namespace) -> int:
    import warnings

    from .registry import GROUPS, get_registry

    registry = get_registry()
    rows: list[list[str]] = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for group in GROUPS:
            for entry in registry.entries(group):
                rows.append(
                    [
                        group.split(".")[-1],
                        entry.name,
                        entry.distribution,
                        entry.version,
                        registry.status_of(entry),
                    ]
                )
    if not rows:
        print("No adapt plugins found. Install a method, e.g. `pip install adapt-lora`.")
        return 0
    print(_table(rows, ["kind", "name", "distribution", "version", "status"]))
    failed = [r for r in rows if r[4].startswith("failed")]
    if failed:
        print(f"\n{len(failed)} plugin(s) failed to load; they are skipped.")
    return 0


def _unsupported_note(config: dict[str, Any]) -> str:
    """' — uses use_dora=True, which adapt does not implement: ...' for a folder adapt cannot
    load, '' otherwise (also when the method's package is not installed)."""
    from .registry import get_registry

    try:
        method = get_registry().get_method(str(config.get("peft_type", "")).lower())
    except Exception:
        return ""
    found = method.config_class.unsupported_features(config)
    if not found:
        return ""
    uses = ", ".join(f"{k}={v!r}" for k, v in found.items())
    return f" — uses {uses}, a PEFT feature adapt does not implement: adapt cannot load it"


#: what ``adapt inspect`` prints of an adapter's config after its targets, in this order
_INSPECT_KEYS = (
    "r",
    "init_r",
    "target_r",
    "lora_alpha",
    "use_rslora",
    "projection_prng_key",
    "save_projection",
)


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the safetensors file ``weights``, read from its header."""
    from safetensors import safe_open

    from .errors import CheckpointError

    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(str(weights), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    except Exception as exc:
        raise CheckpointError(f"{weights} is corrupt and cannot be read: {exc}") from exc
    return shapes


def _by_module(
    shapes: dict[str, tuple[int, ...]],
) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]:
    """The tensors per adapted module (module path → tensor name → shape), and the shared
    ones (``base_model.<name>``, outside the model, e.g. VeRA's basis)."""
    modules: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    shared: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if key.startswith("base_model.") and not key.startswith("base_model.model."):
            shared[key] = shape
            continue
        rel = key.removeprefix("base_model.model.")
        parts = rel.split(".")
        cut = next(
            (i for i, p in enumerate(parts) if "_" in p and p.split("_")[0] in ("lora", "vera")),
            len(parts) - 1,
        )
        modules[".".join(parts[:cut])][".".join(parts[cut:])] = shape
    return modules, shared


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _print_summary(
    path: Path,
    config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    n_modules: int,
    weights: Path,
) -> None:
    """The first lines of ``adapt inspect``: the method, the base model, the config values
    that matter, the tensor count and the size on disk."""
    n_params = sum(_numel(shape) for shape in shapes.values())
    print(f"adapter:      {path}")
    print(f"method:       {config.get('peft_type')}{_unsupported_note(config)}")
    print(f"base model:   {config.get('base_model_name_or_path') or '(not recorded)'}")
    print(f"targets:      {config.get('target_modules')}")
    for key in _INSPECT_KEYS:
        if key == "r" and "init_r" in config:
            continue  # AdaLoRA: PEFT writes LoRA's r, which it ignores; init_r/target_r rule
        if key in config:
            print(f"{key + ':':<13} {config[key]}")
    if config.get("modules_to_save"):
        print(f"modules_to_save: {config['modules_to_save']}")
    print(f"tensors:      {len(shapes)} in {n_modules} modules, {n_params:,} parameters")
    print(f"size on disk: {_human_bytes(weights.stat().st_size)}")


def _module_rows(modules: dict[str, dict[str, tuple[int, ...]]]) -> list[list[str]]:
    """One ``[module, rank, tensors]`` row per adapted module, sorted by module path."""
    rows = []
    for module, tensors in sorted(modules.items()):
        rank = ""
        for name, shape in tensors.items():
            if (name.split(".")[0] in ("lora_A", "lora_embedding_A") and shape) or (
                name == "vera_lambda_d" and shape
            ):
                rank = str(shape[0])
        desc = ", ".join(f"{n} {list(s)}" for n, s in sorted(tensors.items()))
        rows.append([module, rank, desc])
    return rows


def _print_modules(rows: list[list[str]], show_all: bool) -> None:
    """The table of modules: the first 20, or every one with ``show_all``."""
    limit = None if show_all else 20
    shown = rows if limit is None else rows[:limit]
    if shown:
        print()
        print(_table(shown, ["module", "rank", "tensors"]))
        if limit is not None and len(rows) > limit:
            print(f"… {len(rows) - limit} more modules (use --all to list every one)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import WEIGHTS_NAME, read_config
    from .errors import CheckpointError

    path = Path(args.path)
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{str(path)!r} holds no {WEIGHTS_NAME}")
    shapes = _tensor_shapes(weights)
    modules, shared = _by_module(shapes)
    _print_summary(path, config, shapes, len(modules), weights)
    rows = _module_rows(modules)
    _print_modules(rows, args.all)
    if shared:
        print("\nshared tensors: " + ", ".join(f"{k} {list(v)}" for k, v in sorted(shared.items())))
    if args.plot:
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


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """Arrange per-module ranks as a grid: one row per layer (the last number in the module
    path), one column per module name (the path's last part, e.g. ``q_proj``)."""
    import re

    layers: dict[str, dict[str, int]] = defaultdict(dict)
    for module, rank in ranks.items():
        parts = module.split(".")
        numbers = [i for i, p in enumerate(parts) if p.isdigit()]
        layer = ".".join(parts[: numbers[-1] + 1]) if numbers else "(model)"
        column = ".".join(parts[numbers[-1] + 1 :]) if numbers else module
        layers[layer][column] = rank

    def natural(key: str) -> list[Any]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]

    row_names = sorted(layers, key=natural)
    columns = sorted({c for cols in layers.values() for c in cols}, key=natural)
    grid = [[layers[r].get(c) for c in columns] for r in row_names]
    return row_names, columns, grid


def plot_ranks(ranks: dict[str, int], out: Path, title: str = "") -> Path:
    """Draw the rank per layer and module as a heat map (PNG, SVG or PDF by extension)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise AdaptError(
            "--plot draws with matplotlib, which is not installed: `pip install matplotlib` "
            "(or `pip install adapt-adalora[plot]`)"
        ) from exc
    if not ranks:
        raise AdaptError("the adapter has no per-module ranks to plot")
    rows, columns, grid = rank_grid(ranks)
    values = [[float("nan") if v is None else float(v) for v in row] for row in grid]
    fig_w = max(4.0, 1.1 * len(columns) + 2.0)
    fig_h = max(2.5, 0.35 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, str(v), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _load_base(model_dir: str, dtype: str | None) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise AdaptError(
            "`adapt merge` loads transformers models: `pip install transformers`"
        ) from exc
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise AdaptError(f"{model_dir!r} is not a transformers model folder (no config.json)")
    hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = hf_config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    kwargs: dict[str, Any] = {}
    if dtype:
        import torch

        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = (
            getattr(torch, dtype)
        )
    return cls.from_pretrained(model_dir, **kwargs)


def cmd_merge(args: argparse.Namespace) -> int:
    from .model import AdaptedModel

    start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise AdaptError(f"{str(out)!r} exists and is not empty; pass --overwrite to replace it")
    print(f"[1/4] loading base model from {args.base}", flush=True)
    base = _load_base(args.base, args.dtype)
    print(f"[2/4] loading adapter from {args.adapter}", flush=True)
    model = AdaptedModel.from_pretrained(base, args.adapter)
    n_layers = sum(1 for _ in model.adapter_layers())
    print(f"[3/4] merging {n_layers} adapted layers", flush=True)
    merged: Any = model.merge_and_unload(
        safe_merge=True, progress_bar=None if sys.stderr.isatty() else False
    )
    print(f"[4/4] saving merged model to {out}", flush=True)
    merged.save_pretrained(out)
    tok = Path(args.base)
    for name in os.listdir(tok):
        if (
            name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
            and not (out / name).exists()
        ):
            (out / name).write_bytes((tok / name).read_bytes())
    print(f"done in {time.perf_counter() - start:.1f} s: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .__about__ import __version__

    parser = argparse.ArgumentParser(
        prog="adapt",
        description="adapt: parameter-efficient fine-tuning adapters (PEFT-compatible).",
    )
    parser.add_argument("--version", action="version", version=f"adapt-peft-core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed methods, layers and backends")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("inspect", help="describe a saved adapter (method, targets, ranks, size)")
    p.add_argument("path", help="folder holding adapter_config.json and adapter_model.safetensors")
    p.add_argument("--all", action="store_true", help="list every module, not the first 20")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the rank per layer and module as a heat map (needs matplotlib), e.g. ranks.png",
    )
    p.add_argument(
        "--json", action="store_true", help="also print config and tensor shapes as JSON"
    )
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("merge", help="merge an adapter into a transformers model and save it")
    p.add_argument("--base", required=True, help="transformers model folder")
    p.add_argument("--adapter", required=True, help="saved adapter folder")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="load the base in this dtype"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AdaptError as exc:
        print(f"adapt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`adapt inspect DIR | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
