"""Writes that never leave half a file: a temporary file in the same folder, flushed to disk, then a
rename, then the folder itself flushed, so that after a crash or power loss a reader finds either the
old file or the whole new one. Temporary files left by a killed writer are named so that
:func:`remove_stale_temporaries` can find them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    # Mode 0o666 lets the umask decide the permissions, as for any other file the user writes
    # (tempfile.mkstemp would make it private to the user).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never part."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted writes in ``folder`` (call it only while no other
    process writes there, e.g. under the run directory's lock); returns what was removed."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        parts = p.name.split(".")
        # .<name>.<pid>.<hex8>.tmp
        if len(parts) >= 5 and parts[-3].isdigit() and len(parts[-2]) == 8 and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
