"""Test-time and source-free adaptation on real shifts, every method through the engine, 3 paired seeds.

- ``tta``: source models trained by recipe on clean Fashion-MNIST (a ResNet-8 with BatchNorm and the
  ViT of the zoo), then every test-time method through ``mentor adapt`` on ``fmnist_c``: the 15
  corruptions at severity 5 in the ``reset`` and ``continual`` settings, and every severity 1..5 in the
  ``reset`` setting for the mean over severities. ``--limit`` images per stream (the first N of each
  corruption's seeded order), batch 128. Methods that adapt BatchNorm are not run on the ViT (it has none).
- ``sfda``: source models trained on the printed-font digits (four families) and on Fashion-MNIST at 0°,
  then every source-free method adapts to the handwritten digits and to 60° / 75° rotations, reported at
  the last step (the headline) and at the best step on a labelled target holdout (the oracle column).

Within a seed every method adapts the same source network over the same streams in the same order, so
the gains are paired (mean ± std of the per-seed differences; * where |mean| > 2 std).

    python benchmarks/adapt.py --parts tta,sfda --seeds 0,1,2
    python benchmarks/adapt.py --report-only

Finished runs (a directory with summary.json) are reused, so the command can be stopped and started
again. Each training run is a process of its own (``mentor.sweep``), its output in ``<run>/log.txt``;
``<out>/sweep.json`` lists them and their status. The report is written to ``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mentor.engine.adapt import AdaptPlan, adapt, build_adapt_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import mean_std, paired_gain, train_cells, write_report  # noqa: E402

SOURCES = {"resnet8": "recipes/supervised/fmnist_resnet8.yaml", "vit": "recipes/adapt/fmnist_source_vit.yaml"}
TTA_METHODS = ["source", "norm", "bn_ema", "tent", "eta", "eata", "sar", "deyo", "cotta", "memo", "lame", "rotta",
               "t3a", "domain_adaptor"]
# MEMO adapts a copy of the network per test image on 32 augmented views (about 4 images/s on one CPU
# thread): it reads the first MEMO_LIMIT images of each stream, and is paired with norm on the same images.
OWN_LIMIT = {"memo": 100}
EPISODIC = {"memo", "domain_adaptor"}  # reset before every batch: continual equals reset by construction
# On the ViT the CPU plan runs the methods that need no BN and no per-image augmentation ensembles.
VIT_METHODS = {"source", "lame", "t3a"}
BN_METHODS = {"norm", "bn_ema", "tent", "eta", "eata", "sar", "deyo", "rotta", "domain_adaptor"}
# The online benchmark's CIFAR-10-C table (WRN-28, severity 5, continual, error %, mean of 5 seeds), published.
PUBLISHED_C10C = {"source": 43.5, "norm": 20.4, "tent": 20.0, "eata": 17.9, "sar": 20.4, "cotta": 16.5,
                  "rotta": 19.3, "lame": 64.3}
SFDA_METHODS = ["shot", "shot_im", "nrc", "aad", "arfnet", "cadtrans"]
# 5 of the recipes' 15 epochs on a rotated domain (145 batches of 64 each) keep the CPU plan within its hour
ROTATED_STEPS = ["trainer.max_steps=725", "trainer.eval_every=145", "trainer.ckpt_every=725"]
SFDA_TASKS = {  # task -> (source recipe, target recipe pattern, target domain, overrides of the target run)
    "digits printed -> handwritten": ("recipes/adapt/digits_source.yaml", "recipes/adapt/digits_{m}.yaml",
                                      "handwritten", []),
    "rotated_fmnist 0° -> 60°": ("recipes/adapt/rotated_fmnist_source.yaml", "recipes/adapt/rotated_fmnist_{m}.yaml",
                                 "60", ["data.domains=[60]", "data.test_domains=[60]", *ROTATED_STEPS]),
    "rotated_fmnist 0° -> 75°": ("recipes/adapt/rotated_fmnist_source.yaml", "recipes/adapt/rotated_fmnist_{m}.yaml",
                                 "75", ["data.domains=[75]", "data.test_domains=[75]", *ROTATED_STEPS]),
}
VIT_SOURCE_OVERRIDES = {"cadtrans": "recipes/adapt/digits_source_vit.yaml"}
THREADS: list[str] = []


def _summary(run: Path) -> dict | None:
    f = run / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _train(runs: list[tuple[str, Path, list[str]]], out: Path, required: bool = False) -> None:
    """Train every (recipe, run directory, overrides) not finished (``required``: later runs need them)."""
    train_cells([(ROOT / recipe, run, ["trainer.progress=false", *THREADS, *overrides])
                 for recipe, run, overrides in runs], index=out / "sweep.json", required=required)


def _adapt(source: Path, run: Path, method: str, setting: str, seed: int, severities, limit: int) -> dict:
    done = _summary(run)
    if done is not None:
        return done
    cfg = build_adapt_config([f"method.name={method}", f"out_dir={run}", f"trainer.seed={seed}",
                              "data.batch_size=128", *THREADS])
    plan = AdaptPlan(run=str(source), shift="fmnist_c", setting=setting,
                     options={"severities": list(severities), "limit": limit})
    return adapt(plan, cfg)


def run_tta(out: Path, seeds: list[int], models: list[str], methods: list[str], limit: int, sev_limit: int) -> None:
    _train([(SOURCES[arch], out / "tta" / arch / "source" / f"seed{seed}", [f"trainer.seed={seed}"])
            for arch in models for seed in seeds], out, required=True)
    for arch in models:
        for seed in seeds:
            src = out / "tta" / arch / "source" / f"seed{seed}"
            for m in methods:
                if arch == "vit" and m not in VIT_METHODS:
                    continue
                if m in OWN_LIMIT:
                    n = OWN_LIMIT[m]
                    for name in (m, "norm"):
                        _adapt(src, out / "tta" / arch / name / f"reset_first{n}" / f"seed{seed}", name, "reset", seed,
                               (5,), n)
                    continue
                for setting in ("reset",) if m in EPISODIC else ("reset", "continual"):
                    _adapt(src, out / "tta" / arch / m / setting / f"seed{seed}", m, setting, seed, (5,), limit)
                _adapt(src, out / "tta" / arch / m / "severities" / f"seed{seed}", m, "reset", seed,
                       (1, 2, 3, 4, 5), sev_limit)


def _rows(out: Path, arch: str, m: str, part: str, seeds: list[int]) -> list[dict]:
    return [s for s in (_summary(out / "tta" / arch / m / part / f"seed{seed}") for seed in seeds) if s]


def _part(m: str) -> str:
    return f"reset_first{OWN_LIMIT[m]}" if m in OWN_LIMIT else "reset"


def _err(xs: list[float]) -> str:
    """Errors in percent, mean ± std over seeds, from accuracies in [0, 1]."""
    return mean_std([1.0 - x for x in xs])


def report_tta(out: Path, seeds: list[int], models: list[str], methods: list[str]) -> str:
    parts = []
    for arch in models:
        clean = [s["test_acc_last"] for s in (_summary(out / "tta" / arch / "source" / f"seed{seed}") for seed in seeds)
                 if s]
        if not clean:
            continue
        have = [m for m in methods if _rows(out, arch, m, _part(m), seeds)]
        rs = _rows(out, arch, have[0], "reset", seeds)
        lines = [f"#### {arch} (source recipe `{SOURCES[arch]}`, clean test error {_err(clean)} %, "
                 f"{len(clean)} seeds; batch 128, {rs[0]['options'].get('limit')} images per stream)",
                 "",
                 "| method | sev. 5 reset: mean error % | error − norm's (ViT: source's), paired, < 0 better | "
                 "sev. 5 continual | continual − reset (paired) | mean over severities 1–5 (reset) | "
                 "backward / sample | img/s | published CIFAR-10-C continual error % |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for m in have:
            reset = _rows(out, arch, m, _part(m), seeds)
            cont = reset if m in EPISODIC else _rows(out, arch, m, "continual", seeds)
            sev = _rows(out, arch, m, "severities", seeds)
            acc_r, acc_c = [r["acc_mean"] for r in reset], [r["acc_mean"] for r in cont]
            ref = "norm" if _rows(out, arch, "norm", "reset", seeds) else "source"  # the ViT has no BN: source
            base = _rows(out, arch, ref, _part(m), seeds)
            vs = "–"
            if m != ref and len(base) == len(reset) and reset:
                vs = paired_gain([r["acc_mean"] for r in base], acc_r)  # error difference = -acc gain
            drift = paired_gain(acc_r, acc_c) if len(acc_r) == len(acc_c) and acc_c else "–"
            if m in EPISODIC:
                drift = "= reset (episodic)"
            if m in OWN_LIMIT:
                m = f"{m} (first {OWN_LIMIT[m]} images per stream)"
            lines.append(f"| {m} | {_err(acc_r)} | {vs} | {_err(acc_c)} | {drift} | "
                         f"{_err([r['acc_mean'] for r in sev])} | "
                         f"{statistics.mean(r['backward_per_sample'] for r in reset):.2f} | "
                         f"{statistics.mean(r['img_s'] for r in reset):,.0f} | {PUBLISHED_C10C.get(m, '–')} |")
        streams = [k[len("acc@"):] for k in rs[0] if k.startswith("acc@")]
        lines += ["", f"Error % per corruption, severity 5 ({arch}, reset / continual):", "",
                  "| method | " + " | ".join(s.removesuffix("-5") for s in streams) + " |",
                  "|---" * (len(streams) + 1) + "|"]
        for m in have:
            for setting in ("reset", "continual"):
                if m in OWN_LIMIT or (m in EPISODIC and setting == "continual"):
                    continue
                rows = _rows(out, arch, m, setting, seeds)
                if rows:
                    cells = [f"{100 * statistics.mean(1 - r[f'acc@{s}'] for r in rows):.1f}" for s in streams]
                    lines.append(f"| {m} ({setting}) | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def run_sfda(out: Path, seeds: list[int], methods: list[str], tasks: list[str]) -> None:
    """The source runs first (every one the targets need), then the source-free target runs."""
    sources: dict[Path, tuple[str, Path, list[str]]] = {}
    targets = []
    for task, (source_recipe, pattern, _, extra) in SFDA_TASKS.items():
        if not any(task.startswith(t) for t in tasks):
            continue
        key = _slug(task)
        for seed in seeds:
            for m in methods:
                recipe = pattern.format(m=m)
                if not (ROOT / recipe).is_file():
                    continue
                src_recipe = VIT_SOURCE_OVERRIDES.get(m, source_recipe) if task.startswith("digits") else source_recipe
                if m == "cadtrans" and not task.startswith("digits"):
                    src_recipe = recipe.replace("_cadtrans", "_source_vit")
                    if not (ROOT / src_recipe).is_file():
                        continue
                src = out / "sfda" / key / ("source_vit" if "vit" in src_recipe else "source") / f"seed{seed}"
                sources.setdefault(src, (src_recipe, src, [f"trainer.seed={seed}"]))
                targets.append((recipe, out / "sfda" / key / m / f"seed{seed}",
                                [f"model.init_from={src}", f"trainer.seed={seed}", *extra]))
    _train(list(sources.values()), out, required=True)
    _train(targets, out)


def _slug(task: str) -> str:
    return task.replace(" -> ", "_to_").replace("°", "").replace(" ", "_")


def _source_target_acc(out: Path, task: str, seed: int, vit: bool) -> float | None:
    """The source network's accuracy on the target domain (a held-out test domain of its run)."""
    s = _summary(out / "sfda" / _slug(task) / ("source_vit" if vit else "source") / f"seed{seed}")
    return None if s is None else s.get(f"test_acc_last@{SFDA_TASKS[task][2]}")


