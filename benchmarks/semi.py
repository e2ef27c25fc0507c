"""The semi-supervised benchmark on Fashion-MNIST, through the engine, as PROTOCOL.md asks.

Every method trains from its recipe ``recipes/semi/fmnist_<method>.yaml`` with the plan's network,
schedule and batch, on ``labels_per_class`` labels per class (the fold is ``data.label_seed``) and the rest
of the training split as the unlabelled stream. Within a seed every method shares the fold, the
initial weights, the batch order and the augmentation draws, so differences are paired. Rows:

- ``supervised``: the labelled images alone (the floor);
- every semi-supervised method, the founding ones marked;
- ``fully_supervised``: every training image labelled (the ceiling).

Columns: test accuracy at the last step of the EMA copy (the number the SSL literature reports) and of
the raw network, test accuracy at the best validation step (raw), paired gains over FixMatch and over
the floor (EMA, last step; * where |mean| > 2 std), the cost, and the founding paper's published number
(CIFAR/STL, a different dataset and network: for orientation only). Validation is ``data.val_size``
labelled images carved from the training split before the labels are drawn; it chooses the best-val
column and nothing else. The mismatched regime (``--regimes lt``) keeps the labels balanced and makes the
unlabelled pool long-tailed (``data.unlabeled_imbalance=100``), the setting of RDA's robustness claim.

    python benchmarks/semi.py --plan cpu                 # the CPU plan (2 cores, 2 runs at a time)
    python benchmarks/semi.py --plan gpu                 # wrn_28_2, every method and regime (one GPU)
    python benchmarks/semi.py --plan cpu --methods fixmatch,rda --regimes 4 --seeds 0
    python benchmarks/semi.py --plan cpu --report-only   # rebuild the tables from finished runs

Finished runs (a run directory with summary.json) are reused, so the command can be stopped and started
again. Each run trains in a process of its own (``mentor.sweep``), its output in ``<run>/log.txt``;
``<out>/sweep.json`` lists the runs and their status. The report goes to ``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import mean_std, paired_gain, train_cells  # noqa: E402

USB = ["pseudo_label", "pi_model", "mean_teacher", "vat", "mixmatch", "remixmatch", "uda", "fixmatch",
       "flexmatch", "dash", "freematch", "softmatch", "adamatch", "simmatch", "comatch", "defixmatch"]
FOUNDING = ["unimatch", "shrinkmatch", "mutexmatch", "rda", "soc", "rkd_unlabeled"]
FLOOR, CEILING = "supervised", "fully_supervised"

# The founding papers' (and FixMatch's) published accuracies, on their datasets and networks.
PUBLISHED = {
    "fixmatch": "CIFAR-10@40: 86.19 ± 3.37 (RA, WRN-28-2, 5 folds)",
    "shrinkmatch": "CIFAR-10@40: 94.92 (5 seeds); STL-10@40: 85.98",
    "mutexmatch": "CIFAR-10@40: 93.22 (k=C), 94.21 (k=0.6C)",
    "rda": "CIFAR-10@40: 94.13 (seed 1)",
    "unimatch": "segmentation only (Pascal 1/16: 75.2 mIoU)",
    "soc": "fine-grained only (Semi-Aves scratch: 32.3 top-1)",
    "rkd_unlabeled": "teacher trained on all of CIFAR-10 (not comparable)",
}

PLANS = {
    # 2 CPU cores, 2 runs at a time on one thread each. ResNet-8, batch 16 labelled + 32 unlabelled
    # (mu = 2), 300 steps: a short schedule that fits every method in about an hour. EMA decay 0.95: over
    # 300 steps a 0.999 average would still be mostly the initial weights.
    "cpu": {
        "model": "resnet8", "batch_size": 16, "mu": 2, "steps": 300, "ema": 0.95, "val_size": 500,
        "eval_batch": 256, "threads": 1, "jobs": 2,
        # every method at 4 labels per class; the floor, FixMatch and the founding methods at 25 and 400,
        # and the mismatched regime for RDA's claim
        "regimes": {"4": "all", "25": "core", "400": "core", "lt": "lt"},
    },
    # 2 CPU cores, four times longer, 40 labels only: the floor, FixMatch and the founding methods.
    "cpu-long": {
        "model": "resnet8", "batch_size": 16, "mu": 2, "steps": 1200, "ema": 0.99, "val_size": 500,
        "eval_batch": 256, "threads": 1, "jobs": 2, "regimes": {"4": "core"},
    },
    # One GPU: the literature's SSL network, long enough for the accuracies to settle.
    "gpu": {
        "model": "wrn_28_2", "batch_size": 64, "mu": 7, "steps": 20000, "ema": 0.999, "val_size": 500,
        "eval_batch": 1000, "threads": None, "jobs": 1,
        "regimes": {"4": "all", "25": "all", "400": "all", "lt": "lt"},
    },
}
REGIMES = {"4": (4, None), "25": (25, None), "400": (400, None), "lt": (4, 100.0)}
CORE = [FLOOR, "fixmatch", *FOUNDING, CEILING]
LT = [FLOOR, "fixmatch", "flexmatch", "rda", "shrinkmatch", CEILING]


def recipe_of(method: str) -> Path:
    if method in (FLOOR, CEILING):
        return ROOT / "recipes/semi/fmnist_supervised_40.yaml"
    return ROOT / f"recipes/semi/fmnist_{method}.yaml"


def overrides(plan: dict, method: str, regime: str, seed: int, run: Path) -> list[str]:
    labels, imbalance = REGIMES[regime]
    steps = plan["steps"]
    out = [f"out_dir={run}", f"model.name={plan['model']}", f"data.batch_size={plan['batch_size']}",
           f"data.val_size={plan['val_size']}", f"data.unlabeled_ratio={plan['mu']}", f"trainer.seed={seed}",
           f"data.label_seed={seed}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
           f"trainer.ckpt_every={steps}", f"trainer.log_every={max(1, steps // 4)}", f"trainer.ema={plan['ema']}",
           "trainer.progress=false", "schedule.warmup_steps=0", f"data.eval_batch_size={plan['eval_batch']}"]
    if plan["threads"]:
        out.append(f"trainer.threads={plan['threads']}")
    out.append("data.labels_per_class=null" if method == CEILING else f"data.labels_per_class={labels}")
    if imbalance is not None and method != CEILING:
        out.append(f"data.unlabeled_imbalance={imbalance}")
    if method == "rkd_unlabeled":
        # The teacher is FixMatch's run of the same regime and seed: it has seen the same labels and nothing
        # more (the recipe's teacher, trained on every label, would leak labels into a few-label benchmark).
        out.append(f"method.teacher={run_dir(run.parents[2], regime, 'fixmatch', seed)}")
    return out


def methods_of(plan: dict, regime: str, chosen: list[str] | None) -> list[str]:
    kind = plan["regimes"][regime]
    names = [FLOOR, *USB, *FOUNDING, CEILING] if kind == "all" else CORE if kind == "core" else LT
    return [m for m in names if chosen is None or m in chosen]


def run_grid(plan: dict, out: Path, regimes: list[str], seeds: list[int], chosen: list[str] | None) -> None:
    jobs = []
    for regime in regimes:
        for method in methods_of(plan, regime, chosen):
            if not recipe_of(method).is_file():
                print(f"skipping {method}: no recipe {recipe_of(method).relative_to(ROOT)}")
                continue
            for seed in seeds:
                run = run_dir(out, regime, method, seed)
                if not (run / "summary.json").is_file() and all(run != j[2] for j in jobs):
                    jobs.append((str(recipe_of(method)), overrides(plan, method, regime, seed, run), run))
    # rkd_unlabeled runs after the FixMatch runs that are their teachers (a stage of their own)
    for stage in (False, True):
        train_cells([(recipe, run, ovr) for recipe, ovr, run in jobs if ("rkd_unlabeled" in str(run)) == stage],
                    jobs=plan["jobs"], index=out / "sweep.json")


def run_dir(out: Path, regime: str, method: str, seed: int) -> Path:
    """Where a run lives; the ceiling (every label) is one run per seed, shown in every regime's table."""
    return out / (CEILING if method == CEILING else f"{regime}/{method}") / f"seed{seed}"


