"""Runs that never lie: finite checkpoints, finished runs left alone, one run per directory, a resume that
continues only its own recipe, checkpoints verified on load."""

import json
import os
import signal
import socket
import subprocess
import sys
import zipfile

import pytest
import torch
from _helpers import FixedMLP  # noqa: F401  (registers test models and methods)

from mentor.cli import main
from mentor.config import load_config
from mentor.engine import CheckpointError, CheckpointMismatchError, NonFiniteLossError, Trainer, train
from mentor.engine import checkpoint as ckpt
from mentor.engine.rundir import LOCK, RunDir, recipe_changes
from mentor.errors import RunDirError

pytest.importorskip("sklearn")


def cfg_for(tmp_path, *extra, name="run"):
    return load_config(None, [
        f"out_dir={tmp_path / name}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
        "data.augment=none", "model.name=test_mlp", "trainer.max_steps=6", "trainer.eval_every=3",
        "trainer.ckpt_every=2", "trainer.log_every=2", "trainer.progress=false", "optim.lr=0.05", *extra])


def recipe_file(tmp_path):
    """The recipe of :func:`cfg_for` as a file (``mentor train`` needs one)."""
    path = tmp_path / "recipe.yaml"
    path.write_text("method: {name: supervised}\nmodel: {name: test_mlp}\n"
                    "data: {name: digits, val_size: 200, batch_size: 32, augment: none}\n"
                    "optim: {lr: 0.05}\ntrainer: {max_steps: 6, eval_every: 3, ckpt_every: 2, log_every: 2, "
                    "progress: false}\n")
    return str(path)


def files_of(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


# -- non-finite values are never written ---------------------------------------------------------------

def test_nonfinite_weights_with_a_finite_loss_are_caught_before_the_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, "method.name=test_poison_at", "method.step=2", "trainer.ckpt_every=1",
                  "trainer.eval_every=100")
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg)
    msg = str(e.value)
    # step 2 poisons the weights; the check before writing step 3's checkpoint sees it
    assert "by step 3" in msg and "student." in msg and "step 2) is the last checkpoint" in msg
    state = ckpt.load(tmp_path / "run" / "last.pt")  # verified: finite, checksum matches
    assert state["step"] == 2


def test_nonfinite_weights_never_reach_best_pt(tmp_path):
    cfg = cfg_for(tmp_path, "method.name=test_poison_at", "method.step=1", "trainer.ckpt_every=100",
                  "trainer.eval_every=2")
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        train(cfg)
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_checkpoint_with_nonfinite_values_is_refused_by_eval(tmp_path, capsys):
    train(cfg_for(tmp_path))
    best = tmp_path / "run" / "best.pt"
    state = torch.load(best, weights_only=True)
    next(iter(state["model"].values())).view(-1)[0] = float("nan")
    del state["checksum"]  # as an older checkpoint, or another tool, would write it
    torch.save(state, best)
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "best.pt" in err and "Traceback" not in err


