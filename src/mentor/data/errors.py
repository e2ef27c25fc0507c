"""The one exception for data problems a user can cause (and fix).

Every ``DataError`` message names the file or folder involved and says what to do about it, so the
command line can print it as is, without a traceback.
"""

from __future__ import annotations

from pathlib import Path

from mentor.errors import DataError as DataError

FETCH_HINT = "mentor data fetch {name} [--to DIR]"


def refetch_hint(path: str | Path, name: str | None = None) -> str:
    """The standard fix for a damaged file: delete it and get it again."""
    if name is None:
        return f"delete {path} and download it again"
    return f"delete {path} and run `{FETCH_HINT.format(name=name)}`"
