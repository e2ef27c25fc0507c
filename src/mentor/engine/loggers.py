"""Where a run's logged numbers go: ``metrics.jsonl`` always, and the backends of ``trainer.loggers``.

Every backend receives the same records as ``metrics.jsonl`` (one per log event: ``step``, ``split``
"train" or "val", the numbers, ``time``), on rank 0 only, and is closed at the end of the run and when
it stops early. A resumed run continues from its last checkpoint without logging a step twice.

========================  ==============================================================================
``jsonl``                 ``metrics.jsonl``, one JSON object per line: what mentor's own tools read, so it
                          is written whether or not the list names it (on resume, lines after the
                          checkpoint's step are dropped: :func:`truncate_metrics`)
``csv``                   ``metrics.csv``: one row per record, ``step`` and ``split`` first, ``time`` last.
                          Validation keys appear after the first training rows: the file is then rewritten
                          (atomically) with the wider header, and rows lacking a column leave it empty. On
                          resume, rows after the checkpoint's step are dropped
``tensorboard``           event files in ``<run>/tensorboard`` (``torch.utils.tensorboard``), scalars named
                          ``train/<key>`` and ``val/<key>``; a resumed run opens its writer with
                          ``purge_step`` so TensorBoard hides what the interrupted session logged after the
                          checkpoint
``wandb``                 a Weights & Biases run in ``<run>/wandb``, offline unless ``WANDB_MODE`` or
                          ``WANDB_API_KEY`` is set; its config is the resolved recipe, its name the run
                          directory's; a resumed run continues the same W&B run (id kept in
                          ``<run>/wandb/mentor-run-id``)
========================  ==============================================================================
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Protocol

from ..config import LOGGERS, ConfigError
from ..fileio import atomic_write_text

#: The package each optional backend needs, and the extra that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "mentor[tensorboard]"), "wandb": ("wandb", "mentor[wandb]")}
_META = ("step", "split", "time")


class Backend(Protocol):
    """One destination of the run's records."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_loggers(names: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` naming ``trainer.loggers`` for an unknown backend or one whose package is
    missing (called before the run loads its data, so nothing trains first)."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"trainer.loggers: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
        if name in PACKAGES and not _installed(PACKAGES[name][0]):
            module, extra = PACKAGES[name]
            raise ConfigError(f"trainer.loggers lists {name!r}, but the {module} package is not installed: "
                              f"pip install '{extra}', or remove {name!r} from trainer.loggers")


def open_backends(names: list[str] | tuple[str, ...], run_dir: Path, start_step: int,
                  config: dict[str, Any] | None = None) -> list[Backend]:
    """The backends of ``names`` for the run in ``run_dir``, continuing after ``start_step``; jsonl is always
    the first. ``config`` (the resolved recipe) goes to W&B."""
    check_loggers(names)
    backends: list[Backend] = [JsonlBackend(run_dir / "metrics.jsonl")]
    try:
        for name in dict.fromkeys(names):  # each once, in the order given
            if name == "csv":
                backends.append(CsvBackend(run_dir / "metrics.csv", start_step))
            elif name == "tensorboard":
                backends.append(TensorBoardBackend(run_dir / "tensorboard", start_step))
            elif name == "wandb":
                backends.append(WandbBackend(run_dir, start_step, config or {}))
    except BaseException:
        for b in backends:
            b.close(failed=True)
        raise
    return backends


# -- jsonl ---------------------------------------------------------------------------------------------

class JsonlBackend:
    """``metrics.jsonl``: one JSON object per line, appended (a crash cuts at most the last line)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self, failed: bool = False) -> None:
        pass


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after ``last_step`` so a resumed run does not log the same steps
    twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write_text(path, "".join(k + "\n" for k in kept))


# -- csv -----------------------------------------------------------------------------------------------

def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a ``metrics.csv``; a last line without its newline (cut by a crash) is left out."""
    if not path.is_file():
        return [], []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def truncate_csv(path: Path, last_step: int) -> None:
    """Drop the rows of ``metrics.csv`` after ``last_step`` (the csv twin of :func:`truncate_metrics`)."""
    if path.is_file():
        header, rows = read_csv(path)
        _rewrite_csv(path, header, [r for r in rows if _step(r) <= last_step])


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


def _rewrite_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, restval="", extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


class CsvBackend:
    """``metrics.csv`` with the keys of ``metrics.jsonl`` as columns; a record with a new key rewrites the
    file once with the wider header (atomically), every other record appends one row."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        truncate_csv(path, start_step)
        self.header, _ = read_csv(path)

    def write(self, record: dict[str, Any]) -> None:
        new = [k for k in record if k not in self.header]
        if new or not self.path.is_file():
            keys = [*self.header, *new]
            self.header = [k for k in keys if k != "time"] + (["time"] if "time" in keys else [])
            _, rows = read_csv(self.path)
            _rewrite_csv(self.path, self.header, [*rows, record])
            return
        out = io.StringIO()
        csv.DictWriter(out, fieldnames=self.header, restval="", lineterminator="\n").writerow(record)
        with open(self.path, "a") as f:
            f.write(out.getvalue())

    def close(self, failed: bool = False) -> None:
        pass


# -- tensorboard ---------------------------------------------------------------------------------------

def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """``<split>/<key>`` -> value for every number of a record."""
    split = record.get("split", "train")
    return {f"{split}/{k}": float(v) for k, v in record.items()
            if k not in _META and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardBackend:
    """Scalars ``train/<key>`` and ``val/<key>`` in event files under ``<run>/tensorboard``."""

    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard drops events at and after purge_step from the files of earlier sessions: what an
        # interrupted session logged after the checkpoint this run resumes from (a fresh start: everything).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, step, walltime=record.get("time"))
        self.writer.flush()  # at log events only: a killed run keeps what it logged, as metrics.jsonl does

    def close(self, failed: bool = False) -> None:
        self.writer.close()


# -- wandb ---------------------------------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


class WandbBackend:
    """A W&B run in ``<run>/wandb``: offline unless the environment configures W&B (``WANDB_MODE`` or
    ``WANDB_API_KEY``), so a run never reaches the network unless asked to."""

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        import wandb

        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "mentor-run-id"
        run_id = id_file.read_text().strip() if (start_step > 0 and id_file.is_file()) else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id + "\n")
        configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        # a W&B run the program holds already stays its own (wandb >= 0.19.10 names this "create_new")
        reinit = "create_new" if _version(wandb.__version__) >= (0, 19, 10) else True
        try:
            self.run = wandb.init(mode=None if configured else "offline", dir=str(run_dir), config=config,
                                  project=os.environ.get("WANDB_PROJECT") or "mentor", name=run_dir.name,
                                  id=run_id, resume="allow", reinit=reinit)
        except Exception as e:  # wandb's own errors (a bad key, no network in online mode) name the cause
            raise ConfigError(f"trainer.loggers lists 'wandb', and W&B could not start ({type(e).__name__}: "
                              f"{e}); set WANDB_MODE=offline, fix the W&B settings, or remove 'wandb' from "
                              "trainer.loggers") from None

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
