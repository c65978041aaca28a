"""Benchmark adapt against HF PEFT, side by side in one run.

Every case runs adapt and PEFT alternately (the order rotates from one repetition to the next,
so slow drift of a shared machine hits both), several times, and reports the medians and the
ratio adapt / PEFT against the goals of the performance issue. See tools/bench/README.md for
what each case measures exactly.

    python tools/bench/bench.py                     # everything (a few minutes on 2 CPU cores)
    python tools/bench/bench.py --quick             # CI smoke: small sizes, few repetitions
    python tools/bench/bench.py --cases train,infer --methods lora --json out.json

Needs torch, transformers, peft, accelerate and the adapt packages. Runs on CUDA when it is
available (``--device`` overrides), on CPU otherwise.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CASES = ("import", "inject", "train", "infer", "merge", "load", "allocate", "memory")
METHODS = ("lora", "vera", "adalora")
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


FULL = Sizes(
    hidden=512, intermediate=1376, layers=4, heads=8, vocab=1024, batch=8, seq=128,
    inject_layers=32, inject_hidden=512, inject_intermediate=1376,
    reps=9, import_reps=5, infer_reps=15, infer_number=1, allocate_reps=20, memory_reps=3,
)  # fmt: skip
QUICK = Sizes(
    hidden=128, intermediate=344, layers=2, heads=4, vocab=256, batch=2, seq=32,
    inject_layers=8, inject_hidden=512, inject_intermediate=1376,
    reps=3, import_reps=1, infer_reps=3, infer_number=1, allocate_reps=4, memory_reps=1,
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
    **{("import", m): Goal(0.35) for m in METHODS},
    **{("inject", m): Goal(0.5) for m in METHODS},
    ("train step", "lora"): Goal(0.90),
    ("train step", "vera"): Goal(0.85),
    ("train overhead", "lora"): Goal(0.6),
    **{("infer unmerged", m): Goal(0.9) for m in METHODS},
    **{("infer merged÷base", m): Goal(1.02, on="adapt") for m in METHODS},
    **{("peak mem", m): Goal(1.0) for m in METHODS},
}


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
    return row


def paired_ratios(samples: dict[str, list[float]]) -> list[float]:
    """adapt / PEFT per repetition, when both sides were measured in the same repetitions."""
    a, p = samples.get("adapt", []), samples.get("peft", [])
    if len(a) != len(p) or not all(x > 0 for x in [*a, *p]):
        return []
    return [x / y for x, y in zip(a, p, strict=True)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------- timing


def alternate(
    contenders: dict[str, Callable[[int], float]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every contender once per repetition, rotating who goes first; each contender
    returns its own measured seconds (so it can do untimed setup). Warm-up rounds are
    dropped."""
    names = list(contenders)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        k = rep % len(names)
        order = names[k:] + names[:k]
        if (rep // len(names)) % 2:
            order.reverse()
        for name in order:
            seconds = contenders[name](rep)
            if rep >= warmup:
                samples[name].append(seconds)
    return samples


class Bench:
    """Shared state of one run: options, device, models and helpers."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.sizes = QUICK if args.quick else FULL
        if args.reps:
            self.sizes = Sizes(
                **{
                    **asdict(self.sizes),
                    "reps": args.reps,
                    "import_reps": args.reps,
                    "infer_reps": args.reps,
                    "allocate_reps": args.reps,
                }
            )
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        # "cpu": process CPU time (user + system) instead of wall time; see --clock
        self.cpu_clock = getattr(args, "clock", "wall") == "cpu"
        if self.cpu_clock and self.device.type == "cuda":
            raise SystemExit("--clock cpu measures CPU work; on CUDA use the wall clock")
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.case_seconds: dict[str, float] = {}
        self._base: Any = None

    # -- timing -----------------------------------------------------------------------------
    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any], number: int = 1) -> float:
        """Seconds per call of ``fn`` (``number`` calls), after a garbage collection."""
        clock = time.process_time if self.cpu_clock else time.perf_counter
        gc.collect()
        self.sync()
        start = clock()
        for _ in range(number):
            fn()
        self.sync()
        return (clock() - start) / number

    # -- models -----------------------------------------------------------------------------
    def llama_config(self, *, layers: int, hidden: int, intermediate: int) -> Any:
        from transformers import LlamaConfig

        s = self.sizes
        return LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.heads,
            vocab_size=s.vocab,
            max_position_embeddings=max(2048, s.seq),
        )

    def base(self) -> Any:
        """The small Llama of the training / inference cases (real weights, seed 0)."""
        if self._base is None:
            import torch
            from transformers import LlamaForCausalLM

            s = self.sizes
            torch.manual_seed(0)
            cfg = self.llama_config(layers=s.layers, hidden=s.hidden, intermediate=s.intermediate)
            self._base = LlamaForCausalLM(cfg).to(self.device)
        return self._base

    def fresh_base(self) -> Any:
        return copy.deepcopy(self.base())

    def batch(self) -> Any:
        import torch

        s = self.sizes
        gen = torch.Generator().manual_seed(1)
        return torch.randint(0, s.vocab, (s.batch, s.seq), generator=gen).to(self.device)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print("  " + format_row(row), flush=True)


def configs(method: str) -> tuple[Any, Any]:
    """Fresh ``(adapt config, PEFT config)`` of ``method``, with the same settings.

    PEFT gets ``task_type="CAUSAL_LM"`` (how PEFT is used on a causal LM): without it
    ``get_peft_model`` returns a bare ``PeftModel`` whose forward skips the tuner's forward, so
    AdaLoRA's orthogonal regulariser would silently not be computed on the PEFT side.
    """
    import peft

    task = {"task_type": "CAUSAL_LM"}
    if method == "lora":
        from adapt.lora import LoraConfig

        return (
            LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)),
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), **task),
        )
    if method == "vera":
        from adapt.vera import VeraConfig

        return (
            VeraConfig(r=256, target_modules=list(TARGETS)),
            peft.VeraConfig(r=256, target_modules=list(TARGETS), **task),
        )
    if method == "adalora":
        from adapt.adalora import AdaLoraConfig

        kw = dict(init_r=12, target_r=8, tinit=10, tfinal=10, deltaT=2, total_step=1000)
        return (
            AdaLoraConfig(target_modules=list(TARGETS), **kw),
            peft.AdaLoraConfig(target_modules=list(TARGETS), **kw, **task),
        )
    raise ValueError(method)


def inject(lib: str, model: Any, method: str) -> Any:
    a_cfg, p_cfg = configs(method)
    if lib == "adapt":
        from adapt.core import adapt

        return adapt(model, a_cfg)
    import peft

    return peft.get_peft_model(model, p_cfg)


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def same_work(models: dict[str, Any], ids: Any) -> str:
    """Copy adapt's trainable tensors into the PEFT model (same names: both use PEFT's key
    layout) and compare the two training losses; returns a note for the table."""
    import torch

    params = {
        lib: {n: p for n, p in models[lib].named_parameters() if p.requires_grad} for lib in LIBS
    }
    if set(params["adapt"]) != set(params["peft"]):
        return "trainable tensors differ by name"
    with torch.no_grad():
        for name, tensor in params["adapt"].items():
            params["peft"][name].copy_(tensor)
        loss = {lib: float(models[lib](input_ids=ids, labels=ids).loss) for lib in LIBS}
    if abs(loss["adapt"] - loss["peft"]) > 1e-4 * max(1.0, abs(loss["peft"])):
        return f"LOSSES DIFFER: adapt {loss['adapt']:.5f}, peft {loss['peft']:.5f}"
    return "same loss"


def train_step_fn(model: Any, ids: Any) -> Callable[[], None]:
    """zero_grad + forward (causal-LM loss) + backward + AdamW step."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step


