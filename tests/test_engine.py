"""The engine: run directory contents, exact resume, non-finite losses, accumulation, DDP, EMA."""

import json
import os
import signal

import pytest
import torch
import yaml
from _helpers import FixedMLP  # noqa: F401  (registers test models and methods)
from conftest import needs_fmnist, split_accuracy

from mentor.config import load_config
from mentor.engine import CheckpointError, CheckpointMismatchError, NonFiniteLossError, Trainer, train
from mentor.engine.ema import EMA
from mentor.engine.inputs import load_splits
from mentor.models import create_model

pytest.importorskip("sklearn")


def digits_cfg(tmp_path, *extra, name="run"):
    return load_config(None, [
        f"out_dir={tmp_path / name}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
        "data.augment=weak", "data.padding=1", "data.flip=false", "model.name=resnet8",
        "trainer.max_steps=12", "trainer.eval_every=6", "trainer.ckpt_every=4", "trainer.log_every=2",
        "trainer.progress=false", "optim.lr=0.05", "schedule.warmup_steps=3", *extra])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_directory_contents(tmp_path):
    cfg = digits_cfg(tmp_path)
    summary = train(cfg)
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*"))
    assert load_config(run / "config.yaml") == cfg  # the resolved config reproduces the run
    events = read_jsonl(run / "metrics.jsonl")
    train_steps = [e["step"] for e in events if e["split"] == "train"]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    assert [e["step"] for e in events if e["split"] == "val"] == [6, 12]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 12 and "method" in state and len(state["optimizers"]) == 1
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("val_acc_last", "val_acc_best", "best_step", "test_acc_last", "test_acc_best", "wall_s",
                "train_img_s", "params"):
        assert key in on_disk
    assert on_disk["test_acc_last"] == summary["test_acc_last"]
    # the reported accuracy is that of the network in last.pt on the test split, computed here
    net = create_model("resnet8", num_classes=10, in_channels=1)
    net.load_state_dict({k[len("student."):]: v for k, v in state["method"].items() if k.startswith("student.")})
    splits = load_splits(cfg.data)
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(net.eval(), splits.test, splits.train),
                                                     abs=1 / len(splits.test) + 1e-9)


def _state(trainer):
    return {k: v.clone() for k, v in trainer.method.state_dict().items()}


def test_exact_resume_after_interrupt(tmp_path, monkeypatch):
    straight = Trainer(digits_cfg(tmp_path, name="a"))
    straight.fit()
    ref = _state(straight)

    cfg = digits_cfg(tmp_path, name="b")
    first = Trainer(cfg)
    original = Trainer._train_step

    def interrupt_at_5(self, step):
        original(self, step)
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal path: stop between steps

    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_5)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 6

    second = Trainer(cfg)
    second.fit()
    assert second.start_step == 6
    got = _state(second)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bitwise on CPU
    a = [e for e in read_jsonl(tmp_path / "a" / "metrics.jsonl") if e["split"] == "train"]
    b = [e for e in read_jsonl(tmp_path / "b" / "metrics.jsonl") if e["split"] == "train"]
    assert [e["step"] for e in a] == [e["step"] for e in b]
    assert [e["loss"] for e in a] == [e["loss"] for e in b]


def test_nan_loss_stops_naming_step_and_term(tmp_path):
    cfg = digits_cfg(tmp_path, "method.name=test_nan_at", "method.step=5", "trainer.ckpt_every=2")
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg)
    msg = str(e.value)
    assert "'loss'" in msg and "step 5" in msg and "last.pt" in msg
    # the checkpoint on disk is the last good one (step 4), written before the NaN
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4


