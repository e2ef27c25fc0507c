"""The main job's table: what `mentor demo` prints is what it saves (demo.md, demo.json), and --quick runs the
whole path."""

import json

import pytest
from conftest import needs_fmnist

from mentor.demo import HEAD, format_table, markdown_table, save_tables


def fake_rows():
    base = {"model": "resnet8", "params": 78042, "steps": 800, "val_acc_best": 0.8766, "test_acc_last": 0.8721,
            "test_acc_best": 0.8721, "train_img_s": 3416.2, "wall_s": 31.0, "device": "CPU X", "threads": 2}
    return [{"role": "teacher", "run": "runs/demo/teacher", "summary": {**base, "model": "resnet20", "params": 272186}},
            {"role": "KD", "run": "runs/demo/kd", "summary": {**base, "test_acc_last": 0.8859, "train_img_s": None}}]


def test_tables_hold_the_same_numbers(tmp_path):
    rows = fake_rows()
    text = format_table(rows)
    md = markdown_table(rows)
    assert text.splitlines()[0].split()[:2] == ["role", "model"]
    assert md.splitlines()[0] == "| " + " | ".join(HEAD) + " |"
    for shown in (text, md):
        assert "88.59" in shown and "87.21" in shown and "0.27M" in shown and "3,416" in shown and "nan" in shown
    md_path, js_path = save_tables(rows, tmp_path, "Fashion-MNIST, CPU", 315.0)
    saved = md_path.read_text()
    assert md in saved and "5.2 min" in saved and "CPU X" in saved
    doc = json.loads(js_path.read_text())
    assert [r["role"] for r in doc["rows"]] == ["teacher", "KD"]
    assert doc["rows"][1]["test_acc_last"] == 0.8859 and doc["wall_s"] == 315.0
    assert doc["mentor_version"] and "git_commit" in doc


@pytest.mark.slow
@needs_fmnist
def test_quick_demo_runs_and_saves_its_table(tmp_path, capsys):
    from mentor.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    doc = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["role"] for r in doc["rows"]] == ["teacher", "student alone", "KD", "DKD"]
    assert all(r["steps"] == 100 for r in doc["rows"])
    assert doc["rows"][0]["test_acc_last"] > 0.5  # 100 steps of resnet20 on 5,000 images
    assert "saved" in capsys.readouterr().out
