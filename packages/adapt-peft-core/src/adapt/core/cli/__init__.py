"""The ``adapt`` command line: ``plugins``, ``inspect PATH``, ``merge --base --adapter --out``,
``combine --adapter A --adapter B --weights 0.7,0.3 --out DIR``.

One module per command (:mod:`.plugins`, :mod:`.inspect`, :mod:`.merge`, :mod:`.combine`), the rank heat map
of ``inspect --plot`` (:mod:`.plot`), what ``inspect`` reads of a saved adapter and asks its
method (:mod:`.layout`) and the table helper (:mod:`._format`). The commands import the rest
of adapt-core when they run, so ``adapt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import AdaptError
from .combine import add_combine
from .inspect import cmd_inspect
from .merge import cmd_merge
from .plot import plot_ranks, rank_grid
from .plugins import cmd_plugins

__all__ = ["build_parser", "main", "plot_ranks", "rank_grid"]


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="describe a saved adapter (method, targets, ranks, size)")
    p.add_argument("path", help="folder holding adapter_config.json and adapter_model.safetensors")
    p.add_argument("--all", action="store_true", help="list every module, not the first 20")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the rank per layer and module as a heat map (needs matplotlib), e.g. ranks.png",
    )
    p.add_argument(
        "--json", action="store_true", help="also print config and tensor shapes as JSON"
    )
    p.set_defaults(func=cmd_inspect)


def _add_merge(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("merge", help="merge an adapter into a transformers model and save it")
    p.add_argument("--base", required=True, help="transformers model folder")
    p.add_argument("--adapter", required=True, help="saved adapter folder")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="load the base in this dtype"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.set_defaults(func=cmd_merge)


def build_parser() -> argparse.ArgumentParser:
    from ..__about__ import __version__

    parser = argparse.ArgumentParser(
        prog="adapt",
        description="adapt: parameter-efficient fine-tuning adapters (PEFT-compatible).",
    )
    parser.add_argument("--version", action="version", version=f"adapt-peft-core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed methods, layers and backends")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 if any plugin failed to load or is invalid",
    )
    p.set_defaults(func=cmd_plugins)
    _add_inspect(sub)
    _add_merge(sub)
    add_combine(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AdaptError as exc:
        print(f"adapt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`adapt inspect DIR | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
