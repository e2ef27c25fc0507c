"""Domain generalisation, leave one domain out, DomainBed's protocol, 3 trial seeds.

Every method of ``mentor.generalize`` is trained once per held-out domain and trial seed (the seed sets the
initial weights, the batch order and the in/out split of every domain, as DomainBed's trial seed does);
the number reported is the held-out domain's "in" accuracy at the step chosen by training-domain validation
(the headline), beside the oracle (the held-out domain's "out" split at the last step, an upper bound) and
leave-one-domain-out selection where its extra runs were made (``--lodo``). Within a seed all methods
start from the same weights and see the same batches, so the gains over ERM are paired (mean ± std of the
per-seed differences of the average over held-out domains; * where |mean| > 2 std).

Three more tables put a founding method against its natural baselines:
- ``openset``: MEDIC against ERM (maximum-softmax confidence) with unknown classes only in the held-out domain;
- ``fewlabel``: MultiMatch against ERM and FixMatch on a few labels per source domain;
- ``single``: DSBF against ERM on one labelled source domain and FixMatch with the other sources unlabelled.

    python benchmarks/generalize.py --plan cpu --parts dg,openset,fewlabel,single --seeds 0,1,2 --jobs 2
    python benchmarks/generalize.py --report-only

Finished runs (a run directory with summary.json) are reused. The report goes to ``<out>/report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))
from report import mean_std, paired_gain, train_job, write_report  # noqa: E402

from mentor.generalize.selection import leave_one_domain_out, oracle, read_run  # noqa: E402

DG_METHODS = ["erm", "irm", "vrex", "groupdro", "mixup", "mldg", "coral", "mmd", "dann", "cdann", "sagnet", "rsc",
              "selfreg", "fishr", "mixstyle", "swad", "lookahead_dg", "place_dropout", "pbn", "normaug", "aloft",
              "spurious_dg"]
FOUNDING = {"normaug", "aloft", "place_dropout", "pbn", "lookahead_dg", "spurious_dg", "medic", "dsbf", "multimatch"}
DOMAINS = {"digits_domains": ["handwritten", "dejavu", "liberation", "freefont", "urw"],
           "rotated_fmnist": ["0", "15", "30", "45", "60", "75"]}

# The CPU plan (2 cores, 60 minutes): ResNet-8, one batch of 32 per training domain, 300 steps; rotated
# Fashion-MNIST keeps 1,000 images per domain (DomainBed's RotatedMNIST has ~11,700), so 300 steps are
# about 12 passes over the 4,000 training images. The GPU plan keeps every image and trains 5,000 steps.
PLANS = {
    "cpu": {"common": ["model.name=resnet8", "data.batch_size=32", "data.augment=none", "optim.name=sgd",
                       "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
                       "schedule.name=cosine", "schedule.warmup_steps=20", "trainer.max_steps=300",
                       "trainer.eval_every=50", "trainer.ckpt_every=300", "trainer.log_every=50",
                       "trainer.threads=1", "data.eval_batch_size=500"],
            # weak/strong views (NormAUG, FixMatch): 1-pixel crops on the 8x8 digits; no flips, which would
            # mirror a digit or turn a rotation of +t into one of -t (a domain the set does not have)
            "digits_domains": ["data.padding=1", "data.flip=false"],
            "rotated_fmnist": ["data.domain_limit=1000", "data.flip=false"],
            # held-out domains swept per dataset (rotated_fmnist: the hardest, 0 degrees, on 2 CPU cores)
            "tests": {"digits_domains": DOMAINS["digits_domains"], "rotated_fmnist": ["0"]}},
    "gpu": {"common": ["model.name=resnet20", "data.batch_size=64", "data.augment=none", "optim.name=sgd",
                       "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
                       "schedule.name=cosine", "schedule.warmup_steps=100", "trainer.max_steps=5000",
                       "trainer.eval_every=500", "trainer.ckpt_every=1000", "trainer.log_every=500",
                       "trainer.device=cuda"],
            "digits_domains": [], "rotated_fmnist": [], "tests": DOMAINS},
}
# DomainBed turns on IRM's, V-REx's and Fishr's full penalty after ERM has converged (step 500 or 1,500 of its
# 5,000, at Adam 1e-3). On this plan ERM's training-domain validation is flat from step 150 (half the run),
# so the three anneal there; switched on earlier (10% of the run), the penalty of 100 stops the network
# from fitting at all (IRM: 63% against ERM's 93% on digits_domains).
SCALED = {"irm": {"anneal_steps": 0.5}, "vrex": {"anneal_steps": 0.5}, "fishr": {"anneal_steps": 0.5}}
# IRM's weight of 100 under SGD at lr 0.05 diverges within steps of the anneal (DomainBed trains with Adam at
# 1e-3 and builds a fresh optimizer there); the IRM authors' own code divides the loss by the weight, which
# keeps SGD stable. (Under Adam without that fresh optimizer, IRM collapses after the anneal as well.)
# Lookahead's slow weights follow the fast ones with a horizon of k / alpha = 300 steps at its defaults (15,
# 0.05), a small fraction of its paper's 40,000 iterations but the whole of a 300-step plan: k 5, alpha 0.25
# keep the horizon at 20 steps.
# SWAD's loss valley is read from one validation loss per evaluation: 12 segments of 25 steps in 300.
METHOD_EXTRA = {"irm": ["method.rescale=true"], "lookahead_dg": ["method.k=5", "method.alpha=0.25"],
                "swad": ["trainer.eval_every=25"]}
# Variants run beside the plan on digits_domains, each paired with ERM under the same change ("erm@<tag>").
VARIANTS: dict[str, list[str]] = {}
VARIANT_METHODS: dict[str, list[str]] = {}
# Methods that bring their own backbone (or optimizer) train with their recipe's, and are compared with ERM on it.
OWN_MODEL = {"aloft"}

# Published numbers beside ours (PACS, leave one domain out, average over the four targets), labelled as
# published: DomainBed's 2020 results (ResNet-50, training-domain validation), and each founding method's
# own repository where it states one.
PUBLISHED = {
    "erm": "85.5 (DomainBed, RN-50)", "irm": "83.5 (DomainBed)", "groupdro": "84.4 (DomainBed)",
    "mixup": "84.6 (DomainBed)", "mldg": "84.9 (DomainBed)", "coral": "86.2 (DomainBed)", "mmd": "84.6 (DomainBed)",
    "dann": "83.6 (DomainBed)", "cdann": "82.6 (DomainBed)", "sagnet": "86.3 (DomainBed)", "vrex": "84.9 (DomainBed)",
    "rsc": "85.2 (DomainBed)", "fishr": "85.5 (DomainBed)",
    "aloft": "91.58 ALOFT-E, 90.88 ALOFT-S, baseline 87.76 (GFNet-H-Ti, repo)",
    "place_dropout": "86.37 (RN-18, repo's released models)",
    "spurious_dg": "Digits-DG 92.30 (abstract)",
}

BASE_RECIPE = ROOT / "recipes" / "generalize" / "rotated_fmnist_erm.yaml"  # every key is set by the plan


def _run_dir(out: Path, plan: str, part: str, dataset: str, method: str, tests: list[str], seed: int) -> Path:
    return out / plan / part / dataset / method / "+".join(tests) / f"seed{seed}"


def _method_overrides(method: str) -> list[str]:
    """The method's section of its recipe (its paper defaults), and its model/optimizer where it brings its own."""
    recipe = ROOT / "recipes" / "generalize" / f"rotated_fmnist_{method}.yaml"
    if not recipe.is_file():
        return [f"method.name={method}"]
    data = yaml.safe_load(recipe.read_text())
    out = [f"method.{k}={json.dumps(v)}" for k, v in data["method"].items()]
    if method in OWN_MODEL:
        out += [f"model.{k}={json.dumps(v)}" for k, v in data.get("model", {}).items()]
        out += [f"optim.{k}={json.dumps(v)}" for k, v in data.get("optim", {}).items()]
        out += [f"trainer.{k}={json.dumps(v)}" for k, v in data.get("trainer", {}).items() if k == "clip_grad"]
    return out


