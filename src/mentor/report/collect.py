"""Reading run directories for a report: what ``mentor train`` and ``mentor adapt`` write.

A run directory holds ``config.yaml`` (the resolved recipe) and ``summary.json`` or ``metrics.jsonl``;
a folder given to the report is searched for run directories at any depth (a sweep). Nothing here
writes: every problem with the input is found before the report creates its folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.details import FILE as DETAILS_FILE
from ..engine.rundir import flatten
from ..errors import ReportError

# The seeds of a run: runs that differ only in them (and in bookkeeping) are repetitions of one experiment,
# and a gain pairs the runs of equal seeds. The semi-supervised convention draws the labelled subset
# (data.label_seed) with the seed, so it counts as one.
SEED_KEYS = ("trainer.seed", "data.label_seed", "data.split_seed")
# Keys that say how a run was kept or reported, not what it trained.
BOOKKEEPING = frozenset({
    *SEED_KEYS, "out_dir", "resume", "trainer.eval_every", "trainer.ckpt_every", "trainer.log_every",
    "trainer.threads", "trainer.progress", "trainer.loggers", "trainer.device", "trainer.compile",
    "trainer.cuda_graph", "trainer.channels_last", "data.num_workers", "data.eval_batch_size",
    "adapt.run", "adapt.checkpoint",
})


def _empty(value: Any) -> bool:
    """An unset option: recipes written by an older mentor lack the key, newer ones say None, [] or ""."""
    return value is None or value == "" or value == [] or value == {}


def recipe_key(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe, flattened, without seeds, bookkeeping and unset options."""
    return {k: v for k, v in flatten(config).items() if k not in BOOKKEEPING and not _empty(v)}


def seeds_of(config: dict[str, Any]) -> tuple[Any, ...]:
    """``(trainer.seed, data.label_seed, data.split_seed)`` of a resolved recipe (0 where unset)."""
    flat = flatten(config)
    return tuple(flat.get(k, 0) if flat.get(k) is not None else 0 for k in SEED_KEYS)


def _seed_text(seeds: tuple[Any, ...]) -> str:
    """The training seed, with the label and split seeds where they are neither 0 nor that seed."""
    extra = [f"{name} {v}" for name, v in zip(("label", "split"), seeds[1:]) if v not in (0, seeds[0])]
    return " ".join([str(seeds[0]), *extra])


def _resolve_run(ref: Any, run_dir: Path) -> Path | None:
    """The run directory a recipe refers to (a teacher, ``model.init_from``, an adaptation's source), as
    given when it trained: relative to the working directory, or to a folder above ``run_dir``."""
    if not isinstance(ref, str) or not ref or "\n" in ref:
        return None
    path = Path(ref)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *(p / path for p in run_dir.parents)]
    for c in candidates:
        try:
            folder = c if c.is_dir() else c.parent
            if (folder / "config.yaml").is_file():
                return folder
        except OSError:
            continue
    return None


def _load_config(folder: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_token(ref: Any, run_dir: Path) -> str | None:
    """A referenced run named by its recipe instead of its folder: the teachers of different seeds
    (runs/teacher/seed0, .../seed1) of one recipe give one token, so their students group together."""
    folder = _resolve_run(ref, run_dir)
    config = _load_config(folder) if folder is not None else None
    if config is None:
        return None
    digest = hashlib.sha1(json.dumps(recipe_key(config), sort_keys=True, default=repr).encode()).hexdigest()[:6]
    method = (config.get("method") or {}).get("name", "?")
    model = (config.get("model") or {}).get("name", "?")
    return f"<run of {method} {model} #{digest}>"


@dataclass
class Run:
    """One run directory as the report sees it.

    ``kind`` is "adapt" for a ``mentor adapt`` folder, "train" otherwise; ``train``/``val`` are the
    records of ``metrics.jsonl`` with split "train"/"val"; ``streams`` an adaptation run's per-stream
    records; ``details`` the run's ``test_details.json`` (None for runs trained before it was written,
    and for runs not selected on accuracy)."""

    path: Path
    label: str
    config: dict[str, Any]
    summary: dict[str, Any] | None
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] | None = None
    source: dict[str, Any] | None = None  # an adaptation run's source run config, when it can be read
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """"adapt" for a ``mentor adapt`` folder (its config has an ``adapt`` section), else "train"."""
        return "adapt" if isinstance(self.config.get("adapt"), dict) else "train"

    @property
    def method(self) -> str:
        """``method.name`` of the run's recipe."""
        return str((self.config.get("method") or {}).get("name", "?"))

    @property
    def seed(self) -> str:
        """The pairing key as shown: the seeds of :data:`SEED_KEYS` (for an adaptation run, its source run's
        and, when not 0, its own)."""
        own = seeds_of(self.config)
        if self.kind != "adapt":
            return _seed_text(own)
        src = _seed_text(seeds_of(self.source)) if self.source is not None else str(self.config["adapt"].get("run"))
        return src if own[0] == 0 else f"{src} / {own[0]}"

    @property
    def pair(self) -> str:
        """What pairs runs across groups: every seed of :data:`SEED_KEYS` (and of the source run)."""
        own = seeds_of(self.config)
        if self.kind != "adapt":
            return repr(own)
        src = seeds_of(self.source) if self.source is not None else self.config["adapt"].get("run")
        return repr((src, own))

    @property
    def metric(self) -> str:
        """The number the run was selected on, without ``val_`` and ``_ema`` ("acc", "loss"); for an
        adaptation run "acc"."""
        select = (self.summary or {}).get("select")
        if self.kind == "adapt" or not isinstance(select, str):
            return "acc"
        name = select.removeprefix("val_")
        return name.removesuffix("_ema")

    @property
    def finished(self) -> bool:
        """Whether the run wrote its ``summary.json``."""
        return self.summary is not None

    def group_key(self) -> dict[str, Any]:
        """The resolved recipe without seeds, bookkeeping and unset options (see :func:`recipe_key`), a
        referenced run (a teacher) named by its recipe: runs with equal keys are seeds of one group."""
        flat = recipe_key(self.config)
        if self.kind == "adapt" and self.source is not None:
            flat.update({f"source.{k}": v for k, v in recipe_key(self.source).items()})
        elif self.kind == "adapt":
            flat["source.run"] = self.config["adapt"].get("run")
        for k, v in flat.items():
            if k.startswith(("method.", "model.", "source.method.", "source.model.")):
                refs = v if isinstance(v, list) else [v]
                tokens = [_run_token(r, self.path) if isinstance(r, str) and "/" in r else None for r in refs]
                if any(tokens):
                    named = [t or r for t, r in zip(tokens, refs)]
                    flat[k] = named if isinstance(v, list) else named[0]
        return flat

    def number(self, key: str) -> float | None:
        """A finite number of the summary, else None."""
        v = (self.summary or {}).get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)


