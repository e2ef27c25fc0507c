"""Launchers: how the cells of a sweep run, on this machine (:class:`LocalLauncher`) or on a Slurm cluster
(:class:`SlurmLauncher`, through submitit)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, RunConfig, from_dict
from ..errors import MentorError
from .cells import LOG, Cell, CellResult

# Exit statuses of a run stopped by a signal: the CLI's 130 after SIGINT/SIGTERM, or the signal itself.
_STOPPED = {130, 143, -signal.SIGINT, -signal.SIGTERM}


# --------------------------------------------------------------------------------------------------
# running one cell as a process


def _mentor_path() -> str:
    """The folder that holds this ``mentor`` package (so a worker imports the same one)."""
    return str(Path(__file__).resolve().parents[2])


def train_argv(cell: Cell, extra: Sequence[str] = ()) -> list[str]:
    """The command of one cell: ``python -m mentor.cli train RECIPE overrides...``."""
    overrides = cell.train_overrides()
    return [sys.executable, "-m", "mentor.cli", "train", cell.recipe, *overrides[:-1], *extra, overrides[-1]]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_mentor_path(), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_logged(argv: Sequence[str], env: dict[str, str], log: str | Path, new_session: bool = False,
               started: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Run ``argv`` with its stdout and stderr appended to ``log`` (after a line naming the command and the
    time); returns the exit status."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {shlex.join(argv[1:])}\n")
        f.flush()
        proc = subprocess.Popen(list(argv), stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=new_session)
        if started is not None:
            started(proc)
        return proc.wait()


def run_job(argv: list[str], env: dict[str, str], log: str) -> int:
    """One cell in a Slurm (or submitit local/debug) job: its command under the job's environment."""
    return run_logged(argv, {**os.environ, **env}, log)


def _last_error(log: Path) -> str:
    """The error of the last session in a cell's log: the CLI's ``mentor: ...`` line, else the last line."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "no log"
    lines = [x.strip() for x in text.rsplit("\n=== ", 1)[-1].splitlines()[1:] if x.strip()]
    mentor = [x for x in lines if x.startswith("mentor: ")]
    line = (mentor or lines or ["(nothing was printed)"])[-1]
    return line if len(line) <= 400 else line[:397] + "..."


def _result(cell: Cell, cfg: RunConfig, rc: int | None, seconds: float, resumed: bool,
            error: str | None = None, job: str | None = None) -> CellResult:
    from ..engine.rundir import RunDir

    summary = RunDir(cell.out_dir).summary()
    steps = summary.get("steps") if summary else None
    if rc == 0 and isinstance(steps, int) and steps >= cfg.trainer.max_steps:
        return CellResult(cell, "done", resumed, seconds, summary=summary, job=job)
    log = Path(cell.out_dir) / LOG
    if rc in _STOPPED:
        return CellResult(cell, "interrupted", resumed, seconds, f"stopped by a signal; see {log}", job=job)
    if error is None:
        error = (f"exit status {rc}: {_last_error(log)}" if rc != 0 else
                 f"exit status 0 but no summary.json of {cfg.trainer.max_steps} steps; see {log}")
    return CellResult(cell, "failed", resumed, seconds, error, job=job)


@dataclass
class Job:
    """A cell to run now: its validated recipe and whether it resumes from ``last.pt``."""

    cell: Cell
    cfg: RunConfig
    resumed: bool

    def extra(self, threads: int | None) -> list[str]:
        """``trainer.threads`` for the launcher's share of the cores, where the recipe does not set it."""
        return [f"trainer.threads={threads}"] if threads and self.cfg.trainer.threads is None else []


# --------------------------------------------------------------------------------------------------
# launchers


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices unless it says otherwise)."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [g.strip() for g in named.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