# The GFNet is sized for its input: 4x4 patches of a 28x28 image, 2x2 patches of the 8x8 digits.
OWN_MODEL_KWARGS = {"digits_domains": ['model.kwargs={"image_size": 8, "patch_size": 2}'],
                    "rotated_fmnist": ['model.kwargs={"image_size": 28}']}


def _steps(plan: str) -> int:
    return int([a for a in PLANS[plan]["common"] if a.startswith("trainer.max_steps=")][-1].split("=")[1])


def _job(out: Path, plan: str, part: str, dataset: str, method: str, tests: list[str], seed: int,
         extra: list[str] = (), label: str | None = None) -> tuple[Path, list[str]]:
    d = _run_dir(out, plan, part, dataset, label or method, tests, seed)
    scaled = [f"method.{k}={round(f * _steps(plan))}" for k, f in SCALED.get(method, {}).items()]
    args = [*PLANS[plan]["common"], *PLANS[plan][dataset], f"data.name={dataset}",
            f"data.test_domains=[{','.join(tests)}]", "data.holdout_fraction=0.2", f"trainer.seed={seed}",
            f"data.split_seed={seed}", *_method_overrides(method), *scaled, *METHOD_EXTRA.get(method, []), *extra,
            f"out_dir={d}", "trainer.progress=false"]
    return d, args


