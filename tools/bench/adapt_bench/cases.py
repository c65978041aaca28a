"""The timed cases: import, inject, train (step, floor, overhead: ``train_rows``, shared with
the overhead case of ``adapt_bench.overhead``), infer (unmerged, merged, base),
merge_and_unload, from_pretrained and AdaLoRA's update_and_allocate. Each one runs both
libraries through ``alternate`` and adds its rows to the ``Bench``; peak memory: ``.memory``."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import IMPORTED, INITS, LIBS, MOE_METHODS, TARGETS
from .report import make_row, median, min_based
from .timing import Bench, alternate
from .workloads import (
    Ctx,
    base_for,
    empty_llama,
    floor_fn,
    inject,
    same_work,
    train_step_fn,
    trainable,
)


def case_import(b: Bench, methods: Sequence[str]) -> None:
    """Wall time of a fresh ``python -c "import X"``; also minus ``import torch``."""
    methods = [m for m in methods if m in IMPORTED]
    mods = {"torch": "torch", "peft": "peft", **{m: IMPORTED[m] for m in methods}}
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # both sides import from compiled .pyc files
    # Warm-up (untimed): writes any missing .pyc and fills the OS page cache for both sides.
    warm = subprocess.run(
        [sys.executable, "-c", "import " + ", ".join(mods.values())],
        env=env,
        capture_output=True,
        text=True,
    )
    if warm.returncode:
        raise RuntimeError(f"importing {list(mods.values())} failed:\n{warm.stderr}")

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    clock = children_cpu if b.cpu_clock else time.perf_counter

    def run(mod: str) -> float:
        start = clock()
        subprocess.run(
            [sys.executable, "-c", f"import {mod}"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return clock() - start

    contenders = {k: (lambda rep, mod=mod: run(mod)) for k, mod in mods.items()}
    samples = alternate(contenders, b.sizes.import_reps, warmup=0)
    torch_s = samples["torch"]
    b.add(make_row("import torch", "-", "s", median(torch_s), None, samples={"torch": torch_s}))
    for m in methods:
        a, p = samples[m], samples["peft"]
        b.add(make_row("import", m, "s", median(a), median(p), samples={"adapt": a, "peft": p}))
    for m in methods:
        a = [x / t for x, t in zip(samples[m], torch_s, strict=True)]
        p = [x / t for x, t in zip(samples["peft"], torch_s, strict=True)]
        b.add(
            make_row(
                "import ÷ torch", m, "x", median(a), median(p),
                note="× import torch", samples={"adapt": a, "peft": p},
            )
        )  # fmt: skip


def case_inject(b: Bench, methods: Sequence[str]) -> None:
    """adapt(...) vs get_peft_model(...) on a Llama built with empty (meta) weights."""
    methods = [m for m in methods if m not in MOE_METHODS]  # train and memory only
    for m in methods:
        how_used = None
        for how in ("meta", "init_empty_weights", "real"):
            try:
                for lib in LIBS:
                    inject(lib, empty_llama(b, how), m)
            except Exception as exc:  # report it and fall back
                b.notes.append(f"inject/{m}: {how} failed ({type(exc).__name__}: {exc})")
                continue
            how_used = how
            break
        if how_used is None:
            b.notes.append(f"inject/{m}: skipped, no way to build the model worked for both")
            continue

        def contender(lib: str, how: str = how_used, m: str = m) -> Callable[[int], float]:
            def run(rep: int) -> float:
                model = empty_llama(b, how)
                return b.timed(lambda: inject(lib, model, m))

            return run

        samples = alternate({lib: contender(lib) for lib in LIBS}, b.sizes.reps)
        note = f"{b.sizes.inject_layers} layers, {how_used}"
        b.add(
            make_row(
                "inject", m, "s", median(samples["adapt"]), median(samples["peft"]),
                note=note, samples=samples,
            )
        )  # fmt: skip


def case_init(b: Bench, methods: Sequence[str]) -> None:
    """Creating a LoRA adapter whose initialisation decomposes the base weights (PiSSA exact
    and randomised, OLoRA) on a fresh copy of the bench model; both libraries draw from the
    same seed."""
    if "lora" not in methods:
        return
    import torch

    for init in INITS:

        def contender(lib: str, init: str = init) -> Callable[[int], float]:
            def run(rep: int) -> float:
                model = b.fresh_base()
                torch.manual_seed(rep)
                return b.timed(lambda: inject(lib, model, "lora", init))

            return run

        samples = alternate({lib: contender(lib) for lib in LIBS}, b.sizes.reps)
        b.add(
            make_row(
                "init", init, "s", median(samples["adapt"]), median(samples["peft"]),
                note=f"LoRA r8, {len(TARGETS) * b.sizes.layers} modules", samples=samples,
            )
        )  # fmt: skip


def case_combine(b: Bench, methods: Sequence[str]) -> None:
    """``add_weighted_adapter`` of two rank-16 LoRA adapters over the 28 linear modules of the
    bench model with ``svd`` (new rank 16), both libraries on identical adapters."""
    if "lora" not in methods:
        return
    import peft
    import torch

    from adapt.core import adapt
    from adapt.lora import LoraConfig

    kw: dict[str, Any] = dict(r=16, lora_alpha=32, target_modules=list(TARGETS))
    models: dict[str, Any] = {}
    for lib in LIBS:
        torch.manual_seed(0)
        if lib == "adapt":
            model = adapt(b.fresh_base(), LoraConfig(init_lora_weights=False, **kw))
            model.add_adapter("other", LoraConfig(init_lora_weights=False, **kw))
        else:
            model = peft.get_peft_model(
                b.fresh_base(), peft.LoraConfig(init_lora_weights=False, **kw)
            )
            model.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **kw))
        models[lib] = model

    def contender(lib: str) -> Callable[[int], float]:
        def run(rep: int) -> float:
            model = models[lib]
            name = f"combined{rep}"
            spent = b.timed(
                lambda: model.add_weighted_adapter(
                    ["default", "other"], [0.7, 0.3], name, combination_type="svd", svd_rank=16
                )
            )
            model.delete_adapter(name)
            return spent

        return run

    samples = alternate({lib: contender(lib) for lib in LIBS}, b.sizes.reps)
    b.add(
        make_row(
            "add_weighted_adapter", "svd", "s", median(samples["adapt"]), median(samples["peft"]),
            note=f"2 × r16 → r16, {len(TARGETS) * b.sizes.layers} modules", samples=samples,
        )
    )  # fmt: skip


def case_train(b: Bench, methods: Sequence[str]) -> None:
    """forward + backward + AdamW step, and the frozen base model's forward + backward."""
    ids = b.batch()
    floors: dict[bool, Any] = {}  # one frozen base per model kind (Llama, MoE)
    for m in methods:
        moe = m in MOE_METHODS
        if moe not in floors:
            floors[moe] = floor_fn(base_for(b, m), ids)
        models = {lib: inject(lib, base_for(b, m), m).train() for lib in LIBS}
        train_rows(b, m, models, floors[moe], ids)
        del models
        gc.collect()


