"""Peak memory of one training step. ``case_memory`` (in the main process) spawns a fresh
worker per (library, method) — ``--quick``: one per library for all methods — by re-running the
entry script ``bench.py`` with the hidden ``--memory-worker LIB METHODS`` option, and turns the
workers' JSON into rows. ``run_worker`` / ``memory_worker`` are the worker side: CUDA's
``max_memory_allocated``, or on CPU the torch profiler's allocator record plus the RSS peak."""

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
from .workloads import base_for, inject, train_step_fn

# The workers re-run the entry script (it dispatches --memory-worker to run_worker).
ENTRY = Path(__file__).resolve().parent.parent / "bench.py"


# ----------------------------------------------------------------------------- main process


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
        cmd = [sys.executable, str(ENTRY), "--memory-worker", lib, ",".join(group)]
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


# ----------------------------------------------------------------------------- worker process


def run_worker(args: argparse.Namespace) -> int:
    """``bench.py --memory-worker LIB METHODS``: measure each method, print the results as
    one JSON line (the last line of stdout is what ``case_memory`` reads)."""
    lib, methods = args.memory_worker
    results = []
    for method in methods.split(","):
        results.append(memory_worker(lib, method, args.size, args.device))
        gc.collect()
    print(json.dumps(results))
    return 0


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
    args = argparse.Namespace(
        quick=size == "quick", reps=None, device=device, threads=None, clock="wall"
    )
    b = Bench(args)
    ids = b.batch()
    model = inject(lib, base_for(b, method), method).train()
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