def _worker_init() -> None:
    """Each worker process keeps the domain sets it has built (rendering the printed digits takes seconds;
    ``load_splits`` looks ``load_domains`` up at call time, so the cached one is used)."""
    import functools

    import torch

    import mentor.data.domains as domains

    torch.set_num_threads(1)
    original = domains.load_domains
    cached = functools.lru_cache(maxsize=8)(lambda name, root, items: original(name, root, **dict(items)))
    domains.load_domains = lambda name, root=None, **options: cached(name, root, tuple(sorted(options.items())))


def _train_one(job: tuple[Path, list[str]]) -> str:
    d, args = job
    return train_job(d, BASE_RECIPE, args)


def _execute(jobs: list[tuple[Path, list[str]]], workers: int) -> None:
    import multiprocessing as mp

    todo = [(d, a) for d, a in jobs if not (d / "summary.json").is_file()]
    print(f"{len(jobs)} runs, {len(todo)} to train", flush=True)
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init, maxtasksperchild=200) as pool:
        for line in pool.imap_unordered(_train_one, todo):
            print(line, flush=True)


def _summary(d: Path) -> dict | None:
    f = d / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


# ------------------------------------------------------------------------------------------ the DG table
def dg_jobs(out: Path, plan: str, datasets: list[str], methods: list[str], seeds: list[int], lodo: list[str]):
    jobs = []
    for dataset in datasets:
        for method in methods:
            for test in PLANS[plan]["tests"][dataset]:
                for seed in seeds:
                    jobs.append(_job(out, plan, "dg", dataset, method, [test], seed,
                                     OWN_MODEL_KWARGS[dataset] if method in OWN_MODEL else []))
                    if method in lodo:
                        jobs += [_job(out, plan, "dg", dataset, method, [test, v], seed)
                                 for v in DOMAINS[dataset] if v != test]
        if dataset == "digits_domains":
            for tag, extra in VARIANTS.items():
                for m in ["erm", *[m for m in VARIANT_METHODS[tag] if m in methods]]:
                    for test in PLANS[plan]["tests"][dataset]:
                        for seed in seeds:
                            jobs.append(_job(out, plan, "dg", dataset, m, [test], seed, extra, label=f"{m}@{tag}"))
        if any(m in OWN_MODEL for m in methods):  # ERM on the backbone those methods bring
            for m in sorted(OWN_MODEL & set(methods)):
                model = [a for a in _method_overrides(m) if a.startswith(("model.", "optim.", "trainer."))]
                model += OWN_MODEL_KWARGS[dataset]
                for test in PLANS[plan]["tests"][dataset]:
                    for seed in seeds:
                        jobs.append(_job(out, plan, "dg", dataset, "erm", [test], seed, model, label=f"erm@{m}"))
    return jobs


def _cells(out: Path, plan: str, dataset: str, label: str, seeds: list[int]):
    """Per held-out domain, per seed: (training-domain validation, last, oracle, lodo) test accuracies."""
    cells = {}
    for test in PLANS[plan]["tests"][dataset]:
        for seed in seeds:
            d = _run_dir(out, plan, "dg", dataset, label, [test], seed)
            s = _summary(d)
            if s is None:
                continue
            runs = [read_run(d, hparams="h")]
            for v in DOMAINS[dataset]:
                dv = _run_dir(out, plan, "dg", dataset, label, [test, v], seed)
                if (dv / "summary.json").is_file():
                    runs.append(read_run(dv, hparams="h"))
            lo = leave_one_domain_out(runs, test, DOMAINS[dataset])
            orc = oracle(runs, test)
            cells[(test, seed)] = {"tdv": s["test_acc_best"], "last": s["test_acc_last"],
                                   "oracle": orc.test if orc else math.nan, "lodo": lo.test if lo else math.nan,
                                   "wall": s["wall_s"]}
    return cells


def _avg(cells: dict, tests: list[str], seed: int, key: str) -> float | None:
    vals = [cells[(t, seed)][key] for t in tests if (t, seed) in cells]
    return statistics.mean(vals) if len(vals) == len(tests) else None


