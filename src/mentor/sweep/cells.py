"""Cells: one ``mentor train`` run each, named by what makes it differ, validated before anything runs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, RunConfig, apply_overrides, load_config, parse_override, read_recipe

INDEX = "sweep.json"
LOG = "log.txt"


# --------------------------------------------------------------------------------------------------
# cells


def value_text(value: Any) -> str:
    """An override's value as text the recipe loader reads back to the same value (``2``, ``0.1``,
    ``[a, b]``, ``'2'`` for the string "2")."""
    if isinstance(value, str):
        try:
            if parse_override(f"k={value}")[1] == value:
                return value
        except ConfigError:
            pass
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,:@%\[\]{}-]")  # anything else in a folder name becomes "_"


def _name_part(key: str, value: Any) -> str:
    text = value_text(value).replace(", ", ",").replace(": ", ":")
    return _UNSAFE.sub("_", f"{key}={text}")


def point_name(point: Sequence[tuple[str, Any]]) -> str:
    """The folder name of one grid point: ``key=value`` pairs in key order, joined by commas; a name over
    120 characters is cut and ends with a hash of the whole, so that it stays unique and fits the file system."""
    name = ",".join(_name_part(k, v) for k, v in sorted(point))
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``mentor train RECIPE *overrides [grid point] [trainer.seed=k] out_dir=OUT``.

    ``overrides`` apply first, then the grid ``point`` (``(key, value)`` pairs), then the ``seed``
    (``trainer.seed``, when given) and ``out_dir``. ``name`` is the cell's name in tables and the index.
    """

    recipe: str
    out_dir: str
    overrides: tuple[str, ...] = ()
    point: tuple[tuple[str, Any], ...] = ()
    seed: int | None = None
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.out_dir

    def train_overrides(self) -> list[str]:
        """Every override of the cell's run, ``out_dir`` last."""
        out = [*self.overrides, *(f"{k}={value_text(v)}" for k, v in self.point)]
        if self.seed is not None:
            out.append(f"trainer.seed={self.seed}")
        return [*out, f"out_dir={self.out_dir}"]

    def entry(self) -> dict[str, Any]:
        """The cell as ``sweep.json`` lists it (without its status)."""
        return {"name": self.label, "recipe": self.recipe, "overrides": list(self.overrides),
                "grid": {k: v for k, v in self.point}, "seed": self.seed, "out_dir": self.out_dir}


def make_cells(root: str | Path, recipes: Sequence[str | Path], overrides: Sequence[str] = (),
               grid: dict[str, Sequence[Any]] | None = None, seeds: Sequence[int] | None = None,
               by_recipe: bool = True) -> list[Cell]:
    """The cross product recipes × grid × seeds under ``root``, in that order (the last varies fastest).

    A cell lives in ``root/<recipe stem>/<point>/seed<k>``: without ``by_recipe`` (one recipe) the stem is
    left out, without a grid the point, without seeds the seed."""
    grid = grid or {}
    keys = list(grid)
    points: list[tuple[tuple[str, Any], ...]] = [()]
    for key in keys:
        points = [(*p, (key, v)) for p in points for v in grid[key]]
    cells = []
    for recipe in recipes:
        for point in points:
            for seed in (seeds if seeds is not None else [None]):
                parts = [Path(recipe).stem] if by_recipe else []
                parts += [point_name(point)] if point else []
                parts += [f"seed{seed}"] if seed is not None else []
                name = "/".join(parts) or Path(recipe).stem
                cells.append(Cell(str(recipe), str(Path(root) / name), tuple(overrides), point, seed, name))
    return cells


# --------------------------------------------------------------------------------------------------
# what a cell's folder holds


