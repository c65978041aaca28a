"""``adapt inspect --plot``: the rank per layer and module as a grid and a heat map."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import AdaptError


def _natural(key: str) -> list[Any]:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """Arrange per-module ranks as a grid: one row per layer (the last number in the module
    path), one column per module name (the path's last part, e.g. ``q_proj``)."""
    layers: dict[str, dict[str, int]] = defaultdict(dict)
    for module, rank in ranks.items():
        parts = module.split(".")
        numbers = [i for i, p in enumerate(parts) if p.isdigit()]
        layer = ".".join(parts[: numbers[-1] + 1]) if numbers else "(model)"
        column = ".".join(parts[numbers[-1] + 1 :]) if numbers else module
        layers[layer][column] = rank
    row_names = sorted(layers, key=_natural)
    columns = sorted({c for cols in layers.values() for c in cols}, key=_natural)
    grid = [[layers[r].get(c) for c in columns] for r in row_names]
    return row_names, columns, grid


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise AdaptError(
            "--plot draws with matplotlib, which is not installed: `pip install matplotlib` "
            "(or `pip install adapt-adalora[plot]`)"
        ) from exc
    return plt


def plot_ranks(ranks: dict[str, int], out: Path, title: str = "") -> Path:
    """Draw the rank per layer and module as a heat map (PNG, SVG or PDF by extension)."""
    plt = _pyplot()
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