def report_dg(out: Path, plan: str, datasets: list[str], methods: list[str], seeds: list[int]) -> str:
    parts = []
    for dataset in datasets:
        tests = PLANS[plan]["tests"][dataset]
        labels = list(methods) + [f"erm@{m}" for m in sorted(OWN_MODEL & set(methods))]
        labels += [f"{m}@{tag}" for tag in VARIANTS for m in ["erm", *VARIANT_METHODS[tag]] if m in methods]
        table = {label: _cells(out, plan, dataset, label, seeds) for label in labels}
        base = {s: _avg(table.get("erm", {}), tests, s, "tdv") for s in seeds}
        head = ("| method | " + " | ".join(f"{t}" for t in tests) + " | average (training-domain val) | paired gain "
                "over ERM | last step | oracle | leave-one-domain-out | cost | published (PACS unless named) |")
        lines = [f"\n#### {dataset}\n", head, "|---" * (len(tests) + 8) + "|"]
        for label in labels:
            cells = table[label]
            if not cells:
                continue
            cols = [mean_std([cells[(t, s)]["tdv"] for s in seeds if (t, s) in cells]) for t in tests]
            avgs = {k: [a for s in seeds if (a := _avg(cells, tests, s, k)) is not None]
                    for k in ("tdv", "last", "oracle", "lodo")}
            ref = "erm" if "@" not in label else f"erm@{label.split('@')[1]}"
            ref_base = base if ref == "erm" else {s: _avg(table.get(ref, {}), tests, s, "tdv") for s in seeds}
            if label in OWN_MODEL:
                ref_base = {s: _avg(table.get(f"erm@{label}", {}), tests, s, "tdv") for s in seeds}
            pairs = [(a, ref_base[s]) for s in seeds if (a := _avg(cells, tests, s, "tdv")) is not None
                     and ref_base.get(s) is not None]
            gain = "–" if label in ("erm",) or label.startswith("erm@") or not pairs else \
                paired_gain([a for a, _ in pairs], [b for _, b in pairs])
            lodo = mean_std(avgs["lodo"]) if avgs["lodo"] and not any(math.isnan(x) for x in avgs["lodo"]) else "–"
            cost = sum(c["wall"] for c in cells.values()) / 60
            name = f"**{label}**" if label in FOUNDING else label
            lines.append(f"| {name} | " + " | ".join(cols) + f" | {mean_std(avgs['tdv'])} | {gain} | "
                         f"{mean_std(avgs['last'])} | {mean_std(avgs['oracle'])} | {lodo} | {cost:.1f} min | "
                         f"{PUBLISHED.get(label, '–')} |")
        parts.append("\n".join(lines))
    return "\n".join(parts)


# ------------------------------------------------------------------------ founding methods' own settings
# (label, method, extra overrides) per table, on digits_domains (every held-out domain; "single" one split)
SETTINGS = {
    "openset": {"dataset": "digits_domains", "extra": ["data.unknown_classes=[8,9]"],
                "rows": [("erm", "erm", []), ("medic", "medic", [])],
                "note": "digits 8 and 9 are unknown: absent from the training domains, labelled 'unknown' in the "
                        "held-out one"},
    "fewlabel": {"dataset": "digits_domains", "extra": ["data.labels_per_class=5", "data.unlabeled_ratio=2"],
                 "rows": [("erm", "erm", []), ("fixmatch", "fixmatch", ["data.augment=weak", "data.padding=1",
                                                                          "data.flip=false"]),
                          ("multimatch", "multimatch", ["data.padding=1", "data.flip=false"])],
                 "note": "5 labels per class in each source domain (50 per domain), the rest of each source "
                         "unlabelled"},
    "single": {"dataset": "digits_domains", "extra": [],
               "rows": [("erm", "erm", []), ("fixmatch", "fixmatch", ["data.augment=weak", "data.padding=1",
                                                                        "data.flip=false"]),
                        ("dsbf", "dsbf", ["data.padding=1", "data.flip=false"])],
               "note": "one labelled source (liberation), unlabelled sources dejavu, freefont, urw; tests handwritten"},
}
SINGLE = {"labelled": "liberation", "unlabelled": ["dejavu", "freefont", "urw"], "test": "handwritten"}


