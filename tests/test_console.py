"""What a run shows and records besides its checkpoints: the logging backends (csv, TensorBoard, W&B), the
header and the warnings at the start, the readable summaries of `mentor train` and `mentor eval`, and the
console of a run started from Python."""

import contextlib
import csv
import json
import logging
import math
import sys

import pytest
from _helpers import FixedMLP  # noqa: F401  (registers test models and methods)

from mentor.cli import main
from mentor.config import ConfigError, load_config
from mentor.engine import Trainer, train
from mentor.engine.console import start_warnings

pytest.importorskip("sklearn")

TINY = ["data.name=digits", "data.val_size=200", "data.batch_size=32", "data.augment=none", "model.name=test_mlp",
        "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=1",
        "trainer.progress=false", "optim.lr=0.05"]
MLP_PARAMS = 64 * 32 + 32 + 32 * 10 + 10  # FixedMLP on 8x8 digits: two linear layers
TRAIN_IMAGES = 1797 - 599 - 200  # digits: 1,797 images, 599 test (sklearn's split), 200 carved for validation


def cfg_for(tmp_path, *extra, name="run"):
    return load_config(None, [f"out_dir={tmp_path / name}", *TINY, *extra])


def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: {name: supervised}\n")
    return str(path)


def jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(folder):
    """{tag: [(step, value), ...]} read back from TensorBoard's event files (earlier sessions purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_records(run):
    """metrics.csv and the TensorBoard events hold exactly the keys and values of metrics.jsonl."""
    records = jsonl(run)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    for rec, row in zip(records, rows):
        assert {k for k, v in row.items() if v != ""} == set(rec)
        for k, v in rec.items():
            assert (row[k] == v) if isinstance(v, str) else float(row[k]) == v, (k, row[k], v)
    expected = {}
    for rec in records:
        for k, v in rec.items():
            if k not in ("step", "split", "time"):
                expected.setdefault(f"{rec['split']}/{k}", []).append((rec["step"], v))
    got = scalars(run / "tensorboard")
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # each step once
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_csv_and_tensorboard_hold_the_records_of_metrics_jsonl(tmp_path):
    train(cfg_for(tmp_path, "trainer.loggers=[csv, tensorboard]"))
    run = tmp_path / "run"
    records = jsonl(run)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    assert_same_records(run)
    # validation keys appeared after the first training rows: the header was widened, time stays last
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "split"] and header[-1] == "time" and "val_acc" in header


def test_a_resumed_run_logs_no_step_twice(tmp_path, monkeypatch):
    """A crash after step 5 (checkpoint at 3): steps 4 and 5 were logged, the resume logs them again."""
    cfg = cfg_for(tmp_path, "trainer.loggers=[csv, tensorboard]")
    original = Trainer._train_step

    def crash(self, step):
        if step == 5:
            raise RuntimeError("the machine went away")
        original(self, step)

    monkeypatch.setattr(Trainer, "_train_step", crash)
    with pytest.raises(RuntimeError):
        Trainer(cfg).fit()
    run = tmp_path / "run"
    with open(run / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f) if r["split"] == "train"] == ["1", "2", "3", "4", "5"]
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = Trainer(cfg_for(tmp_path, "trainer.loggers=[csv, tensorboard]"))
    resumed.fit()
    assert resumed.start_step == 3
    records = jsonl(run)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    # the throughput of steps 4-5 is the resumed session's: TensorBoard shows it, not the crashed session's
    assert_same_records(run)


def test_wandb_writes_an_offline_run_under_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)  # nothing configured: mentor asks for offline mode itself
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    train(cfg_for(tmp_path, "trainer.loggers=[wandb]", "trainer.max_steps=3"))
    run = tmp_path / "run"
    run_id = (run / "wandb" / "mentor-run-id").read_text().strip()
    [folder] = (run / "wandb").glob("offline-run-*")
    assert folder.name.endswith(run_id)
    data = (folder / f"run-{run_id}.wandb").read_bytes()
    for rec in jsonl(run):
        for k, v in rec.items():
            if k not in ("step", "split", "time"):  # each key, and its value as W&B stores it (JSON text)
                assert f"{rec['split']}/{k}".encode() in data and json.dumps(v).encode() in data, (k, v)


def test_the_header_says_what_trains_and_for_how_long(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mentor"):
        train(cfg_for(tmp_path, "trainer.max_steps=40", "trainer.eval_every=40", "trainer.ckpt_every=40",
                      "trainer.log_every=40", "trainer.loggers=[csv]"))
    text = caplog.text
    per_epoch = TRAIN_IMAGES // 32
    assert f"test_mlp, {MLP_PARAMS:,} parameters" in text
    assert f"40 steps ~ {40 / per_epoch:.1f} epochs ({per_epoch} steps per epoch), batch 32" in text
    assert f"data digits: {TRAIN_IMAGES:,} train / 200 val / 599 test" in text
    assert f"output {tmp_path / 'run'} (metrics.jsonl, metrics.csv)" in text
    assert "device cpu" in text and "fp32" in text
    assert "evaluating at step 40 ..." in text and "testing the last weights on 599 test images" in text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_header_reports_the_teacher_and_its_accuracy(tmp_path, caplog):
    teacher = tmp_path / "run"
    train(cfg_for(tmp_path))
    summary = json.loads((teacher / "summary.json").read_text())
    with caplog.at_level(logging.INFO, logger="mentor"):
        train(cfg_for(tmp_path, "method.name=kd", f"method.teacher={teacher}", "trainer.max_steps=1", name="kd"))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher "))
    assert line.startswith(f"teacher test_mlp ({MLP_PARAMS:,} parameters) from {teacher}")
    assert f"test acc {100 * summary['test_acc_best']:.2f}% (best val)" in line
    assert f"{100 * summary['test_acc_last']:.2f}% (last)" in line


def test_warnings_fire_for_a_short_ema_or_warm_up_and_not_for_the_recipes(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mentor"):
        train(cfg_for(tmp_path, "trainer.ema=0.99", "schedule.warmup_steps=4"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert "schedule.warmup_steps=4 takes 67% of the run" in warned[0]
    # about 100 steps of averaging in a 6-step run: 0.99**6 of the initial weights are left
    assert "trainer.ema=0.99 averages the weights over about 100 steps" in warned[1]
    assert f"{0.99 ** 6:.0%} of the initial weights" in warned[1]
    for recipe in ("recipes/supervised/digits_resnet8.yaml", "recipes/diffusion/digits_edm.yaml"):
        trainer = Trainer(load_config(recipe, [f"out_dir={tmp_path / 'r'}"]))
        assert start_warnings(trainer) == [], recipe


def test_a_short_edm_run_is_told_its_ema_copy_is_mostly_noise(tmp_path):
    trainer = Trainer(load_config("recipes/diffusion/digits_edm.yaml",
                                  [f"out_dir={tmp_path / 'edm'}", "trainer.max_steps=250"]))
    [warning] = start_warnings(trainer)
    # 250 steps with decay 0.999: 0.999**250 = 78% of the EMA copy is still the random initial network
    assert "method edm samples from the EMA copy" in warning and f"{0.999 ** 250:.0%}" in warning
    assert f"Train more than {math.ceil(math.log(0.1) / math.log(0.999)):,} steps" in warning
    # the EDM check replaces the engine's: one warning, not two
    assert not any(w.startswith("trainer.ema=") for w in start_warnings(trainer))


def test_train_and_eval_print_a_readable_summary_or_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", recipe_file(tmp_path), f"out_dir={out}", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert "{" not in printed
    assert (f"test acc   {100 * summary['test_acc_last']:.2f}% (last)   {100 * summary['test_acc_best']:.2f}% "
            f"(best val, step {summary['best_step']})") in printed
    assert f"supervised: test_mlp, {MLP_PARAMS:,} parameters, 6 steps" in printed and f"run {out}" in printed
    assert main(["train", recipe_file(tmp_path), f"out_dir={out}", *TINY, "--json"]) == 0  # finished: as it is
    assert json.loads(capsys.readouterr().out) == summary
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out / 'best.pt'} (step {summary['best_step']}, {MLP_PARAMS:,} parameters)")
    assert f"test_acc  {100 * summary['test_acc_best']:.2f}%" in printed
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == pytest.approx(summary["test_acc_best"])


@contextlib.contextmanager
def no_logging_configured():
    """No handler on the root or "mentor" logger, as in a fresh interpreter (pytest's own set aside)."""
    root, mentor = logging.getLogger(), logging.getLogger("mentor")
    saved = (root.handlers[:], mentor.handlers[:], mentor.propagate, mentor.level)
    root.handlers.clear()
    mentor.handlers.clear()
    mentor.propagate = True
    mentor.setLevel(logging.NOTSET)
    try:
        yield
    finally:
        root.handlers[:], mentor.handlers[:] = saved[0], saved[1]
        mentor.propagate = saved[2]
        mentor.setLevel(saved[3])


def test_the_python_api_prints_progress_without_logging_set_up(tmp_path, capsys):
    with no_logging_configured():
        train(cfg_for(tmp_path))
    err = capsys.readouterr().err
    assert err.count("training into") == 1 and "step 6/6  loss" in err and f"{MLP_PARAMS:,} parameters" in err
    with no_logging_configured():  # the program configured logging: its handler prints, once
        user = logging.StreamHandler(sys.stdout)
        user.setFormatter(logging.Formatter("USER %(message)s"))
        logging.getLogger().addHandler(user)
        logging.getLogger().setLevel(logging.INFO)
        try:
            train(cfg_for(tmp_path, name="second"))
        finally:
            logging.getLogger().setLevel(logging.WARNING)
        assert logging.getLogger("mentor").handlers == []
    captured = capsys.readouterr()
    assert captured.out.count("USER training into") == 1 and "training into" not in captured.err


def test_the_command_line_logs_each_line_once_on_stdout(tmp_path, capsys):
    with no_logging_configured():
        assert main(["train", recipe_file(tmp_path), f"out_dir={tmp_path / 'run'}", *TINY]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("training into") == 1 and captured.out.count("step 6/6  loss") == 1
    assert "training into" not in captured.err


def test_an_unknown_logger_is_a_recipe_error(tmp_path, capsys):
    assert main(["train", recipe_file(tmp_path), f"out_dir={tmp_path / 'run'}", *TINY,
                 "trainer.loggers=[csv, tensorbord]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mentor: recipe error: ") and err.count("\n") == 1
    assert "trainer.loggers[1] must be one of jsonl, csv, tensorboard, wandb, got 'tensorbord'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_stops_before_training(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(ConfigError, match=rf"trainer.loggers .*pip install 'mentor\[{name}\]'"):
        Trainer(cfg_for(tmp_path, f"trainer.loggers=[{name}]"))
    assert main(["train", recipe_file(tmp_path), f"out_dir={tmp_path / 'run'}", *TINY,
                 f"trainer.loggers=[{name}]"]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'mentor[{name}]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
