"""The overhead case (issue 31, "Training speed: the adapter's own cost").

For LoRA, VeRA and AdaLoRA, on two model shapes (``"h512"``: the bench model; ``"h1024"``: the
wide Llama of the ``wide_*`` sizes, LoRA r16 there) and two precisions (``"fp32"``; ``"bf16"``:
float32 weights, every forward and its loss under ``torch.autocast(dtype=torch.bfloat16)``),
adapt's training step, PEFT's and the floor (the frozen base model's forward + backward) run in
one alternation (``cases.train_rows``, as in the train case), which adds the rows
``step <precision> <shape>``, ``floor …`` and ``overhead …`` (step − floor, paired per
repetition; the goal is on adapt / PEFT of it). Then the peak memory of one step per
(library, method, shape, precision), in fresh worker processes (``memory.run_memory_workers``):
rows ``peak mem <precision> <shape>``.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from .cases import train_rows
from .config import LIBS, OVERHEAD_METHODS, PRECISIONS, SHAPES
from .memory import add_memory_row, run_memory_workers, tensor_note
from .timing import Bench
from .workloads import autocast_for, floor_fn, inject, shape_base, shape_batch

#: Relative tolerance of the same-loss check per precision: float32 agrees to rounding; under
#: bf16 autocast the two libraries round their (differently ordered) products to bfloat16.
RTOL = {"fp32": 1e-4, "bf16": 2e-2}


def case_overhead(b: Bench, methods: Sequence[str]) -> None:
    """Steps, floors and overheads of every (shape, precision, method), then peak memory."""
    methods = [m for m in methods if m in OVERHEAD_METHODS]
    if not methods:
        return
    for shape in SHAPES:
        for precision in PRECISIONS:
            overhead_group(b, methods, shape, precision)
    overhead_memory(b, methods)


def case_name(what: str, precision: str, shape: str) -> str:
    """``"overhead bf16 h1024"``: the case column of the overhead case's rows (goal keys)."""
    return f"{what} {precision} {shape}"


def overhead_group(b: Bench, methods: Sequence[str], shape: str, precision: str) -> None:
    """One (shape, precision): one frozen floor model, then per method a fresh adapt / PEFT
    pair timed with it (``b.sizes.reps`` on h512, ``wide_reps`` on h1024)."""
    ids = shape_batch(b, shape)
    ctx = autocast_for(b.device.type, precision)
    floor = floor_fn(shape_base(b, shape), ids, ctx)
    reps = b.sizes.reps if shape == "h512" else b.sizes.wide_reps
    names = [case_name(what, precision, shape) for what in ("step", "floor", "overhead")]
    for m in methods:
        models = {lib: inject(lib, shape_base(b, shape), m, shape=shape).train() for lib in LIBS}
        train_rows(
            b, m, models, floor, ids,
            names=names, reps=reps, ctx=ctx, rtol=RTOL[precision], tag=f"overhead {precision} {shape}",
        )  # fmt: skip
        del models
        gc.collect()
    del floor
    gc.collect()


def overhead_memory(b: Bench, methods: Sequence[str]) -> None:
    """Peak tensor memory of one step per (library, method, shape, precision): a worker per
    (library, method, shape, precision) (``--quick``: one per library for all of them), the
    two libraries side by side, once: the CPU allocator's figure is deterministic (repeated
    workers gave the same bytes), and 12 worker pairs per method cost ~5 minutes."""
    items = [(m, shape, prec) for shape in SHAPES for prec in PRECISIONS for m in methods]
    results = run_memory_workers(b, [items] if b.args.quick else [[i] for i in items], reps=1)
    for m, shape, prec in items:
        by_lib = {lib: results[(lib, m, shape, prec)] for lib in LIBS}
        case = case_name("peak mem", prec, shape)
        add_memory_row(b, case, m, by_lib, "tensor_peak", tensor_note(b))
