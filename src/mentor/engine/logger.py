"""Run logging: periodic log lines (always), ``metrics.jsonl`` and the backends of ``trainer.loggers``
(rank 0), and a tqdm bar on terminals only.

Log lines go through the ``"mentor"`` logger; :func:`mentor.logs.console_logging` prints them when
nothing else would.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..logs import console_logging, log
from .loggers import Backend, open_backends, truncate_metrics

__all__ = ["RunLogger", "console_logging", "format_duration", "log", "truncate_metrics"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def _loss(values: dict[str, float]) -> tuple[str, float] | None:
    """The headline loss of a log event: ``loss``, else the first ``<phase>/loss``."""
    if "loss" in values:
        return "loss", values["loss"]
    for k, v in values.items():
        if k.endswith("/loss"):
            return k, v
    return None


class RunLogger:
    """Sends every log event to ``metrics.jsonl`` and the configured backends (rank 0), and mirrors it as
    a log line; on a terminal a tqdm bar also shows the step, the loss and the throughput."""

    def __init__(self, run_dir: Path | None, max_steps: int, start_step: int, enabled: bool, progress: bool,
                 loggers: list[str] | tuple[str, ...] = ("jsonl",), config: dict[str, Any] | None = None):
        """``loggers`` (``trainer.loggers``) adds backends to ``metrics.jsonl``; ``config`` is the resolved
        recipe (W&B's run config). ``enabled`` is False on ranks other than 0: nothing is written or printed."""
        self.enabled = enabled
        self.max_steps = max_steps
        self.backends: list[Backend] = []
        self.path = run_dir / "metrics.jsonl" if (run_dir is not None and enabled) else None
        if run_dir is not None and enabled:
            self.backends = open_backends(list(loggers), run_dir, start_step, config)
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True, leave=False, unit="step")
            # console handlers write through tqdm while the bar is shown, so lines and bar do not mix (only
            # loggers that have one: tqdm would add a console handler to the others, printing lines twice)
            consoles = [lg for lg in (log, logging.getLogger()) if any(_is_console(h) for h in lg.handlers)]
            if consoles:
                self._redirect.enter_context(logging_redirect_tqdm(consoles))

    def event(self, record: dict[str, Any]) -> None:
        """One record to every backend (rank 0)."""
        for backend in self.backends:
            backend.write(record)

    def train(self, step: int, values: dict[str, float], lr: float, img_s: float, eta_s: float) -> None:
        self.event({"step": step, "split": "train", **values, "lr": lr, "img_s": img_s, "time": time.time()})
        if not self.enabled:
            return
        if self.bar is not None:
            loss = _loss(values)
            shown = f"{loss[0]} {loss[1]:.4f}  " if loss else ""
            self.bar.set_postfix_str(f"{shown}{img_s:,.0f} img/s", refresh=False)
        terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        log.info(f"step {step}/{self.max_steps}  {terms}  lr {lr:.4g}  {img_s:,.0f} img/s  "
                 f"eta {format_duration(eta_s)}")

    def evaluating(self, step: int) -> None:
        """Evaluation at ``step`` begins: the bar says so, or a line does off a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str("evaluating", refresh=True)
        else:
            log.info(f"evaluating at step {step} ...")

    def eval(self, step: int, values: dict[str, float]) -> None:
        self.event({"step": step, "split": "val", **values, "time": time.time()})
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str("", refresh=False)
        log.info(f"step {step}/{self.max_steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Close the bar and every backend (``failed``: the run stopped early or on an error). Idempotent."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()
        backends, self.backends = self.backends, []
        for backend in backends:
            try:
                backend.close(failed)
            except Exception as e:  # one backend's failure to close must not hide the run's outcome
                log.warning(f"closing the {type(backend).__name__} logger failed: {type(e).__name__}: {e}")
