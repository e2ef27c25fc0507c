"""The solver x NFE benchmark: sampling error against a reference, with and without AMED and GITS.

Every cell is the RMSE (per-sample root-mean-square over pixels, averaged over samples) between a fast
sampler's output and a reference solution started from the *same* noise, in float64 on the oracles:

- ``gaussian``: Gaussian data with the mean and covariance of the UCI digits (64-dimensional, the spectrum of
  real images); the reference is the exact probability-flow solution
  (:meth:`~mentor.diffusion.denoisers.GaussianDenoiser.exact`).
- ``digits``: the optimal denoiser of ``n_data`` UCI digits images (8 x 8, scaled to [-1, 1]); the reference
  is Heun with ``ref_steps`` timestamps of the polynomial schedule.
- a trained EDM run directory (``run_dirs``): its denoiser (read by :func:`load_denoiser`), in float32, with
  the many-step Heun reference.

Rows: the base solvers, each on the schedule its authors recommend (polynomial for Euler, Heun, DPM-Solver-2,
iPNDM, iPNDM-v; log-SNR for DPM-Solver++(3M) and UniPC; time-uniform rho = 2 for DEIS); ``+ GITS`` rows use a
GITS schedule searched on other noise (iPNDM teacher, 61 polynomial timestamps); AMED rows use a predictor
trained for that NFE on other noise (AMED-Solver: Heun teacher, time-uniform, M = 1; AMED-Plugin on iPNDM:
iPNDM teacher, polynomial, M = 2). Two-evaluation methods (Heun, DPM-Solver-2, AMED) reach odd NFE with AFS;
"-" marks a budget a method cannot spend exactly. ``mentor bench diffusion`` calls :func:`main`; with
``--geometry`` it measures the trajectories' geometry instead (:mod:`mentor.diffusion.geometry_report`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mentor.diffusion.amed import AMEDPredictor, FeatureHook, InputFeature, amed_plugin, amed_solver, train_amed
from mentor.diffusion.denoisers import EmpiricalDenoiser, GaussianDenoiser
from mentor.diffusion.gits import gits_schedule
from mentor.diffusion.samplers import SAMPLERS, STOCHASTIC, heun, nfe
from mentor.diffusion.schedules import get_schedule

NFES = (3, 4, 5, 6, 8, 10)
SOLVERS = ("euler", "heun", "dpm_solver_2", "ipndm", "ipndm_v", "deis", "dpm_solver_pp", "unipc")
#: The solvers a table can hold: the ODE solvers (a stochastic sampler does not converge to the reference
#: solution from the same noise, so its error against it measures nothing).
ODE_SOLVERS = tuple(name for name in SAMPLERS if name not in STOCHASTIC)
GITS_SOLVERS = ("euler", "ipndm")
AMED_METHODS = ("amed_solver", "amed_plugin_ipndm")

#: The schedule each solver's authors recommend (name, options other than the sigma range).
SOLVER_SCHEDULES: dict[str, tuple[str, dict[str, float]]] = {
    "euler": ("polynomial", {}),
    "heun": ("polynomial", {}),
    "dpm_solver_2": ("polynomial", {}),
    "ipndm": ("polynomial", {}),
    "ipndm_v": ("polynomial", {}),
    "deis": ("time_uniform", {"rho": 2.0}),
    "dpm_solver_pp": ("logsnr", {}),
    "unipc": ("logsnr", {}),
}

#: AMED variants: label, student ("amed" or a plugin base), teacher, schedule, M, predictor options.
AMED_SETTINGS: dict[str, dict[str, Any]] = {
    "amed_solver": dict(label="AMED-Solver", solver="amed", teacher="heun", schedule="time_uniform", M=1,
                        predictor={"scale_dir": 0.01}),
    "amed_plugin_ipndm": dict(label="AMED-Plugin (iPNDM)", solver="ipndm", teacher="ipndm", schedule="polynomial",
                              M=2, predictor={"scale_dir": 0.01}),
    "amed_plugin_dpm_solver_pp": dict(label="AMED-Plugin (DPM-Solver++)", solver="dpm_solver_pp",
                                      teacher="dpm_solver_pp", schedule="logsnr", M=2,
                                      predictor={"scale_dir": 0.05}),
}

LABELS = {"euler": "Euler (DDIM)", "heun": "Heun", "dpm_solver_2": "DPM-Solver-2", "ipndm": "iPNDM",
          "ipndm_v": "iPNDM-v", "deis": "DEIS-tAB3", "dpm_solver_pp": "DPM-Solver++(3M)", "unipc": "UniPC-3"}


@dataclass
class Oracle:
    """A denoiser to benchmark with the function giving its reference solution from ``x = noise * sigma_max``."""

    name: str
    description: str
    denoiser: Callable[..., Tensor]
    shape: tuple[int, ...]
    reference: Callable[[Tensor, dict], Tensor]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    num_classes: int = 0
    feature_module: str | None = None

    def schedule_kw(self) -> dict[str, float]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def make_cond(self, n: int, generator: torch.Generator | None) -> dict:
        if not self.num_classes:
            return {}
        labels = torch.randint(self.num_classes, (n,), generator=generator)
        return {"class_labels": labels.to(self.device)}


@dataclass
class Table:
    """One benchmark table: ``rows[label][nfe]`` is the RMSE, or ``None`` where the budget is unreachable."""

    title: str
    description: str
    nfes: tuple[int, ...]
    rows: dict[str, dict[int, float | None]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_markdown(self) -> str:
        head = "| method | " + " | ".join(f"NFE {n}" for n in self.nfes) + " |"
        sep = "|---|" + "---|" * len(self.nfes)
        lines = [f"### {self.title}", "", self.description, "", head, sep]
        for label, cells in self.rows.items():
            vals = [("-" if cells.get(n) is None else _fmt(cells[n])) for n in self.nfes]
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
        return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.2e}"


# --------------------------------------------------------------------------------------------------
# Oracles


def digits_images(n: int | None = None) -> Tensor:
    """The UCI digits training split as float64 ``(n, 1, 8, 8)`` in [-1, 1] (first ``n`` images)."""
    from mentor.data.readers import read_digits

    images, _ = read_digits("train")
    x = images.to(torch.float64) / 127.5 - 1.0
    return x if n is None else x[:n]


def gaussian_oracle() -> Oracle:
    """Gaussian data with the digits' mean and covariance; reference = the exact ODE flow."""
    data = digits_images().reshape(-1, 64)
    mean = data.mean(0)
    cov = torch.cov(data.T)
    den = GaussianDenoiser(mean, cov)

    def reference(x: Tensor, cond: dict) -> Tensor:
        return den.exact(x, 80.0, 0.002)

    return Oracle("gaussian", "Gaussian fitted to the UCI digits (d = 64); reference: the exact flow.",
                  den, (64,), reference)


