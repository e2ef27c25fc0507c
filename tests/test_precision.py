"""fp16 with a gradient scaler, the choice of precision, and what a run records about what produced it."""

import json

import pytest
import torch
import yaml
from _helpers import resumes_bitwise

from mentor import __version__
from mentor.config import ConfigError, load_config
from mentor.engine import Trainer, train
from mentor.engine.trainer import autocast_for, resolve_precision
from mentor.provenance import git_commit

pytest.importorskip("sklearn")


def digits_cfg(tmp_path, *extra, name="run"):
    return load_config(None, [
        f"out_dir={tmp_path / name}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
        "data.padding=1", "data.flip=false", "model.name=resnet8", "trainer.max_steps=8",
        "trainer.eval_every=4", "trainer.ckpt_every=4", "trainer.log_every=2", "trainer.progress=false",
        "optim.lr=0.05", *extra])


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(cpu, "fp16") == "fp16"
    assert resolve_precision(cpu, "bf16") == "bf16"
    with autocast_for(cpu, "fp16")():
        assert torch.get_autocast_dtype("cpu") == torch.float16
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.float16
    with autocast_for(cpu, "fp32")():
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.float32


def test_fp16_scales_the_loss_and_resumes_exactly(tmp_path):
    """The fp16 path: a gradient scaler whose state is checkpointed, so a resumed run ends bit for bit where the
    straight run ends; its weights differ from an fp32 run's (the step really ran in half precision)."""
    cfg = lambda name: digits_cfg(tmp_path, "trainer.precision=fp16", "trainer.clip_grad=5", name=name)  # noqa: E731
    _, ref = resumes_bitwise(cfg, stop_after=4)
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    fp32 = Trainer(digits_cfg(tmp_path, name="fp32"))
    fp32.fit()
    got = fp32.method.state_dict()
    assert any(not torch.equal(ref[k], got[k]) for k in ref if ref[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in ref.values() if v.is_floating_point())


def test_fp16_refuses_a_captured_step(tmp_path):
    with pytest.raises(ConfigError, match="trainer.precision=fp16.*cuda_graph"):
        digits_cfg(tmp_path, "trainer.precision=fp16", "trainer.cuda_graph=true")


def test_run_records_version_and_commit(tmp_path):
    summary = train(digits_cfg(tmp_path, "trainer.max_steps=2", "trainer.eval_every=2"))
    assert summary["mentor_version"] == __version__
    assert summary["git_commit"] == git_commit()
    assert summary["torch"] == str(torch.__version__)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["mentor_version"] == __version__
    text = (tmp_path / "run" / "config.yaml").read_text()
    first = text.splitlines()[0]
    assert first.startswith(f"# written by mentor {__version__}") and str(git_commit() or "unknown") in first
    # the file is still a recipe: it loads and trains the same run (a finished one: nothing to do)
    assert yaml.safe_load(text)["trainer"]["max_steps"] == 2
    again = train(load_config(tmp_path / "run" / "config.yaml"))
    assert again["steps"] == 2


def test_git_commit_is_this_checkout():
    import subprocess
    from pathlib import Path

    import mentor

    src = Path(mentor.__file__).parent
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("mentor is not imported from a git checkout")
    assert git_commit().split("+")[0] == head.stdout.strip()


def test_run_files_follow_the_umask(tmp_path):
    """Every file a run writes gets the permissions the umask gives (0o664 under umask 002), so colleagues in
    the group can read runs on a shared cluster; an atomic write's temporary file is not left private."""
    import os
    import stat

    old = os.umask(0o002)
    try:
        train(digits_cfg(tmp_path, "trainer.max_steps=2", "trainer.eval_every=2", "trainer.ckpt_every=2",
                         "trainer.loggers=[jsonl,csv]"))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [p for p in run.iterdir() if p.is_file() and p.name != "run.lock"]
    expected = {"config.yaml", "summary.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt"}
    assert expected <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o664, (p.name, oct(p.stat().st_mode))


def test_snapshots_keep_the_weights_of_their_steps(tmp_path):
    """trainer.snapshots keeps snapshot_<step>.pt (fractions of max_steps or steps); its weights are those of a
    straight run stopped at that step, and `mentor eval` reads it; --force removes it."""
    from mentor.engine.run import evaluate_run
    from mentor.engine.trainer import snapshot_steps

    assert snapshot_steps([0.5, 6, 0.8, 99], 8) == {4, 6}
    train(digits_cfg(tmp_path, "trainer.snapshots=[0.5,6]", "trainer.eval_every=8", "trainer.ckpt_every=8"))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("snapshot_*.pt")) == ["snapshot_4.pt", "snapshot_6.pt"]
    snap = torch.load(run / "snapshot_4.pt", weights_only=True)
    assert snap["step"] == 4
    # the same recipe stopped by a signal after its 4th step: its last.pt holds exactly the step-4 weights
    from _helpers import fit_until_signal

    fit_until_signal(Trainer(digits_cfg(tmp_path, "trainer.eval_every=8", name="again")), after_step=3)
    state = torch.load(tmp_path / "again" / "last.pt", weights_only=True)
    assert state["step"] == 4
    student = {k[len("student."):]: v for k, v in state["method"].items() if k.startswith("student.")}
    assert student.keys() == snap["model"].keys()
    assert all(torch.equal(v, student[k]) for k, v in snap["model"].items())
    assert any(not torch.equal(v, student[k]) for k, v in torch.load(run / "snapshot_6.pt", weights_only=True)[
        "model"].items() if v.is_floating_point())
    result = evaluate_run(run / "snapshot_6.pt")
    assert result["step"] == 6 and 0.0 <= result["test_acc"] <= 1.0
    train(digits_cfg(tmp_path, "trainer.eval_every=8"), force=True)
    assert not list(run.glob("snapshot_*.pt"))