def is_run_dir(path: Path) -> bool:
    """A folder ``mentor train`` or ``mentor adapt`` wrote: ``config.yaml`` and a summary or metrics."""
    return (path / "config.yaml").is_file() and ((path / "summary.json").is_file()
                                                 or (path / "metrics.jsonl").is_file())


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} cannot be read ({type(e).__name__}): it records the recipe of the run in "
                          f"{path.parent}. Restore it, or move that run out of the folders given to "
                          "`mentor report`.") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} does not hold a recipe (a YAML mapping): restore it, or move the run in "
                          f"{path.parent} out of the folders given to `mentor report`.")
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_run(path: Path, label: str) -> Run:
    """Everything the report uses of one run directory."""
    config = _read_yaml(path / "config.yaml")
    summary = _read_json(path / "summary.json")
    run = Run(path=path, label=label, config=config, summary=summary if isinstance(summary, dict) else None)
    if run.summary is None:
        why = "unreadable" if (path / "summary.json").exists() else "missing"
        run.notes.append(f"summary.json {why}: the run has not finished (curves only, not in the tables)")
    for rec in _read_metrics(path / "metrics.jsonl"):
        if "stream" in rec:
            run.streams.append(rec)
        elif rec.get("split") == "train":
            run.train.append(rec)
        elif rec.get("split") == "val":
            run.val.append(rec)
    details = _read_json(path / DETAILS_FILE)
    run.details = details if isinstance(details, dict) and isinstance(details.get("splits"), dict) else None
    if run.kind == "adapt":
        folder = _resolve_run(config["adapt"].get("run"), path)
        run.source = _load_config(folder) if folder is not None else None
    return run


def _walk(root: Path) -> list[Path]:
    found = []
    for folder, dirs, _ in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if is_run_dir(Path(folder)):
            found.append(Path(folder))
    return found


def find_runs(paths: list[str | Path]) -> list[Run]:
    """The runs in ``paths`` (run directories, or folders searched at any depth), in path order; a path
    that does not exist, is a file or holds no run is a :class:`ReportError`."""
    if not paths:
        raise ReportError("mentor report needs at least one run directory or folder of runs")
    dirs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p} does not exist: give a run directory (what `mentor train` or `mentor adapt` "
                              "writes: config.yaml with summary.json or metrics.jsonl) or a folder holding such "
                              "directories at any depth.")
        if not p.is_dir():
            raise ReportError(f"{p} is a file, not a folder: give its run directory ({p.parent}) or a folder "
                              "holding run directories.")
        found = _walk(p)
        if not found:
            hint = (" It has config.yaml but neither summary.json nor metrics.jsonl: the run has not started "
                    "training." if (p / "config.yaml").is_file() else "")
            raise ReportError(f"{p} holds no run: a run directory has config.yaml and summary.json or "
                              f"metrics.jsonl (what `mentor train` and `mentor adapt` write), and none was found "
                              f"in {p} or below it.{hint} Give the folder of a trained run or of a sweep.")
        dirs.extend(found)
    unique = list(dict.fromkeys(d.resolve() for d in dirs))
    base = Path(os.path.commonpath(unique)) if len(unique) > 1 else unique[0].parent
    labels = [d.relative_to(base).as_posix() for d in unique]
    return [read_run(d, d.name if label == "." else label) for d, label in zip(unique, labels)]