def floor_fn(model: Any, ids: Any) -> Callable[[], None]:
    """The frozen base model's forward + backward: every weight frozen, the input embeddings'
    output made to require grad (``enable_input_require_grads``) so the loss backpropagates
    through every layer (activation grads only, no weight grads); no optimizer."""
    model.requires_grad_(False)
    model.enable_input_require_grads()
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    return step


# ----------------------------------------------------------------------------- cases


def case_import(b: Bench, methods: Sequence[str]) -> None:
    """Wall time of a fresh ``python -c "import X"``; also minus ``import torch``."""
    mods = {"torch": "torch", "peft": "peft", **{m: f"adapt.{m}" for m in methods}}
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


def empty_llama(b: Bench, how: str) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    s = b.sizes
    cfg = b.llama_config(
        layers=s.inject_layers, hidden=s.inject_hidden, intermediate=s.inject_intermediate
    )
    if how == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    if how == "init_empty_weights":
        from accelerate import init_empty_weights

        with init_empty_weights():
            return LlamaForCausalLM(cfg)
    torch.manual_seed(0)  # "real": small real weights
    return LlamaForCausalLM(cfg)


def case_inject(b: Bench, methods: Sequence[str]) -> None:
    """adapt(...) vs get_peft_model(...) on a Llama built with empty (meta) weights."""
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


