"""Atomic file writes: a temporary file in the target folder, fsync, then a rename, so a reader (or a run
killed half-way) never sees half a file; the result has the mode a plain ``open()`` would give it."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_text", "atomic_torch_save", "is_temporary", "remove_stale_temporaries"]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    if path.is_dir():        # else the rename's error would name the temporary file, not the target
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (or keep the replaced file's mode)
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0o022)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise



def atomic_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (the whole file is serialised in memory first)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is one of :func:`atomic_write`'s temporary files (``.<name>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_stale_temporaries(folder: Path, min_age_s: float = 60.0) -> int:
    """Delete the temporary files a killed writer left under ``folder`` (older than ``min_age_s``, so a write in
    progress in another process is never touched). Returns how many were removed."""
    import time

    removed, now = 0, time.time()
    if not folder.is_dir():
        return 0
    for path in folder.rglob(".*.tmp"):
        try:
            if path.is_file() and not path.is_symlink() and now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:      # another process finished or removed it meanwhile
            continue
    return removed