def train_rows(
    b: Bench,
    method: str,
    models: dict[str, Any],
    floor_step: Callable[[], None],
    ids: Any,
    *,
    names: Sequence[str] = ("train step", "train floor", "train overhead"),
    reps: int | None = None,
    ctx: Ctx = contextlib.nullcontext,
    rtol: float = 1e-4,
    tag: str = "train",
) -> None:
    """Time adapt's and PEFT's training step (``models``, one per library) and the floor in
    one alternation (``reps``, default ``b.sizes.reps``), every forward under ``ctx``; add
    the rows ``names`` (step, floor, overhead = step − floor paired per repetition). Before
    timing: the trainable-parameter counts and the same-loss check (to ``rtol``); a
    difference goes into the notes (prefixed ``tag/method``) and the step row's note."""
    counts = {lib: trainable(models[lib]) for lib in LIBS}
    if counts["adapt"] != counts["peft"]:
        b.notes.append(f"{tag}/{method}: trainable parameters differ: {counts}")
    check = same_work(models, ids, ctx, rtol)
    if check != "same loss":
        b.notes.append(f"{tag}/{method}: {check}")
    steps = {lib: train_step_fn(models[lib], ids, ctx) for lib in LIBS}
    steps["floor"] = floor_step
    samples = alternate(
        {k: (lambda rep, f=f: b.timed(f)) for k, f in steps.items()}, reps or b.sizes.reps
    )
    a, p, fl = samples["adapt"], samples["peft"], samples["floor"]
    step_case, floor_case, overhead_case = names
    b.add(make_row(step_case, method, "s", median(a), median(p), note=check, samples=samples))
    b.add(make_row(floor_case, method, "s", median(fl), None, note="frozen base fwd+bwd"))
    oa = [x - f for x, f in zip(a, fl, strict=True)]
    op = [x - f for x, f in zip(p, fl, strict=True)]
    b.add(
        make_row(
            overhead_case, method, "s", median(oa), median(op),
            note=f"step − floor; {min_based(a, p, fl)}", samples={"adapt": oa, "peft": op},
        )
    )  # fmt: skip