def digits_oracle(n_data: int = 500, ref_steps: int = 512) -> Oracle:
    """The optimal denoiser of ``n_data`` digits images; reference = Heun with ``ref_steps`` timestamps."""
    den = EmpiricalDenoiser(digits_images(n_data))
    sigmas = get_schedule("polynomial", ref_steps)

    def reference(x: Tensor, cond: dict) -> Tensor:
        with torch.no_grad():
            return heun(den, x, sigmas, cond=cond)

    return Oracle("digits", f"Optimal denoiser of {n_data} UCI digits (8x8, [-1, 1]); reference: Heun, "
                  f"{ref_steps} polynomial timestamps ({2 * (ref_steps - 1)} NFE).", den, (1, 8, 8), reference)


def load_denoiser(run_dir: str | os.PathLike, device: str = "auto") -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """The denoiser of a trained EDM run and its info (``image_shape``, ``sigma_min``, ``sigma_max``, ...).

    Delegates to ``mentor.diffusion.edm.load_edm``; a clear error if that is not available.
    """
    try:
        from mentor.diffusion.edm import load_edm
    except ImportError as exc:
        raise RuntimeError(f"cannot benchmark {run_dir}: loading trained models needs "
                           f"mentor.diffusion.edm.load_edm, which failed to import ({exc})") from exc
    return load_edm(run_dir, device=device)