def case_train(b: Bench, methods: Sequence[str]) -> None:
    """forward + backward + AdamW step, and the frozen base model's forward + backward."""
    ids = b.batch()
    floor_model = b.fresh_base()
    floor_step = floor_fn(floor_model, ids)
    for m in methods:
        models = {lib: inject(lib, b.fresh_base(), m).train() for lib in LIBS}
        counts = {lib: trainable(models[lib]) for lib in LIBS}
        if counts["adapt"] != counts["peft"]:
            b.notes.append(f"train/{m}: trainable parameters differ: {counts}")
        check = same_work(models, ids)
        if check != "same loss":
            b.notes.append(f"train/{m}: {check}")
        steps = {lib: train_step_fn(models[lib], ids) for lib in LIBS}
        steps["floor"] = floor_step
        samples = alternate(
            {k: (lambda rep, f=f: b.timed(f)) for k, f in steps.items()}, b.sizes.reps
        )
        a, p, fl = samples["adapt"], samples["peft"], samples["floor"]
        b.add(make_row("train step", m, "s", median(a), median(p), note=check, samples=samples))
        b.add(make_row("train floor", m, "s", median(fl), None, note="frozen base fwd+bwd"))
        oa = [x - f for x, f in zip(a, fl, strict=True)]
        op = [x - f for x, f in zip(p, fl, strict=True)]
        b.add(
            make_row(
                "train overhead", m, "s", median(oa), median(op),
                note="step − floor", samples={"adapt": oa, "peft": op},
            )
        )  # fmt: skip
        del models, steps
        gc.collect()


def case_infer(b: Bench, methods: Sequence[str]) -> None:
    """no_grad eval forward: unmerged, merged (merge_adapter), and the base model."""
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
    from peft import PeftModel

    from adapt.core import AdaptedModel

    with tempfile.TemporaryDirectory(prefix="adapt-bench-") as tmp:
        for m in methods:
            dirs = {lib: Path(tmp) / f"{lib}-{m}" for lib in LIBS}
            for lib in LIBS:  # each library saves its own adapter once
                inject(lib, b.fresh_base(), m).save_pretrained(str(dirs[lib]))

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


def case_memory(b: Bench, methods: Sequence[str]) -> None:
    """Peak memory of one training step, in a fresh subprocess per (library, method)
    (``--quick``: one subprocess per library for all methods)."""
    size = "quick" if b.args.quick else "full"
    env = dict(os.environ)
    # glibc: serve every allocation >= 64 KiB with its own mmap and unmap it on free, so the
    # resident set follows live tensor memory instead of glibc's retained heap (RSS figure).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    groups = [list(methods)] if b.args.quick else [[m] for m in methods]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {
        (lib, m): [] for lib in LIBS for m in methods
    }
    threads = ["--threads", str(b.args.threads)] if b.args.threads else []

    def spawn(lib: str, group: list[str]) -> subprocess.Popen[str]:
        cmd = [sys.executable, __file__, "--memory-worker", lib, ",".join(group)]
        cmd += ["--size", size, "--device", str(b.device), *threads]
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    for group in groups:
        for _ in range(b.sizes.memory_reps):
            # memory does not depend on timing: the two workers run side by side
            procs = {lib: spawn(lib, group) for lib in LIBS}
            for lib, proc in procs.items():
                out, err = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"memory worker {lib}/{group} failed:\n{err[-3000:]}")
                for result in json.loads(out.strip().splitlines()[-1]):
                    results[(lib, result["method"])].append(result)
    tensor_note = (
        "CUDA max_memory_allocated" if b.device.type == "cuda" else "CPU allocator (profiler)"
    )
    for m in methods:
        for key, case, note in (
            ("tensor_peak", "peak mem", tensor_note),
            ("rss_peak", "peak mem (RSS)", "VmHWM − VmRSS, info"),
        ):
            vals = {
                lib: [r[key] for r in results[(lib, m)] if r.get(key) is not None] for lib in LIBS
            }
            if not all(vals.values()):
                continue
            b.add(
                make_row(
                    case, m, "B", median(vals["adapt"]), median(vals["peft"]),
                    note=note, samples=vals,
                )
            )  # fmt: skip


