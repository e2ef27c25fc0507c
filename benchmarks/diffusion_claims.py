"""The founding diffusion papers' headline claims, tested on a trained EDM model with many samples and seeds.

Each claim compares a method with its baseline at the same number of denoiser evaluations (NFE):

- AMED-Plugin on iPNDM against plain iPNDM, NFE 3-6 (AMED, CVPR 2024);
- AMED-Solver against DPM-Solver-2, NFE 3-6 (AMED);
- GITS timestamps against the polynomial schedule, for iPNDM and Euler, NFE 4-6 (GITS, ICML 2024);
- SFD's few-step student (Euler, AFS) against its teacher, DPM-Solver++(3M) on the (M+1)(N-1)+1 grid, and
  against iPNDM at the student's NFE, NFE 2-4 (SFD, NeurIPS 2024).

The measure is the Fréchet distance (and KID) of ``--n`` samples on the penultimate features of a classifier
trained on the same data (``FD-FMNIST``; not FID) against the real test images. Every method of one seed starts
from the same noise (``initial_noise(n, shape, seed)``), so the seeds pair the comparisons: a claim holds when the
mean of the per-seed differences (method - baseline) is negative by more than 2 std of those differences.

What is trained (AMED predictors, GITS schedules, SFD students) sees other noise than the samples scored. It is
trained once (seed 0) and cached in ``<out>/trained/``; finished cells are cached in ``<out>/cells.json``, so
the command can be stopped and started again. With ``--train-only`` first, processes given different ``--seeds``
can sample into the same folder at once; a last call with every seed writes the table.

    python benchmarks/diffusion_claims.py --run runs/diffusion/fmnist_edm_cpu \\
        --classifier runs/supervised/fmnist_resnet20 --n 10000 --seeds 0 1 2 --out runs/bench/diffusion/claims
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from mentor.diffusion import (
    SAMPLERS,
    AMEDPredictor,
    ClassifierFeatures,
    FeatureHook,
    InputFeature,
    amed_sample,
    frechet_distance,
    gaussian_stats,
    gits_schedule,
    kid,
    load_edm,
    load_predictor,
    load_student,
    save_predictor,
    save_student,
    sfd_distill,
    sfd_sample,
    train_amed,
)
from mentor.diffusion.bench import AMED_SETTINGS, budget
from mentor.diffusion.sample import initial_noise
from mentor.diffusion.schedules import get_schedule
from mentor.engine.trainer import hardware_name
from mentor.fileio import atomic_write_bytes

AMED_NFE = (3, 4, 5, 6)
GITS_NFE = (4, 5, 6)
SFD_NFE = (2, 3, 4)
CLAIMS = ("amed_plugin", "amed_solver", "gits", "sfd")


class Cell(NamedTuple):
    """One method at one NFE; ``make()`` builds (training what it needs, once) its sampler of unscaled noise."""

    label: str
    nfe: int
    make: Callable[[], Callable[[Tensor], Tensor]]
    trained: bool = False  # the sampler needs a trained piece (AMED predictor, GITS schedule, SFD student)


class Claims:
    """The trained pieces and the sampling of one EDM run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.trained = self.out / "trained"
        self.trained.mkdir(parents=True, exist_ok=True)
        self.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        self.device = "cpu" if self.device == "auto" else self.device
        self.den, self.info = load_edm(args.run, device=self.device)
        self.den.requires_grad_(False)
        self.shape = tuple(self.info["image_shape"])
        self.skw = {"sigma_min": float(self.info["sigma_min"]), "sigma_max": float(self.info["sigma_max"])}

    def say(self, text: str) -> None:
        print(f"{datetime.datetime.now():%H:%M:%S} {text}", file=sys.stderr, flush=True)

    # -- trained pieces (seed 0, noise the scored samples never use) ---------------------------------------
    def feature(self):
        return FeatureHook(self.den, self.args.feature_module) if self.args.feature_module else InputFeature()

    def amed(self, key: str, target: int) -> tuple[AMEDPredictor, dict]:
        path = self.trained / f"{key}_nfe{target}.pt"
        if not path.exists():
            setting = AMED_SETTINGS[key]
            steps, afs = budget("amed", target)
            self.say(f"training {setting['label']} for NFE {target} ({self.args.amed_iterations} iterations)")
            torch.manual_seed(0)
            predictor = AMEDPredictor(**setting["predictor"]).to(self.device)
            feature = self.feature()
            try:
                res = train_amed(self.den, predictor, self.shape, num_steps=steps, M=self.args.amed_M or setting["M"],
                                 solver=setting["solver"], teacher=setting["teacher"], schedule=setting["schedule"],
                                 schedule_kw=self.skw, afs=afs, iterations=self.args.amed_iterations,
                                 batch=self.args.train_batch, feature=feature,
                                 generator=torch.Generator(self.device).manual_seed(1000 + target),
                                 device=self.device, out_dir=self.trained / f"{key}_nfe{target}_run")
            finally:
                if isinstance(feature, FeatureHook):
                    feature.remove()
            config = dict(res.config, feature_module=self.args.feature_module)
            save_predictor(path, predictor, config)
        return load_predictor(path, map_location=self.device)

    def gits(self, solver: str, target: int) -> Tensor:
        path = self.trained / f"gits_{solver}_nfe{target}.pt"
        if not path.exists():
            steps, _ = budget(solver, target)
            self.say(f"searching GITS timestamps for {solver} at NFE {target}")
            res = gits_schedule(self.den, self.shape, steps, teacher="ipndm", teacher_steps=61,
                                num_samples=self.args.gits_samples, batch=self.args.gits_samples, seed=2000 + target,
                                device=self.device, **self.skw)
            torch.save(res.sigmas.cpu(), path)
        return torch.load(path, weights_only=True)

    def sfd(self, target: int) -> tuple[torch.nn.Module, dict]:
        path = self.trained / f"sfd_nfe{target}.pt"
        student = copy.deepcopy(self.den)
        if not path.exists():
            steps = target + 2  # Euler with AFS: N - 2 evaluations
            self.say(f"distilling an SFD student for NFE {target} ({self.args.sfd_iterations} iterations)")
            student.requires_grad_(True)
            res = sfd_distill(student, self.den, self.shape, num_steps=steps, M=self.args.sfd_M, schedule="polynomial",
                              schedule_kw=self.skw, afs=True, iterations=self.args.sfd_iterations,
                              batch=self.args.train_batch,
                              generator=torch.Generator(self.device).manual_seed(3000 + target),
                              device=self.device, out_dir=self.trained / f"sfd_nfe{target}_run")
            save_student(path, student, res.config)
        config = load_student(path, student, map_location=self.device)
        return student.requires_grad_(False), config

    # -- the sampled cells ---------------------------------------------------------------------------------
    def cells(self, claims: Sequence[str] = CLAIMS) -> list[Cell]:
        """Every cell the named claims compare (baselines included once), each with a lazy sampler."""
        den, skw, m = self.den, self.skw, self.args.sfd_M
        want: dict[tuple[str, int], Cell] = {}

        def add(label: str, t: int, make: Callable[[], Callable[[Tensor], Tensor]], trained: bool = False) -> None:
            want.setdefault((label, t), Cell(label, t, make, trained))

        def plain(solver: str, target: int, sigmas: Callable[[], Tensor] | None = None):
            steps, afs = budget(solver, target)

            def make() -> Callable[[Tensor], Tensor]:
                s = sigmas() if sigmas is not None else get_schedule("polynomial", steps, **skw)
                return lambda z: SAMPLERS[solver](den, z * s[0].to(z), s.to(z), afs=afs)
            return make

        for claim in claims:
            if claim == "amed_plugin":
                for t in AMED_NFE:
                    add("iPNDM", t, plain("ipndm", t))
                    add("AMED-Plugin (iPNDM)", t, lambda t=t: self._amed_sampler("amed_plugin_ipndm", t), True)
            elif claim == "amed_solver":
                for t in AMED_NFE:
                    add("DPM-Solver-2", t, plain("dpm_solver_2", t))
                    add("AMED-Solver", t, lambda t=t: self._amed_sampler("amed_solver", t), True)
            elif claim == "gits":
                for t in GITS_NFE:
                    for solver, label in (("ipndm", "iPNDM"), ("euler", "Euler")):
                        add(label, t, plain(solver, t))
                        add(f"{label} + GITS", t, plain(solver, t, sigmas=lambda s=solver, t=t: self.gits(s, t)),
                            True)
            elif claim == "sfd":
                for t in SFD_NFE:
                    steps = t + 2  # Euler with AFS spends N - 2 evaluations
                    grid = get_schedule("polynomial", (m + 1) * (steps - 1) + 1, **skw)
                    add("iPNDM", t, plain("ipndm", t))
                    add(f"SFD teacher (DPM-Solver++(3M), NFE {(m + 1) * (steps - 1)})", t,
                        lambda g=grid: lambda z: SAMPLERS["dpm_solver_pp"](den, z * g[0].to(z), g.to(z), max_order=3))
                    add("SFD", t, lambda t=t: self._sfd_sampler(t), True)
            else:
                raise ValueError(f"unknown claim {claim!r}; known: {', '.join(CLAIMS)}")
        return sorted(want.values(), key=lambda c: (c.nfe, c.label))

    def _amed_sampler(self, key: str, target: int) -> Callable[[Tensor], Tensor]:
        predictor, config = self.amed(key, target)
        predictor = predictor.float()

        def run(z: Tensor) -> Tensor:
            feature = self.feature()  # hooked for this batch only
            try:
                return amed_sample(self.den, z, predictor, config, feature=feature)
            finally:
                if isinstance(feature, FeatureHook):
                    feature.remove()
        return run

    def _sfd_sampler(self, target: int) -> Callable[[Tensor], Tensor]:
        student, config = self.sfd(target)
        return lambda z: sfd_sample(student, z, config)