def test_resume_refuses_a_different_model(tmp_path):
    train(digits_cfg(tmp_path, "trainer.max_steps=4"))
    with pytest.raises(CheckpointMismatchError, match="model.name: 'resnet8' -> 'resnet14'"):
        Trainer(digits_cfg(tmp_path, "trainer.max_steps=8", "model.name=resnet14")).fit()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(digits_cfg(tmp_path, "trainer.max_steps=4"))
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        Trainer(digits_cfg(tmp_path, "trainer.max_steps=8")).fit()


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    common = ["model.name=test_mlp", "data.augment=none", "schedule.name=constant", "trainer.max_steps=6",
              "optim.weight_decay=0"]
    big = Trainer(digits_cfg(tmp_path, *common, "data.batch_size=64", name="big"))
    big.fit()
    acc = Trainer(digits_cfg(tmp_path, *common, "data.batch_size=32", "trainer.accumulate=2", name="acc"))
    acc.fit()
    for (k, a), b in zip(_state(big).items(), _state(acc).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_ema_tracks_the_weights():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, 0.9 * start + 0.1 * (start + 1.0))
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_is_evaluated_when_enabled(tmp_path):
    trainer = Trainer(digits_cfg(tmp_path, "trainer.ema=0.9", "trainer.max_steps=6"))
    summary = trainer.fit()
    # the EMA numbers are those of the averaged network, which differs from the raw one
    ema, raw, sp = trainer.ema.module.eval(), trainer.method.student.eval(), trainer.splits
    assert not torch.equal(ema.fc.weight, raw.fc.weight)
    assert summary["test_acc_ema_last"] == pytest.approx(split_accuracy(ema, sp.test, sp.train),
                                                         abs=1 / len(sp.test) + 1e-9)
    assert summary["val_acc_ema_last"] == pytest.approx(split_accuracy(ema, sp.val, sp.train),
                                                        abs=1 / len(sp.val) + 1e-9)
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(raw, sp.test, sp.train),
                                                     abs=1 / len(sp.test) + 1e-9)


# -- DDP ----------------------------------------------------------------------------------------------

DDP_COMMON = ["data.name=digits", "data.val_size=200", "model.name=test_mlp", "data.augment=none",
              "trainer.max_steps=8", "trainer.eval_every=8", "trainer.ckpt_every=8", "trainer.log_every=4",
              "trainer.progress=false", "optim.lr=0.1", "optim.weight_decay=0", "schedule.name=constant"]


def test_ddp_two_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp
    from _helpers import ddp_worker, free_port

    # The data is loaded here and handed to the workers: they import torch and mentor only.
    splits = load_splits(load_config(None, DDP_COMMON).data)
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), DDP_COMMON + ["data.batch_size=32"], splits,
                               str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    single = Trainer(load_config(None, [f"out_dir={tmp_path / 'one'}", *DDP_COMMON, "data.batch_size=64"]),
                     splits=splits)
    one_summary = single.fit()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for k, v in single.method.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert ddp["summary"]["world_size"] == 2
    assert ddp["summary"]["val_acc_last"] == pytest.approx(one_summary["val_acc_last"], abs=1e-9)
    logged = [e for e in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if e["split"] == "train"]
    ref = [e for e in read_jsonl(tmp_path / "one" / "metrics.jsonl") if e["split"] == "train"]
    assert [round(e["loss"], 5) for e in logged] == [round(e["loss"], 5) for e in ref]


@pytest.mark.slow
@needs_fmnist
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    cfg = load_config(None, [
        f"out_dir={tmp_path / 'fm'}", "data.name=fashion_mnist", "data.val_size=1000", "data.subset=3000",
        "data.batch_size=64", "model.name=resnet8", "trainer.max_steps=80", "trainer.eval_every=40",
        "trainer.ckpt_every=40", "trainer.log_every=20", "trainer.progress=false", "optim.lr=0.1"])
    summary = train(cfg)
    events = [e for e in read_jsonl(tmp_path / "fm" / "metrics.jsonl") if e["split"] == "train"]
    assert events[-1]["loss"] < events[0]["loss"]
    assert summary["test_acc_last"] > 0.5  # chance is 0.1
    assert yaml.safe_load((tmp_path / "fm" / "config.yaml").read_text())["data"]["subset"] == 3000


