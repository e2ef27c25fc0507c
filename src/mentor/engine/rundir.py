"""The run directory: one run per folder, and a resume that continues exactly the run that is there.

* **One process per directory.** ``run.lock`` holds the owner's pid, host and start time. A second
  process gets a clear error; a lock whose process is gone (same host, dead pid) is taken over with a
  message. Temporary files of interrupted writes are removed once the lock is held.
* **Same recipe or nothing.** A directory that holds a run (``config.yaml``) is only continued by the
  recipe that wrote it; only the keys of :data:`MAY_CHANGE` may differ. Anything else stops with the
  list of differences and the ways forward. ``config.yaml`` is written once, when the run starts.
* **A finished run is not trained again.** Re-running the command of a run whose ``summary.json`` covers
  ``trainer.max_steps`` returns that summary and touches nothing (``--force`` starts over).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, dump_config, to_dict
from ..errors import CheckpointMismatchError, RunDirError
from ..fileio import atomic_write_text, remove_stale_temporaries
from ..provenance import header_comment
from .logger import log

LOCK = "run.lock"
# Keys a resumed run may change: how long it trains and how it reports, never what it trains.
MAY_CHANGE = ("trainer.max_steps", "trainer.eval_every", "trainer.ckpt_every", "trainer.log_every",
              "trainer.threads", "trainer.progress", "trainer.snapshots", "data.num_workers", "out_dir", "resume")
# What a fresh start (--force) removes, with the snapshots; anything else the user put in the folder stays.
SNAPSHOTS = "snapshot_*.pt"
RUN_FILES = ("last.pt", "best.pt", "summary.json", "metrics.jsonl", "metrics.csv", "config.yaml", "test_details.json")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def recipe_changes(saved: dict[str, Any], now: dict[str, Any], may_change: tuple[str, ...] = ()) -> list[str]:
    """``key: saved -> now`` for every key both recipes set and that differs, except ``may_change``."""
    a, b = flatten(saved), flatten(now)
    changes = []
    for key in sorted(set(a) & set(b)):
        if key in may_change:
            continue
        x, y = a[key], b[key]
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            x, y = list(x), list(y)
        if x != y:
            changes.append(f"{key}: {x!r} -> {y!r}")
    return changes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunDir:
    """The files of one run: lock, recipe, summary; what a start or a resume finds there."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_path = self.path / LOCK
        self._locked = False

    # -- the lock ----------------------------------------------------------------------------------
    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:
            raise RunDirError(f"out_dir {str(self.path)!r} cannot be created ({type(e).__name__}: {e}); set out_dir "
                              "to a folder you can write to") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunDirError(f"out_dir {str(self.path)!r} is not writable; set out_dir to a folder you can write to")

    def _read_lock(self) -> dict[str, Any]:
        try:
            return json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Create ``run.lock`` (exclusive), taking over a stale one; a clear error if the run is live."""
        self._create()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._read_lock()
                pid, host = owner.get("pid"), owner.get("host")
                if not isinstance(pid, int) or not owner:
                    # being written at this instant, or damaged: give the writer a moment
                    time.sleep(0.2)
                    owner = self._read_lock()
                    pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                    log.warning(f"{self.lock_path}: taking over the lock of process {pid}, which no longer runs "
                                f"(started {owner.get('started', '?')})")
                    with contextlib.suppress(FileNotFoundError):
                        self.lock_path.unlink()
                    continue
                who = f"process {pid} on {host}" if pid else "another process"
                extra = "" if host == me["host"] else (" If that process is gone (another machine cannot be "
                                                       f"checked from here), delete {self.lock_path}.")
                raise RunDirError(f"out_dir {str(self.path)!r} is in use by {who} since "
                                  f"{owner.get('started', '?')} ({self.lock_path}): one run per directory. Wait "
                                  f"for it to finish, or give this run another out_dir.{extra}") from None
            except OSError as e:
                raise RunDirError(f"cannot create {self.lock_path} ({type(e).__name__}: {e}); set out_dir to a "
                                  "folder you can write to") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            removed = remove_stale_temporaries(self.path)
            if removed:
                log.info(f"removed {len(removed)} temporary file(s) of an interrupted write in {self.path}")
            return
        raise RunDirError(f"could not take the lock {self.lock_path}: another process keeps creating it")

    def release(self) -> None:
        if self._locked:
            if self._read_lock().get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.lock_path.unlink()
            self._locked = False

    @contextlib.contextmanager
    def locked(self, enabled: bool = True) -> Iterator[RunDir]:
        if enabled:
            self.acquire()
        try:
            yield self
        finally:
            if enabled:
                self.release()

    # -- what is there -----------------------------------------------------------------------------
    def saved_recipe(self) -> dict[str, Any] | None:
        p = self.path / "config.yaml"
        if not p.is_file():
            return None
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise RunDirError(f"{p} cannot be read ({type(e).__name__}); it records the recipe of the run in "
                              f"{self.path}: restore it, or start over with --force") from None
        return data if isinstance(data, dict) else None

    def summary(self) -> dict[str, Any] | None:
        p = self.path / "summary.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None  # a damaged summary is recomputed by the resume

    def check_recipe(self, cfg: RunConfig, saved: dict[str, Any] | None = None, where: str = "config.yaml") -> None:
        """Stop when ``cfg`` is not the recipe of the run saved here (apart from :data:`MAY_CHANGE`)."""
        saved = self.saved_recipe() if saved is None else saved
        if saved is None:
            return
        changes = recipe_changes(saved, to_dict(cfg), MAY_CHANGE)
        if changes:
            shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
            raise CheckpointMismatchError(
                f"out_dir {str(self.path)!r} holds a run of another recipe ({where} there differs: {shown}). A "
                f"run directory continues only the recipe that started it (apart from {', '.join(MAY_CHANGE[:6])}). "
                "To train this recipe, give it another out_dir; to discard that run and start this one there, add "
                "--force (mentor train) or resume=false.")

    def finished(self, cfg: RunConfig, say: bool = True) -> dict[str, Any] | None:
        """The summary of a finished run of ``cfg`` here (it covers ``trainer.max_steps``), else None; a
        run of another recipe here is an error."""
        self.check_recipe(cfg)
        summary = self.summary()
        steps = summary.get("steps") if summary else None
        if not isinstance(steps, int) or steps < cfg.trainer.max_steps:
            return None
        if say:
            more = (f" (it trained {steps} steps, more than trainer.max_steps={cfg.trainer.max_steps})"
                    if steps > cfg.trainer.max_steps else "")
            log.info(f"{self.path} holds a finished run of this recipe{more}: nothing to train, its files are left "
                     "as they are. To train it again add --force (or resume=false), or give another out_dir.")
        return summary

    def start(self, cfg: RunConfig) -> None:
        """A fresh start: remove a previous run's files, record the recipe."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for snapshot in self.path.glob(SNAPSHOTS):
            snapshot.unlink(missing_ok=True)
        atomic_write_text(self.path / "config.yaml", header_comment() + dump_config(cfg))
