"""The distillation benchmark on Fashion-MNIST, run through the engine as PROTOCOL.md asks.

Teachers are trained by their recipes (once; reused when their run directory is complete). Then every
method trains the same student, per seed and per regime (full data, and a stratified low-data subset),
from the same initial weights, batch order and augmentation draws, so differences are paired. The
report gives test accuracy at the last step and at the best-validation step (mean ± std over seeds),
the paired gain over the student trained alone, training images/s and extra trainable parameters.

    python benchmarks/kd.py --plan cpu                       # the CPU-sized table (2 cores, 400 steps)
    python benchmarks/kd.py --plan cpu-long --jobs 2         # low data, trained until the student alone converges
    python benchmarks/kd.py --plan gpu                       # the literature's pairs, on a GPU
    python benchmarks/kd.py --plan cpu --methods kd,dkd --seeds 0 --regimes low   # a slice
    python benchmarks/kd.py --plan cpu --report-only         # rebuild the tables from finished runs
    python benchmarks/kd.py --plan cpu --speed               # training speed of every method, side by side
    python benchmarks/kd.py --plan gpu --jobs 4              # four runs at a time (one per GPU, or sharing one)

Runs already finished are not repeated (a run directory with summary.json is reused), so the
command can be stopped and started again. Each run trains in a process of its own (``mentor.sweep``), its
output in ``<run>/log.txt``; ``<out>/sweep.json`` lists the runs and their status.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from mentor.config import load_config
from mentor.methods import METHODS, load_builtin_methods

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import mean_std, paired_gain, train_cells  # noqa: E402

SINGLE = ["kd", "dkd", "rld", "fitnet", "at", "rkd", "crd", "nst", "pkt", "sp", "vid", "ofd", "reviewkd", "kdsvd",
          "simkd", "semckd", "dskd"]
# The founding methods whose papers claim a gain over KD (the table says whether it holds by more than 2 std).
FOUNDING = ["dkd", "rld", "simkd", "semckd", "dskd", "camkd", "mmkd", "okddip"]
MULTI = ["avg_mkd", "ebkd", "camkd", "mmkd"]
ONLINE = ["dml", "okddip", "mbd"]

PLANS = {
    # 2 CPU cores: small pairs (a KD step of resnet20 -> resnet8 runs at ~1,100 img/s there).
    "cpu": {
        "teachers": ["recipes/supervised/fmnist_resnet20.yaml", "recipes/supervised/fmnist_wrn_16_1.yaml",
                     "recipes/supervised/fmnist_resnet14.yaml"],
        "students": ["resnet8"],
        "student_recipe": "recipes/supervised/fmnist_resnet8.yaml",
        "steps": {"full": 400, "low": 400},
        "batch_size": 64,
        "regimes": {"full": None, "low": 5000},
    },
    # 2 CPU cores, the low-data regime trained until the student alone has converged (its test accuracy moves
    # less than 0.3 points over the last fifth: checked from snapshot_<0.8 max_steps>.pt), with the CPU settings
    # of the demo (channels-last, evaluation batches of 128).
    "cpu-long": {
        "teachers": ["recipes/supervised/fmnist_resnet20.yaml", "recipes/supervised/fmnist_wrn_16_1.yaml",
                     "recipes/supervised/fmnist_resnet14.yaml"],
        "students": ["resnet8"],
        "student_recipe": "recipes/supervised/fmnist_resnet8.yaml",
        "steps": {"low": 6000},
        "batch_size": 64,
        "regimes": {"low": 5000},
        "overrides": ["trainer.channels_last=true", "data.eval_batch_size=128", "trainer.snapshots=[0.8]"],
    },
    # One GPU: the literature's pairs.
    "gpu": {
        "teachers": ["recipes/supervised/fmnist_resnet32x4.yaml", "recipes/supervised/fmnist_wrn_40_2.yaml",
                     "recipes/supervised/fmnist_resnet20.yaml"],
        "students": ["resnet8x4", "wrn_16_2", "shufflenetv2"],
        "student_recipe": "recipes/supervised/fmnist_resnet8x4.yaml",
        "steps": {"full": 12880, "low": 4000},
        "batch_size": 128,
        "regimes": {"full": None, "low": 5000},
    },
}


def needs_all_teachers(methods: list[str]) -> bool:
    return any("teachers" in {f.name for f in dataclasses.fields(METHODS.get(m).Config)} for m in methods)


def teacher_dirs(plan: dict, out: Path, device: str, count: int, threads: int | None = None) -> list[str]:
    """Train the first ``count`` teachers by their recipes (unless finished); their run directories."""
    runs = [(ROOT / recipe, out / "teachers" / Path(recipe).stem) for recipe in plan["teachers"][:count]]
    extra = [f"trainer.threads={threads}"] if threads else []
    train_cells([(recipe, run, [f"trainer.device={device}", "trainer.progress=false", *extra]) for recipe, run in runs],
                index=out / "sweep.json", required=True)
    return [str(run) for _, run in runs]


def method_overrides(name: str, teachers: list[str], epochs: float) -> list[str]:
    """Teacher(s) by the method's config fields; warm-ups scaled to the run's length.

    DKD and RLD warm their distillation terms up over 20 of 240 epochs in the reference; a short run
    keeps the same share (1/12 of training) rather than the same number of epochs.
    """
    fields = {f.name for f in dataclasses.fields(METHODS.get(name).Config)}
    out = []
    if "teachers" in fields:
        out.append(f"method.teachers=[{','.join(teachers)}]")
    elif "teacher" in fields:
        out.append(f"method.teacher={teachers[0]}")
    if "warmup_epochs" in fields:
        out.append(f"method.warmup_epochs={epochs / 12:.4g}")
    own = ROOT / "recipes" / "distill" / f"fmnist_{name}.yaml"
    if own.is_file():  # a method whose recipe needs clipping (SemCKD's beta = 400) keeps it here
        clip = (yaml.safe_load(own.read_text()).get("trainer") or {}).get("clip_grad")
        if clip is not None:
            out.append(f"trainer.clip_grad={clip}")
    return out


def run_one(plan: dict, method: str, student: str, regime: str, seed: int, teachers: list[str], out: Path,
            device: str, threads: int | None = None) -> tuple[Path, Path, list[str]]:
    """(recipe, run directory, overrides) of one student run."""
    run = out / regime / student / method / f"seed{seed}"
    steps = plan["steps"][regime]
    subset = plan["regimes"][regime]
    epochs = steps * plan["batch_size"] / (subset or 55000)
    overrides = [
        f"out_dir={run}", f"model.name={student}", f"method.name={method}", f"trainer.seed={seed}",
        f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // 4)}",
        f"trainer.ckpt_every={max(1, steps // 4)}", f"trainer.log_every={max(1, steps // 8)}",
        f"data.batch_size={plan['batch_size']}", f"trainer.device={device}", "trainer.progress=false",
        *method_overrides(method, teachers, epochs), *plan.get("overrides", []),
    ]
    overrides.append(f"data.subset={subset if subset is not None else 'null'}")
    if threads:
        overrides.append(f"trainer.threads={threads}")
    return ROOT / plan["student_recipe"], run, overrides


def speed(plan: dict, methods: list[str], teachers: list[str], device: str, threads: int | None,
          warmup: int = 3, steps: int = 20) -> dict[str, float]:
    """Training images/s of every method's step (the engine's own), measured one after the other in
    one process on the plan's first student, so the numbers compare (accuracy runs may have shared
    the machine with other work)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import time_steps

    from mentor.engine import Trainer

    rates = {}
    for m in ["supervised", *methods]:
        overrides = [f"model.name={plan['students'][0]}", f"method.name={m}", f"data.batch_size={plan['batch_size']}",
                     f"trainer.device={device}", "trainer.progress=false", "out_dir=/tmp/mentor-kd-speed",
                     "resume=false", f"trainer.max_steps={warmup + steps}", "schedule.warmup_steps=0",
                     "data.subset=5000",
                     *method_overrides(m, teachers, 1.0)]
        if threads:
            overrides.append(f"trainer.threads={threads}")
        tr = Trainer(load_config(ROOT / plan["student_recipe"], overrides))
        rates[m] = steps * plan["batch_size"] / time_steps(tr, warmup, steps)
        print(f"{m}: {rates[m]:,.0f} img/s", file=sys.stderr, flush=True)
    return rates