def model_oracle(run_dir: str | os.PathLike, ref_steps: int = 256, device: str = "auto",
                 feature_module: str | None = None) -> Oracle:
    """A trained EDM model; reference = Heun with ``ref_steps`` timestamps of its sigma range."""
    den, info = load_denoiser(run_dir, device=device)
    smin, smax = float(info.get("sigma_min", 0.002)), float(info.get("sigma_max", 80.0))
    sigmas = get_schedule("polynomial", ref_steps, sigma_min=smin, sigma_max=smax)
    dev = next(den.parameters()).device if hasattr(den, "parameters") else "cpu"
    conditional = bool(info.get("conditional"))

    def reference(x: Tensor, cond: dict) -> Tensor:
        with torch.no_grad():
            return heun(den, x, sigmas, cond=cond)

    name = os.path.basename(os.path.normpath(os.fspath(run_dir)))
    return Oracle(name, f"Trained EDM model `{run_dir}` ({info.get('dataset', '?')}, "
                  f"{'class-conditional' if conditional else 'unconditional'}); reference: Heun, {ref_steps} "
                  f"polynomial timestamps.", den, tuple(info["image_shape"]), reference, sigma_min=smin,
                  sigma_max=smax, dtype=torch.float32, device=dev,
                  num_classes=int(info.get("num_classes", 0)) if conditional else 0, feature_module=feature_module)


# --------------------------------------------------------------------------------------------------
# Budgets


def budget(method: str, target: int) -> tuple[int, bool] | None:
    """``(num_steps, afs)`` at which ``method`` spends exactly ``target`` evaluations (AFS only if needed).

    ``method`` is a sampler name, or ``"amed"`` (two evaluations per interval, like Heun).
    """
    name = "heun" if method == "amed" else method
    for afs in (False, True):
        for n in range(2, target + 3):
            if nfe(name, n, afs=afs) == target:
                return n, afs
    return None


# --------------------------------------------------------------------------------------------------
# The benchmark


def _rmse(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).square().flatten(1).mean(1).sqrt().mean())


def bench_oracle(oracle: Oracle, *, solvers: Sequence[str] = SOLVERS, nfes: Sequence[int] = NFES,
                 gits_solvers: Sequence[str] = GITS_SOLVERS, amed: Sequence[str] = AMED_METHODS, n: int = 256,
                 seed: int = 0, gits_samples: int = 256, teacher_steps: int = 61, amed_iterations: int = 100,
                 amed_batch: int = 64, amed_M: int | None = None, log: Callable[[str], None] | None = None) -> Table:
    """The solver x NFE table for one oracle (see the module docstring for the protocol)."""
    say = log or (lambda s: None)
    start = time.time()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *oracle.shape), generator=g, dtype=torch.float64).to(oracle.dtype).to(oracle.device)
    cond = oracle.make_cond(n, g)
    skw = oracle.schedule_kw()
    x_start = noise * oracle.sigma_max
    with torch.no_grad():
        reference = oracle.reference(x_start, cond)
    nfes = tuple(nfes)
    table = Table(f"{oracle.name}: RMSE vs reference", oracle.description + f" {n} samples, seed {seed}.", nfes)

    def run_solver(name: str, sigmas: Tensor, afs: bool) -> float:
        opts = {"vp_sigma_min": oracle.sigma_min, "vp_sigma_max": oracle.sigma_max} if name == "deis" else {}
        with torch.no_grad():
            out = SAMPLERS[name](oracle.denoiser, noise * sigmas[0].to(noise), sigmas, afs=afs, cond=cond, **opts)
        return _rmse(out, reference)

    for name in solvers:
        sched, kw = SOLVER_SCHEDULES.get(name, ("polynomial", {}))
        row: dict[int, float | None] = {}
        for target in nfes:
            b = budget(name, target)
            row[target] = None if b is None else run_solver(name, get_schedule(sched, b[0], **kw, **skw), b[1])
        table.rows[LABELS.get(name, name)] = row
        say(f"{oracle.name}: {name} done")

    for name in gits_solvers:
        row = {}
        for target in nfes:
            b = budget(name, target)
            if b is None or b[1]:
                row[target] = None
                continue
            res = gits_schedule(oracle.denoiser, oracle.shape, b[0], teacher="ipndm", teacher_steps=teacher_steps,
                                num_samples=gits_samples, batch=gits_samples, seed=seed + 1, dtype=oracle.dtype,
                                device=oracle.device, cond=oracle.make_cond(gits_samples, g), **skw)
            row[target] = run_solver(name, res.sigmas, False)
        table.rows[f"{LABELS.get(name, name)} + GITS"] = row
        say(f"{oracle.name}: {name} + GITS done")

    for key in amed:
        setting = dict(AMED_SETTINGS[key])
        if amed_M is not None:
            setting["M"] = amed_M
        row = {}
        for target in nfes:
            b = budget("amed", target)
            if b is None or b[0] < 2:
                row[target] = None
                continue
            row[target] = _amed_cell(oracle, setting, b[0], b[1], noise, cond, reference, seed, amed_iterations,
                                     amed_batch)
        table.rows[setting["label"]] = row
        say(f"{oracle.name}: {setting['label']} done")
    table.seconds = time.time() - start
    return table


