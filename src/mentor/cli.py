"""The ``mentor`` command line: train, eval, list, data, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _setup_logging() -> None:
    """Log lines on standard output (the tqdm bar is on standard error), through the same console handler
    a Python program gets from :func:`mentor.engine.train`; logging configured already is left as it is."""
    from .logs import console_logging

    console_logging(sys.stdout)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import train

    if args.seeds or args.grid or args.dry_run or args.processes is not None:
        return _train_sweep(args)
    cfg = load_config(args.recipe, args.overrides)
    summary = train(cfg, force=args.force)
    if os.environ.get("RANK", "0") == "0":
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            from .engine.console import summary_text

            print(summary_text(summary, cfg.out_dir))
    return 0


def _train_sweep(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .sweep import execute, train_sweep

    if args.force:
        raise ConfigError("--force does not combine with --seeds/--grid: a sweep skips finished cells and resumes "
                          "interrupted ones; delete the cells' folders (or give another out_dir) to train them anew")
    if not (args.seeds or args.grid):
        raise ConfigError("--dry-run and --processes belong to a sweep: add --seeds 0,1,2 and/or --grid key=v1,v2")
    return execute(train_sweep(args.recipe, args.overrides, args.seeds, args.grid or [], args.processes),
                   dry_run=args.dry_run)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import execute, load_sweep

    return execute(load_sweep(args.sweep, processes=args.processes), dry_run=args.dry_run)


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.run import evaluate_run

    result = evaluate_run(args.path, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from .engine.console import eval_text

        print(eval_text(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run, export_text

    meta = export_run(args.run, args.format, out=args.out, ema=args.ema, checkpoint=args.checkpoint)
    print(export_text(meta))
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
    plan = AdaptPlan(run=args.run, shift=args.shift, setting=args.setting, root=args.root, options=options,
                     save_model=args.save_model)
    summary = adapt(plan, build_adapt_config(args.overrides))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .introspect import list_names, listing_text

    # every list is read from its registries (mentor.introspect), so a registered name cannot be left out
    print(listing_text(args.pattern) if args.what is None else "\n".join(list_names(args.what, args.pattern)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .introspect import method_text

    print(method_text(args.method, full=args.full))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .introspect import config_text

    print(config_text(args.recipe, args.overrides), end="")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import fetch

    if args.action == "info":
        from .data.names import describe_dataset, missing_hint

        text, available = describe_dataset(args.name)
        print(text)
        if not available:
            print(f"mentor: error: {missing_hint(args.name)}", file=sys.stderr)
            return 1
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
                               predictor=args.predictor, ema=not args.no_ema, device=args.device, scale=args.scale,
                               guidance=args.guidance, solver_opts=args.solver_opt)
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


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    print(make_report(args.paths, out=args.out, baseline=args.baseline))
    return 0


class _Version(argparse.Action):
    """``--version``: computed when asked (from package metadata, importing nothing heavy), then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .introspect import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mentor", description="Teacher-student learning on one engine.")
    p.add_argument("--version", action=_Version, help="the versions of mentor, torch and Python, then exit")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe: mentor train RECIPE [key.sub=value ...]")
    t.add_argument("recipe", help="a recipe YAML file, e.g. recipes/supervised/fmnist_resnet20.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=100 optim.lr=0.1")
    t.add_argument("--force", action="store_true", help="discard what out_dir holds (checkpoints, metrics, "
                   "summary) and train from scratch; without it a finished run is left as it is and an "
                   "interrupted one resumes")
    t.add_argument("--json", action="store_true", help="print the run's summary.json at the end (default: the "
                   "headline numbers as readable lines)")
    t.add_argument("--seeds", default=None, help="a sweep over seeds, e.g. 0,1,2: one run per seed (trainer.seed) "
                   "under the recipe's out_dir (else runs/<recipe name>)/seed<k>")
    t.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a sweep over a key's values, e.g. "
                   "method.beta=2,4,8 (repeat for a cross product); with --seeds, every point per seed")
    t.add_argument("--processes", type=int, default=None, help="sweep cells run at once (default: one per GPU, "
                   "else 1)")
    t.add_argument("--dry-run", action="store_true", help="list the sweep's cells and their state; run nothing")
    t.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="run a sweep file: recipes x grid x seeds, one run directory per cell")
    sw.add_argument("sweep", help="a sweep YAML file (out, recipes, overrides, grid, seeds, launcher)")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    sw.add_argument("--processes", type=int, default=None, help="cells at once (the launcher's processes; Slurm: "
                    "its parallelism)")
    sw.set_defaults(func=cmd_sweep)

    e = sub.add_parser("eval", help="evaluate a run directory or checkpoint on validation and test data")
    e.add_argument("path", help="a run directory (uses best.pt, else last.pt), a checkpoint file, or a file "
                   "written by mentor export (beside its sidecar FILE.json)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the result as JSON (default: readable lines)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a run's deployable network for shipping: mentor export RUN --format "
                       "safetensors|onnx|torchscript|torch (a sidecar FILE.json describes it)")
    x.add_argument("run", help="a run directory (best.pt, else last.pt), a checkpoint, or a `mentor adapt "
                   "--save-model` directory")
    x.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript", "torch"])
    x.add_argument("--out", default=None, help="the file to write (default RUN/export/<model>.<ext>)")
    x.add_argument("--ema", action="store_true", help="the run's EMA weights (trainer.ema)")
    x.add_argument("--checkpoint", choices=["best", "last"], default=None, help="which checkpoint of a run "
                   "directory (default best.pt, else last.pt)")
    x.set_defaults(func=cmd_export)

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
    a.add_argument("--save-model", action="store_true", help="write the adapted network (as it stands after the "
                   "last stream) to OUT_DIR/adapted.pt, which mentor export and mentor eval read")
    a.add_argument("overrides", nargs="*", help="method.name=norm data.batch_size=64 trainer.device=cuda out_dir=...")
    a.set_defaults(func=cmd_adapt)

    ls = sub.add_parser("list", help="list registered methods, models, datasets, shifts or augmentations (all "
                        "of them without a kind)", epilog="model.name also takes timm:NAME, torchvision:NAME (the "
                        "zoo extra) and path/to/file.py:build_fn")
    ls.add_argument("what", nargs="?", default=None, choices=["methods", "models", "datasets", "shifts", "augments"])
    ls.add_argument("pattern", nargs="?", default="*", help="a glob, e.g. 'resnet*'")
    ls.set_defaults(func=cmd_list)

    sh = sub.add_parser("show", help="a method: its paper, hyper-parameters with defaults, inputs, required keys "
                        "and recipes: mentor show kd")
    sh.add_argument("method", help="a method name (`mentor list methods`)")
    sh.add_argument("--full", action="store_true", help="also print the method's whole description")
    sh.set_defaults(func=cmd_show)

    cf = sub.add_parser("config", help="a recipe resolved, every default filled in, as YAML: mentor config "
                        "RECIPE [key.sub=value ...]")
    cf.add_argument("recipe", help="a recipe YAML file, e.g. recipes/distill/fmnist_kd.yaml")
    cf.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.temperature=2")
    cf.set_defaults(func=cmd_config)

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
    sm.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale with --class-label "
                    "(models trained with method.label_dropout > 0; 1 = conditional, > 1 stronger)")
    sm.add_argument("--afs", action="store_true", help="analytic first step (saves one evaluation)")
    sm.add_argument("--solver-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the solver, repeatable: eta=0.5 (euler_ancestral, dpm_solver_pp_2m_sde), "
                    "s_churn=40 s_tmin=0.05 s_tmax=50 s_noise=1.003 (edm_stochastic), max_order=2, ...")
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

    rp = sub.add_parser("report", help="an HTML page (and Markdown) of runs or sweeps: tables over seeds, curves, "
                        "per-class accuracy, calibration, samples")
    rp.add_argument("paths", nargs="+", help="run directories, or folders holding runs at any depth (a sweep)")
    rp.add_argument("--out", default=None, help="folder for report.html, report.md and figures/ (default "
                    "<first path>/report)")
    rp.add_argument("--baseline", default=None, help="the group gains are measured against, by its name in the "
                    "table (default: a supervised group, else the first)")
    rp.set_defaults(func=cmd_report)
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
