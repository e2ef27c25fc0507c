"""Checkpoints: written atomically and flushed to disk, readable with ``torch.load(weights_only=True)``,
carrying a checksum of their contents that every load verifies, and never holding a non-finite value.

A checkpoint is a mapping of tensors and plain data. :func:`atomic_save` moves it to the host, adds
``checksum`` (BLAKE2b over every tensor's dtype, shape and bytes and every other value, in order) and
writes it through a temporary file. :func:`load` recomputes the checksum (random bytes inside a tensor
are caught) and refuses non-finite floating-point values. Checkpoints written before checksums were
introduced load without the check.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..fileio import atomic_write
from ..fileio import atomic_write_bytes as atomic_write_bytes
from ..fileio import atomic_write_text as atomic_write_text

CHECKSUM = "checksum"


def _walk(obj: Any, name: str = ""):
    """(dotted name, leaf) of every leaf of a nested mapping/list, in order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{name}[{i}]")
    else:
        yield name, obj


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


def digest(obj: Any) -> str:
    """A checksum of a checkpoint's contents (host tensors), independent of the file's encoding."""
    h = hashlib.blake2b(digest_size=16)
    for name, leaf in _walk(obj):
        if name == CHECKSUM:
            continue
        if isinstance(leaf, Tensor):
            t = leaf.detach().contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{tuple(leaf.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{name}={leaf!r}|".encode())
    return h.hexdigest()


def nonfinite(obj: Any) -> list[str]:
    """Names of the floating-point tensors of ``obj`` holding NaN or inf (one host read for all of them)."""
    named = [(n, t) for n, t in _walk(obj) if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]
    if not named:
        return []
    flags = [torch.isfinite(t.detach()).all().reshape(1) for _, t in named]
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    ok = [True] * len(named)
    for idx in by_device.values():
        for i, v in zip(idx, torch.cat([flags[i] for i in idx]).tolist()):
            ok[i] = v
    return [n for (n, _), good in zip(named, ok) if not good]


def describe(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({', '.join(names[:limit])}{more})"


def atomic_save(obj: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint: host copies of its tensors plus their checksum, through a temporary file, the
    file and its folder flushed to disk. Refuses non-finite values (callers check before, to say why)."""
    host = _map_tensors(obj, lambda t: t.detach().cpu())
    bad = nonfinite(host)
    if bad:
        raise CheckpointError(f"refusing to write {path}: it would hold non-finite values in {describe(bad)}")
    host[CHECKSUM] = digest(host)
    atomic_write(path, lambda f: torch.save(host, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint (checksum, finite values); tensors end on ``map_location``."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}; point to a .pt file written by mentor train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, ...
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e}); "
                              "delete it to restart, or point to another checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a mentor checkpoint (it holds a {type(state).__name__}, not a "
                              "mapping); point to last.pt or best.pt of a run")
    saved = state.get(CHECKSUM)
    if saved is not None and saved != digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the checksum written with "
                              "them (a damaged disk or copy); restore it from a backup, or delete it to restart")
    bad = nonfinite(state)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {describe(bad)}; it cannot be used. "
                              "Use an earlier checkpoint, or retrain")
    state.pop(CHECKSUM, None)
    if torch.device(map_location) != torch.device("cpu"):
        state = _map_tensors(state, lambda t: t.to(map_location))
    return state


def require(state: dict[str, Any], keys: tuple[str, ...], path: str | Path, what: str = "last.pt of a run") -> None:
    """A clear error naming the entries a checkpoint lacks."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(repr(k) for k in missing)}: it is not a complete "
                              f"{what} (written by another tool or an older mentor); delete it to restart, or "
                              "point to another checkpoint")


def load_weights(module: nn.Module, weights: dict[str, Tensor], file: str | Path, what: str,
                 optional: tuple[str, ...] = ()) -> None:
    """Load ``weights`` into ``module``, naming every missing and unexpected entry and every tensor whose
    shape differs (both shapes); entries under the prefixes ``optional`` may be absent."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights and not k.startswith(optional)]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} is {tuple(weights[k].shape)} in the checkpoint but {tuple(v.shape)} here"
              for k, v in expected.items()
              if isinstance(v, Tensor) and isinstance(weights.get(k), Tensor) and weights[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append("shapes differ: " + "; ".join(shapes[:3]) + (f"; and {len(shapes) - 3} more" if len(shapes) > 3
                                                                     else ""))
    if missing:
        problems.append(f"missing {describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {describe(unexpected)}")
    if problems:
        raise CheckpointError(f"{file} does not fit {what}: {'; '.join(problems)}")
    module.load_state_dict(weights, strict=False)


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
            if (p / name).exists():
                raise CheckpointError(f"{p / name} is not a file: move it away (a run directory holds best.pt and "
                                      "last.pt as files written by mentor train)")
        raise CheckpointError(f"{what} {str(p)!r} holds no best.pt or last.pt: it is not the run directory of a "
                              f"`mentor train` run that has saved a checkpoint; train it first (mentor train RECIPE "
                              f"out_dir={p})")
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
