"""Running cells: skip the finished, resume the interrupted, rerun the failed; ``sweep.json`` and the table."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cells import Cell, CellResult, headline, lock_owner, prepare
from .launch import Job, Launcher, LocalLauncher, SlurmLauncher

# --------------------------------------------------------------------------------------------------
# running cells: index and table


class _Index:
    """``sweep.json``: every cell with its status, rewritten (atomically) as cells end."""

    def __init__(self, path: str | Path | None, header: dict[str, Any], merge: bool):
        self.path = Path(path) if path is not None else None
        self.header = header
        self.kept: list[dict[str, Any]] = []
        if self.path is not None and merge and self.path.is_file():
            try:
                self.kept = list(json.loads(self.path.read_text()).get("cells", []))
            except (OSError, ValueError, AttributeError):
                self.kept = []

    def write(self, results: Sequence[CellResult]) -> None:
        if self.path is None:
            return
        from ..fileio import atomic_write_text

        mine = [r.entry() for r in results]
        dirs = {e["out_dir"] for e in mine}
        cells = [e for e in self.kept if e.get("out_dir") not in dirs] + mine
        counts: dict[str, int] = {}
        for e in cells:
            counts[e["status"]] = counts.get(e["status"], 0) + 1
        data = {**self.header, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "counts": counts, "cells": cells}
        atomic_write_text(self.path, json.dumps(data, indent=2, default=str) + "\n")


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f}min"


def table(results: Sequence[CellResult]) -> str:
    """The final status of every cell, one line each (the error of a failed cell on the next line)."""
    rows = [("cell", "status", "time", "result")]
    for r in results:
        status = r.status + (" (resumed)" if r.resumed and r.status == "done" else "")
        head = headline(r.summary) if r.summary else {}
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in head.items()
                          if k.startswith(("test_", "val_")) and k.endswith("_last")) or ""
        rows.append((r.cell.label, status, _minutes(r.seconds), shown))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row, r in zip(rows, [None, *results]):
        lines.append("  ".join(x.ljust(w) for x, w in zip(row[:3], widths)) + "  " + row[3])
        if r is not None and r.error and not r.ok:
            lines.append(" " * 4 + r.error)
    return "\n".join(line.rstrip() for line in lines)


def run_cells(cells: Sequence[Cell], launcher: Launcher | None = None, index: str | Path | None = None, *,
              header: dict[str, Any] | None = None, merge: bool = True,
              echo: Callable[[str], None] = print) -> list[CellResult]:
    """Run every cell that is not finished; returns one :class:`CellResult` per cell, in order.

    Every cell is validated first (:func:`prepare`): one bad cell raises :class:`ConfigError` and nothing
    runs. Finished cells are skipped, interrupted ones resume from ``last.pt``, failed ones run again; a
    failing cell does not stop the others. ``index`` (a ``sweep.json``) lists every cell with its status,
    rewritten as cells end; with ``merge`` the entries of other cells already listed there are kept. The
    final table is echoed. Ctrl-C stops the running cells (they save ``last.pt``), writes the index and
    re-raises :class:`KeyboardInterrupt`.
    """
    launcher = launcher if launcher is not None else LocalLauncher()
    launcher.check()
    prepared = prepare(cells, machine=launcher.machine_checks)
    results: dict[int, CellResult] = {}
    jobs: list[Job] = []
    for i, (cell, cfg, state, summary) in enumerate(prepared):
        if state == "finished":
            results[i] = CellResult(cell, "skipped", summary=summary)
        elif state == "running":
            results[i] = CellResult(cell, "running", error=f"{cell.out_dir} is in use by "
                                    f"{lock_owner(Path(cell.out_dir))}; run the sweep again once it has finished")
        else:
            results[i] = CellResult(cell, "pending", resumed=state == "interrupted")
            jobs.append(Job(cell, cfg, state == "interrupted"))
    order = {id(c): i for i, (c, *_) in enumerate(prepared)}
    book = _Index(index, {"launcher": launcher.describe(), **(header or {})}, merge)
    lock = threading.Lock()
    resumed = sum(j.resumed for j in jobs)
    echo(f"{len(prepared)} cells: {sum(r.status == 'skipped' for r in results.values())} finished, "
         f"{len(jobs)} to run ({resumed} resuming), {sum(r.status == 'running' for r in results.values())} "
         "running elsewhere")
    ordered = lambda: [results[i] for i in range(len(prepared))]  # noqa: E731
    book.write(ordered())
    count = [0]

    def done(result: CellResult) -> None:
        with lock:
            results[order[id(result.cell)]] = result
            count[0] += 1
            more = f": {result.error}" if result.error and not result.ok else ""
            echo(f"[{count[0]}/{len(jobs)}] {result.status} {result.cell.label} ({_minutes(result.seconds)}){more}")
            book.write(ordered())

    try:
        if isinstance(launcher, SlurmLauncher):
            root = Path(index).parent if index is not None else Path(".")
            launcher.launch(jobs, done, root)
        else:
            launcher.launch(jobs, done)
    except KeyboardInterrupt:
        book.write(ordered())
        echo(table(ordered()))
        raise
    book.write(ordered())
    echo(table(ordered()))
    return ordered()