@dataclass
class CellResult:
    """What became of one cell: ``done`` (trained now), ``skipped`` (finished before), ``failed``,
    ``interrupted`` (stopped by a signal, ``last.pt`` kept), ``running`` (another process holds its
    folder) or ``pending`` (not started)."""

    cell: Cell
    status: str
    resumed: bool = False
    seconds: float | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None
    job: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    def entry(self) -> dict[str, Any]:
        out = {**self.cell.entry(), "status": self.status, "resumed": self.resumed,
               "seconds": None if self.seconds is None else round(self.seconds, 1), "error": self.error,
               "log": str(Path(self.cell.out_dir) / LOG)}
        if self.job:
            out["job"] = self.job
        if self.summary:
            out["result"] = headline(self.summary)
        return out


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers a table shows: the selection metric (best) and its test counterparts."""
    select = str(summary.get("select", "val_acc"))
    base = select[len("val_"):] if select.startswith("val_") else select
    keys = [f"{select}_best", f"test_{base}_last", f"test_{base}_best", "steps", "world_size"]
    return {k: summary[k] for k in keys if k in summary}


def lock_owner(out_dir: Path) -> str | None:
    """Who holds the run's lock, if a live process (or one on another machine) does."""
    from ..engine.rundir import LOCK, _alive

    try:
        owner = json.loads((out_dir / LOCK).read_text())
    except (OSError, ValueError):
        return None
    pid, host = owner.get("pid"), owner.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        return None  # stale: the engine takes it over
    return f"process {pid} on {host} (since {owner.get('started', '?')})"


def cell_state(cell: Cell, cfg: RunConfig) -> tuple[str, dict[str, Any] | None]:
    """(``finished`` | ``running`` | ``interrupted`` | ``new``, summary of a finished run) of a cell's folder.

    Raises :class:`mentor.errors.CheckpointMismatchError` when the folder holds a run of another recipe."""
    from ..engine.rundir import RunDir

    rundir = RunDir(cell.out_dir)
    summary = rundir.finished(cfg, say=False)
    if summary is not None:
        return "finished", summary
    if lock_owner(Path(cell.out_dir)):
        return "running", None
    return ("interrupted" if (Path(cell.out_dir) / "last.pt").is_file() else "new"), None


def _validation_config(cell: Cell, machine: bool) -> RunConfig:
    """The cell's validated recipe. ``machine=False`` (cells that run elsewhere, e.g. on Slurm nodes) leaves
    the CUDA checks to the machine that runs the cell."""
    overrides = cell.train_overrides()
    if machine:
        return load_config(cell.recipe, overrides)
    cfg = load_config(cell.recipe, [*overrides[:-1], "trainer.device=auto", "trainer.cuda_graph=false",
                                    overrides[-1]])
    trainer = apply_overrides(read_recipe(cell.recipe), overrides).get("trainer") or {}
    cfg.trainer.device = str(trainer.get("device", cfg.trainer.device))
    cfg.trainer.cuda_graph = bool(trainer.get("cuda_graph", False))
    return cfg


def prepare(cells: Sequence[Cell], machine: bool = True) -> list[tuple[Cell, RunConfig, str, dict | None]]:
    """Validate every cell before anything runs: its recipe and overrides, a folder of its own, and that its
    folder holds nothing but a run of the same recipe. Returns (cell, config, state, summary) per cell;
    raises one :class:`ConfigError` naming the first bad cell (and how many are bad) otherwise."""
    seen: dict[str, str] = {}
    out, errors = [], []
    for cell in cells:
        key = os.path.normpath(cell.out_dir)
        if key in seen:
            errors.append(f"cells {seen[key]!r} and {cell.label!r} share the folder {cell.out_dir!r}; every cell "
                          "needs a folder of its own (values that differ only in characters a folder name cannot "
                          "hold map to one name)")
            continue
        seen[key] = cell.label
        try:
            cfg = _validation_config(cell, machine)
            state, summary = cell_state(cell, cfg)
        except ConfigError as e:
            errors.append(f"cell {cell.label!r} (recipe {cell.recipe}): {e}")
            continue
        out.append((cell, cfg, state, summary))
    if errors:
        more = f" ({len(errors) - 1} more cell(s) are invalid too)" if len(errors) > 1 else ""
        raise ConfigError(f"{errors[0].rstrip('.')}{more}. Nothing was started.")
    return out


