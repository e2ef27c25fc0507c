"""The benchmark scripts run and report what they claim (no timing is asserted here)."""

import argparse
import importlib.util
from pathlib import Path

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
    assert out["img_s"] > 0 and abs(out["step_ms"] * out["img_s"] / 1000 - 8) < 0.01
