"""Sweep files and ``mentor train --seeds/--grid``: what a sweep is, checked before it runs."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_overrides, from_dict, parse_override, read_recipe
from .cells import INDEX, LOG, Cell, CellResult, make_cells, prepare
from .launch import Launcher, LocalLauncher, SlurmLauncher, make_launcher, train_argv
from .run import run_cells

# --------------------------------------------------------------------------------------------------
# sweep files and `mentor train --seeds/--grid`


@dataclass
class SweepFile:
    """The keys of a sweep file (see :mod:`mentor.sweep`)."""

    out: str | None = None
    recipes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None
    launcher: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sweep:
    """Cells under one root, with the launcher that runs them and ``sweep.json`` at the root."""

    root: Path
    cells: list[Cell]
    launcher: Launcher
    source: str

    @property
    def index(self) -> Path:
        return self.root / INDEX

    def run(self, echo: Callable[[str], None] = print) -> list[CellResult]:
        """Run the cells not finished (:func:`run_cells`); ``sweep.json`` lists exactly this sweep's cells."""
        return run_cells(self.cells, self.launcher, self.index, header={"sweep": self.source, "root": str(self.root)},
                         merge=False, echo=echo)

    def dry_run(self, echo: Callable[[str], None] = print) -> list[tuple[Cell, str]]:
        """Validate and list the cells with their state; nothing is written."""
        self.launcher.check()
        states = [(c, s) for c, _, s, _ in prepare(self.cells, machine=self.launcher.machine_checks)]
        width = max(len(c.label) for c, _ in states)
        for c, s in states:
            echo(f"{c.label.ljust(width)}  {s:<11}  mentor train {shlex.join(train_argv(c)[4:])}")
        tally = {s: sum(x == s for _, x in states) for s in ("new", "interrupted", "finished", "running")}
        echo(f"{len(states)} cells under {self.root} ({', '.join(f'{n} {s}' for s, n in tally.items() if n)}); "
             "nothing was run (--dry-run)")
        return states


def _listing(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _flat_grid(grid: dict[str, Any], where: str, prefix: str = "") -> dict[str, list[Any]]:
    """``{method: {beta: [1, 2]}}`` and ``{method.beta: [1, 2]}`` alike; a scalar is one value."""
    out: dict[str, list[Any]] = {}
    for k, v in grid.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat_grid(v, where, key))
            continue
        values = list(v) if isinstance(v, (list, tuple)) else [v]
        if not values:
            raise ConfigError(f"{where}: grid.{key} has no values; give a list such as [2, 4, 8], or remove it")
        out[key] = values
    return out


def _check_keys(grid: dict[str, list[Any]], overrides: Sequence[str], seeds: list[int] | None, where: str) -> None:
    for text in overrides:
        path, _ = parse_override(text)
        if path == ["out_dir"]:
            raise ConfigError(f"{where}: override {text!r}: out_dir is set per cell by the sweep (under its root); "
                              "remove it")
    for key in grid:
        if key == "out_dir":
            raise ConfigError(f"{where}: grid.out_dir: every cell's out_dir is set by the sweep; remove it")
        if key == "trainer.seed" and seeds is not None:
            raise ConfigError(f"{where}: grid.trainer.seed and seeds both set the seed; keep seeds")
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"{where}: grid key {key!r} is not a dotted recipe key such as method.temperature")
    if seeds is not None:
        if not seeds:
            raise ConfigError(f"{where}: seeds is empty; list at least one, or remove the key")
        bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        if bad:
            raise ConfigError(f"{where}: seeds must be whole numbers >= 0, got {bad[0]!r}")
        if len(set(seeds)) < len(seeds):
            raise ConfigError(f"{where}: seeds lists a seed twice ({seeds}); list each once")


def _recipe_path(text: str, base: Path, where: str) -> str:
    """A recipe path as given (relative to the current folder), else relative to the sweep file's folder."""
    p = Path(text)
    if not p.is_absolute() and not p.exists() and (base / p).exists():
        p = base / p
    if not p.is_file():
        raise ConfigError(f"{where}: recipe {text!r} not found (looked in the current folder and beside the sweep "
                          "file); fix the path in recipes")
    return str(p)


