"""The captured training step: the capturable optimizer, device learning rates, refusals, and (on a
GPU) graph replays that equal the eager steps."""

import pytest
import torch
from _helpers import FixedMLP  # noqa: F401  (registers test models and methods)

from mentor.config import ConfigError, ScheduleConfig, load_config
from mentor.engine import Trainer
from mentor.engine.graph import GraphCaptureError, check_capturable
from mentor.engine.optim import CapturableSGD, build_optimizer, build_scheduler, device_lr, lr_factor

pytest.importorskip("sklearn")


@pytest.mark.parametrize("nesterov,wd,tensor_lr", [(True, 5e-4, False), (False, 0.0, True), (True, 1e-3, True)])
def test_capturable_sgd_equals_torch_sgd(nesterov, wd, tensor_lr):
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    ref = torch.optim.SGD(a, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    ours = CapturableSGD(b, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=wd)
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ref.step()
        ours.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    # the state is torch's: a checkpoint of one loads into the other
    ref.load_state_dict(ours.state_dict())


def test_device_lr_follows_the_schedule_in_place():
    cfg = ScheduleConfig(name="cosine", warmup_steps=2)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = CapturableSGD([p], lr=0.2, momentum=0.9)
    device_lr(opt, torch.device("cpu"))
    held = opt.param_groups[0]["lr"]
    sched = build_scheduler(opt, cfg, 10, 0.2)
    seen = []
    for _ in range(6):
        assert opt.param_groups[0]["lr"] is held  # a captured step keeps reading this address
        seen.append(float(held))
        sched.step()
    assert seen == pytest.approx([0.2 * lr_factor(k, cfg, 10, 0.2) for k in range(6)])


def digits(tmp_path, *extra):
    return load_config(None, [
        f"out_dir={tmp_path / 'run'}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
        "model.name=resnet8", "trainer.max_steps=10", "trainer.eval_every=5", "trainer.ckpt_every=5",
        "trainer.log_every=5", "trainer.progress=false", *extra])


def test_cuda_graph_is_refused_with_the_reason_on_cpu(tmp_path):
    # A recipe asking for a graph on the CPU is refused when it is loaded (exit status 2); the engine's
    # own check, for set-ups only a built run knows, names every reason.
    with pytest.raises(ConfigError, match="needs a CUDA device.*cuda_graph=false"):
        digits(tmp_path, "trainer.device=cpu", "trainer.cuda_graph=true")
    with pytest.raises(GraphCaptureError, match="needs a CUDA device.*accumulate=1"):
        check_capturable(torch.device("cpu"), False, 2, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_graph_replays_equal_eager_steps(tmp_path, optim):
    # An MLP (deterministic matmuls; cuDNN's convolution gradients are not bitwise reproducible).
    common = ["trainer.device=cuda", "trainer.precision=fp32", f"optim.name={optim}", "trainer.ema=0.9",
              "schedule.warmup_steps=4", "trainer.clip_grad=5", "model.name=test_mlp",
              f"optim.lr={0.05 if optim == 'sgd' else 1e-3}"]
    runs = {}
    for mode in ("false", "true"):
        tr = Trainer(digits(tmp_path / mode, *common, f"trainer.cuda_graph={mode}"))
        if mode == "false":  # the same optimizer and rates in both modes: the comparison is of the capture
            tr.optimizers = [build_optimizer(p.params, tr.cfg.optim, p.optim, capturable=True) for p in tr.phases]
            tr.schedulers = [build_scheduler(o, tr.cfg.schedule, 10, o.param_groups[0]["lr"]) for o in tr.optimizers]
        tr.method.train()
        for o in tr.optimizers:
            device_lr(o, tr.device)
        for step in range(10):
            tr._train_step(step)
        torch.cuda.synchronize()
        runs[mode] = (tr.method.state_dict(), tr.meter.read(), tr.ema.state_dict())
    assert runs["true"][1] == pytest.approx(runs["false"][1], rel=1e-4)
    for i in (0, 2):
        for k, v in runs["false"][i].items():
            torch.testing.assert_close(runs["true"][i][k].float(), v.float(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_that_syncs_is_refused_clearly(tmp_path):
    tr = Trainer(digits(tmp_path, "trainer.device=cuda", "trainer.cuda_graph=true", "method.name=test_item_step",
                        "model.name=test_mlp"))
    tr.method.train()
    with pytest.raises(GraphCaptureError, match="(?s)test_item_step.*must not read values back"):
        for step in range(5):
            tr._train_step(step)
