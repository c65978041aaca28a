"""Peak memory of one training step. ``case_memory`` (in the main process) spawns a fresh
worker per (library, method) — ``--quick``: one per library for all methods — by re-running the
entry script ``bench.py`` with the hidden ``--memory-worker LIB ITEMS`` option, and turns the
workers' JSON into rows. An item is a method, or ``method/shape/precision`` for the overhead
case (``run_memory_workers``, e.g. ``lora/h1024/bf16``). ``run_worker`` / ``memory_worker``
are the worker side: CUDA's ``max_memory_allocated``, or on CPU the torch profiler's
allocator record plus the RSS peak."""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import LIBS
from .report import make_row, median
from .timing import Bench
from .workloads import autocast_for, base_for, inject, shape_base, shape_batch, train_step_fn

# The workers re-run the entry script (it dispatches --memory-worker to run_worker).
ENTRY = Path(__file__).resolve().parent.parent / "bench.py"


# ----------------------------------------------------------------------------- main process


#: What one worker measures: (method, shape, precision) — see ``adapt_bench.overhead``.
Item = tuple[str, str, str]


def case_memory(b: Bench, methods: Sequence[str]) -> None:
    """Peak memory of one training step, in a fresh subprocess per (library, method)
    (``--quick``: one subprocess per library for all methods)."""
    items = [(m, "h512", "fp32") for m in methods]
    results = run_memory_workers(b, [items] if b.args.quick else [[i] for i in items])
    for item in items:
        for key, case, note in (
            ("tensor_peak", "peak mem", tensor_note(b)),
            ("rss_peak", "peak mem (RSS)", "VmHWM − VmRSS, info"),
        ):
            by_lib = {lib: results[(lib, *item)] for lib in LIBS}
            add_memory_row(b, case, item[0], by_lib, key, note)


def tensor_note(b: Bench) -> str:
    """What the tensor peak of the device is (the note of its rows)."""
    return "CUDA max_memory_allocated" if b.device.type == "cuda" else "CPU allocator (profiler)"


def run_memory_workers(
    b: Bench, groups: Sequence[Sequence[Item]], reps: int | None = None
) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    """Run one worker per library for each group of items ``(method, shape, precision)``,
    the two libraries side by side (memory does not depend on timing), ``reps`` times
    (default ``memory_reps``); returns the workers' results by ``(lib, method, shape,
    precision)``."""
    size = "quick" if b.args.quick else "full"
    env = dict(os.environ)
    # glibc: serve every allocation >= 64 KiB with its own mmap and unmap it on free, so the
    # resident set follows live tensor memory instead of glibc's retained heap (RSS figure).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    threads = ["--threads", str(b.args.threads)] if b.args.threads else []
    results: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {
        (lib, *item): [] for lib in LIBS for group in groups for item in group
    }

    def spawn(lib: str, spec: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, str(ENTRY), "--memory-worker", lib, spec]
        cmd += ["--size", size, "--device", str(b.device), *threads]
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    for group in groups:
        spec = ",".join("/".join(item) for item in group)  # lora/h512/fp32,vera/h512/fp32
        for _ in range(b.sizes.memory_reps if reps is None else reps):
            procs = {lib: spawn(lib, spec) for lib in LIBS}
            for lib, proc in procs.items():
                out, err = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"memory worker {lib} {spec} failed:\n{err[-3000:]}")
                for r in json.loads(out.strip().splitlines()[-1]):
                    results[(lib, r["method"], r["shape"], r["precision"])].append(r)
    return results


def add_memory_row(
    b: Bench, case: str, method: str, results: dict[str, list[dict[str, Any]]], key: str, note: str
) -> None:
    """One row of the medians of ``key`` over each library's worker ``results`` (none when a
    side has no value, e.g. the RSS figure on CUDA)."""
    vals = {lib: [r[key] for r in results[lib] if r.get(key) is not None] for lib in LIBS}
    if not all(vals.values()):
        return
    b.add(
        make_row(
            case, method, "B", median(vals["adapt"]), median(vals["peft"]),
            note=note, samples=vals,
        )
    )  # fmt: skip


# ----------------------------------------------------------------------------- worker process


def run_worker(args: argparse.Namespace) -> int:
    """``bench.py --memory-worker LIB ITEMS``: measure each item (``method`` or
    ``method/shape/precision``, comma-separated), print the results as one JSON line (the last
    line of stdout is what ``run_memory_workers`` reads)."""
    lib, items = args.memory_worker
    results = []
    for item in items.split(","):
        method, shape, precision = [*item.split("/"), "h512", "fp32"][:3]
        results.append(memory_worker(lib, method, args.size, args.device, shape, precision))
        gc.collect()
    print(json.dumps(results))
    return 0


def memory_worker(
    lib: str, method: str, size: str, device: str, shape: str = "h512", precision: str = "fp32"
) -> dict[str, Any]:
    """Measure one (library, method) training step on the model and batch of ``shape``, its
    forward under the autocast of ``precision`` (``workloads.autocast_for``); runs in a worker
    process.

    Steady state: one warm-up step first (it creates AdamW's state), gradients set to None,
    then the measured step. CUDA: ``max_memory_allocated`` − ``memory_allocated`` before the
    step. CPU: the torch profiler's record of the CPU allocator (``profile_memory=True``):
    the highest net total of bytes allocated since the step began (activations, gradients,
    optimizer temporaries), the CPU counterpart of CUDA's figure; plus, for information, the
    peak resident set above the resident set before the step (``VmHWM`` after resetting it
    through ``/proc/self/clear_refs``), measured in a separate step without the profiler.
    """
    args = argparse.Namespace(
        quick=size == "quick", reps=None, device=device, threads=None, clock="wall"
    )
    b = Bench(args)
    base = base_for(b, method) if shape == "h512" else shape_base(b, shape)
    ids = shape_batch(b, shape)
    model = inject(lib, base, method, shape=shape).train()
    b._base = base = None  # only the adapted copy stays alive
    gc.collect()
    step = train_step_fn(model, ids, autocast_for(b.device.type, precision))
    step()  # warm-up: AdamW state, lazy initialisation
    opt_zero = [p for p in model.parameters() if p.requires_grad]

    def clear_grads() -> None:
        for p in opt_zero:
            p.grad = None
        gc.collect()

    out: dict[str, Any] = {"lib": lib, "method": method, "trainable": len(opt_zero)}
    out.update(shape=shape, precision=precision)
    clear_grads()
    if b.device.type == "cuda":
        out["tensor_peak"] = cuda_step_peak(step)
        out["rss_peak"] = None
        return out
    out["rss_peak"] = rss_step_peak(step)
    clear_grads()
    out["tensor_peak"] = profiled_step_peak(step)
    return out


def cuda_step_peak(step: Callable[[], None]) -> int:
    """Bytes: ``max_memory_allocated`` during ``step`` − ``memory_allocated`` before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def rss_step_peak(step: Callable[[], None]) -> int | None:
    """Bytes: peak resident set during ``step`` (``VmHWM``, reset first) − ``VmRSS`` before it;
    ``None`` where ``/proc/self`` cannot be read or written."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        step()
        return (_proc_status_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def profiled_step_peak(step: Callable[[], None]) -> int:
    """Bytes: the highest net total the torch CPU allocator reports during ``step``
    (``torch.profiler`` with ``profile_memory=True``)."""
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
    return max([0, *totals])


def _proc_status_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field_name}")
    return int(match[1])
