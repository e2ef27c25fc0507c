"""Assembling a report: runs -> groups -> tables and figures -> ``report.html`` and ``report.md``."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from ..errors import MentorError, ReportError
from ..fileio import atomic_write_bytes, atomic_write_text
from . import figures
from .collect import Run, find_runs
from .page import Image, Page
from .tables import (
    Group,
    Section,
    differences_table,
    domain_tables,
    group_runs,
    per_class_table,
    pool_details,
    runs_table,
    sections,
    summary_table,
)

FIGURES = "figures"


class _Figures:
    """Writes the PNGs of one report into ``<out>/figures`` under unique names."""

    def __init__(self, out: Path):
        self.folder = out / FIGURES
        self.written: set[str] = set()

    def add(self, stem: str, data: bytes | None, caption: str, pixels: bool = False) -> list[Image]:
        if data is None:
            return []
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_.")[:80] or "figure"
        name, i = f"{base}.png", 1
        while name in self.written:
            i += 1
            name = f"{base}_{i}.png"
        atomic_write_bytes(self.folder / name, data)
        self.written.add(name)
        return [Image(f"{FIGURES}/{name}", caption, pixels)]

    def remove_stale(self) -> None:
        """PNGs of an earlier report in the same folder that this one did not write."""
        for p in self.folder.glob("*.png"):
            if p.name not in self.written:
                p.unlink(missing_ok=True)


def _summary_sections(page: Page, secs: list[Section], figs: _Figures) -> None:
    for i, s in enumerate(secs):
        page.heading(s.title)
        if not s.columns:
            page.text("No finished run of these groups reports a test number yet.", "note")
        else:
            page.table(summary_table(s))
        page.table(differences_table(s.groups))
        for t in domain_tables(s):
            page.table(t)
        if s.groups[0].kind == "adapt":
            page.images(figs.add(f"streams_{i}", figures.stream_accuracy(s.groups),
                                 "Accuracy per stream, mean over seeds, one line per group"))


def _classifier_section(page: Page, groups: list[Group], figs: _Figures) -> None:
    groups = [g for g in groups if g.kind == "train" and g.metric == "acc"]
    if not groups:
        return
    page.heading("Per-class accuracy and calibration")
    page.text("From test_details.json, which the engine writes at the end of a classification run: the network "
              "deployed at the last step on the test split (held-out domains pooled). Confusion matrices and "
              "reliability diagrams pool the seeds of a group; ECE uses 15 equal-width confidence bins.", "meta")
    page.table(per_class_table(groups))
    missing = [r.label for g in groups for r in g.finished if r.details is None]
    if missing:
        page.notes([f"No test_details.json in {', '.join(missing)}: these runs were trained before per-class "
                    "numbers and calibration were recorded (or their method reports no plain accuracy); train "
                    "them again to include them here."])
    for g in groups:
        pooled = pool_details([r.details for r in g.finished if r.details])
        if pooled is None:
            continue
        n = sum(1 for r in g.finished if r.details)
        page.heading(g.name, 3)
        page.images(figs.add(f"confusion_{g.name}", figures.confusion_figure(pooled, g.name),
                             f"Confusion matrix of {g.name} ({n} run{'s' if n > 1 else ''} pooled)")
                    + figs.add(f"reliability_{g.name}", figures.reliability_figure(pooled, g.name),
                               f"Reliability diagram of {g.name}: ECE {pooled['ece'] * 100:.2f}%"))


def _diffusion_section(page: Page, groups: list[Group], figs: _Figures) -> None:
    groups = [g for g in groups if g.method == "edm"]
    if not groups:
        return
    page.heading("Diffusion samples")
    for g in groups:
        page.heading(g.name, 3)
        # the first run of the group with a checkpoint (the others are seeds of the same recipe)
        run = next((r for r in g.runs if (r.path / "best.pt").is_file() or (r.path / "last.pt").is_file()),
                   g.runs[0])
        try:
            grid, traj, caption = figures.diffusion_figures(run)
        except MentorError as e:
            page.notes([f"No samples of {run.label}: {e}"])
            continue
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            page.notes([f"No samples of {run.label}: its checkpoint could not be sampled ({type(e).__name__}: {e})"])
            continue
        page.images(figs.add(f"samples_{g.name}", grid, caption, pixels=True)
                    + figs.add(f"trajectory_{g.name}", traj, f"Sampling trajectories of {run.label}"))


def _curves_section(page: Page, groups: list[Group], figs: _Figures) -> None:
    runs = [r for g in groups for r in g.runs if r.train or r.val]
    if not runs:
        return
    page.heading("Training curves")
    page.text("From metrics.jsonl: every logged loss term, the learning rate, the throughput (img/s) and the "
              "validation numbers. Overlay: one colour per group, one line style per seed.", "meta")
    page.images(figs.add("curves_all", figures.overlay_curves(groups), "All runs overlaid"))
    page.fold(f"Curves of each run ({len(runs)})")
    for r in runs:
        page.images(figs.add(f"curves_{r.label}", figures.run_curves(r), f"Curves of {r.label}"))
    page.unfold()


def _notes(runs: list[Run]) -> list[str]:
    return [f"{r.label}: {n}" for r in runs for n in r.notes]


def make_report(paths: list[str | Path], out: str | Path | None = None, baseline: str | None = None) -> Path:
    """Write ``report.html``, ``report.md`` and ``figures/*.png`` for the runs in ``paths`` (run directories,
    or folders searched for them at any depth) into ``out`` (default ``<first path>/report``); returns the
    HTML page's path. ``baseline`` names the group the gains are measured against. Every problem with the
    input raises :class:`~mentor.errors.ReportError` before anything is written."""
    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    figures.require_matplotlib()
    groups = group_runs(runs)
    secs = sections(groups, baseline)
    out = Path(out) if out is not None else paths[0] / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file: give a folder for report.html, report.md and figures/")
    from .. import __version__

    figs = _Figures(out)
    page = Page("mentor report: " + ", ".join(str(p) for p in paths))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page.text(f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {len(groups)} group"
              f"{'s' if len(groups) != 1 else ''}, made {when} by mentor {__version__}. Every number and figure "
              "is read from the run directories (config.yaml, summary.json, metrics.jsonl, test_details.json).",
              "meta")
    _summary_sections(page, secs, figs)
    _classifier_section(page, groups, figs)
    _diffusion_section(page, groups, figs)
    _curves_section(page, groups, figs)
    page.heading("Runs")
    page.table(runs_table(groups))
    page.notes(_notes(runs))
    atomic_write_text(out / "report.md", page.markdown())
    atomic_write_text(out / "report.html", page.html())
    figs.remove_stale()
    return out / "report.html"