def test_phases_run_on_their_schedule_with_their_own_optimizer(tmp_path):
    trainer = Trainer(digits_cfg(tmp_path, "method.name=test_two_phase", "method.every=3", "trainer.max_steps=7",
                                 "model.name=test_mlp"))
    head_before = trainer.method.head.weight.detach().clone()
    student_before = trainer.method.student.fc.weight.detach().clone()
    trainer.fit()
    calls = trainer.method.calls
    assert [s for s, p in calls if p == "aux"] == [0, 3, 6]
    assert [s for s, p in calls if p == "main"] == list(range(7))
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers][1] <= 0.5
    assert len(trainer.optimizers) == 2 and trainer.optimizers[1].param_groups[0]["weight_decay"] == 0.0
    assert not torch.equal(trainer.method.head.weight, head_before)
    assert not torch.equal(trainer.method.student.fc.weight, student_before)
    logged = [e for e in read_jsonl(tmp_path / "run" / "metrics.jsonl") if e["split"] == "train"]
    assert "main/loss" in logged[0] and "aux/loss" in logged[0]


def _train_losses(run):
    return [e["loss"] for e in read_jsonl(run / "metrics.jsonl") if e["split"] == "train"]


def test_bf16_autocast_on_cpu(tmp_path):
    train(digits_cfg(tmp_path, "trainer.max_steps=4", name="fp32"))
    train(digits_cfg(tmp_path, "trainer.precision=bf16", "trainer.max_steps=4", name="bf16"))
    fp32, bf16 = _train_losses(tmp_path / "fp32"), _train_losses(tmp_path / "bf16")
    # the same run in bfloat16 (8 bits of mantissa): close to float32, but not equal to it
    assert bf16 == pytest.approx(fp32, rel=0.05) and bf16 != fp32


def test_channels_last_is_the_same_run(tmp_path):
    eager = train(digits_cfg(tmp_path, "trainer.max_steps=4", name="eager"))
    cl = train(digits_cfg(tmp_path, "trainer.channels_last=true", "trainer.max_steps=4", name="cl"))
    assert _train_losses(tmp_path / "cl") == pytest.approx(_train_losses(tmp_path / "eager"), rel=1e-3)
    assert cl["test_acc_last"] == pytest.approx(eager["test_acc_last"], abs=2 / 599)


@pytest.mark.slow
def test_compile_and_channels_last(tmp_path):
    # torch.compile on the CPU spends most of a minute generating and compiling C++ kernels
    eager = train(digits_cfg(tmp_path, "trainer.max_steps=4", name="eager"))
    compiled = train(digits_cfg(tmp_path, "trainer.compile=true", "trainer.channels_last=true",
                                "trainer.max_steps=4", name="compiled"))
    assert _train_losses(tmp_path / "compiled") == pytest.approx(_train_losses(tmp_path / "eager"), rel=1e-3)
    assert compiled["test_acc_last"] == pytest.approx(eager["test_acc_last"], abs=3 / 599)


def test_a_method_reports_and_selects_by_its_own_score(tmp_path):
    # A method that is not a classifier (a diffusion denoiser) reports its own numbers; best.pt
    # follows its chosen metric, here a lower-is-better one.
    summary = train(digits_cfg(tmp_path, "method.name=test_scored", "model.name=test_mlp", "trainer.eval_every=3"))
    events = [e for e in read_jsonl(tmp_path / "run" / "metrics.jsonl") if e["split"] == "val"]
    values = {e["step"]: e["val_ce"] for e in events}
    best_step = min(values, key=values.get)
    assert summary["select"] == "val_ce" and summary["best_step"] == best_step
    assert summary["val_ce_best"] == pytest.approx(values[best_step])
    assert "test_ce_last" in summary and "test_ce_best" in summary and "test_acc_last" not in summary
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["step"] == best_step
