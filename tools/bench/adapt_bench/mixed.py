"""The mixed-batch serving case (issue 30): one LoRA adapter per sample of a batch.

The bench model carries N LoRA adapters (r16, α32, every linear layer, ``init_lora_weights=
False`` so that each one changes the output); adapt saves them and PEFT loads the same files,
so both libraries run identical weights. Four contenders run in one alternation, no grad, eval
mode: the plain base model (the floor), adapt with one adapter for the whole batch, adapt's
mixed batch (``adapter_names=[...]``, round-robin over the N adapters) and PEFT's mixed batch.

* The main table (batch 32 × 64, N = 8 and 32): each forward as a ratio to the floor of the
  same repetition, and adapt's mixed forward against PEFT's; the note of the ``mixed`` row has
  the largest difference between the two libraries' mixed logits.
* The curve (batch 64 × 64, N = 1 … 64, few repetitions): milliseconds per forward of the four
  series, written as a markdown table (also printed), a PNG plot and the samples (JSON) into
  ``--out`` (``mixed_curve.md``, ``mixed_curve.png``, ``mixed_curve.json``). ``--curve-max N``
  shortens it (0 skips it); ``--quick`` uses small sizes.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import TARGETS
from .report import make_row, median
from .timing import Bench, alternate

#: the contenders, in the order of the tables and the plot
SERIES = ("base", "single", "adapt", "peft")
LABELS = {
    "base": "base model (floor)",
    "single": "adapt, one adapter",
    "adapt": "adapt, mixed batch",
    "peft": "PEFT, mixed batch",
}
COLORS = {"base": "tab:grey", "single": "tab:green", "adapt": "tab:blue", "peft": "tab:orange"}


def adapter_names(n: int) -> list[str]:
    return [f"a{i}" for i in range(n)]


def round_robin(n: int, batch: int) -> list[str]:
    """One adapter name per sample: a0, a1, …, a(n-1), a0, …"""
    names = adapter_names(n)
    return [names[i % n] for i in range(batch)]


def build_models(b: Bench, n: int) -> dict[str, Any]:
    """The plain base model, adapt with adapters ``a0 … a(n-1)`` and PEFT with the same
    adapters loaded from adapt's files; all in eval mode."""
    import torch
    from peft import PeftModel

    from adapt.core import adapt
    from adapt.lora import LoraConfig

    names = adapter_names(n)
    kw: dict[str, Any] = dict(
        r=16,
        lora_alpha=32,
        target_modules=list(TARGETS),
        init_lora_weights=False,
        task_type="CAUSAL_LM",  # so that PEFT loads a PeftModelForCausalLM
    )
    torch.manual_seed(0)
    ours = adapt(b.fresh_base(), LoraConfig(**kw), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, LoraConfig(**kw))
    ours.set_adapter(names[0])  # the single-adapter contender
    with tempfile.TemporaryDirectory(prefix="adapt-bench-mixed-") as tmp:
        ours.save_pretrained(tmp)
        theirs = PeftModel.from_pretrained(b.fresh_base(), f"{tmp}/{names[0]}", names[0])
        for name in names[1:]:
            theirs.load_adapter(f"{tmp}/{name}", adapter_name=name)
    return {"base": b.fresh_base().eval(), "adapt": ours.eval(), "peft": theirs.eval()}


def contenders(
    b: Bench, models: dict[str, Any], ids: Any, names: Sequence[str]
) -> dict[str, Callable[[int], float]]:
    """The four timed forwards (no grad) of one batch, keyed by :data:`SERIES`."""
    import torch

    def fwd(model: Any, **kw: Any) -> Callable[[int], float]:
        def run(rep: int) -> float:
            with torch.no_grad():
                return b.timed(lambda: model(input_ids=ids, **kw).logits)

        return run

    return {
        "base": fwd(models["base"]),
        "single": fwd(models["adapt"]),
        "adapt": fwd(models["adapt"], adapter_names=list(names)),
        "peft": fwd(models["peft"], adapter_names=list(names)),
    }


