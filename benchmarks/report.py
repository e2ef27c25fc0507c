"""Statistics shared by the benchmark reports: mean ± std over seeds and paired gains (PROTOCOL.md)."""

from __future__ import annotations

import math

from mentor.report import tables


def mean_std(xs: list[float]) -> str:
    """Accuracies in [0, 1] as "mean ± std" in percent over seeds (NaNs dropped; "–" when none); the statistics
    of ``mentor report`` (:mod:`mentor.report.tables`)."""
    m, sd, n = tables.mean_std([x for x in xs if not math.isnan(x)])
    if n == 0:
        return "–"
    return f"{100 * m:.2f} ± {100 * (sd if n > 1 else 0.0):.2f}"


def paired_gain(xs: list[float], base: list[float]) -> str:
    """Mean ± std of the per-seed differences to the baseline (paired by position), in points; * where
    |mean| > 2 std, as ``mentor report`` marks a clear gain."""
    gain = tables.paired_gain(dict(enumerate(xs)), dict(enumerate(base)))
    if gain is None:
        return "–"
    return f"{100 * gain.mean:+.2f} ± {100 * (gain.std if gain.n > 1 else 0.0):.2f}" + (" *" if gain.clear else "")


def write_report(out, text: str, t0: float) -> None:
    """Write ``text`` to ``<out>/report.md``, print it and the minutes since ``t0``."""
    import time
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print(text)
    print(f"({(time.time() - t0) / 60:.1f} min)")


def train_cells(items, jobs: int = 1, threads: int | None = None, index=None, required: bool = False) -> list[str]:
    """Train every ``(recipe, run directory, overrides)`` of ``items`` whose directory holds no summary.json, ``jobs``
    at a time, each in a process of its own (``mentor.sweep.run_cells``: one GPU per process where there are GPUs,
    shared when ``jobs`` is larger; each run's output in its ``log.txt``; ``index`` lists them with their status). A
    failed run is reported and the others go on; ``required`` stops the benchmark when any failed (later runs need
    them). Returns the failed runs' directories."""
    import sys
    from pathlib import Path

    from mentor.sweep import Cell, LocalLauncher, run_cells, visible_gpus

    base = Path(index).parent if index is not None else Path(".")

    def name(run) -> str:  # the run's folder, relative to the index's where it lies below it
        return str(Path(run).relative_to(base)) if Path(run).is_relative_to(base) else str(run)

    cells = [Cell(str(recipe), str(run), tuple(map(str, overrides)), name=name(run)) for recipe, run, overrides in items
             if not (Path(run) / "summary.json").is_file()]
    print(f"{len(items)} runs, {len(cells)} to train", flush=True)
    if not cells:
        return []
    gpus = visible_gpus()
    launcher = LocalLauncher(processes=jobs, per_gpu=max(1, -(-jobs // len(gpus))) if gpus else 1, threads=threads)
    failed = [r.cell.out_dir for r in run_cells(cells, launcher, index) if not r.ok]
    if failed and required:
        sys.exit(f"{len(failed)} run(s) that later runs need did not finish: {', '.join(failed)} (see log.txt there)")
    return failed


def train_job(run_dir, recipe, args: list[str]) -> str:
    """Train one benchmark run (recipe and overrides) into ``run_dir``; one line saying how long it took and
    whether it finished or failed (a failure is reported, not raised, so the rest of a sweep goes on)."""
    import time
    from pathlib import Path

    from mentor.config import load_config
    from mentor.engine import train
    from mentor.errors import MentorError

    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        train(load_config(recipe, args))
        status = "ok"
    except (MentorError, RuntimeError, ValueError) as e:
        status = f"FAILED: {type(e).__name__}: {str(e)[-400:]}"
    return f"{run_dir}: {time.time() - t0:.0f}s {status}"
