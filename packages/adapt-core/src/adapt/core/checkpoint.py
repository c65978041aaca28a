"""Checkpoint files in HF PEFT's format, written atomically and read without pickle.

A saved adapter is a folder holding ``adapter_config.json`` and ``adapter_model.safetensors``
(metadata ``{"format": "pt"}``). Keys follow PEFT: ``base_model.model.<module path>.<tensor>``
with the adapter name removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def write_adapter(
    folder: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Write one adapter: weights first, then the config, each atomically."""
    from safetensors.torch import save_file

    out = Path(folder)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(out / CONFIG_NAME, write_json)
    return out


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder)
    if not path.exists():
        raise CheckpointError(f"no adapter at {str(path)!r}: the folder does not exist")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(
            f"{str(path)!r} holds no {CONFIG_NAME}; point to the folder save_pretrained wrote "
            "(a non-default adapter is saved in a subfolder named after it)"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise CheckpointError(f"{file} has no 'peft_type'; it is not an adapter config")
    return data


def read_tensors(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors``; pickle files are refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    file = path / WEIGHTS_NAME
    if not file.is_file():
        pickled = [n for n in PICKLE_NAMES if (path / n).is_file()]
        if pickled:
            raise CheckpointError(
                f"{str(path)!r} holds only {pickled[0]}, a pickle file; adapt never unpickles. "
                "Convert it to safetensors in a trusted environment (load it with "
                "torch.load(weights_only=True) and save with safetensors.torch.save_file)"
            )
        raise CheckpointError(f"{str(path)!r} holds no {WEIGHTS_NAME}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated and cannot be read: {exc}") from exc