def load_sweep(path: str | Path, processes: int | None = None) -> Sweep:
    """Read and check a sweep file (unknown keys, missing recipes, bad grid or seeds raise :class:`ConfigError`
    naming them); ``processes`` replaces the local launcher's (the Slurm launcher's ``parallelism``)."""
    path = Path(path)
    where = f"sweep {str(path)!r}"
    raw = read_recipe(path) if path.is_file() else None
    if raw is None:
        raise ConfigError(f"{where} not found; give a sweep file (out, recipes, overrides, grid, seeds, launcher)")
    raw = dict(raw)
    for key in ("recipes", "overrides"):
        if key in raw:
            raw[key] = _listing(raw[key])
    if isinstance(raw.get("seeds"), int) and not isinstance(raw.get("seeds"), bool):
        raw["seeds"] = [raw["seeds"]]
    try:
        spec = from_dict(SweepFile, raw)
        launcher = make_launcher(spec.launcher)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not spec.recipes:
        raise ConfigError(f"{where}: recipes is missing or empty; list the recipe files to sweep, e.g. "
                          "recipes: [recipes/supervised/digits_resnet8.yaml]")
    grid = _flat_grid(spec.grid, where)
    _check_keys(grid, spec.overrides, spec.seeds, where)
    recipes = [_recipe_path(r, path.parent, f"{where}: recipes[{i}]") for i, r in enumerate(spec.recipes)]
    stems = {}
    for r in recipes:
        if Path(r).stem in stems and stems[Path(r).stem] != r:
            raise ConfigError(f"{where}: recipes {stems[Path(r).stem]} and {r} have the same name {Path(r).stem!r}, "
                              "which names their cells' folders; copy one under another name")
        stems[Path(r).stem] = r
    if processes is not None:
        launcher = _with_processes(launcher, processes)
    root = Path(spec.out or f"runs/sweeps/{path.stem}")
    cells = make_cells(root, recipes, spec.overrides, grid, spec.seeds, by_recipe=True)
    return Sweep(root, cells, launcher, str(path))


def _with_processes(launcher: Launcher, processes: int) -> Launcher:
    if processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {processes}")
    if isinstance(launcher, SlurmLauncher):
        return dataclasses.replace(launcher, parallelism=processes)
    return dataclasses.replace(launcher, processes=processes)


def split_values(text: str) -> list[str]:
    """``2,4,[8,16]`` -> ``["2", "4", "[8,16]"]``: commas inside brackets, braces or quotes do not split."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def parse_grid_args(args: Sequence[str]) -> dict[str, list[Any]]:
    """``["method.beta=2,4,8", ...]`` (the ``--grid`` options) -> ``{"method.beta": [2, 4, 8]}``."""
    grid: dict[str, list[Any]] = {}
    for text in args:
        if "=" not in text:
            raise ConfigError(f"--grid {text!r} must look like key.sub=v1,v2,... (e.g. --grid method.beta=2,4,8)")
        key, values = text.split("=", 1)
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one: --grid {key}=v1,v2")
        parsed = []
        for piece in split_values(values):
            if not piece.strip():
                raise ConfigError(f"--grid {text!r}: an empty value; separate values by single commas")
            parsed.append(parse_override(f"{key}={piece}")[1])
        grid[key] = parsed
    return grid


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` (the ``--seeds`` option) -> ``[0, 1, 2]``."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be whole numbers separated by commas, e.g. --seeds 0,1,2") from None


def train_sweep(recipe: str, overrides: Sequence[str], seeds: str | None, grid: Sequence[str],
                processes: int | None = None) -> Sweep:
    """``mentor train RECIPE --seeds 0,1,2 --grid key=v1,v2 ...`` as a sweep: its cells live under the recipe's
    ``out_dir`` (an ``out_dir=`` override counts), else ``runs/<recipe stem>``."""
    where = f"mentor train {recipe}"
    raw = apply_overrides(read_recipe(recipe), list(overrides))
    common = [o for o in overrides if parse_override(o)[0] != ["out_dir"]]
    seed_list = parse_seeds(seeds) if seeds else None
    grid_map = parse_grid_args(grid)
    _check_keys(grid_map, common, seed_list, where)
    root = Path(str(raw.get("out_dir") or f"runs/{Path(recipe).stem}"))
    launcher = LocalLauncher(processes=processes)
    if processes is not None:
        launcher = _with_processes(launcher, processes)
    cells = make_cells(root, [recipe], common, grid_map, seed_list, by_recipe=False)
    command = shlex.join(["mentor", "train", recipe, *overrides,
                          *(["--seeds", seeds] if seeds else []), *[x for g in grid for x in ("--grid", g)]])
    return Sweep(root, cells, launcher, command)


def execute(sweep: Sweep, dry_run: bool = False, echo: Callable[[str], None] = print) -> int:
    """Run (or with ``dry_run`` list) a sweep; the exit status: 0 when every cell has finished, 1 otherwise."""
    if dry_run:
        sweep.dry_run(echo)
        return 0
    results = sweep.run(echo)
    bad = [r for r in results if not r.ok]
    if bad:
        kinds = sorted({r.status for r in bad})
        echo(f"{len(bad)} of {len(results)} cells {'/'.join(kinds)}; logs in each cell's {LOG}, index in "
             f"{sweep.index}. Run the same command again to rerun them (finished cells are skipped).")
        return 1
    return 0
