"""What the bench compares and against which targets: the case and method names, the target
modules, the two libraries, the overhead case's shapes and precisions, the model sizes and
repetition counts of a full and a ``--quick`` run, and the goals of the performance issues."""

from __future__ import annotations

from dataclasses import dataclass

CASES = (
    "import", "inject", "init", "combine", "train", "overhead", "infer", "mixed", "merge", "load",
    "allocate", "memory",
)  # fmt: skip
#: ``init_lora_weights`` values the init case times (LoRA r8 on all linear layers of the bench
#: model): creating the adapter, base-weight decomposition included.
INITS = ("pissa", "pissa_niter_4", "olora")
METHODS = ("lora", "vera", "adalora", "dora", "moe", "moe-dense")
#: Methods on the MoE bench model (LoRA on attention and the fused expert parameters; "moe"
#: is adapt's default low-rank path, "moe-dense" adapt forced to PEFT's dense W + ΔW): only
#: the train and memory cases run them.
MOE_METHODS = ("moe", "moe-dense")
#: The module a method is imported from (DoRA is a LoRA variant: no import row of its own).
IMPORTED = {"lora": "adapt.lora", "vera": "adapt.vera", "adalora": "adapt.adalora"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIBS = ("adapt", "peft")
#: The overhead case (issue 31, adapt_bench.overhead): its methods, model shapes ("h512": the
#: bench model; "h1024": the wide model of the ``wide_*`` sizes), precisions ("fp32"; "bf16":
#: float32 weights, forward and loss under bf16 autocast) and LoRA rank per shape (α = 2r).
OVERHEAD_METHODS = ("lora", "vera", "adalora")
SHAPES = ("h512", "h1024")
PRECISIONS = ("fp32", "bf16")
LORA_RANK = {"h512": 8, "h1024": 16}


# ----------------------------------------------------------------------------- sizes and goals


@dataclass(frozen=True)
class Sizes:
    """Model sizes and repetition counts of one run (full or ``--quick``)."""

    hidden: int
    intermediate: int
    layers: int  # the training / inference model
    heads: int
    vocab: int
    batch: int
    seq: int
    inject_layers: int  # the empty-weight model of the injection case
    inject_hidden: int
    inject_intermediate: int
    reps: int  # timed repetitions per case (after one warm-up)
    import_reps: int
    infer_reps: int
    infer_number: int  # forwards per inference sample
    allocate_reps: int
    memory_reps: int
    # the mixed-batch case (adapt_bench.mixed): the main table, then the curve
    mixed_batch: int
    mixed_seq: int
    mixed_adapters: tuple[int, ...]  # adapter counts of the main table's rows
    # 21: on a shared 2-CPU machine one repetition's ratio spreads ±0.03 (q1–q3 1.05–1.12),
    # so a median of 7 moved by ±0.02 between runs, as much as the goal's margin
    mixed_reps: int
    curve_batch: int
    curve_adapters: tuple[int, ...]  # adapter counts of the curve (--curve-max cuts it)
    curve_reps: int
    # the wide model of the overhead case (shape "h1024"; vocab as above)
    wide_hidden: int
    wide_intermediate: int
    wide_layers: int
    wide_heads: int
    wide_kv_heads: int
    wide_batch: int
    wide_seq: int
    wide_reps: int  # timed repetitions on the wide model (the bench model uses reps)


FULL = Sizes(
    hidden=512, intermediate=1376, layers=4, heads=8, vocab=1024, batch=8, seq=128,
    inject_layers=32, inject_hidden=512, inject_intermediate=1376,
    reps=9, import_reps=5, infer_reps=15, infer_number=1, allocate_reps=20, memory_reps=3,
    mixed_batch=32, mixed_seq=64, mixed_adapters=(8, 32), mixed_reps=21,
    curve_batch=64, curve_adapters=(1, 2, 4, 8, 16, 32, 64), curve_reps=3,
    wide_hidden=1024, wide_intermediate=2752, wide_layers=4, wide_heads=8, wide_kv_heads=4,
    wide_batch=4, wide_seq=256, wide_reps=7,
)  # fmt: skip
QUICK = Sizes(
    hidden=128, intermediate=344, layers=2, heads=4, vocab=256, batch=2, seq=32,
    inject_layers=8, inject_hidden=512, inject_intermediate=1376,
    reps=3, import_reps=1, infer_reps=3, infer_number=1, allocate_reps=4, memory_reps=1,
    mixed_batch=8, mixed_seq=16, mixed_adapters=(2, 8), mixed_reps=3,
    curve_batch=8, curve_adapters=(1, 2, 4, 8), curve_reps=1,
    wide_hidden=128, wide_intermediate=344, wide_layers=2, wide_heads=4, wide_kv_heads=2,
    wide_batch=2, wide_seq=32, wide_reps=1,
)  # fmt: skip


@dataclass(frozen=True)
class Goal:
    """``value(on) <= limit``; ``on`` is ``"ratio"`` (adapt / PEFT) or ``"adapt"``."""

    limit: float
    on: str = "ratio"

    def text(self) -> str:
        return f"{'ratio' if self.on == 'ratio' else 'adapt'} ≤ {self.limit:g}"


# Goals of the issue, as ratios adapt / PEFT (unless `on="adapt"`).
GOALS: dict[tuple[str, str], Goal] = {
    **{("import", m): Goal(0.35) for m in IMPORTED},
    **{("inject", m): Goal(0.5) for m in METHODS if m not in MOE_METHODS},
    ("init", "pissa"): Goal(0.5),
    ("add_weighted_adapter", "svd"): Goal(0.5),
    ("train step", "lora"): Goal(0.90),
    ("train step", "vera"): Goal(0.85),
    ("train overhead", "lora"): Goal(0.6),
    ("train overhead", "dora"): Goal(0.5),
    ("train overhead", "moe"): Goal(0.6),
    ("infer overhead", "dora"): Goal(0.5),
    **{("infer unmerged", m): Goal(0.9) for m in METHODS if m not in MOE_METHODS},
    **{("infer merged÷base", m): Goal(1.02, on="adapt") for m in METHODS if m not in MOE_METHODS},
    **{("peak mem", m): Goal(1.0) for m in METHODS if m != "moe-dense"},
    # mixed batches (the method column holds the adapter count): adapt's mixed forward over
    # the base model's, and adapt's mixed forward over PEFT's
    ("mixed÷base", "N=8"): Goal(1.10, on="adapt"),
    ("mixed÷base", "N=32"): Goal(1.15, on="adapt"),
    ("mixed", "N=32"): Goal(0.85),
    # the overhead case (issue 31): (step − floor) adapt / PEFT, and peak memory, on every
    # shape and precision
    **{
        (f"overhead {p} {s}", m): Goal(limit)
        for m, limit in (("lora", 0.50), ("vera", 0.65), ("adalora", 0.60))
        for s in SHAPES
        for p in PRECISIONS
    },
    **{
        (f"peak mem {p} {s}", m): Goal(1.0)
        for m in OVERHEAD_METHODS
        for s in SHAPES
        for p in PRECISIONS
    },
}
