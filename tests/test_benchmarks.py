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