def table(results: dict, methods: list[str], seeds: list[int], rates: dict[str, float] | None = None) -> str:
    """One markdown table per (regime, student); the baseline is `supervised`. Images/s come from
    ``rates`` (a side-by-side measurement) when given, else from the runs themselves."""
    out = []
    for (regime, student), rows in results.items():
        base = [rows["supervised"][s]["test_acc_last"] for s in seeds if s in rows.get("supervised", {})]
        out.append(f"\n#### {student}, {regime} data\n")
        kd = [rows["kd"][s]["test_acc_last"] for s in seeds if s in rows.get("kd", {})]
        out.append("| method | test acc, last step | test acc, best val step | paired gain (last) | gain over KD "
                   "(last) | img/s | extra params |")
        out.append("|---|---|---|---|---|---|---|")
        for m in ["supervised", *methods]:
            if m not in rows:
                continue
            runs = [rows[m][s] for s in seeds if s in rows[m]]
            last = [r["test_acc_last"] for r in runs]
            best = [r.get("test_acc_best", float("nan")) for r in runs]
            gain = paired_gain(last, base) if m != "supervised" and len(base) == len(last) else "–"
            img_s = rates[m] if rates and m in rates else statistics.mean(r["train_img_s"] for r in runs)
            extra = runs[0].get("trainable_params", 0) - runs[0].get("student_params", 0)
            over_kd = paired_gain(last, kd) if m not in ("supervised", "kd") and len(kd) == len(last) else "–"
            name = f"**{m}**" if m in FOUNDING else m
            out.append(f"| {name} | {mean_std(last)} | {mean_std(best)} | {gain} | {over_kd} | {img_s:,.0f} | "
                       f"{extra:,} |")
        out.append("\nBold: founding methods; `*` marks a paired gain whose mean exceeds 2 std.")
    return "\n".join(out)


