"""Crash-safe file writes, once: a temporary file beside the target, fsynced, renamed over it,
and the folder fsynced so the rename itself is durable (tier 1: no adapt imports but errors);
and how an adapter file's tensor names split into module and tensor (:func:`split_key`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under the usual 022):
    ``mkstemp`` creates 0600, which other users and containers reading the adapter cannot read."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """fsync a file, or a folder (skipped on platforms without directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open folders
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        if not folder:
            raise
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fsync_path(folder, folder=True)


def write_temp(folder: Path, name: str, write: Callable[[str], object]) -> Path:
    """Write a complete, fsynced temporary file next to ``folder / name`` with ``write(path)``
    and return its path; on any error the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # the usual permissions (writers such as safetensors may recreate the file)
        os.chmod(tmp, new_file_mode())
        fsync_path(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Replace ``path`` atomically with what ``write(tmp_path)`` writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, path.name, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def split_key(key: str, prefixes: tuple[str, ...]) -> tuple[str, str]:
    """``base_model.model.<module>.<tensor>`` → ``(module, tensor)``: the tensor part begins at
    the first segment that starts with one of ``prefixes``, else it is the last segment."""
    parts = key.removeprefix("base_model.model.").split(".")
    cut = next((i for i, p in enumerate(parts) if p.startswith(prefixes)), len(parts) - 1)
    return ".".join(parts[:cut]), ".".join(parts[cut:])
