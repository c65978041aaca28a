"""Checkpoint files in HF PEFT's format, written atomically and read without pickle.

A saved adapter is a folder holding ``adapter_config.json`` and ``adapter_model.safetensors``
(metadata ``{"format": "pt"}``). Keys follow PEFT: ``base_model.model.<module path>.<tensor>``
with the adapter name removed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import atomic_write as _atomic_write
from .files import fsync_dir as _fsync_dir
from .files import write_temp as _write_temp

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


JOURNAL_NAME = ".adapt-save.json"


def _journal(folder: Path) -> list[tuple[str, str]] | None:
    """The renames of an interrupted save's commit record, or None if there is none."""
    file = folder / JOURNAL_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        renames = [(str(src), str(dst)) for src, dst in data["renames"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file} (a save's commit record) is unreadable: {exc}") from exc
    for src, dst in renames:
        if "/" in src or "/" in dst or dst not in (WEIGHTS_NAME, CONFIG_NAME):
            raise CheckpointError(f"{file} names unexpected files: {renames}")
    return renames


def _roll_forward(folder: Path, renames: list[tuple[str, str]]) -> None:
    for src, dst in renames:
        if (folder / src).exists():
            os.replace(folder / src, folder / dst)
    _fsync_dir(folder)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)
    _fsync_dir(folder)


def recover(folder: str | os.PathLike[str]) -> None:
    """Finish a save that was interrupted after its commit point, and delete the temporary
    files of one interrupted before it (which left the previous adapter in place)."""
    path = Path(folder)
    renames = _journal(path)
    if renames is not None:
        _roll_forward(path, renames)
    for name in (WEIGHTS_NAME, CONFIG_NAME, JOURNAL_NAME):
        for stale in path.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _current(folder: Path, name: str) -> Path:
    """Where ``name`` is now, as a reader sees it: a save interrupted after its commit point
    counts as done (without writing anything, so read-only folders work)."""
    renames = _journal(folder)
    if renames is not None:
        for src, dst in renames:
            if dst == name and (folder / src).exists():
                return folder / src
    return folder / name


def adapter_folder(root: str | os.PathLike[str], adapter_name: str) -> Path:
    """Where ``save_pretrained(root)`` writes adapter ``adapter_name``: ``root`` itself for
    ``"default"``, ``root/<name>`` for any other (PEFT's layout)."""
    return Path(root) if adapter_name == "default" else Path(root) / adapter_name


def write_adapter(
    folder: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Write one adapter so that a crash at any point leaves the old adapter or the new one.

    Both files are written completely to temporary names first; then a commit record naming
    the two renames is written atomically (the commit point); then the renames happen and the
    record is deleted. A reader (and the next save) completes a committed save that was cut
    off between the renames, and ignores the temporary files of an uncommitted one.
    """
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    recover(out)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    weights = _write_temp(out, WEIGHTS_NAME, lambda tmp: save_file(clean, tmp, {"format": "pt"}))
    try:
        conf = _write_temp(out, CONFIG_NAME, write_json)
    except BaseException:
        weights.unlink(missing_ok=True)
        raise
    renames = [(weights.name, WEIGHTS_NAME), (conf.name, CONFIG_NAME)]
    try:
        _atomic_write(out / JOURNAL_NAME, lambda tmp: Path(tmp).write_text(
            json.dumps({"renames": renames}), encoding="utf-8"))  # fmt: skip
    except BaseException:
        weights.unlink(missing_ok=True)
        conf.unlink(missing_ok=True)
        raise
    _roll_forward(out, renames)
    return out


#: What a Hugging Face Hub repo id looks like (``owner/name``); anything else is a local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
#: The keyword arguments PEFT passes on to the Hub download, accepted here too.
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download")


def resolve_adapter_dir(
    model_id: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    caller: str = "resolve_adapter_dir",
    **hub: Any,
) -> Path:
    """The local folder of an adapter: ``model_id`` itself (joined with ``subfolder``) when it
    exists, otherwise a Hugging Face Hub repo id (``owner/name``) fetched with
    ``huggingface_hub.snapshot_download`` (only the adapter's files; cached; honours
    ``HF_HUB_OFFLINE``). ``hub`` takes PEFT's download arguments (:data:`HUB_KWARGS`); any
    other is refused, naming ``caller``."""
    unknown = sorted(set(hub) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(
            f"{caller} got unexpected arguments {unknown}; Hub downloads take {list(HUB_KWARGS)}"
        )
    subfolder = hub.pop("subfolder", None) or ""
    local = Path(model_id) / subfolder
    if local.exists() or not isinstance(model_id, str) or not _REPO_ID.match(model_id):
        return local
    if ".." in model_id or (subfolder and ".." in Path(subfolder).parts):
        raise CheckpointError(f"{model_id!r}: '..' is not allowed in a Hub repo id or subfolder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"no local folder {model_id!r}; to load it from the Hugging Face Hub, "
            "`pip install huggingface_hub`"
        ) from exc
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    names = [CONFIG_NAME, WEIGHTS_NAME, *(PICKLE_NAMES if allow_pickle else ())]
    try:
        snapshot = snapshot_download(
            repo_id=model_id, allow_patterns=[prefix + n for n in names], **hub
        )
    except Exception as exc:  # hub errors: not found, offline and not cached, HTTP, auth
        raise CheckpointError(
            f"no local folder {model_id!r}, and loading it from the Hugging Face Hub failed: "
            f"{type(exc).__name__}: {_first_line(exc)}. "
            "Check the path or the repo id; offline (HF_HUB_OFFLINE=1) only adapters already "
            "in the Hub cache load"
        ) from exc
    return Path(snapshot) / subfolder


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else "(no message)"


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder)
    if not path.exists():
        raise CheckpointError(f"no adapter at {str(path)!r}: the folder does not exist")
    file = _current(path, CONFIG_NAME)
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


def read_tensors(
    folder: str | os.PathLike[str], *, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors``.

    A folder holding only a pickle file (``adapter_model.bin``) is refused unless
    ``allow_pickle=True``, which loads it with ``torch.load(weights_only=True)`` (tensors and
    plain containers only: no code runs). Only do that for files you trust.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    file = _current(path, WEIGHTS_NAME)
    if not file.is_file():
        pickled = [n for n in PICKLE_NAMES if (path / n).is_file()]
        if pickled and allow_pickle:
            return _read_pickle(path / pickled[0])
        if pickled:
            raise CheckpointError(
                f"{str(path)!r} holds only {pickled[0]}, a pickle file, which adapt does not "
                "load by default. If you trust it, pass allow_pickle=True (it is read with "
                "torch.load(weights_only=True)), or convert it to safetensors once: "
                "safetensors.torch.save_file(torch.load(f, weights_only=True), "
                "'adapter_model.safetensors')"
            )
        raise CheckpointError(f"{str(path)!r} holds no {WEIGHTS_NAME}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated and cannot be read: {exc}") from exc


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{file} cannot be loaded with torch.load(weights_only=True): {exc}"
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(f"{file} does not hold a flat dict of named tensors")
    return dict(data)
