"""The ``mentor`` command line: train, eval, list, data, demo."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import train

    cfg = load_config(args.recipe, args.overrides)
    summary = train(cfg, force=args.force)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.run import evaluate_run

    result = evaluate_run(args.path, device=args.device)
    print(json.dumps(result, indent=2))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from .engine.adapt import AdaptPlan, adapt, build_adapt_config

    options = {}
    if args.severities:
        options["severities"] = tuple(args.severities)
    if args.corruptions:
        options["corruptions"] = tuple(args.corruptions)
    if args.limit:
        options["limit"] = args.limit
    plan = AdaptPlan(run=args.run, shift=args.shift, setting=args.setting, root=args.root, options=options)
    summary = adapt(plan, build_adapt_config(args.overrides))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from .methods import METHODS

        names = METHODS.names(args.pattern)
    elif args.what == "models":
        from .models import list_models

        names = list_models(args.pattern)
    elif args.what == "datasets":
        from .data import list_datasets
        from .data.domains import list_domain_sets

        names = sorted(n for n in list_datasets() + list_domain_sets() if fnmatch.fnmatch(n, args.pattern))
    elif args.what == "shifts":
        from .data.domains import list_domain_sets

        names = list_domain_sets(args.pattern)
    else:
        from .data.augment import AUGMENTS

        names = AUGMENTS.names(args.pattern)
    print("\n".join(names))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import dataset_info, fetch

    if args.action == "info":
        print(dataset_info(args.name))
    else:
        files = fetch(args.name, to=args.to, verify=not args.no_verify)
        for f in files:
            print(f)
        state = "stored (not verified)" if args.no_verify else "verified by SHA-256"
        print(f"{args.name}: {len(files)} files {state}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .diffusion.sample import SampleError, sample_to_png

    try:
        result = sample_to_png(args.run_dir, args.out, solver=args.solver, nfe=args.nfe, schedule=args.schedule,
                               n=args.n, seed=args.seed, class_label=args.class_label, afs=args.afs,
                               predictor=args.predictor, ema=not args.no_ema, device=args.device, scale=args.scale)
    except SampleError as e:
        print(f"mentor: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "diffusion":
        from .diffusion.bench import main as bench_diffusion

        return bench_diffusion(args.rest)
    raise AssertionError(args.suite)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(device=args.device, out=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mentor", description="Teacher-student learning on one engine.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe: mentor train RECIPE [key.sub=value ...]")
    t.add_argument("recipe", help="a recipe YAML file, e.g. recipes/supervised/fmnist_resnet20.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=100 optim.lr=0.1")
    t.add_argument("--force", action="store_true", help="discard what out_dir holds (checkpoints, metrics, "
                   "summary) and train from scratch; without it a finished run is left as it is and an "
                   "interrupted one resumes")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run directory or checkpoint on validation and test data")
    e.add_argument("path", help="a run directory (uses best.pt, else last.pt) or a checkpoint file")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("adapt", help="adapt a trained run online over the streams of a shift: "
                       "mentor adapt RUN --shift fmnist_c [--setting reset|continual|mixed] [method.name=norm ...]")
    a.add_argument("run", help="the source run directory (or checkpoint) of `mentor train`")
    a.add_argument("--shift", required=True, help="a shift or domain set: fmnist_c, cifar10_c, digits_domains, ...")
    a.add_argument("--setting", default="reset", help="reset (source state before every stream, default) or "
                   "continual (state carried across streams) or mixed (every stream shuffled into one)")
    a.add_argument("--root", default=None, help="folder of a user's shift files (cifar10_c, domain folders)")
    a.add_argument("--severities", type=int, nargs="*", help="corruption severities (default 5)")
    a.add_argument("--corruptions", nargs="*", help="corruption names (default all 15)")
    a.add_argument("--limit", type=int, default=None, help="first N images of every stream")
    a.add_argument("overrides", nargs="*", help="method.name=norm data.batch_size=64 trainer.device=cuda out_dir=...")
    a.set_defaults(func=cmd_adapt)

    ls = sub.add_parser("list", help="list registered methods, models, datasets or augmentations")
    ls.add_argument("what", choices=["methods", "models", "datasets", "shifts", "augments"])
    ls.add_argument("pattern", nargs="?", default="*", help="a glob, e.g. 'resnet*'")
    ls.set_defaults(func=cmd_list)

    d = sub.add_parser("data", help="find or download datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    info = dsub.add_parser("info", help="where a dataset was found (or where it was looked for)")
    info.add_argument("name")
    fetch = dsub.add_parser("fetch", help="download the official files, verified by SHA-256")
    fetch.add_argument("name")
    fetch.add_argument("--to", default=None, help="target folder (default ~/.cache/mentor/NAME)")
    fetch.add_argument("--no-verify", action="store_true", help="keep files whose SHA-256 is not published")
    d.set_defaults(func=cmd_data)

    sm = sub.add_parser("sample", help="sample a trained diffusion run (method edm) into a PNG grid")
    sm.add_argument("run_dir", help="the run directory of an `edm` recipe (uses best.pt, its EMA weights)")
    sm.add_argument("--solver", default="ipndm", help="a sampler of mentor.diffusion.samplers (default ipndm)")
    sm.add_argument("--nfe", type=int, default=5, help="denoiser evaluations per sample (default 5)")
    sm.add_argument("--schedule", default="polynomial", help="polynomial, logsnr or time_uniform")
    sm.add_argument("--n", type=int, default=64, help="number of images")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--out", default="samples.png", help="the PNG grid to write")
    sm.add_argument("--predictor", default=None, help="an AMED predictor file (decides solver, schedule, steps)")
    sm.add_argument("--class-label", type=int, default=None, help="class of every sample (conditional models)")
    sm.add_argument("--afs", action="store_true", help="analytic first step (saves one evaluation)")
    sm.add_argument("--no-ema", action="store_true", help="use the trained weights instead of their EMA")
    sm.add_argument("--scale", type=int, default=1, help="enlarge every pixel this many times")
    sm.add_argument("--device", default="auto")
    sm.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="benchmark tables: mentor bench diffusion [--help for its options]",
                       add_help=True)
    b.add_argument("suite", choices=["diffusion"], help="which benchmark (the distillation table is "
                   "benchmarks/kd.py)")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options")
    b.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job: teacher and student on Fashion-MNIST, one table")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--out", default=None, help="run folder (default runs/demo, runs/demo-quick with --quick)")
    demo.add_argument("--quick", action="store_true", help="a few steps per row (a smoke test)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import MentorError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides may follow options (mentor adapt RUN --shift X method.name=norm)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging()
    try:
        return args.func(args)
    except MentorError as e:
        kind = "recipe error" if e.exit_code == 2 else "error"
        print(f"mentor: {kind}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyError as e:  # a registry's "unknown name" message
        print(f"mentor: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mentor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