def report_sfda(out: Path, seeds: list[int], methods: list[str]) -> str:
    lines = ["| task | method | target acc % (last step, headline) | vs SHOT (paired) | vs source (paired) | "
             "oracle: best step on labelled target holdout | cost |", "|---|---|---|---|---|---|---|"]
    for task in SFDA_TASKS:
        key = _slug(task)
        shot = {seed: _summary(out / "sfda" / key / "shot" / f"seed{seed}") for seed in seeds}
        for m in ["source", *methods]:
            if m == "source":
                # the source network on the same target test split (its held-out domain test, read once)
                accs = {seed: _source_target_acc(out, task, seed, False) for seed in seeds}
                accs = {k: v for k, v in accs.items() if v is not None}
                if not accs:
                    continue
                lines.append(f"| {task} | source model | {mean_std(list(accs.values()))} | | | | |")
                vit = [v for v in (_source_target_acc(out, task, seed, True) for seed in seeds) if v is not None]
                if vit and "cadtrans" in methods:
                    lines.append(f"| {task} | source model (ViT, for cadtrans) | {mean_std(vit)} | | | | |")
                continue
            rows = {seed: _summary(out / "sfda" / key / m / f"seed{seed}") for seed in seeds}
            rows = {k: v for k, v in rows.items() if v}
            if not rows:
                continue
            last = [rows[s]["test_acc_last"] for s in rows]
            vs_shot = paired_gain(last, [shot[s]["test_acc_last"] for s in rows]) \
                if m != "shot" and all(shot.get(s) for s in rows) else "–"
            if m == "cadtrans":
                vs_shot = "– (a ViT; SHOT adapts the ResNet-8)"
            src = [_source_target_acc(out, task, s, m == "cadtrans") for s in rows]
            vs_src = paired_gain(last, src) if all(v is not None for v in src) else "–"
            cost = f"{sum(r['wall_s'] for r in rows.values()) / len(rows) / 60:.1f} min/run"
            lines.append(f"| {task} | {m} | {mean_std(last)} | {vs_shot} | {vs_src} | "
                         f"{mean_std([rows[s]['test_acc_best'] for s in rows])} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="tta,sfda")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--models", default="resnet8,vit", help="TTA source networks")
    p.add_argument("--tta-methods", default=",".join(TTA_METHODS))
    p.add_argument("--sfda-methods", default=",".join(SFDA_METHODS))
    p.add_argument("--sfda-tasks", default="digits,rotated_fmnist 0° -> 60°,rotated_fmnist 0° -> 75°",
                   help="source-free tasks (prefixes of their names)")
    p.add_argument("--limit", type=int, default=1000, help="images per corruption stream at severity 5")
    p.add_argument("--severity-limit", type=int, default=400, help="images per stream for the severity mean")
    p.add_argument("--out", default="runs/bench/adapt")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (trainer.threads)")
    args = p.parse_args()
    if args.threads:
        THREADS.append(f"trainer.threads={args.threads}")
    seeds = [int(s) for s in args.seeds.split(",")]
    models, tta_methods, sfda_methods = (args.models.split(","), args.tta_methods.split(","),
                                         args.sfda_methods.split(","))
    out = Path(args.out)
    parts = args.parts.split(",")
    t0 = time.time()
    if not args.report_only:
        if "tta" in parts:
            run_tta(out, seeds, models, tta_methods, args.limit, args.severity_limit)
        if "sfda" in parts:
            run_sfda(out, seeds, sfda_methods, args.sfda_tasks.split(","))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    text = (f"Command: `python benchmarks/adapt.py --parts {args.parts} --seeds {args.seeds} --limit {args.limit} "
            f"--severity-limit {args.severity_limit}`, commit {commit}, {time.strftime('%Y-%m-%d')}.\n")
    if "tta" in parts:
        text += "\n### Test-time adaptation on fmnist_c\n\n" + report_tta(out, seeds, models, tta_methods) + "\n"
    if "sfda" in parts:
        text += "\n### Source-free adaptation\n\n" + report_sfda(out, seeds, sfda_methods) + "\n"
    write_report(out, text, t0)


if __name__ == "__main__":
    main()