@dataclass
class LocalLauncher:
    """Worker processes on this machine, each running one cell after another.

    With GPUs (``gpus``, default: every visible one) each worker sees one GPU (``CUDA_VISIBLE_DEVICES``);
    ``per_gpu`` workers share each GPU; ``processes`` defaults to ``len(gpus) * per_gpu``. Without GPUs
    (``gpus: []`` forces that) ``processes`` workers (default 1) share the CPU cores. Every cell gets
    ``threads`` CPU threads (default: the cores divided among the workers) as ``trainer.threads`` unless its
    recipe sets them. Each cell's output goes to ``<cell>/log.txt``.
    """

    processes: int | None = None
    gpus: list[int | str] | None = None
    per_gpu: int = 1
    threads: int | None = None

    machine_checks = True  # cells run here: CUDA asked for where there is none is an error before the start

    def slots(self) -> list[tuple[dict[str, str], int]]:
        """(environment, threads) of each worker."""
        for key, value in (("processes", self.processes), ("per_gpu", self.per_gpu), ("threads", self.threads)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"launcher.{key} must be a whole number >= 1, got {value!r}")
        gpus = [str(g) for g in (self.gpus if self.gpus is not None else visible_gpus())]
        if gpus:
            shared = [gpus[i % len(gpus)] for i in range(len(gpus) * self.per_gpu)]  # spread over the GPUs first
            n = self.processes or len(shared)
            if n > len(shared):
                raise ConfigError(f"launcher.processes={n} is more than the {len(gpus)} GPU(s) {', '.join(gpus)} × "
                                  f"launcher.per_gpu={self.per_gpu} can take; set launcher.per_gpu="
                                  f"{-(-n // len(gpus))} to share each GPU among more runs, or fewer processes")
            envs = [{"CUDA_VISIBLE_DEVICES": g} for g in shared[:n]]
        else:
            n = self.processes or 1
            envs = [{"CUDA_VISIBLE_DEVICES": ""} for _ in range(n)]
        threads = self.threads or max(1, available_cores() // n)
        return [({**env, "OMP_NUM_THREADS": str(threads)}, threads) for env in envs]

    def describe(self) -> dict[str, Any]:
        return {"name": "local", **dataclasses.asdict(self)}

    def check(self) -> None:
        """Raise :class:`ConfigError` for options this machine cannot serve (before anything starts)."""
        self.slots()

    def launch(self, jobs: Sequence[Job], done: Callable[[CellResult], None]) -> None:
        """Run ``jobs`` on the workers, calling ``done`` as each ends. Ctrl-C sends every running cell one
        SIGINT (it saves ``last.pt`` and stops), waits for them and re-raises."""
        slots = self.slots()
        queue, lock, stop = deque(jobs), threading.Lock(), threading.Event()
        procs: dict[int, subprocess.Popen] = {}

        def started(proc: subprocess.Popen) -> None:
            with lock:
                procs[proc.pid] = proc
                if stop.is_set():
                    proc.send_signal(signal.SIGINT)

        def worker(env: dict[str, str], threads: int) -> None:
            try:
                work(env, threads)
            finally:
                with lock:
                    running[0] -= 1

        def work(env: dict[str, str], threads: int) -> None:
            while True:
                with lock:
                    if stop.is_set() or not queue:
                        return
                    job = queue.popleft()
                t0 = time.time()
                try:
                    rc = run_logged(train_argv(job.cell, job.extra(threads)), _env(env),
                                    Path(job.cell.out_dir) / LOG, new_session=True, started=started)
                    result = _result(job.cell, job.cfg, rc, time.time() - t0, job.resumed)
                except OSError as e:  # the folder or the log cannot be written
                    result = CellResult(job.cell, "failed", job.resumed, time.time() - t0, f"{type(e).__name__}: {e}")
                done(result)

        workers = [threading.Thread(target=worker, args=slot, daemon=True) for slot in slots[:max(1, len(jobs))]]
        running = [len(workers)]
        for w in workers:
            w.start()
        signalled = 0
        # Polled with sleep, not Thread.join: a KeyboardInterrupt inside join() can leave a live thread looking
        # finished (CPython before 3.13).
        while running[0] > 0:
            try:
                time.sleep(0.1)
            except KeyboardInterrupt:
                # The workers run in sessions of their own (the terminal's Ctrl-C does not reach them): one SIGINT
                # each saves and stops between two steps; a second Ctrl-C sends a second, which stops at once.
                signalled += 1
                with lock:
                    stop.set()
                    for p in procs.values():
                        if p.poll() is None:
                            p.send_signal(signal.SIGINT)
        if signalled:
            raise KeyboardInterrupt


@dataclass
class SlurmLauncher:
    """A Slurm job array through ``submitit`` (``pip install 'mentor[sweep]'``): one job per cell, waited for.

    ``time`` is each job's limit in minutes: at the limit Slurm sends SIGTERM, the run saves ``last.pt`` and
    running the sweep again resumes it. ``gpus`` per cell (one process; several GPUs per cell would need
    torchrun inside the job), ``cpus`` per cell (also ``trainer.threads``), ``parallelism`` cells at once,
    ``setup`` shell lines before each job (``module load ...``, activating an environment), ``additional``
    any other ``#SBATCH`` option. ``cluster: local`` or ``debug`` runs the jobs with submitit's local or
    in-process executor instead (a check without a cluster); submitit's own files go to ``folder``
    (default ``<root>/.submitit``).
    """

    partition: str | None = None
    time: int = 240
    gpus: int = 1
    cpus: int = 8
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    parallelism: int = 64
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    cluster: Literal["slurm", "local", "debug"] = "slurm"

    machine_checks = False  # the nodes, not this machine, decide whether CUDA is there

    def describe(self) -> dict[str, Any]:
        return {"name": "slurm", **dataclasses.asdict(self)}

    def check(self) -> None:
        """Raise for options out of range, or when submitit is not installed (before anything starts)."""
        for key in ("time", "cpus", "parallelism"):
            if getattr(self, key) < 1:
                raise ConfigError(f"launcher.{key} must be >= 1, got {getattr(self, key)}")
        if self.gpus < 0:
            raise ConfigError(f"launcher.gpus must be >= 0, got {self.gpus}")
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise MentorError("the slurm launcher needs submitit: pip install 'mentor[sweep]' (or submitit)") from None

    def executor(self, root: Path) -> Any:
        self.check()
        import submitit
        try:
            ex = submitit.AutoExecutor(folder=self.folder or str(root / ".submitit"), cluster=self.cluster)
        except RuntimeError as e:  # no srun on this machine
            raise MentorError(f"launcher slurm: {e} Run the sweep on the cluster's login node, or set "
                              "launcher.cluster: local to try it on this machine") from None
        params: dict[str, Any] = {"name": "mentor-sweep", "timeout_min": self.time, "cpus_per_task": self.cpus,
                                  "mem_gb": self.mem_gb}
        if self.cluster == "slurm":
            params.update(gpus_per_node=self.gpus, slurm_partition=self.partition, slurm_account=self.account,
                          slurm_qos=self.qos, slurm_constraint=self.constraint,
                          slurm_array_parallelism=self.parallelism, slurm_setup=list(self.setup) or None,
                          slurm_additional_parameters=dict(self.additional) or None,
                          slurm_signal_delay_s=120)  # SIGTERM two minutes before the limit: time to save
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def launch(self, jobs: Sequence[Job], done: Callable[[CellResult], None], root: Path = Path(".")) -> None:
        """Submit ``jobs`` as one array and wait for each, calling ``done`` as each ends."""
        if not jobs:
            return
        import submitit

        ex = self.executor(root)
        env = {"OMP_NUM_THREADS": str(self.cpus), "PYTHONPATH": _env({})["PYTHONPATH"]}
        argvs = [train_argv(j.cell, j.extra(self.cpus)) for j in jobs]
        submitted = ex.map_array(run_job, argvs, [env] * len(jobs), [str(Path(j.cell.out_dir) / LOG) for j in jobs])
        by_id = {id(s): j for s, j in zip(submitted, jobs)}
        t0 = time.time()
        poll = 30.0 if self.cluster == "slurm" else 0.5  # seconds between looks at the jobs' states
        try:
            for s in submitit.helpers.as_completed(submitted, poll_frequency=poll):
                self._collect(s, by_id[id(s)], done, t0)
        except KeyboardInterrupt:
            ids = sorted({str(s.job_id).split("_")[0] for s in submitted})
            print(f"the submitted jobs keep running ({', '.join(ids)}; scancel stops them); run the sweep again "
                  "once they have ended to collect them", file=sys.stderr)
            raise

    @staticmethod
    def _collect(s: Any, j: Job, done: Callable[[CellResult], None], t0: float) -> None:
        try:
            rc, error = s.result(), None
        except Exception as e:  # noqa: BLE001 - a job killed, timed out or lost is this cell's failure only
            rc, error = None, f"job {s.job_id}: {type(e).__name__}: {' '.join(str(e).split())[-300:]}"
            if (Path(j.cell.out_dir) / "last.pt").is_file():
                rc = 130  # stopped with last.pt saved (e.g. at the time limit): the next run resumes it
        done(_result(j.cell, j.cfg, rc, time.time() - t0, j.resumed, error, job=str(s.job_id)))


Launcher = LocalLauncher | SlurmLauncher
LAUNCHERS: dict[str, type] = {"local": LocalLauncher, "slurm": SlurmLauncher}


def make_launcher(spec: dict[str, Any] | None, prefix: str = "launcher") -> Launcher:
    """A launcher from its mapping (``{name: local, processes: 2}``); unknown options name the key."""
    spec = dict(spec or {})
    name = spec.pop("name", "local")
    if name not in LAUNCHERS:
        raise ConfigError(f"{prefix}.name: unknown launcher {name!r}; choose local or slurm")
    return from_dict(LAUNCHERS[name], spec, prefix=prefix)


