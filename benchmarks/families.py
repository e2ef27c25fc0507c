"""The baselines of the semi-supervised and test-time adaptation families, through the engine on real data, 3
paired seeds (domain generalisation: `benchmarks/generalize.py`).

- ``ssl``: ``supervised`` on ``labels_per_class`` labels (the lower bound) beside ``pseudo_label``,
  which adds the unlabelled stream (the rest of the Fashion-MNIST training split).
- ``tta``: a ResNet-8 trained on clean Fashion-MNIST (its recipe), then ``source`` and ``norm``
  through ``mentor adapt`` on the 15 corruptions of ``fmnist_c`` at severity 5, reset per shift.

Within a seed the methods of a table share the initial weights, the batch order and the augmentation
draws, so the gains are paired (mean ± std of the per-seed differences; * where |mean| > 2 std).

    python benchmarks/families.py --suites ssl,tta --seeds 0,1,2
    python benchmarks/families.py --report-only

Finished runs (a run directory with summary.json) are reused, so the command can be stopped and started
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
from report import mean_std, paired_gain, train_cells  # noqa: E402

SSL = {"recipes": {"supervised": "recipes/semi/fmnist_supervised_40.yaml",
                   "pseudo_label": "recipes/semi/fmnist_pseudo_label.yaml"},
       # mu = 2 instead of USB's 7 keeps a pseudo-label step at ~0.2 s on 2 CPU cores
       "overrides": ["data.unlabeled_ratio=2"]}
TTA = {"source_recipe": "recipes/supervised/fmnist_resnet8.yaml", "methods": ["source", "norm"],
       "shift": "fmnist_c", "severities": (5,)}


THREADS: list[str] = []  # trainer.threads override (--threads)


def _train(runs: list[tuple[str, Path, list[str]]], out: Path, required: bool = False) -> None:
    """Train every (recipe, run directory, overrides) not finished (``required``: later runs need them)."""
    train_cells([(ROOT / recipe, run, ["trainer.progress=false", *THREADS, *overrides])
                 for recipe, run, overrides in runs], index=out / "sweep.json", required=required)


def _done(run: Path) -> dict | None:
    summary = run / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def _cost(rows: list[dict]) -> str:
    return f"{sum(r['wall_s'] for r in rows) / 60:.1f} min"


def ssl(out: Path, seeds: list[int], run: bool) -> str:
    res: dict[str, dict[int, dict]] = {}
    runs = {(name, seed): (recipe, out / "ssl" / name / f"seed{seed}", [f"trainer.seed={seed}", *SSL["overrides"]])
            for name, recipe in SSL["recipes"].items() for seed in seeds}
    if run:
        _train(list(runs.values()), out)
    for (name, seed), (_, d, _) in runs.items():
        if (summary := _done(d)) is not None:
            res.setdefault(name, {})[seed] = summary
    lines = ["| method | test acc, last | test acc, best val | paired gain (last) | pseudo-label acc / mask rate "
             "(last log) | train img/s | cost |", "|---|---|---|---|---|---|---|"]
    base = [res["supervised"][s]["test_acc_last"] for s in seeds if s in res.get("supervised", {})]
    for name, rows in res.items():
        rs = [rows[s] for s in seeds if s in rows]
        last = [r["test_acc_last"] for r in rs]
        gain = paired_gain(last, base) if name != "supervised" and len(last) == len(base) else "–"
        diag = "–"
        if name == "pseudo_label":
            ev = [json.loads(x) for x in (out / "ssl" / name / f"seed{seeds[0]}" / "metrics.jsonl")
                  .read_text().splitlines()]
            tr = [e for e in ev if e["split"] == "train"][-1]
            diag = f"{100 * tr['pl_acc']:.1f}% / {100 * tr['mask_rate']:.1f}% (seed {seeds[0]})"
        rate = statistics.mean(r["train_img_s"] for r in rs)
        lines.append(f"| {name} | {mean_std(last)} | {mean_std([r['test_acc_best'] for r in rs])} | {gain} | {diag} "
                     f"| {rate:,.0f} | {_cost(rs)} |")
    return "\n".join(lines)


def tta(out: Path, seeds: list[int], run: bool) -> str:
    res: dict[str, dict[int, dict]] = {}
    sources = {}
    if run:
        _train([(TTA["source_recipe"], out / "tta" / "source_model" / f"seed{seed}", [f"trainer.seed={seed}"])
                for seed in seeds], out, required=True)
    for seed in seeds:
        src = out / "tta" / "source_model" / f"seed{seed}"
        if (summary := _done(src)) is not None:
            sources[seed] = summary
        for m in TTA["methods"]:
            d = out / "tta" / m / f"seed{seed}"
            if (d / "summary.json").is_file():
                res.setdefault(m, {})[seed] = json.loads((d / "summary.json").read_text())
            elif run:
                cfg = build_adapt_config([f"method.name={m}", f"out_dir={d}", f"trainer.seed={seed}",
                                          "data.batch_size=128"])
                plan = AdaptPlan(run=str(src), shift=TTA["shift"], setting="reset",
                                 options={"severities": TTA["severities"]})
                res.setdefault(m, {})[seed] = adapt(plan, cfg)
    if not res:
        return ""
    streams = [k[len("acc@"):] for k in next(iter(res["source"].values())) if k.startswith("acc@")]
    clean = [sources[s]["test_acc_last"] for s in seeds if s in sources]
    base = [res["source"][s]["acc_mean"] for s in seeds if s in res.get("source", {})]
    lines = [f"Source model: `{TTA['source_recipe']}` (clean test accuracy {mean_std(clean)}).", "",
             "| method | mean acc over 15 corruptions | worst corruption | paired gain over source | img/s |",
             "|---|---|---|---|---|"]
    for m, rows in res.items():
        rs = [rows[s] for s in seeds if s in rows]
        mean = [r["acc_mean"] for r in rs]
        gain = paired_gain(mean, base) if m != "source" and len(mean) == len(base) else "–"
        rate = statistics.mean(r["img_s"] for r in rs)
        lines.append(f"| {m} | {mean_std(mean)} | {mean_std([r['acc_worst'] for r in rs])} | {gain} | {rate:,.0f} |")
    lines += ["", "| corruption (severity 5) | " + " | ".join(res) + " |", "|---" * (len(res) + 1) + "|"]
    for st in streams:
        cells = [mean_std([rows[s][f"acc@{st}"] for s in seeds if s in rows]) for rows in res.values()]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default="ssl,tta")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/bench/families")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (trainer.threads)")
    args = p.parse_args()
    if args.threads:
        THREADS.append(f"trainer.threads={args.threads}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    suites = {"ssl": ssl, "tta": tta}
    t0 = time.time()
    sections = []
    for name in args.suites.split(","):
        text = suites[name](out, seeds, run=not args.report_only)
        sections.append(f"\n### {name}\n\n{text}\n")
        (out / "report.md").parent.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        head = (f"Command: `python benchmarks/families.py --suites {args.suites} --seeds {args.seeds}`, commit "
                f"{commit}, {time.strftime('%Y-%m-%d')}.\n")
        (out / "report.md").write_text(head + "".join(sections))
    print((out / "report.md").read_text())
    print(f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
