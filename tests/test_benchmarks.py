"""The benchmark scripts run and report what they claim (no timing is asserted here)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_reports_one_configuration():
    bench = load("throughput")
    args = argparse.Namespace(model="resnet8", batch=8, channels=3, size=32, classes=100, augment="strong",
                              device="cpu", precision="fp32", compile=False, channels_last=False, threads=None,
                              warmup=1, steps=2)
    out = bench.measure(args)
    assert out["model"] == "resnet8" and out["input"] == [3, 32, 32] and out["device"] == "cpu"
    # images/s and ms/step describe the same timing (both rounded for printing)
    assert out["img_s"] > 0 and out["step_ms"] * out["img_s"] / 1000 == pytest.approx(8, rel=0.02)


def test_kd_report_statistics_by_hand():
    kd = load("kd")
    kd.load_builtin_methods()
    # per-seed differences 5, 0 (points): mean 2.5, sample std 3.54 -> not marked
    assert kd.paired_gain([0.90, 0.80], [0.85, 0.80]) == "+2.50 ± 3.54"
    # differences 1.0, 1.1, 0.9: mean 1.0, std 0.1 -> marked as exceeding 2 std
    assert kd.paired_gain([0.81, 0.711, 0.609], [0.80, 0.70, 0.60]).endswith("*")
    assert kd.mean_std([0.5, 0.7]) == "60.00 ± 14.14"
    assert kd.method_overrides("kd", ["t0", "t1"], 12.0) == ["method.teacher=t0"]
    assert kd.method_overrides("dkd", ["t0"], 12.0) == ["method.teacher=t0", "method.warmup_epochs=1"]
    assert kd.method_overrides("ebkd", ["t0", "t1"], 1.0) == ["method.teachers=[t0,t1]"]
    assert kd.method_overrides("dml", ["t0"], 1.0) == []


@pytest.mark.parametrize("plan", ["cpu", "gpu"])
def test_generalize_sweep_recipes_are_valid_for_every_method_and_setting(tmp_path, plan):
    from mentor.config import load_config

    bench = load("generalize")
    jobs = bench.dg_jobs(tmp_path, plan, ["digits_domains", "rotated_fmnist"], bench.DG_METHODS, [0], ["erm"])
    for part in ("openset", "fewlabel", "single"):
        jobs += bench._setting_runs(tmp_path, plan, part, [0])[0]
    tests = bench.PLANS[plan]["tests"]
    # one run per (method, held-out domain); ERM also holds out each other domain; GFNet ERM; the @adam variants
    expected = sum(len(bench.DG_METHODS) * len(tests[d]) + len(tests[d]) * (len(bench.DOMAINS[d]) - 1)
                   + len(tests[d]) for d in tests)
    expected += sum(len(tests["digits_domains"]) * (1 + len(ms)) for ms in bench.VARIANT_METHODS.values())
    assert len([j for j in jobs if "/dg/" in str(j[0])]) == expected
    assert len({d for d, _ in jobs}) == len(jobs)  # every run has its own directory
    for d, args in jobs:
        args = [a for a in args if a != "trainer.device=cuda"]  # this machine may have no GPU
        cfg = load_config(bench.BASE_RECIPE, args)  # every key exists and every value passes its rule
        assert cfg.out_dir == str(d) and cfg.data.split_seed == cfg.trainer.seed == 0
    irm = next(a for d, a in jobs if "/irm/" in str(d) and "/dg/digits_domains/" in str(d))
    assert f"method.anneal_steps={round(0.5 * bench._steps(plan))}" in irm and "method.rescale=true" in irm


@pytest.mark.parametrize("plan", ["cpu", "gpu"])
def test_datafree_sweep_recipes_are_valid_and_give_every_method_the_same_student_steps(tmp_path, plan):
    from mentor.config import load_config
    bench = load("datafree")
    teachers = {recipe: tmp_path / "teacher" for recipe, _ in bench.PLANS[plan]["pairs"]}
    jobs = bench.plan_jobs(tmp_path, plan, [0, 1], bench.METHODS, "cpu", teachers)
    pairs = len(bench.PLANS[plan]["pairs"])
    assert len(jobs) == pairs * 2 * (len(bench.METHODS) + 2) and len({d for d, _, _ in jobs}) == len(jobs)
    want = bench.PLANS[plan]["student_steps"]
    for d, recipe, args in jobs:
        cfg = load_config(recipe, args)  # every key exists and every value passes its rule
        assert cfg.out_dir == str(d)
        name = cfg.method.name
        if name in bench.METHODS:
            # max_steps comes from steps_for, which tests/test_datafree_engine.py checks against each method's phases
            assert cfg.method.batch_size == bench.PLANS[plan]["batch"]
        else:
            assert cfg.trainer.max_steps == want and cfg.data.batch_size == bench.PLANS[plan]["batch"]


def test_diffusion_claims_verdicts_by_hand():
    claims = load("diffusion_claims")
    tag = "digits"

    def cell(fd):
        return {f"FD-{tag}": fd, f"KID-{tag}": 0.0, "seconds": 1.0}

    results = {}
    # AMED-Plugin at NFE 3: per-seed differences -1.0, -1.2, -0.8 (mean -1.0, std 0.2): holds
    for seed, (a, b) in enumerate([(4.0, 5.0), (3.8, 5.0), (4.2, 5.0)]):
        results[claims.cell_key("AMED-Plugin (iPNDM)", 3, seed)] = cell(a)
        results[claims.cell_key("iPNDM", 3, seed)] = cell(b)
    # AMED-Solver at NFE 4: differences +1, -1, +0.5: not separated
    for seed, (a, b) in enumerate([(6.0, 5.0), (4.0, 5.0), (5.5, 5.0)]):
        results[claims.cell_key("AMED-Solver", 4, seed)] = cell(a)
        results[claims.cell_key("DPM-Solver-2", 4, seed)] = cell(b)
    # SFD at NFE 2 against its teacher: differences +2.0, +2.1, +1.9: reversed
    for seed, (a, b) in enumerate([(3.0, 1.0), (3.1, 1.0), (2.9, 1.0)]):
        results[claims.cell_key("SFD", 2, seed)] = cell(a)
        results[claims.cell_key("SFD teacher (DPM-Solver++(3M), NFE 12)", 2, seed)] = cell(b)
    rows = claims.claims_table(results, [0, 1, 2], tag)[2:]
    assert len(rows) == 3  # pairs without cells are left out
    assert rows[0].startswith("| AMED-Plugin (iPNDM) | iPNDM | 3 | 4.000 ± 0.200 | 5.000 ± 0.000 | -1.000 ± 0.200 |")
    assert rows[0].endswith("| holds |")
    assert "| +0.167 ± 1.041 | not separated |" in rows[1]
    assert rows[2].startswith("| SFD | SFD teacher (DPM-Solver++(3M), NFE 12) | 2 |") and rows[2].endswith("reversed |")


@pytest.mark.slow
def test_diffusion_claims_runs_end_to_end_and_resumes(tmp_path):
    pytest.importorskip("sklearn")
    import json

    from mentor.config import load_config
    from mentor.engine import train

    quiet = ["trainer.progress=false", "trainer.threads=1"]
    edm = tmp_path / "edm"
    train(load_config(ROOT / "recipes/diffusion/digits_edm.yaml", [
        f"out_dir={edm}", "data.batch_size=32", *quiet, "model.kwargs={channels: 16, channel_mult: [1, 2], "
        "num_blocks: 1, attention: false}", "trainer.max_steps=12", "trainer.eval_every=12", "trainer.ckpt_every=12",
        "trainer.ema=0.9", "schedule.warmup_steps=10", "method.eval_sigmas=2"]))
    clf = tmp_path / "clf"
    train(load_config(ROOT / "recipes/supervised/digits_resnet8.yaml", [
        f"out_dir={clf}", *quiet, "trainer.max_steps=10", "trainer.eval_every=10", "trainer.ckpt_every=10",
        "schedule.warmup_steps=2"]))
    claims = load("diffusion_claims")
    out = tmp_path / "claims"
    argv = ["--run", str(edm), "--classifier", str(clf), "--n", "40", "--seeds", "0", "1", "--out", str(out),
            "--amed-iterations", "1", "--sfd-iterations", "1", "--train-batch", "8", "--gits-samples", "8",
            "--batch", "20", "--threads", "1"]
    # the cells that need nothing trained first, as a process beside a --train-only one samples them
    assert claims.main([*argv, "--baselines-only"]) == 0
    first = json.loads((out / "cells.json").read_text())
    assert {k.split(" | ")[0] for k in first} == {"iPNDM", "DPM-Solver-2", "Euler",
                                                   "SFD teacher (DPM-Solver++(3M), NFE 12)",
                                                   "SFD teacher (DPM-Solver++(3M), NFE 16)",
                                                   "SFD teacher (DPM-Solver++(3M), NFE 20)"}
    assert not list((out / "trained").glob("*.pt"))
    assert claims.main(argv) == 0
    cells = json.loads((out / "cells.json").read_text())
    # every method at each of its NFE, for both seeds
    labels = {k.split(" | ")[0] for k in cells}
    assert {"iPNDM", "DPM-Solver-2", "Euler", "AMED-Plugin (iPNDM)", "AMED-Solver", "iPNDM + GITS", "Euler + GITS",
            "SFD"} <= labels
    assert len(cells) == 2 * 32 and all(cells[k] == v for k, v in first.items())
    text = (out / "claims.md").read_text()
    assert text.count("| AMED-Plugin (iPNDM) | iPNDM |") == 4 and text.count("| SFD | SFD teacher") == 3
    # the trained pieces are reused: a second call trains nothing and keeps every cell
    trained = {p.name: p.stat().st_mtime_ns for p in (out / "trained").glob("*.pt")}
    assert claims.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trained").glob("*.pt")} == trained
    assert json.loads((out / "cells.json").read_text()) == cells