CASE_FUNCS: dict[str, Callable[[Bench, Sequence[str]], None]] = {
    "import": case_import,
    "inject": case_inject,
    "train": case_train,
    "infer": case_infer,
    "merge": case_merge,
    "load": case_load,
    "allocate": case_allocate,
    "memory": case_memory,
}


# ----------------------------------------------------------------------------- memory worker


def _proc_status_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field_name}")
    return int(match[1])


def memory_worker(lib: str, method: str, size: str, device: str) -> dict[str, Any]:
    """Measure one (library, method) training step; runs in a worker process.

    Steady state: one warm-up step first (it creates AdamW's state), gradients set to None,
    then the measured step. CUDA: ``max_memory_allocated`` − ``memory_allocated`` before the
    step. CPU: the torch profiler's record of the CPU allocator (``profile_memory=True``):
    the highest net total of bytes allocated since the step began (activations, gradients,
    optimizer temporaries), the CPU counterpart of CUDA's figure; plus, for information, the
    peak resident set above the resident set before the step (``VmHWM`` after resetting it
    through ``/proc/self/clear_refs``), measured in a separate step without the profiler.
    """
    import torch

    args = argparse.Namespace(
        quick=size == "quick", reps=None, device=device, threads=None, clock="wall"
    )
    b = Bench(args)
    ids = b.batch()
    model = inject(lib, b.fresh_base(), method).train()
    b._base = None  # only the adapted copy stays alive
    gc.collect()
    step = train_step_fn(model, ids)
    step()  # warm-up: AdamW state, lazy initialisation
    opt_zero = [p for p in model.parameters() if p.requires_grad]

    def clear_grads() -> None:
        for p in opt_zero:
            p.grad = None
        gc.collect()

    out: dict[str, Any] = {"lib": lib, "method": method, "trainable": len(opt_zero)}
    clear_grads()
    if b.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out["tensor_peak"] = torch.cuda.max_memory_allocated() - before
        out["rss_peak"] = None
        return out

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        step()
        out["rss_peak"] = (_proc_status_kib("VmHWM") - before) * 1024
    except OSError:
        out["rss_peak"] = None
    clear_grads()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
    ]
    out["tensor_peak"] = max([0, *totals])
    return out


# ----------------------------------------------------------------------------- output


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


# ----------------------------------------------------------------------------- main


def parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument(
        "--cases",
        type=lambda v: parse_list(v, CASES, "case"),
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all)",
    )
    parser.add_argument(
        "--methods",
        type=lambda v: parse_list(v, METHODS, "method"),
        default=list(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--reps", type=int, default=None, help="override repetition counts")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: CPU time of the process (of the child for "
        "imports), steadier on a shared machine; implies --threads 1 unless given",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("LIB", "METHOD"), help=argparse.SUPPRESS
    )
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()

    if args.clock == "cpu" and not args.threads:
        args.threads = 1  # CPU time of several threads counts their spin-waiting too
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.memory_worker:
        lib, methods = args.memory_worker
        results = []
        for method in methods.split(","):
            results.append(memory_worker(lib, method, args.size, args.device))
            gc.collect()
        print(json.dumps(results))
        return 0

    b = Bench(args)
    env = environment(b)
    v = env["versions"]
    print(
        f"adapt vs PEFT — device {env['device']}, {env['torch_threads']} torch threads, "
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"adapt-peft-core {v['adapt-peft-core']}, {args.clock} clock{' (--quick)' if args.quick else ''}",
        flush=True,
    )
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    for case in CASES:
        if case in args.cases:
            print(f"[{case}]", flush=True)
            case_start = time.perf_counter()
            CASE_FUNCS[case](b, args.methods)
            b.case_seconds[case] = time.perf_counter() - case_start
            print(f"  ({b.case_seconds[case]:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    print_table(b.rows)
    for note in b.notes:
        print(f"note: {note}")
    if load_before and load_after:
        print(
            f"elapsed {elapsed:.0f} s; load average before {load_before[0]:.2f}, "
            f"after {load_after[0]:.2f} (on {os.cpu_count()} CPUs)"
        )
    if args.json:
        env.update(elapsed_s=elapsed, loadavg_before=load_before, loadavg_after=load_after)
        env["case_seconds"] = b.case_seconds
        data = {"environment": env, "notes": b.notes, "results": [asdict(r) for r in b.rows]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
