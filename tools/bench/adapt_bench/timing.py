"""How the bench measures: ``alternate`` (every contender once per repetition, rotating who
goes first, warm-up dropped) and ``Bench``, the shared state of one run (options, device, the
wall or CPU clock of ``timed``, the seeded base Llama and batch, and the collected rows)."""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .config import FULL, QUICK, Sizes
from .report import Row, format_row


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
                    "mixed_reps": args.reps,
                    "curve_reps": args.reps,
                    "wide_reps": args.reps,
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