def case_infer(b: Bench, methods: Sequence[str]) -> None:
    """no_grad eval forward: unmerged, merged (merge_adapter), and the base model."""
    methods = [m for m in methods if m not in MOE_METHODS]  # train and memory only
    import torch

    ids = b.batch()
    base_model = b.fresh_base().eval()
    n = b.sizes.infer_number

    def fwd(model: Any) -> Callable[[int], float]:
        def run(rep: int) -> float:
            with torch.no_grad():
                return b.timed(lambda: model(input_ids=ids).logits, number=n)

        return run

    for m in methods:
        models = {lib: inject(lib, b.fresh_base(), m).eval() for lib in LIBS}
        unmerged = alternate(
            {**{lib: fwd(models[lib]) for lib in LIBS}, "base": fwd(base_model)},
            b.sizes.infer_reps,
        )
        for lib in LIBS:
            models[lib].merge_adapter()
        merged = alternate(
            {**{lib: fwd(models[lib]) for lib in LIBS}, "base": fwd(base_model)},
            b.sizes.infer_reps,
        )
        b.add(
            make_row(
                "infer unmerged", m, "s", median(unmerged["adapt"]), median(unmerged["peft"]),
                samples=unmerged,
            )
        )  # fmt: skip
        b.add(
            make_row(
                "infer merged", m, "s", median(merged["adapt"]), median(merged["peft"]),
                samples=merged,
            )
        )  # fmt: skip
        oa = [x - f for x, f in zip(unmerged["adapt"], unmerged["base"], strict=True)]
        op = [x - f for x, f in zip(unmerged["peft"], unmerged["base"], strict=True)]
        b.add(
            make_row(
                "infer overhead", m, "s", median(oa), median(op),
                note="unmerged − base", samples={"adapt": oa, "peft": op},
            )
        )  # fmt: skip
        base_t = median(merged["base"])
        b.add(make_row("infer base", m, "s", base_t, None, note="no adapter"))
        b.add(
            make_row(
                "infer merged÷base", m, "x",
                median(merged["adapt"]) / base_t, median(merged["peft"]) / base_t,
                note="merged / base model",
            )
        )  # fmt: skip
        del models
        gc.collect()


def case_merge(b: Bench, methods: Sequence[str]) -> None:
    """merge_and_unload on a freshly adapted model each time."""
    methods = [m for m in methods if m not in MOE_METHODS]  # train and memory only
    for m in methods:

        def contender(lib: str, m: str = m) -> Callable[[int], float]:
            def run(rep: int) -> float:
                model = inject(lib, b.fresh_base(), m)
                if lib == "adapt":
                    return b.timed(lambda: model.merge_and_unload(progress_bar=False))
                return b.timed(lambda: model.merge_and_unload(progressbar=False))

            return run

        samples = alternate({lib: contender(lib) for lib in LIBS}, b.sizes.reps)
        b.add(
            make_row(
                "merge_and_unload", m, "s", median(samples["adapt"]), median(samples["peft"]),
                samples=samples,
            )
        )  # fmt: skip


def case_load(b: Bench, methods: Sequence[str]) -> None:
    """from_pretrained of a saved adapter onto a fresh copy of the base model."""
    methods = [m for m in methods if m not in MOE_METHODS]  # train and memory only
    from peft import PeftModel

    from adapt.core import AdaptedModel

    with tempfile.TemporaryDirectory(prefix="adapt-bench-") as tmp:
        for m in methods:
            dirs = {lib: Path(tmp) / f"{lib}-{m}" for lib in LIBS}
            for lib in LIBS:  # each library saves its own adapter once
                inject(lib, b.fresh_base(), m).save_pretrained(str(dirs[lib]))

            # NB: the default `dirs[lib]` is bound here, after the save loop, so it is the PEFT
            # directory for both contenders (adapt loads PEFT's files); kept as it was.
            def contender(lib: str, path: Path = dirs[lib]) -> Callable[[int], float]:
                def run(rep: int) -> float:
                    model = b.fresh_base()
                    if lib == "adapt":
                        return b.timed(lambda: AdaptedModel.from_pretrained(model, path))
                    return b.timed(lambda: PeftModel.from_pretrained(model, str(path)))

                return run

            samples = alternate({lib: contender(lib) for lib in LIBS}, b.sizes.reps)
            b.add(
                make_row(
                    "from_pretrained", m, "s", median(samples["adapt"]), median(samples["peft"]),
                    samples=samples,
                )
            )  # fmt: skip


def case_allocate(b: Bench, methods: Sequence[str]) -> None:
    """AdaLoRA's update_and_allocate per step, in the budgeting phase, after a backward."""
    if "adalora" not in methods:
        return
    ids = b.batch()
    models = {lib: inject(lib, b.fresh_base(), "adalora").train() for lib in LIBS}
    for model in models.values():
        model(input_ids=ids, labels=ids).loss.backward()
    tinit, delta_t = 10, 2  # as in configs("adalora")
    calls = {
        "adapt": lambda step: models["adapt"].update_and_allocate(step),
        "peft": lambda step: models["peft"].base_model.update_and_allocate(step),
    }

    def contender(lib: str) -> Callable[[int], float]:
        # the same step number for both libraries in one repetition
        return lambda rep: b.timed(lambda: calls[lib](tinit + 1 + rep))

    reps = b.sizes.allocate_reps
    samples = alternate({lib: contender(lib) for lib in LIBS}, reps)
    steps = [tinit + 1 + rep for rep in range(1, 1 + reps)]  # warm-up rep 0 dropped
    for label, masking in (("importance only", False), ("importance + mask", True)):
        pick = [i for i, s in enumerate(steps) if (s % delta_t == 0) == masking]
        a = [samples["adapt"][i] for i in pick]
        p = [samples["peft"][i] for i in pick]
        b.add(
            make_row(
                "update_and_allocate", "adalora", "s", median(a), median(p),
                note=label, samples={"adapt": a, "peft": p},
            )
        )  # fmt: skip