def _setting_runs(out: Path, plan: str, part: str, seeds: list[int]):
    spec = SETTINGS[part]
    jobs, where = [], {}
    for label, method, extra in spec["rows"]:
        for seed in seeds:
            if part == "single":
                tests = [SINGLE["test"]]
                if label == "erm":
                    extra2 = [f"data.domains=[{SINGLE['labelled']}]"]
                else:
                    extra2 = [f"data.unlabeled_domains=[{','.join(SINGLE['unlabelled'])}]", "data.unlabeled_ratio=1"]
                for t in tests:
                    j = _job(out, plan, part, spec["dataset"], method, [t], seed, [*spec["extra"], *extra, *extra2],
                             label=label)
                    jobs.append(j)
                    where[(label, t, seed)] = j[0]
            else:
                for t in DOMAINS[spec["dataset"]]:
                    j = _job(out, plan, part, spec["dataset"], method, [t], seed, [*spec["extra"], *extra],
                             label=label)
                    jobs.append(j)
                    where[(label, t, seed)] = j[0]
    return jobs, where


def report_setting(out: Path, plan: str, part: str, seeds: list[int]) -> str:
    spec = SETTINGS[part]
    _, where = _setting_runs(out, plan, part, seeds)
    tests = [SINGLE["test"]] if part == "single" else DOMAINS[spec["dataset"]]
    keys = ["test_acc_best"]
    if part == "openset":
        keys = ["test_closed_acc_best", "test_h_score_best", "test_oscr_best"]
    names = [k[len("test_"):-len("_best")] for k in keys]
    lines = [f"{spec['dataset']}: {spec['note']}.", "",
             "| method | " + " | ".join(f"{n} (avg over held-out) | paired gain in {n}" for n in names)
             + " | cost |", "|---" * (2 * len(keys) + 2) + "|"]
    base: dict[str, list[float]] = {}
    for label, _, _ in spec["rows"]:
        per_key = {k: [] for k in keys}
        wall = 0.0
        for s in seeds:
            rows = [_summary(where[(label, t, s)]) for t in tests]
            if any(r is None for r in rows):
                continue
            wall += sum(r["wall_s"] for r in rows)
            for k in keys:
                per_key[k].append(statistics.mean(r.get(k, math.nan) for r in rows))
        if not per_key[keys[0]]:
            continue
        if label == "erm":
            base = per_key
        cells = []
        for k in keys:
            paired = base and label != "erm" and len(base[k]) == len(per_key[k])
            cells += [mean_std(per_key[k]), paired_gain(per_key[k], base[k]) if paired else "–"]
        name = f"**{label}**" if label in FOUNDING else label
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="cpu", choices=sorted(PLANS))
    p.add_argument("--parts", default="dg,openset,fewlabel,single")
    p.add_argument("--datasets", default="digits_domains,rotated_fmnist")
    p.add_argument("--methods", default=",".join(DG_METHODS))
    p.add_argument("--lodo", default="", help="methods that also get the leave-one-domain-out runs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each on the CPU plan)")
    p.add_argument("--out", default="runs/bench/generalize")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps instead of the plan's (a smoke test)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    if args.steps:
        PLANS[args.plan]["common"] += [f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.steps}",
                                       f"trainer.ckpt_every={args.steps}", "schedule.warmup_steps=0"]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods, datasets = args.methods.split(","), args.datasets.split(",")
    lodo = [m for m in args.lodo.split(",") if m]
    parts = args.parts.split(",")
    out = Path(args.out)
    t0 = time.time()
    if not args.report_only:
        jobs = dg_jobs(out, args.plan, datasets, methods, seeds, lodo) if "dg" in parts else []
        for part in ("openset", "fewlabel", "single"):
            if part in parts:
                jobs += _setting_runs(out, args.plan, part, seeds)[0]
        _execute(jobs, args.jobs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    text = (f"Command: `python benchmarks/generalize.py --plan {args.plan} --parts {args.parts} --datasets "
            f"{args.datasets} --seeds {args.seeds}{' --lodo ' + args.lodo if lodo else ''}`, commit {commit}, "
            f"{time.strftime('%Y-%m-%d')}.\n")
    if "dg" in parts:
        text += "\n### Leave one domain out\n" + report_dg(out, args.plan, datasets, methods, seeds) + "\n"
    for part, title in (("openset", "Open-set DG"), ("fewlabel", "Few labels per source domain"),
                        ("single", "One labelled source domain")):
        if part in parts:
            text += f"\n### {title}\n\n" + report_setting(out, args.plan, part, seeds) + "\n"
    write_report(out, text, t0)


if __name__ == "__main__":
    main()