def convergence(out: Path, regime: str, student: str, seeds: list[int], steps: int) -> str:
    """The student alone's test accuracy at 80% of training (its snapshot) against the last step, per seed: the
    protocol's check that the baseline has converged (moves < 0.3 points over the last fifth)."""
    from mentor.engine.run import evaluate_run

    deltas = []
    for seed in seeds:
        run = out / regime / student / "supervised" / f"seed{seed}"
        snap = run / f"snapshot_{round(0.8 * steps)}.pt"
        if not (snap.is_file() and (run / "summary.json").is_file()):
            continue
        last = json.loads((run / "summary.json").read_text())["test_acc_last"]
        deltas.append(100 * (last - evaluate_run(snap)["test_acc"]))
    if not deltas:
        return ""
    verdict = "converged" if max(abs(d) for d in deltas) < 0.3 else "NOT converged"
    return (f"\nStudent alone, test accuracy over the last fifth of training (step {round(0.8 * steps)} → {steps}): "
            f"{', '.join(f'{d:+.2f}' for d in deltas)} points per seed: {verdict} by the protocol's 0.3-point rule.\n")


def main() -> None:
    load_builtin_methods()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), default="cpu")
    p.add_argument("--methods", default=",".join(SINGLE + MULTI + ONLINE))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--regimes", default=None, help="comma-separated (default: every regime of the plan)")
    p.add_argument("--out", default="runs/bench/kd")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: the cores divided "
                   "among the runs at a time)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in a process of its own (one per GPU, "
                   "or sharing them)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--speed", action="store_true", help="measure every method's training speed side by side "
                   "(written to speed.json and used for the img/s column)")
    args = p.parse_args()
    plan = PLANS[args.plan]
    args.regimes = args.regimes or ",".join(plan["regimes"])
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; registered: {', '.join(METHODS.names())}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) / args.plan
    count = len(plan["teachers"]) if needs_all_teachers(methods) else 1
    if args.report_only:
        teachers = [str(out / "teachers" / Path(r).stem) for r in plan["teachers"][:count]]
    else:
        teachers = teacher_dirs(plan, out, args.device, count, args.threads)
    grid = [(regime, student, m, seed) for regime in args.regimes.split(",") for student in plan["students"]
            for m in ["supervised", *methods] for seed in seeds]
    if not args.report_only:
        train_cells([run_one(plan, m, student, regime, seed, teachers, out, args.device, args.threads)
                     for regime, student, m, seed in grid], jobs=args.jobs, index=out / "sweep.json")
    results: dict = {}
    for regime, student, m, seed in grid:
        rows = results.setdefault((regime, student), {})
        run = out / regime / student / m / f"seed{seed}" / "summary.json"
        if run.is_file():
            rows.setdefault(m, {})[seed] = json.loads(run.read_text())
    speed_file = out / "speed.json"
    if args.speed:
        rates = speed(plan, methods, teachers, args.device, args.threads)
        old = json.loads(speed_file.read_text()) if speed_file.is_file() else {}
        speed_file.write_text(json.dumps({**old, **rates}, indent=2) + "\n")
    rates = json.loads(speed_file.read_text()) if speed_file.is_file() else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    teacher_rows = []
    for t in teachers:
        s = Path(t) / "summary.json"
        if s.is_file():
            info = json.loads(s.read_text())
            sha = hashlib.sha256((Path(t) / "best.pt").read_bytes()).hexdigest()[:12]
            teacher_rows.append(f"| {info['model']} | {Path(t).name} | {sha} | {100 * info['test_acc_last']:.2f} |")
    header = [f"Command: `python benchmarks/kd.py --plan {args.plan} --methods {args.methods} --seeds {args.seeds} "
              f"--regimes {args.regimes}`, commit {commit}.", "",
              "| teacher | recipe | best.pt SHA-256 | test acc |", "|---|---|---|---|", *teacher_rows]
    if rates:
        header += ["", f"img/s: training steps of batch {plan['batch_size']} measured one method after the other "
                   f"in one process (`--speed`), not the accuracy runs' own rates."]
    text = "\n".join(header) + "\n" + table(results, methods, seeds, rates) + "\n"
    for regime, student in results:
        text += convergence(out, regime, student, seeds, plan["steps"][regime])
    (out / "report.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