def test_atomic_save_refuses_nonfinite_values(tmp_path):
    with pytest.raises(CheckpointError, match="non-finite"):
        ckpt.atomic_save({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


# -- checksums, missing entries, shapes ----------------------------------------------------------------

def _flip_tensor_bytes(path):
    """Overwrite 8 bytes inside the largest tensor's data of a torch.save zip (the zip itself stays valid)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    off = info.header_offset
    start = off + 30 + int.from_bytes(raw[off + 26:off + 28], "little") + int.from_bytes(raw[off + 28:off + 30],
                                                                                          "little")
    raw[start + 16:start + 24] = bytes(range(200, 208))
    path.write_bytes(bytes(raw))


def test_random_bytes_inside_a_tensor_are_detected_on_resume_and_eval(tmp_path, capsys):
    train(cfg_for(tmp_path, "trainer.max_steps=4"))
    for name in ("last.pt", "best.pt"):
        _flip_tensor_bytes(tmp_path / "run" / name)
        torch.load(tmp_path / "run" / name, weights_only=True)  # still a readable file
    with pytest.raises(CheckpointError, match="checksum"):
        train(cfg_for(tmp_path, "trainer.max_steps=6"))
    assert main(["eval", str(tmp_path / "run")]) == 1
    assert "checksum" in capsys.readouterr().err


def test_checksum_covers_every_tensor_and_value():
    a = {"w": torch.arange(6.0).view(2, 3), "step": 3, "opt": [{"m": torch.zeros(2)}]}
    b = {"w": torch.arange(6.0).view(3, 2), "step": 3, "opt": [{"m": torch.zeros(2)}]}
    c = {"w": torch.arange(6.0).view(2, 3), "step": 4, "opt": [{"m": torch.zeros(2)}]}
    d = {"w": torch.arange(6.0).view(2, 3), "step": 3, "opt": [{"m": torch.tensor([0.0, 1e-30])}]}
    assert len({ckpt.digest(x) for x in (a, b, c, d)}) == 4
    assert ckpt.digest(a) == ckpt.digest({k: v for k, v in a.items()})


def test_checkpoint_without_optimizer_state_names_what_is_missing(tmp_path):
    train(cfg_for(tmp_path, "trainer.max_steps=4"))
    last = tmp_path / "run" / "last.pt"
    state = ckpt.load(last)
    del state["optimizers"]
    ckpt.atomic_save(state, last)
    with pytest.raises(CheckpointError, match="lacks 'optimizers'"):
        train(cfg_for(tmp_path, "trainer.max_steps=6"))


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    train(cfg_for(tmp_path, "trainer.max_steps=4"))
    last = tmp_path / "run" / "last.pt"
    state = ckpt.load(last)
    key = next(k for k in state["method"] if k.endswith("weight"))
    shape = tuple(state["method"][key].shape)
    state["method"][key] = torch.zeros(3, 5)
    ckpt.atomic_save(state, last)
    with pytest.raises(CheckpointError) as e:
        train(cfg_for(tmp_path, "trainer.max_steps=6"))
    assert key in str(e.value) and "(3, 5)" in str(e.value) and str(shape) in str(e.value)


def test_a_best_pt_that_is_a_folder_is_an_error_not_a_fallback(tmp_path, capsys):
    train(cfg_for(tmp_path))
    (tmp_path / "run" / "best.pt").unlink()
    (tmp_path / "run" / "best.pt").mkdir()
    assert main(["eval", str(tmp_path / "run")]) == 1
    assert "best.pt is not a file" in capsys.readouterr().err


def test_writes_are_flushed_and_stale_temporaries_removed(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    ckpt.atomic_save({"w": torch.ones(2)}, tmp_path / "run" / "x.pt")
    assert len(synced) == 2  # the file, then its folder
    stale = tmp_path / "run" / ".last.pt.12345.abcdef01.tmp"
    stale.write_bytes(b"half")
    mine = tmp_path / "run" / ".notes.tmp"  # not the engine's naming: kept
    mine.write_text("x")
    train(cfg_for(tmp_path, "trainer.max_steps=2"))
    assert not stale.exists() and mine.exists()


# -- a finished run is left alone ----------------------------------------------------------------------

def test_rerunning_a_finished_run_changes_nothing(tmp_path, caplog):
    first = train(cfg_for(tmp_path))
    before = files_of(tmp_path / "run")
    with caplog.at_level("INFO", logger="mentor"):
        again = train(cfg_for(tmp_path))
        again_trainer = Trainer(cfg_for(tmp_path)).fit()  # the engine itself, not only train()
    assert again == first and again_trainer == first
    assert files_of(tmp_path / "run") == before
    assert "finished run" in caplog.text and "--force" in caplog.text


def test_force_trains_again_from_scratch(tmp_path, capsys):
    train(cfg_for(tmp_path, "trainer.max_steps=4"))
    (tmp_path / "run" / "keep.txt").write_text("user file")
    argv = ["train", recipe_file(tmp_path), "--force", f"out_dir={tmp_path / 'run'}", "trainer.max_steps=4"]
    # a different recipe (batch size) with --force replaces the run
    assert main([*argv, "data.batch_size=16"]) == 0
    cfg_saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch_size: 16" in cfg_saved and (tmp_path / "run" / "keep.txt").exists()
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["split"] == "train"] == sorted({e["step"] for e in events
                                                                          if e["split"] == "train"})


def test_a_run_killed_after_its_last_step_completes_its_summary(tmp_path):
    first = train(cfg_for(tmp_path))
    (tmp_path / "run" / "summary.json").unlink()
    again = train(cfg_for(tmp_path))
    assert again["val_acc_last"] == first["val_acc_last"] and again["test_acc_last"] == first["test_acc_last"]
    assert again["test_acc_best"] == first["test_acc_best"]
    assert again["train_img_s"] == pytest.approx(first["train_img_s"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == again


def test_a_signal_during_the_final_evaluation_leaves_a_resumable_run(tmp_path, monkeypatch):
    ref = train(cfg_for(tmp_path, name="ref"))
    original = Trainer._summary

    def killed(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(Trainer, "_summary", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tmp_path))
    run = tmp_path / "run"
    assert not (run / "summary.json").exists() and not (run / LOCK).exists()
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(Trainer, "_summary", original)
    done = train(cfg_for(tmp_path))
    assert done["test_acc_last"] == ref["test_acc_last"] and done["val_acc_last"] == ref["val_acc_last"]


# -- one run per directory -----------------------------------------------------------------------------

def test_a_live_lock_stops_a_second_process(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        argv = ["train", recipe_file(tmp_path), f"out_dir={run}"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and "one run per directory" in err and "Traceback" not in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK]  # nothing written by the second process
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
    with caplog.at_level("WARNING", logger="mentor"):
        train(cfg_for(tmp_path, "trainer.max_steps=2"))
    assert f"lock of process {gone.pid}, which no longer runs" in caplog.text
    assert not (run / LOCK).exists() and (run / "summary.json").exists()


def test_a_lock_from_another_host_says_how_to_clear_it(tmp_path):
    rd = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunDirError, match="delete .*run.lock"):
        rd.acquire()


def test_two_processes_in_one_directory_one_trains_the_other_stops(tmp_path):
    import time

    argv = [sys.executable, "-m", "mentor.cli", "train", recipe_file(tmp_path), f"out_dir={tmp_path / 'run'}",
            "model.name=resnet8", "trainer.max_steps=1000000", "trainer.eval_every=1000000", "trainer.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if (tmp_path / "run" / "config.yaml").exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGINT)  # the first stops between two steps and saves
        out, err = first.communicate(timeout=120)
    assert second.returncode == 1 and "in use by process" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 130, err
    assert not (tmp_path / "run" / LOCK).exists()
    step = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in lines if e["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] <= step  # no line written twice, none past the checkpoint


# -- a resume continues only its own recipe ------------------------------------------------------------

def test_resuming_with_another_learning_rate_lists_the_difference(tmp_path, capsys):
    train(cfg_for(tmp_path))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(CheckpointMismatchError) as e:
        train(cfg_for(tmp_path, "optim.lr=0.01", "trainer.seed=3"))
    msg = str(e.value)
    assert "optim.lr: 0.05 -> 0.01" in msg and "trainer.seed: 0 -> 3" in msg and "--force" in msg
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    # through the command line: a recipe error (status 2), one paragraph
    argv = ["train", recipe_file(tmp_path), f"out_dir={tmp_path / 'run'}", "optim.lr=0.01"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr: 0.05 -> 0.01" in err and "\n" not in err


def test_an_interrupted_run_refuses_another_recipe_too(tmp_path):
    from _helpers import fit_until_signal

    fit_until_signal(Trainer(cfg_for(tmp_path)), after_step=2)
    with pytest.raises(CheckpointMismatchError, match="data.batch_size: 32 -> 16"):
        train(cfg_for(tmp_path, "data.batch_size=16"))


def test_keys_that_may_change_on_resume():
    saved = {"trainer": {"max_steps": 10, "eval_every": 5, "threads": None, "seed": 0}, "out_dir": "a",
             "optim": {"lr": 0.1, "betas": [0.9, 0.99]}}
    now = {"trainer": {"max_steps": 20, "eval_every": 2, "threads": 4, "seed": 0}, "out_dir": "b",
           "optim": {"lr": 0.1, "betas": (0.9, 0.99)}}
    assert recipe_changes(saved, now, ("trainer.max_steps", "trainer.eval_every", "trainer.threads", "out_dir")) == []
    assert recipe_changes(saved, {**now, "optim": {"lr": 0.2, "betas": [0.9, 0.99]}}, ()) == [
        "optim.lr: 0.1 -> 0.2", "out_dir: 'a' -> 'b'", "trainer.eval_every: 5 -> 2", "trainer.max_steps: 10 -> 20",
        "trainer.threads: None -> 4"]


def test_a_longer_max_steps_says_what_it_does_to_the_schedule(tmp_path, caplog):
    train(cfg_for(tmp_path, "trainer.max_steps=4"))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    with caplog.at_level("WARNING", logger="mentor"):
        summary = train(cfg_for(tmp_path, "trainer.max_steps=8"))
    assert summary["steps"] == 8
    assert "trainer.max_steps 4 -> 8" in caplog.text and "cosine" in caplog.text and "step 4 becomes" in caplog.text
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # a resume never rewrites the recipe