def _amed_cell(oracle: Oracle, setting: dict[str, Any], num_steps: int, afs: bool, noise: Tensor, cond: dict,
               reference: Tensor, seed: int, iterations: int, batch: int) -> float:
    with torch.random.fork_rng(devices=[]):  # a reproducible initialisation without touching the global RNG
        torch.manual_seed(seed + 2)
        predictor = AMEDPredictor(**setting["predictor"]).to(device=oracle.device, dtype=oracle.dtype)
    feature = FeatureHook(oracle.denoiser, oracle.feature_module) if oracle.feature_module else InputFeature()
    skw = oracle.schedule_kw()
    gen = torch.Generator(device=oracle.device).manual_seed(seed + 3)
    train_amed(oracle.denoiser, predictor, oracle.shape, num_steps=num_steps, M=setting["M"],
               solver=setting["solver"], teacher=setting["teacher"], schedule=setting["schedule"], schedule_kw=skw,
               afs=afs, iterations=iterations, batch=batch, feature=feature,
               cond=(lambda b, gg: oracle.make_cond(b, gg)) if oracle.num_classes else None,
               generator=gen, dtype=oracle.dtype, device=oracle.device)
    sigmas = get_schedule(setting["schedule"], num_steps, **skw)
    x = noise * sigmas[0].to(noise)
    try:
        with torch.no_grad():
            if setting["solver"] == "amed":
                out = amed_solver(oracle.denoiser, x, sigmas, predictor, afs=afs, feature=feature, cond=cond)
            else:
                out = amed_plugin(oracle.denoiser, x, sigmas, predictor, base=setting["solver"], afs=afs,
                                  feature=feature, cond=cond)
    finally:
        if isinstance(feature, FeatureHook):
            feature.remove()
    return _rmse(out, reference)


def run(oracles: Sequence[str] = ("gaussian", "digits"), run_dirs: Sequence[str] = (), *,
        solvers: Sequence[str] = SOLVERS, nfes: Sequence[int] = NFES, gits: bool = True, amed: bool = True,
        amed_methods: Sequence[str] = AMED_METHODS, gits_solvers: Sequence[str] = GITS_SOLVERS, n: int = 256,
        seed: int = 0, n_data: int = 500, ref_steps: int = 512, model_ref_steps: int = 256,
        gits_samples: int = 256, amed_iterations: int = 100, amed_batch: int = 64, amed_M: int | None = None,
        device: str = "auto",
        feature_module: str | None = None, log: Callable[[str], None] | None = None) -> list[Table]:
    """Benchmark the named oracles (``"gaussian"``, ``"digits"``) and trained EDM runs; one table each."""
    for name in solvers:
        if name not in ODE_SOLVERS:
            raise ValueError(f"unknown solver {name!r}; known: {', '.join(ODE_SOLVERS)}")
    for key in amed_methods:
        if key not in AMED_SETTINGS:
            raise ValueError(f"unknown AMED method {key!r}; known: {', '.join(AMED_SETTINGS)}")
    builders = {"gaussian": gaussian_oracle, "digits": lambda: digits_oracle(n_data, ref_steps)}
    targets: list[Callable[[], Oracle]] = []
    for name in oracles:
        if name not in builders:
            raise ValueError(f"unknown oracle {name!r}; known: {', '.join(builders)}")
        targets.append(builders[name])
    for rd in run_dirs:
        targets.append(lambda rd=rd: model_oracle(rd, model_ref_steps, device, feature_module))
    tables = []
    for build in targets:
        oracle = build()
        tables.append(bench_oracle(oracle, solvers=solvers, nfes=nfes, gits_solvers=gits_solvers if gits else (),
                                   amed=amed_methods if amed else (), n=n, seed=seed, gits_samples=gits_samples,
                                   amed_iterations=amed_iterations,
                                   amed_batch=amed_batch, amed_M=amed_M, log=log))
    return tables


