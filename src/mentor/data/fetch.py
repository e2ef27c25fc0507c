"""``mentor data fetch NAME [--to DIR]``: download the official files and verify their SHA-256.

A download streams into a hidden temporary file beside its destination and is renamed to its final
name only after the checksum matched, so a half-downloaded or tampered file never sits where a loader
would pick it up; the temporary file is removed on every failure, interrupts included.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mentor.data.errors import DataError
from mentor.data.sources import default_fetch_dir, get_source

log = logging.getLogger(__name__)

# opener(url) returns a context manager with .read(n) (and optionally .headers), like urlopen's reply.
Opener = Callable[[str], Any]
_TIMEOUT_S = 60


def _urlopen(url: str) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": "mentor-data-fetch"})
    return urllib.request.urlopen(request, timeout=_TIMEOUT_S)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _content_length(reply: Any) -> int | None:
    headers = getattr(reply, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def download_file(url: str, dest: str | Path, sha256: str | None, *, verify: bool = True,
                  opener: Opener | None = None, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, verified against ``sha256`` (hex) before it gets its final name."""
    dest = Path(dest)
    if verify and sha256 is None:
        raise DataError(f"{dest.name} ({url}) has no published SHA-256 known to mentor, so the file "
                        f"could not be verified; refusing to fetch it. Pass verify=False "
                        f"(`mentor data fetch ... --no-verify`) to accept it unverified.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest, received = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, (opener or _urlopen)(url) as reply:
            expected = _content_length(reply)
            while chunk := reply.read(chunk_size):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        if expected is not None and received != expected:
            raise DataError(f"download of {url} was interrupted after {received:,} of {expected:,} bytes; "
                            f"nothing was written to {dest}; run the fetch again")
        got = digest.hexdigest()
        if verify and got != sha256:
            raise DataError(f"checksum mismatch for {dest.name} from {url}: SHA-256 {got}, expected "
                            f"{sha256}; the file was discarded (a changed or corrupted download); retry, "
                            f"and if it persists, report it")
        os.replace(tmp, dest)
        log.info("fetched %s (%s bytes) -> %s", url, f"{received:,}", dest)
        return dest
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DataError(f"download of {url} failed after {received:,} bytes ({type(e).__name__}: {e}); "
                        f"nothing was written to {dest}; check the connection and run the fetch again, "
                        f"or download the file by hand into {dest.parent}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(name: str, to: str | Path | None = None, *, verify: bool = True,
          opener: Opener | None = None) -> list[Path]:
    """Download dataset ``name``'s official files into ``to`` (default ``$MENTOR_DATA/<name>`` or
    ``~/.cache/mentor/<name>``, both on the load search path); returns the files' paths.

    Files already present with the right checksum are kept. ``opener(url)`` replaces ``urlopen``
    (tests pass an in-memory one).
    """
    source = get_source(name)
    if not source.downloads:
        source.load("test")  # digits: nothing to download, but say so clearly if sklearn is missing
        log.info("%s ships with its package; nothing to fetch", name)
        return []
    unverifiable = [d.filename for d in source.downloads if d.sha256 is None]
    if verify and unverifiable:
        raise DataError(f"{name}: no published SHA-256 known for {', '.join(unverifiable)}, so the files "
                        f"could not be verified; refusing. Pass verify=False (--no-verify) to fetch anyway.")
    target = Path(to).expanduser() if to is not None else default_fetch_dir(name)
    paths = []
    for d in source.downloads:
        dest = target / d.filename
        if dest.is_file() and d.sha256 is not None and sha256_file(dest) == d.sha256:
            log.info("%s is already there and verified", dest)
            paths.append(dest)
            continue
        paths.append(download_file(d.url, dest, d.sha256, verify=verify, opener=opener))
    return paths