def logits_diff(models: dict[str, Any], ids: Any, names: Sequence[str]) -> float:
    """Largest absolute difference between adapt's and PEFT's mixed-batch logits."""
    import torch

    with torch.no_grad():
        ours = models["adapt"](input_ids=ids, adapter_names=list(names)).logits
        theirs = models["peft"](input_ids=ids, adapter_names=list(names)).logits
    return float((ours - theirs).abs().max())


def batch(b: Bench, size: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(2)
    shape = (size, b.sizes.mixed_seq)
    return torch.randint(0, b.sizes.vocab, shape, generator=gen).to(b.device)


def quartiles(xs: Sequence[float]) -> str:
    if len(xs) < 4:
        return ""
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return f"q1–q3 {q1:.2f}–{q3:.2f}"


def paired(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The median of the per-repetition ratios x / y (both measured in each repetition)."""
    return median([x / y for x, y in zip(xs, ys, strict=True)])


def joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def curve_counts(b: Bench) -> list[int]:
    limit = b.args.curve_max
    counts = list(b.sizes.curve_adapters)
    return counts if limit is None else [n for n in counts if n <= limit]


def case_mixed(b: Bench, methods: Sequence[str]) -> None:
    """Mixed-batch forwards: the main table's rows, then the curve (see the module doc)."""
    if "lora" not in methods:
        return
    s = b.sizes
    curve = curve_counts(b)
    models = build_models(b, max([*s.mixed_adapters, *curve]))
    ids = batch(b, s.mixed_batch)
    for n in s.mixed_adapters:
        names = round_robin(n, s.mixed_batch)
        diff = logits_diff(models, ids, names)
        samples = alternate(contenders(b, models, ids, names), s.mixed_reps)
        add_rows(b, n, samples, diff)
    if curve:
        points = run_curve(b, models, curve)
        write_curve(b, points)
    del models
    gc.collect()


def add_rows(b: Bench, n: int, samples: dict[str, list[float]], diff: float) -> None:
    """The main table's four rows for ``n`` adapters: the floor, the single adapter and both
    mixed forwards over the floor (per-repetition ratios), adapt's mixed over PEFT's."""
    s, method = b.sizes, f"N={n}"
    floor = samples["base"]
    over = {k: [x / f for x, f in zip(samples[k], floor, strict=True)] for k in SERIES[1:]}
    b.add(
        make_row(
            "mixed base", method, "s", median(floor), None,
            note=f"floor: base model, batch {s.mixed_batch} × {s.mixed_seq}",
            samples={"base": floor},
        )
    )  # fmt: skip
    b.add(
        make_row(
            "mixed single÷base", method, "x", median(over["single"]), None,
            note=joined("adapt, one adapter for the batch", quartiles(over["single"])),
            samples={"single÷base": over["single"]},
        )
    )  # fmt: skip
    row = make_row(
        "mixed÷base", method, "x", median(over["adapt"]), median(over["peft"]),
        note=joined("mixed batch / base (adapt, peft)", quartiles(over["adapt"])),
        samples={"adapt÷base": over["adapt"], "peft÷base": over["peft"]},
    )  # fmt: skip
    row.ratio = None  # adapt / PEFT is the next row
    b.add(row)
    same = "same logits" if diff <= 1e-5 else "LOGITS DIFFER"
    b.add(
        make_row(
            "mixed", method, "s", median(samples["adapt"]), median(samples["peft"]),
            note=f"{same}: max |Δ| {diff:.1e}, round-robin over {n}",
            samples={k: samples[k] for k in ("adapt", "peft")},
        )
    )  # fmt: skip
    if diff > 1e-5:
        b.notes.append(f"mixed/N={n}: adapt's and PEFT's mixed logits differ by {diff:.2e}")


def run_curve(b: Bench, models: dict[str, Any], counts: Sequence[int]) -> list[dict[str, Any]]:
    """Per adapter count: the medians (seconds) and samples of the four series."""
    s = b.sizes
    ids = batch(b, s.curve_batch)
    points = []
    for n in counts:
        names = round_robin(n, s.curve_batch)
        samples = alternate(contenders(b, models, ids, names), s.curve_reps)
        medians = {k: median(v) for k, v in samples.items()}
        ratios = {f"{k}÷base": paired(samples[k], samples["base"]) for k in SERIES[1:]}
        ratios["adapt÷peft"] = paired(samples["adapt"], samples["peft"])
        points.append(
            {"adapters": n, "median_s": medians, "median_ratio": ratios, "samples_s": samples}
        )
        ms = ", ".join(f"{k} {medians[k] * 1e3:.1f}" for k in SERIES)
        print(f"  curve N={n}: {ms} ms", flush=True)
    return points


def curve_table(b: Bench, points: Sequence[dict[str, Any]]) -> str:
    """The curve as a markdown table: ms per forward, then the ratios."""
    s = b.sizes
    head = [
        "adapters", "base ms", "single ms", "adapt mixed ms", "PEFT mixed ms",
        "single ÷ base", "adapt mixed ÷ base", "PEFT mixed ÷ base", "adapt ÷ PEFT",
    ]  # fmt: skip
    lines = [
        f"Mixed-batch forward, batch {s.curve_batch} × {s.mixed_seq}, round-robin over N "
        f"LoRA r16 adapters; medians of {s.curve_reps} repetition{'s' * (s.curve_reps != 1)} "
        f"({b.args.clock} clock, {b.device}); the ratios are medians of the per-repetition ratios.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---:" for _ in head) + " |",
    ]
    for p in points:
        m = p["median_s"]
        cells = [str(p["adapters"]), *(f"{m[k] * 1e3:.1f}" for k in SERIES)]
        cells += [f"{r:.3f}" for r in p["median_ratio"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_curve(b: Bench, points: Sequence[dict[str, Any]]) -> None:
    """The curve's table (printed too), plot and samples, into ``--out``."""
    out = Path(b.args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = curve_table(b, points)
    print("\n" + table, flush=True)
    (out / "mixed_curve.md").write_text(table)
    data = {"sizes": {"batch": b.sizes.curve_batch, "seq": b.sizes.mixed_seq}, "points": points}
    (out / "mixed_curve.json").write_text(json.dumps(data, indent=2) + "\n")
    written = ["mixed_curve.md", "mixed_curve.json"]
    try:
        plot_curve(b, points, out / "mixed_curve.png")
        written.append("mixed_curve.png")
    except ImportError:
        b.notes.append("mixed: matplotlib is not installed, no plot of the curve")
    b.notes.append(f"mixed: curve written to {out}/ ({', '.join(written)})")


def plot_curve(b: Bench, points: Sequence[dict[str, Any]], path: Path) -> None:
    """Two panels over the adapter count (log2): ms per forward, and the ratio to the base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["adapters"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for key in SERIES:
        ms = [p["median_s"][key] * 1e3 for p in points]
        style = dict(marker="o", label=LABELS[key], color=COLORS[key])
        left.plot(xs, ms, **style)
        if key != "base":
            ratio = [p["median_ratio"][f"{key}÷base"] for p in points]
            right.plot(xs, ratio, **style)
    right.axhline(1.0, color=COLORS["base"], linewidth=0.8)
    for limit in (1.10, 1.15):  # the goals of adapt's mixed batch at N = 8 and N = 32
        right.axhline(limit, color=COLORS["adapt"], linewidth=0.8, linestyle=":")
    left.set_ylabel("ms per forward")
    right.set_ylabel("× base model")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("adapters in the batch (round-robin)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    s = b.sizes
    fig.suptitle(f"mixed-batch forward, batch {s.curve_batch} × {s.mixed_seq}, LoRA r16")
    fig.savefig(path, dpi=120)
    plt.close(fig)