def _load(out: Path, regime: str, method: str, seeds: list[int]) -> dict[int, dict]:
    found = {}
    for s in seeds:
        f = run_dir(out, regime, method, s) / "summary.json"
        if f.is_file():
            found[s] = json.loads(f.read_text())
    return found


def _gain(rows: dict[int, dict], base: dict[int, dict], key: str) -> str:
    common = [s for s in rows if s in base]
    if len(common) < 2:
        return "–"
    return paired_gain([rows[s][key] for s in common], [base[s][key] for s in common])


def table(out: Path, plan: dict, regime: str, seeds: list[int]) -> str:
    key = "test_acc_ema_last"
    res = {m: _load(out, regime, m, seeds) for m in methods_of(plan, regime, None)}
    res = {m: r for m, r in res.items() if r}
    if not res:
        return ""
    fix, floor = res.get("fixmatch", {}), res.get(FLOOR, {})
    lines = ["| method | EMA, last | raw, last | raw, best val | gain over FixMatch | gain over supervised | "
             "cost (min) | published (other data) |", "|---|---|---|---|---|---|---|---|"]
    for m, rows in res.items():
        rs = list(rows.values())
        name = f"**{m}** (founding)" if m in FOUNDING else m
        cost = sum(r["wall_s"] for r in rs) / 60
        lines.append(
            f"| {name} | {mean_std([r[key] for r in rs])} | {mean_std([r['test_acc_last'] for r in rs])} | "
            f"{mean_std([r['test_acc_best'] for r in rs])} | "
            f"{_gain(rows, fix, key) if m not in ('fixmatch', FLOOR, CEILING) else '–'} | "
            f"{_gain(rows, floor, key) if m not in (FLOOR, CEILING) else '–'} | {cost:.1f} | "
            f"{PUBLISHED.get(m, '')} |")
    return "\n".join(lines)


