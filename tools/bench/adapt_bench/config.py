"""What the bench compares and against which targets: the case and method names, the target
modules, the two libraries, the model sizes and repetition counts of a full and a ``--quick``
run, and the goals of the performance issue."""

from __future__ import annotations

from dataclasses import dataclass

CASES = (
    "import", "inject", "init", "combine", "train", "infer", "mixed", "merge", "load", "allocate",
    "memory",
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
    mixed_reps: int
    curve_batch: int
    curve_adapters: tuple[int, ...]  # adapter counts of the curve (--curve-max cuts it)
    curve_reps: int


FULL = Sizes(
    hidden=512, intermediate=1376, layers=4, heads=8, vocab=1024, batch=8, seq=128,
    inject_layers=32, inject_hidden=512, inject_intermediate=1376,
    reps=9, import_reps=5, infer_reps=15, infer_number=1, allocate_reps=20, memory_reps=3,
    mixed_batch=32, mixed_seq=64, mixed_adapters=(8, 32), mixed_reps=7,
    curve_batch=64, curve_adapters=(1, 2, 4, 8, 16, 32, 64), curve_reps=3,
)  # fmt: skip
QUICK = Sizes(
    hidden=128, intermediate=344, layers=2, heads=4, vocab=256, batch=2, seq=32,
    inject_layers=8, inject_hidden=512, inject_intermediate=1376,
    reps=3, import_reps=1, infer_reps=3, infer_number=1, allocate_reps=4, memory_reps=1,
    mixed_batch=8, mixed_seq=16, mixed_adapters=(2, 8), mixed_reps=3,
    curve_batch=8, curve_adapters=(1, 2, 4, 8), curve_reps=1,
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
}
