"""Atomic file writes and checkpoints that ``torch.load(..., weights_only=True)`` can read."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..fileio import atomic_write_bytes as atomic_write_bytes
from ..fileio import atomic_write_text as atomic_write_text


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, ...
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                              "delete it to restart, or point to another checkpoint") from None


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and plain Python data (weights_only-safe)."""
    py = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# networks saved by runs (teachers, source models, init_from)


def find_checkpoint(path: str | Path, what: str = "run") -> Path:
    """The checkpoint of a run directory (best.pt, else last.pt) or the file itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{what} {str(p)!r} holds no best.pt or last.pt: train it first "
                              f"(mentor train RECIPE out_dir={p})")
    if p.is_file():
        return p
    raise CheckpointError(f"{what} {str(p)!r} not found: give the run directory or checkpoint of a "
                          "`mentor train` run")


def network_state(state: dict[str, Any], file: Path) -> dict[str, Any]:
    """The deployable network's weights in a checkpoint: best.pt's ``model``, or the student of a
    supervised run's last.pt."""
    if "model" in state:
        return state["model"]
    if "method" in state and state.get("info", {}).get("method") == "supervised":
        prefix = "student."
        return {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
    raise CheckpointError(f"{file} holds no network weights usable here (use best.pt of the run)")


def run_info(path: str | Path, what: str = "run") -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(checkpoint file, its ``info`` (model, classes, shape, dataset, normalisation), its weights)."""
    file = find_checkpoint(path, what)
    state = load(file)
    info = state.get("info")
    if not info:
        raise CheckpointError(f"{file} does not say which network it holds (no 'info'): retrain it")
    return file, info, network_state(state, file)
