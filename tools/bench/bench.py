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

This file is the entry script and owns the command line: the options, the order of the cases,
the header, the final table, the JSON file, and the dispatch of ``--memory-worker`` (the
subprocesses of the memory case re-run this script). The rest is the package ``adapt_bench`` beside it
(harness, workloads, cases, overhead, mixed, memory, report: see its docstring and README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

# The benchmark package (adapt_bench) sits beside this file: its folder is sys.path[0] when this file
# runs as a script; put it there too when it does not (python -P, runpy, import from elsewhere).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from adapt_bench.cases import (
    case_allocate,
    case_combine,
    case_import,
    case_infer,
    case_init,
    case_inject,
    case_load,
    case_merge,
    case_train,
)
from adapt_bench.config import CASES, METHODS
from adapt_bench.memory import case_memory, run_worker
from adapt_bench.mixed import case_mixed
from adapt_bench.overhead import case_overhead
from adapt_bench.report import environment, print_table
from adapt_bench.timing import Bench

CASE_FUNCS: dict[str, Callable[[Bench, Sequence[str]], None]] = {
    "import": case_import,
    "inject": case_inject,
    "init": case_init,
    "combine": case_combine,
    "train": case_train,
    "overhead": case_overhead,
    "infer": case_infer,
    "mixed": case_mixed,
    "merge": case_merge,
    "load": case_load,
    "allocate": case_allocate,
    "memory": case_memory,
}


def parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
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
        "--out",
        type=Path,
        default=Path("bench-out"),
        help="folder of the files a case writes (the mixed case's curve: table, plot, samples); "
        "default: bench-out/",
    )
    parser.add_argument(
        "--curve-max",
        type=int,
        default=None,
        metavar="N",
        help="mixed case: largest adapter count of the curve (default: all of the sizes' "
        "counts, up to 64); 0 skips the curve",
    )
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("LIB", "ITEMS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    return parser


def prepare(args: argparse.Namespace) -> None:
    """Offline hub, quiet warnings and logging, and the torch thread count."""
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepare(args)
    if args.memory_worker:
        return run_worker(args)

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
    elapsed = run_cases(b, args.cases, args.methods)
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
        write_json(args.json, env, b)
    return 0


def run_cases(b: Bench, cases: Sequence[str], methods: Sequence[str]) -> float:
    """Run the selected cases in the fixed order of ``CASES``; returns the elapsed seconds."""
    started = time.perf_counter()
    for case in CASES:
        if case in cases:
            print(f"[{case}]", flush=True)
            case_start = time.perf_counter()
            CASE_FUNCS[case](b, methods)
            b.case_seconds[case] = time.perf_counter() - case_start
            print(f"  ({b.case_seconds[case]:.0f} s)", flush=True)
    return time.perf_counter() - started


def write_json(path: Path, env: dict[str, Any], b: Bench) -> None:
    data = {"environment": env, "notes": b.notes, "results": [asdict(r) for r in b.rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"results written to {path}")


if __name__ == "__main__":
    sys.exit(main())