def verdicts(out: Path, plan: dict, regimes: list[str], seeds: list[int]) -> str:
    """Which founding method beats FixMatch by more than 2 std (EMA, last step), per regime."""
    key = "test_acc_ema_last"
    lines = []
    for regime in regimes:
        fix = _load(out, regime, "fixmatch", seeds)
        for m in FOUNDING:
            rows = _load(out, regime, m, seeds)
            common = [s for s in rows if s in fix]
            if len(common) < 2:
                continue
            d = [100 * (rows[s][key] - fix[s][key]) for s in common]
            mu, sd = statistics.mean(d), statistics.stdev(d)
            verdict = ("beats FixMatch" if mu > 2 * sd else "is below FixMatch" if mu < -2 * sd
                       else "is not separated from FixMatch")
            lines.append(f"- {regime_title(regime)}: {m} {verdict} ({mu:+.2f} ± {sd:.2f} points, "
                         f"{len(common)} paired seeds).")
    return "\n".join(lines)


def regime_title(regime: str) -> str:
    labels, imbalance = REGIMES[regime]
    text = f"{labels} labels per class ({10 * labels} labels)"
    return text + f", long-tailed unlabelled pool (imbalance {imbalance:g})" if imbalance else text


def provenance(plan_name: str, plan: dict, argv: list[str]) -> str:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return (f"Command: `python benchmarks/semi.py {' '.join(argv)}`, commit {commit}, {device}, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Plan `{plan_name}`: {plan}.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), default="cpu")
    p.add_argument("--regimes", default=None, help="comma list of 4, 25, 400, lt (default: the plan's)")
    p.add_argument("--methods", default=None, help="comma list (default: the plan's for each regime)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="default runs/bench/semi-<plan>")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the plan's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the plan's)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    plan = dict(PLANS[args.plan])
    if args.steps:
        plan["steps"] = args.steps
    if args.jobs:
        plan["jobs"] = args.jobs
    regimes = args.regimes.split(",") if args.regimes else list(plan["regimes"])
    unknown = [r for r in regimes if r not in plan["regimes"]]
    if unknown:
        p.error(f"unknown regime(s) {unknown}; choose from {', '.join(plan['regimes'])}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or f"runs/bench/semi-{args.plan}")
    t0 = time.time()
    if not args.report_only:
        run_grid(plan, out, regimes, seeds, args.methods.split(",") if args.methods else None)
    parts = [provenance(args.plan, plan, sys.argv[1:])]
    for regime in regimes:
        text = table(out, plan, regime, seeds)
        if text:
            parts.append(f"\n### {regime_title(regime)}\n\n{text}\n")
    parts.append("\n### Founding methods against FixMatch (EMA, last step)\n\n" + verdicts(out, plan, regimes, seeds))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("".join(parts) + "\n")
    print((out / "report.md").read_text())
    print(f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