def to_markdown(tables: Sequence[Table], argv: Sequence[str] | None = None) -> str:
    """All tables as one markdown document, headed by the command that produced it."""
    parts = ["## Diffusion sampling: error vs reference (RMSE, lower is better)", ""]
    if argv is not None:
        parts += ["Command: `mentor bench diffusion " + " ".join(argv) + "`", ""]
    for t in tables:
        parts.append(t.to_markdown())
        parts.append(f"({t.seconds:.0f} s)\n")
    return "\n".join(parts)


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mentor bench diffusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--oracles", nargs="*", default=["gaussian", "digits"], choices=["gaussian", "digits"],
                   help="closed-form oracles to benchmark (give none to benchmark only --run-dir models)")
    p.add_argument("--run-dir", action="append", default=[], help="a trained EDM run directory (repeatable)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=sorted(ODE_SOLVERS))
    p.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    p.add_argument("--no-gits", action="store_true", help="skip the GITS rows")
    p.add_argument("--no-amed", action="store_true", help="skip the AMED rows")
    p.add_argument("--amed", nargs="+", default=list(AMED_METHODS), choices=sorted(AMED_SETTINGS))
    p.add_argument("--gits-solvers", nargs="+", default=list(GITS_SOLVERS), choices=sorted(ODE_SOLVERS))
    p.add_argument("--n", type=int, default=256, help="evaluation samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-data", type=int, default=500, help="digits images in the empirical oracle")
    p.add_argument("--ref-steps", type=int, default=512, help="Heun timestamps of the digits reference")
    p.add_argument("--model-ref-steps", type=int, default=256, help="Heun timestamps of a model's reference")
    p.add_argument("--gits-samples", type=int, default=256, help="teacher trajectories for each GITS search")
    p.add_argument("--amed-iterations", type=int, default=100)
    p.add_argument("--amed-batch", type=int, default=64)
    p.add_argument("--amed-m", type=int, default=None, help="teacher refinement M for every AMED row "
                   "(default: the paper's, 1 for AMED-Solver, 2 for the plugins)")
    p.add_argument("--feature-module", default=None, help="module of a trained model whose output feeds AMED")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the markdown to this file (with --geometry: the folder "
                   "for the figures and numbers, default runs/diffusion-geometry)")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("trajectory geometry (instead of the RMSE table)")
    g.add_argument("--geometry", action="store_true", help="measure and draw the trajectories' geometry: deviation "
                   "from the chord, denoising angles, principal directions, mean-shift weights (PNG, JSON, Markdown)")
    g.add_argument("--geometry-solver", default="euler", choices=sorted(SAMPLERS), help="solver of the trajectories")
    g.add_argument("--geometry-steps", type=int, default=20, help="solver steps (polynomial schedule)")
    g.add_argument("--geometry-n", type=int, default=32, help="trajectories per oracle or run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mentor bench diffusion``: print the markdown tables (and write them to ``--out``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.geometry:
        from mentor.diffusion.geometry_report import main as geometry_main

        return geometry_main(args, argv)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    tables = run(args.oracles, args.run_dir, solvers=args.solvers, nfes=args.nfe, gits=not args.no_gits,
                 amed=not args.no_amed, amed_methods=args.amed, gits_solvers=args.gits_solvers, n=args.n,
                 seed=args.seed, n_data=args.n_data, gits_samples=args.gits_samples, ref_steps=args.ref_steps,
                 model_ref_steps=args.model_ref_steps,
                 amed_iterations=args.amed_iterations, amed_batch=args.amed_batch, amed_M=args.amed_m,
                 device=args.device, feature_module=args.feature_module, log=log)
    text = to_markdown(tables, argv)
    print(text)
    if args.out:
        _write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
