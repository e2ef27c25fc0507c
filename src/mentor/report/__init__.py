"""Reports people read: ``mentor report RUN_OR_SWEEP_DIR... [--out DIR] [--baseline NAME]``.

One self-contained HTML page (``report.html``: inline CSS, PNG figures beside it in ``figures/``,
relative links only, nothing fetched from the network) and the same content as Markdown
(``report.md``): the summary table (mean ± std over seeds, paired gains against a baseline group),
per-domain and per-stream tables, per-class accuracy, confusion matrices and reliability diagrams,
diffusion samples and trajectories, and the training curves of every run. Everything is generated from
the run directories' files.

Modules: :mod:`~mentor.report.collect` reads runs, :mod:`~mentor.report.tables` groups them and computes
the numbers, :mod:`~mentor.report.figures` draws (matplotlib, the ``plots`` extra), and
:mod:`~mentor.report.page` writes HTML and Markdown.
"""

from .build import make_report

__all__ = ["make_report"]