def merge_cells(store: Path, new: dict[str, dict] | None = None) -> dict[str, dict]:
    """The finished cells in ``store``, with ``new`` added under a lock (processes sampling other seeds into the
    same folder add theirs)."""
    with open(store.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cells = json.loads(store.read_text()) if store.exists() else {}
        if new:
            cells.update(new)
            atomic_write_bytes(store, json.dumps(cells, indent=1).encode())
    return cells


def cell_key(label: str, nfe: int, seed: int) -> str:
    return f"{label} | {nfe} | {seed}"


def claims_table(results: dict[str, dict], seeds: list[int], tag: str) -> list[str]:
    """The claims: method against baseline per NFE, FD mean ± std over seeds and the paired difference."""
    def fd(label: str, nfe: int) -> list[float]:
        return [results[cell_key(label, nfe, s)][f"FD-{tag}"] for s in seeds
                if cell_key(label, nfe, s) in results]

    pairs = ([("AMED-Plugin (iPNDM)", "iPNDM", t) for t in AMED_NFE]
             + [("AMED-Solver", "DPM-Solver-2", t) for t in AMED_NFE]
             + [("iPNDM + GITS", "iPNDM", t) for t in GITS_NFE]
             + [("Euler + GITS", "Euler", t) for t in GITS_NFE]
             + [("SFD", "iPNDM", t) for t in SFD_NFE])
    teachers = {t: next((k.split(" | ")[0] for k in results if k.startswith("SFD teacher") and
                         k.split(" | ")[1] == str(t)), None) for t in SFD_NFE}
    pairs += [("SFD", teachers[t], t) for t in SFD_NFE if teachers[t]]
    rows = [f"| method | baseline | NFE | FD-{tag} method | FD-{tag} baseline | paired difference | claim |",
            "|---|---|---|---|---|---|---|"]
    for method, base, t in pairs:
        a, b = fd(method, t), fd(base, t)
        if not a or len(a) != len(b):
            continue
        diff = [x - y for x, y in zip(a, b)]
        m = statistics.mean(diff)
        sd = statistics.stdev(diff) if len(diff) > 1 else float("nan")
        verdict = ("holds" if m < 0 and abs(m) > 2 * sd else "reversed" if m > 0 and abs(m) > 2 * sd
                   else "not separated")
        rows.append(f"| {method} | {base} | {t} | {_ms(a)} | {_ms(b)} | {m:+.3f} ± {sd:.3f} | {verdict} |")
    return rows


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def cells_table(results: dict[str, dict], seeds: list[int], tag: str) -> list[str]:
    labels: dict[tuple[str, int], None] = {}
    for k in results:
        label, nfe, _ = k.split(" | ")
        labels[(label, int(nfe))] = None
    rows = [f"| method | NFE | FD-{tag} | KID-{tag} ×1000 | sampling s per seed |", "|---|---|---|---|---|"]
    for label, nfe in sorted(labels, key=lambda x: (x[1], x[0])):
        got = [results[cell_key(label, nfe, s)] for s in seeds if cell_key(label, nfe, s) in results]
        seconds = statistics.mean(g["seconds"] for g in got)
        rows.append(f"| {label} | {nfe} | {_ms([g[f'FD-{tag}'] for g in got])} | "
                    f"{_ms([1000 * g[f'KID-{tag}'] for g in got])} | {seconds:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="an edm run directory")
    p.add_argument("--classifier", required=True, help="a `mentor train` classifier run on the same data")
    p.add_argument("--n", type=int, default=10000, help="samples per cell and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True, help="output folder (trained pieces, cells.json, claims.md)")
    p.add_argument("--feature-module", default="net.mid", help="the U-Net module the AMED predictor reads")
    p.add_argument("--amed-iterations", type=int, default=160, help="AMED: iterations (x batch = trajectories)")
    p.add_argument("--sfd-iterations", type=int, default=200, help="SFD: iterations (x batch = trajectories)")
    p.add_argument("--baselines-only", action="store_true",
                   help="sample only the cells that need nothing trained (to run beside a --train-only process)")
    p.add_argument("--trained-only", action="store_true",
                   help="sample only the cells of trained pieces (the complement of --baselines-only)")
    p.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=CLAIMS, help="which claims to test")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help="only these NFE (default: each claim's)")
    p.add_argument("--amed-M", type=int, default=None, help="AMED's teacher steps per interval (default: the "
                   "paper's, 1 for AMED-Solver, 2 for AMED-Plugin)")
    p.add_argument("--sfd-M", type=int, default=3, help="SFD's teacher steps per student interval (the paper's 3)")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--gits-samples", type=int, default=256)
    p.add_argument("--batch", type=int, default=100, help="sampling batch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-only", action="store_true",
                   help="train the AMED predictors, GITS schedules and SFD students, then stop (several processes "
                        "can then sample different --seeds into the same --out at once)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.baselines_only and args.trained_only:
        p.error("--baselines-only and --trained-only exclude each other")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    claims = Claims(args)
    feats = ClassifierFeatures(args.classifier, device=claims.device)
    tag = feats.tag
    ref = feats(feats.images("test"))
    ref_stats = gaussian_stats(ref)
    store = claims.out / "cells.json"
    results = merge_cells(store)
    cells = claims.cells(args.claims)
    if args.nfe:
        cells = [c for c in cells if c.nfe in args.nfe]
    if args.baselines_only or args.trained_only:
        cells = [c for c in cells if c.trained == args.trained_only]
    if args.train_only:
        for cell in cells:
            cell.make()
        return 0
    claims.say(f"{len(cells)} cells x {len(args.seeds)} seeds, {args.n} samples each")
    for seed in args.seeds:
        noise = initial_noise(args.n, claims.shape, seed)
        for cell in cells:
            label, nfe = cell.label, cell.nfe
            key = cell_key(label, nfe, seed)
            if key in results:
                continue
            fn = cell.make()
            start = time.time()
            with torch.no_grad():
                feats_out = torch.cat([feats(fn(noise[i:i + args.batch].to(claims.device)).float().clamp(-1, 1))
                                       for i in range(0, args.n, args.batch)])
            seconds = time.time() - start
            fd = frechet_distance(*gaussian_stats(feats_out), *ref_stats)
            k = kid(feats_out, ref, num_subsets=100, subset_size=1000)
            if not (math.isfinite(fd) and math.isfinite(k)):
                raise RuntimeError(f"{key}: non-finite FD/KID ({fd}, {k})")
            results = merge_cells(store, {key: {f"FD-{tag}": fd, f"KID-{tag}": k, "seconds": seconds}})
            claims.say(f"seed {seed}: {label} NFE {nfe}: FD {fd:.3f} ({seconds:.0f} s)")
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"Command: `python benchmarks/diffusion_claims.py {cmd}`", "",
            f"Run `{args.run}` (step {claims.info['step']}, EMA {claims.info['ema']}); {args.n:,} samples per cell "
            f"and seed, seeds {', '.join(map(str, args.seeds))} (shared noise within a seed); reference: the "
            f"{len(ref):,} test images; classifier `{args.classifier}`; AMED {args.amed_iterations} iterations x "
            f"{args.train_batch} (M {args.amed_M or 'as published'}, feature `{args.feature_module or 'input'}`), "
            f"SFD {args.sfd_iterations} iterations x {args.train_batch} (M {args.sfd_M}), GITS "
            f"{args.gits_samples} iPNDM trajectories of 61 timestamps; {hardware_name(torch.device(claims.device))}, "
            f"torch {torch.__version__}, {datetime.date.today().isoformat()}, {(time.time() - t0) / 60:.0f} min.",
            ""]
    train = feats.images("train")[:args.n]
    floor = frechet_distance(*gaussian_stats(feats(train)), *ref_stats)
    head.insert(-1, f"Floor: {len(train):,} real training images against the test images, FD-{tag} {floor:.3f}.")
    body = claims_table(results, args.seeds, tag) + [""] + cells_table(results, args.seeds, tag)
    text = "\n".join(head + body) + "\n"
    atomic_write_bytes(claims.out / "claims.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
