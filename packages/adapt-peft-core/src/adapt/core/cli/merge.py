"""``adapt merge --base --adapter --out``: fold an adapter into a transformers model, save it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import AdaptError

#: files of a base model folder that ``adapt merge`` copies next to the merged model
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges")


def _load_base(model_dir: str, dtype: str | None) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise AdaptError(
            "`adapt merge` loads transformers models: `pip install transformers`"
        ) from exc
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise AdaptError(f"{model_dir!r} is not a transformers model folder (no config.json)")
    hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = hf_config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    kwargs: dict[str, Any] = {}
    if dtype:
        import torch

        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = (
            getattr(torch, dtype)
        )
    return cls.from_pretrained(model_dir, **kwargs)


def _copy_tokenizer(base: Path, out: Path) -> None:
    """Copy the base folder's tokenizer files that ``out`` does not have yet."""
    for name in os.listdir(base):
        if name.startswith(TOKENIZER_PREFIXES) and not (out / name).exists():
            (out / name).write_bytes((base / name).read_bytes())


def cmd_merge(args: argparse.Namespace) -> int:
    from ..model import AdaptedModel

    start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise AdaptError(f"{str(out)!r} exists and is not empty; pass --overwrite to replace it")
    print(f"[1/4] loading base model from {args.base}", flush=True)
    base = _load_base(args.base, args.dtype)
    print(f"[2/4] loading adapter from {args.adapter}", flush=True)
    model = AdaptedModel.from_pretrained(base, args.adapter)
    n_layers = sum(1 for _ in model.adapter_layers())
    print(f"[3/4] merging {n_layers} adapted layers", flush=True)
    merged: Any = model.merge_and_unload(
        safe_merge=True, progress_bar=None if sys.stderr.isatty() else False
    )
    print(f"[4/4] saving merged model to {out}", flush=True)
    merged.save_pretrained(out)
    _copy_tokenizer(Path(args.base), out)
    print(f"done in {time.perf_counter() - start:.1f} s: {out}")
    return 0
