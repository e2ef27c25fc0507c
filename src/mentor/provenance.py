"""What produced a run: the mentor version, the git commit of the sources (when they are a checkout) and
torch's version, recorded in ``config.yaml`` and ``summary.json``."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from . import __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout mentor is imported from, with ``+dirty`` when tracked files differ from it;
    None for an installed copy that is not a git checkout (or where git is missing)."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def provenance() -> dict[str, str | None]:
    """``{"mentor_version", "git_commit", "torch"}`` of this process."""
    import torch

    return {"mentor_version": __version__, "git_commit": git_commit(), "torch": str(torch.__version__)}


def header_comment() -> str:
    """The comment lines ``config.yaml`` starts with (YAML comments: the file stays a loadable recipe)."""
    p = provenance()
    return (f"# written by mentor {p['mentor_version']} (git {p['git_commit'] or 'unknown: not a checkout'}), "
            f"torch {p['torch']}\n")
