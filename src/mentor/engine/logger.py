"""Run logging: periodic log lines (always), ``metrics.jsonl`` (rank 0), a tqdm bar on terminals only."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mentor")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class RunLogger:
    """Writes one JSON object per log event and mirrors training progress as log lines."""

    def __init__(self, run_dir: Path | None, max_steps: int, start_step: int, enabled: bool,
                 progress: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl" if (run_dir is not None and enabled) else None
        self.max_steps = max_steps
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True, leave=False)

    def event(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, step: int, values: dict[str, float], lr: float, img_s: float, eta_s: float) -> None:
        self.event({"step": step, "split": "train", **values, "lr": lr, "img_s": img_s,
                    "time": time.time()})
        if not self.enabled:
            return
        terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        msg = (f"step {step}/{self.max_steps}  {terms}  lr {lr:.4g}  {img_s:,.0f} img/s  "
               f"eta {format_duration(eta_s)}")
        self._write(msg)

    def eval(self, step: int, values: dict[str, float]) -> None:
        self.event({"step": step, "split": "val", **values, "time": time.time()})
        if self.enabled:
            self._write(f"step {step}/{self.max_steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop events after ``last_step`` so a resumed run does not log the same steps twice."""
    if not path.is_file():
        return
    from .checkpoint import atomic_write_text

    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write_text(path, "".join(k + "\n" for k in kept))
