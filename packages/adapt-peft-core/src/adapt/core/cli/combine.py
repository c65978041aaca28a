"""``adapt combine --adapter A --adapter B --weights 0.7,0.3 --type svd --out DIR``.

Combines saved adapters without the base model (:func:`adapt.core.combine_saved_adapters`)
and prints what it wrote: method, type, rank per module (the most common one and the others),
file size, time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from ..errors import AdaptError

TYPES_HELP = (
    "combination type (default svd); LoRA: svd, linear, cat, ties, ties_svd, dare_linear, "
    "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd; VeRA: linear"
)


def add_combine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "combine", help="combine saved adapters into a new one, without the base model"
    )
    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="DIR",
        help="a saved adapter folder; give --adapter once per adapter",
    )
    p.add_argument(
        "--weights", required=True, help="one weight per adapter, comma-separated: 0.7,0.3"
    )
    p.add_argument("--type", default="svd", dest="combination_type", help=TYPES_HELP)
    p.add_argument("--out", required=True, help="output folder for the combined adapter")
    p.add_argument("--svd-rank", type=int, help="rank of the *svd types' result")
    p.add_argument("--svd-clamp", type=float, help="clamp quantile of the svd factors")
    p.add_argument("--density", type=float, help="fraction kept by ties / dare / magnitude_prune")
    p.add_argument("--majority-sign-method", choices=["total", "frequency"], default="total")
    p.add_argument("--seed", type=int, help="seed of the DARE types' random masks")
    p.add_argument(
        "--union-targets",
        action="store_true",
        help="allow adapters of different modules: each module combines the ones there",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_combine)


def parse_weights(text: str, count: int) -> list[float]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        weights = [float(part) for part in parts]
    except ValueError as exc:
        raise AdaptError(
            f"--weights {text!r}: give numbers separated by commas, e.g. --weights 0.7,0.3"
        ) from exc
    if len(weights) != count:
        raise AdaptError(
            f"--weights {text!r} gives {len(weights)} weights for {count} --adapter folders; "
            "give one weight per adapter, in the same order"
        )
    return weights


def cmd_combine(args: argparse.Namespace) -> int:
    import torch

    from ..combine_files import combine_saved_adapters

    start = time.perf_counter()
    weights = parse_weights(args.weights, len(args.adapter))
    generator = None
    if args.seed is not None:
        generator = torch.Generator().manual_seed(args.seed)
    pairs = ", ".join(f"{w:g} × {a}" for w, a in zip(weights, args.adapter, strict=True))
    print(f"combining {pairs} ({args.combination_type})", flush=True)
    out = combine_saved_adapters(
        args.adapter,
        weights,
        args.out,
        combination_type=args.combination_type,
        svd_rank=args.svd_rank,
        svd_clamp=args.svd_clamp,
        density=args.density,
        majority_sign_method=args.majority_sign_method,
        generator=generator,
        union_targets=args.union_targets,
        overwrite=args.overwrite,
    )
    print(summary(out, time.perf_counter() - start))
    return 0


def summary(out: Path, seconds: float) -> str:
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    size = (out / "adapter_model.safetensors").stat().st_size
    pattern = config.get("rank_pattern") or {}
    ranks = Counter(pattern.values())
    others = ", ".join(f"{k} at {n} module{'s' if n > 1 else ''}" for k, n in sorted(ranks.items()))
    rank = f"r = {config.get('r')}" + (f" ({others})" if others else "")
    return (
        f"wrote {out}: {config.get('peft_type')} adapter, {rank}, "
        f"{size / 2**20:.2f} MiB, in {seconds:.1f} s"
    )
