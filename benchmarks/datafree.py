"""Data-free distillation: every method of ``mentor.datafree`` against distillation with real data.

A teacher is trained by its recipe (once; reused when finished). Every data-free method then distils it
into the same student, per seed, with the same number of student steps at the same batch size; the
synthesis steps come on top in each method's own ratio, so the cost columns differ. Beside them, the same
student distilled with real data (KD, the ceiling) and trained alone on real data (the reference), for the
same number of steps. Within a seed every run starts from the same student weights, so gains are paired
(mean ± std of per-seed differences; * where |mean| > 2 std).

Reported per method: test accuracy at the last step (the data-free number) and at the step chosen on the
real validation split (which a data-free user would not have: labelled "best val"), synthesis seconds and
student seconds (``phase_seconds``), images synthesised, and a grid of synthetic images in ``docs/img``.

    python benchmarks/datafree.py --plan cpu --seeds 0,1,2 --jobs 2
    python benchmarks/datafree.py --plan gpu --device cuda
    python benchmarks/datafree.py --report-only

Finished runs (a run directory with summary.json) are reused. Each run trains in a process of its own
(``mentor.sweep``), its output in ``<run>/log.txt``; ``<out>/sweep.json`` lists the runs and their status. The
report goes to ``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
from report import mean_std, paired_gain, train_cells, write_report  # noqa: E402

ANCHORS = ["dafl", "zskt", "dfad", "dfq", "deepinversion", "cmi", "fast"]
FOUNDING = ["csd", "cpsc_dfkd", "dfkd_fgvc", "dfdg"]
METHODS = ANCHORS + FOUNDING
CLAIM_BASELINES = ["deepinversion", "cmi", "fast"]

# Published numbers (as published, not reproduced): CIFAR-10 from the Fast-Datafree README (ResNet-34 ->
# ResNet-18 / WRN-40-2 -> WRN-16-1), DFAD from its README (ResNet-34 -> ResNet-18), DFKD-FGVC from its
# paper (ResNet-34 -> ResNet-18 on CUB-200; CMI 53.53 there). CSD, CPSC-DFKD and DFDG publish no table
# that could be found.
PUBLISHED = {
    "dafl": "92.22 / 65.71 (C10)", "zskt": "93.32 / 83.74 (C10)", "dfad": "93.3 (C10, R34→R18)",
    "dfq": "94.61 / 86.14 (C10)", "deepinversion": "93.26 / 83.04 (C10)", "cmi": "94.84 / 90.01 (C10)",
    "fast": "94.05 / 89.29 (C10, Fast-10)", "dfkd_fgvc": "56.93 (CUB-200; CMI 53.53)",
    "csd": "not found", "cpsc_dfkd": "not found", "dfdg": "not found",
}

# The CPU plan (2 cores, one thread per run, two runs at once, about 55 minutes): ResNet-20 -> ResNet-8 on
# Fashion-MNIST, 64 synthetic images per step and 500 student steps for every method. Synthesis budgets are
# scaled to 2 cores (CPU_SCALE): the pool methods run rounds of 25 student steps (so the pool grows to about
# 1,300 images) after 20 (DeepInversion), 12 (CMI, CSD) or 5 (Fast-5) synthesis steps; DFDG alternates 1 step
# of each generator with 2 student steps (its paper: 20 + 20 with 2) and DFKD-FGVC 10 generator steps with 15
# student steps (its paper: 20 with 15). The other online methods keep their papers' ratios.
# The GPU plan uses the papers' own ratios (each Config's defaults), 256 images and 20,000 student steps,
# for ResNet-20 -> ResNet-8 and WRN-16-2 -> WRN-16-1.
PLANS = {
    "cpu": {"pairs": [("recipes/supervised/fmnist_resnet20.yaml", "resnet8")], "batch": 64, "student_steps": 500,
            "threads": 1, "paper_ratios": False},
    "gpu": {"pairs": [("recipes/supervised/fmnist_resnet20.yaml", "resnet8"),
                      ("recipes/supervised/fmnist_wrn_16_2.yaml", "wrn_16_1")],
            "batch": 256, "student_steps": 20000, "threads": None, "paper_ratios": True},
}
CPU_SCALE = {
    "deepinversion": ["method.g_steps=20", "method.kd_steps=25"],
    "cmi": ["method.g_steps=12", "method.kd_steps=25"],
    "fast": ["method.g_steps=5", "method.lr_g=3e-3", "method.kd_steps=25", "method.warmup_rounds=2",
             "method.reset_l0=0"],
    "csd": ["method.g_steps=12", "method.kd_steps=25", "method.warmup_rounds=2"],
    "dfdg": ["method.g_steps=1", "method.s_steps=2"],
    "dfkd_fgvc": ["method.g_steps=10", "method.s_steps=15"],
}
# CSD's reference fills an initial bank with 400 inversion rounds in a separate run; here warm-up rounds leave
# their student windows idle, so the GPU plan keeps 20 of them.
GPU_SCALE = {"csd": ["method.warmup_rounds=20"]}
RATIO_KEYS = ("g_steps", "s_steps", "kd_steps", "warmup_rounds", "g1_steps", "g2_steps")


def teacher_dir(out: Path, recipe: str, device: str) -> Path:
    run = out / "teachers" / Path(recipe).stem
    train_cells([(ROOT / recipe, run, [f"trainer.device={device}", "trainer.progress=false"])],
                index=out / "sweep.json", required=True)
    return run


def method_args(plan: dict, method: str, teacher: Path, student: str, seed: int, run: Path, device: str) -> tuple:
    """(recipe, overrides) of one data-free run with the plan's student budget."""
    import dataclasses

    from mentor.config import load_config
    from mentor.methods import METHODS as REGISTRY

    recipe = ROOT / "recipes" / "datafree" / f"fmnist_{method}.yaml"
    args = [f"out_dir={run}", f"method.teacher={teacher}", f"model.name={student}", f"trainer.seed={seed}",
            f"method.batch_size={plan['batch']}", f"trainer.device={device}", "trainer.progress=false"]
    if plan["threads"]:
        args.append(f"trainer.threads={plan['threads']}")
    cls = REGISTRY.get(method)
    if not plan["paper_ratios"]:
        args += CPU_SCALE.get(method, [])
    else:
        defaults = cls.Config()
        args += [f"method.{k}={getattr(defaults, k)}" for k in RATIO_KEYS
                 if k in {f.name for f in dataclasses.fields(defaults)}]
        args += GPU_SCALE.get(method, [])
    cfg = load_config(recipe, args)
    steps = cls.steps_for(cfg.method, plan["student_steps"])
    every = max(1, steps // 4)
    args += [f"trainer.max_steps={steps}", f"trainer.eval_every={every}", f"trainer.ckpt_every={every}",
             f"trainer.log_every={max(1, steps // 12)}", "schedule.warmup_steps=0"]
    return recipe, args


def reference_args(plan: dict, kind: str, teacher: Path, student: str, seed: int, run: Path, device: str) -> tuple:
    """KD with real data (``kd``) or the student alone (``alone``), for the same student steps and batch."""
    recipe = ROOT / ("recipes/distill/fmnist_kd.yaml" if kind == "kd" else "recipes/supervised/fmnist_resnet8.yaml")
    steps = plan["student_steps"]
    args = [f"out_dir={run}", f"model.name={student}", f"trainer.seed={seed}", f"data.batch_size={plan['batch']}",
            f"trainer.max_steps={steps}", f"trainer.eval_every={max(1, steps // 4)}",
            f"trainer.ckpt_every={max(1, steps // 4)}", f"trainer.log_every={max(1, steps // 12)}",
            "schedule.warmup_steps=0", f"trainer.device={device}", "trainer.progress=false"]
    if kind == "kd":
        args.append(f"method.teacher={teacher}")
    if plan["threads"]:
        args.append(f"trainer.threads={plan['threads']}")
    return recipe, args


def plan_jobs(out: Path, plan_name: str, seeds: list[int], methods: list[str], device: str,
              teachers: dict[str, Path]) -> list[tuple[Path, Path, list[str]]]:
    """(run directory, recipe, overrides) of every run of a plan: per teacher-student pair and seed, KD with
    real data, the student alone, and every data-free method."""
    plan = PLANS[plan_name]
    jobs = []
    for recipe, student in plan["pairs"]:
        teacher = teachers[recipe]
        base = out / plan_name / f"{Path(recipe).stem}-{student}"
        for seed in seeds:
            for kind in ("kd", "alone"):
                run = base / f"{kind}_real" / f"seed{seed}"
                jobs.append((run, *reference_args(plan, kind, teacher, student, seed, run, device)))
            for m in methods:
                run = base / m / f"seed{seed}"
                jobs.append((run, *method_args(plan, m, teacher, student, seed, run, device)))
    return jobs


def execute(jobs: list[tuple[Path, Path, list[str]]], workers: int, index: Path | None = None) -> None:
    """Train the runs of ``jobs`` not finished, ``workers`` at a time (one thread each when several, unless the
    plan says)."""
    train_cells([(recipe, run, args) for run, recipe, args in jobs], jobs=workers, threads=1 if workers > 1 else None,
                index=index)


def write_grid(run: Path, out_png: Path, n: int = 40) -> None:
    """The last synthetic images of a finished run (pool methods: the newest pool entries; generators: fresh
    samples), tiled into a PNG."""
    import torch

    from mentor.config import load_config
    from mentor.diffusion.sample import image_grid, write_png
    from mentor.engine import Trainer
    from mentor.engine import checkpoint as ckpt

    trainer = Trainer(load_config(run / "config.yaml", ["trainer.device=cpu"]))
    trainer.method.load_trained_state(ckpt.load(run / "last.pt", map_location="cpu")["method"])
    torch.manual_seed(0)
    x = trainer.method.samples(n).cpu()
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_png(out_png, image_grid(u8, nrow=10, scale=2))


def _summary(d: Path) -> dict | None:
    f = d / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def report(out: Path, plan_name: str, seeds: list[int], methods: list[str]) -> str:
    plan = PLANS[plan_name]
    lines = [f"### Data-free distillation, {plan_name.upper()} plan", "",
             f"{plan['student_steps']} student steps of {plan['batch']} images for every row; seeds "
             f"{', '.join(map(str, seeds))} (paired: the same initial student per seed). `last` is the data-free "
             "number; `best val` picks the step on the real validation split, which a data-free user does not "
             "have. Gains are paired differences of `last` in points (* where |mean| > 2 std). Seconds are per "
             "run (mean): the synthesis phases (every phase but the student's), the student phase, and the whole "
             "run's wall time (evaluations included).", ""]
    for recipe, student in plan["pairs"]:
        tname = Path(recipe).stem
        base = out / plan_name / f"{tname}-{student}"
        teacher = _summary(out / "teachers" / tname)
        tacc = f"{100 * teacher['test_acc_last']:.2f}" if teacher else "–"
        lines += [f"**{tname.replace('fmnist_', '')} (teacher, {tacc}) → {student}**", "",
                  "| method | kind | seeds | test acc last | test acc best val | gain vs DeepInv | gain vs CMI "
                  "| gain vs Fast | synthesis s | student s | wall s | images | published (as published) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def by_seed(name: str, base: Path = base) -> dict[int, dict]:
            return {seed: s for seed in seeds if (s := _summary(base / name / f"seed{seed}"))}

        baselines = {b: by_seed(b) for b in CLAIM_BASELINES}
        for name in [*methods, "kd_real", "alone_real"]:
            got = by_seed(name)
            if not got:
                continue
            runs = list(got.values())
            last, best = [s["test_acc_last"] for s in runs], [s["test_acc_best"] for s in runs]
            gains = []
            for b in CLAIM_BASELINES:
                common = [seed for seed in got if seed in baselines[b]]
                ok = name in METHODS and name != b and len(common) > 1
                gains.append(paired_gain([got[k]["test_acc_last"] for k in common],
                                         [baselines[b][k]["test_acc_last"] for k in common]) if ok else "")
            ph = [s.get("phase_seconds", {}) for s in runs]
            synth = sum(sum(v for k, v in p.items() if k != "student") for p in ph) / len(runs)
            stud = sum(p.get("student", 0.0) for p in ph) / len(runs)
            wall = sum(s.get("wall_s", 0.0) for s in runs) / len(runs)
            images = int(sum(s.get("images_synthesised", 0) for s in runs) / len(runs))
            kind = "founding" if name in FOUNDING else "anchor" if name in ANCHORS else "real data"
            label = {"kd_real": "KD with real data (ceiling)", "alone_real": "student alone, real data"}.get(name, name)
            cost = f"{synth:.0f} | {stud:.0f}" if name in METHODS else "– | –"
            lines.append(f"| {label} | {kind} | {len(runs)} | {mean_std(last)} | {mean_std(best)} | "
                         f"{' | '.join(gains)} | {cost} | {wall:.0f} | {images if name in METHODS else '–'} | "
                         f"{PUBLISHED.get(name, '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=list(PLANS), default="cpu")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each on the CPU plan)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "datafree"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img"), help="where the grids of synthetic images go")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    t0 = time.time()
    out, plan = Path(args.out), PLANS[args.plan]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if not args.report_only:
        teachers = {recipe: teacher_dir(out, recipe, args.device) for recipe, _ in plan["pairs"]}
        execute(plan_jobs(out, args.plan, seeds, methods, args.device, teachers), args.jobs, out / "sweep.json")
        for recipe, student in plan["pairs"][:1]:
            base = out / args.plan / f"{Path(recipe).stem}-{student}"
            for m in methods:
                run = base / m / f"seed{seeds[0]}"
                if (run / "last.pt").is_file():
                    write_grid(run, Path(args.img) / f"datafree_{m}.png")
    write_report(out / args.plan, report(out, args.plan, seeds, methods), t0)


if __name__ == "__main__":
    main()
