"""Results and their output: a table ``Row`` (with its ratio, the pairs' spread and the goal
verdict), the formatting of values, rows and the final table, and the environment record
(versions, device, sizes) printed in the header and written to the JSON."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .config import GOALS

if TYPE_CHECKING:
    from .timing import Bench


@dataclass
class Row:
    case: str
    method: str
    unit: str  # "s", "B" (bytes) or "x" (a unitless ratio)
    adapt: float | None
    peft: float | None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)


def make_row(
    case: str,
    method: str,
    unit: str,
    adapt: float | None,
    peft: float | None,
    *,
    note: str = "",
    samples: dict[str, list[float]] | None = None,
    ratio: float | None = None,
) -> Row:
    if ratio is None and adapt is not None and peft:
        ratio = adapt / peft
    row = Row(case, method, unit, adapt, peft, ratio, note=note, samples=samples or {})
    pairs = paired_ratios(row.samples)
    if len(pairs) >= 4:
        # spread of the per-repetition ratios (each repetition measures both sides)
        q1, _, q3 = statistics.quantiles(pairs, n=4)
        spread = f"pairs {q1:.2f}–{q3:.2f}"
        row.note = f"{row.note}; {spread}" if row.note else spread
    goal = GOALS.get((case, method))
    if goal is not None:
        value = row.ratio if goal.on == "ratio" else row.adapt
        row.goal = goal.text()
        row.met = None if value is None else value <= goal.limit
        if goal.on == "ratio" and (adapt is None or adapt < 0 or not peft or peft < 0):
            # a difference (step − floor) below zero is noise, not a result: no verdict
            row.met = None
            noise = "NOISE: a negative difference"
            row.note = f"{row.note}; {noise}" if row.note else noise
    return row


def min_based(a: list[float], p: list[float], fl: list[float]) -> str:
    """The overhead ratio from each series' fastest repetition, ``(min a − min fl) / (min p −
    min fl)``: contention on a shared machine only adds time, so minima are its steadiest
    estimate where the paired differences are noisy."""
    oa, op = min(a) - min(fl), min(p) - min(fl)
    return f"min-based {oa / op:.2f}" if op > 0 and oa >= 0 else "min-based: noise"


def paired_ratios(samples: dict[str, list[float]]) -> list[float]:
    """adapt / PEFT per repetition, when both sides were measured in the same repetitions."""
    a, p = samples.get("adapt", []), samples.get("peft", [])
    if len(a) != len(p) or not all(x > 0 for x in [*a, *p]):
        return []
    return [x / y for x, y in zip(a, p, strict=True)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "s":
        if abs(value) >= 1:
            return f"{value:.3f} s"
        return f"{value * 1e3:.1f} ms" if abs(value) >= 1e-3 else f"{value * 1e6:.0f} µs"
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.3f}"


HEADER = ("case", "method", "adapt", "peft", "ratio", "goal", "met?", "note")
WIDTHS = (20, 8, 11, 11, 6, 12, 5, 0)


def format_row(row: Row) -> str:
    met = "" if row.met is None else ("yes" if row.met else "NO")
    ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
    cells = (
        row.case,
        row.method,
        fmt_value(row.adapt, row.unit),
        fmt_value(row.peft, row.unit),
        ratio,
        row.goal,
        met,
        row.note,
    )
    return format_cells(cells)


def format_cells(cells: Sequence[str]) -> str:
    out = []
    for i, (cell, width) in enumerate(zip(cells, WIDTHS, strict=True)):
        out.append(cell.rjust(width) if 2 <= i <= 4 else cell.ljust(width))
    return "  ".join(out).rstrip()


def print_table(rows: Sequence[Row]) -> None:
    print()
    print(format_cells(HEADER))
    print(format_cells(["-" * max(w, len(h)) for w, h in zip(WIDTHS, HEADER, strict=True)]))
    for row in rows:
        print(format_row(row))
    goals = [r for r in rows if r.met is not None]
    met = sum(1 for r in goals if r.met)
    print(f"\ngoals met: {met} of {len(goals)}")


def environment(b: Bench) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    dists = ["torch", "transformers", "peft", "accelerate", "adapt-peft-core", "adapt-lora"]
    dists += ["adapt-vera", "adapt-adalora"]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: version(d) for d in dists},
        "device": str(b.device),
        "cuda_device": torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "sizes": asdict(b.sizes),
        "quick": bool(b.args.quick),
        "clock": b.args.clock,
    }
