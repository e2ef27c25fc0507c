"""DSKD and MBD: every term of their losses against an independent numpy computation (per-sample loops,
hand-worked examples), where the gradients go, and a short Fashion-MNIST run of each that resumes bit
for bit after an interruption and reports the accuracy of the networks it evaluates."""

import math

import numpy as np
import pytest
import torch
from _helpers import (
    fit_until_signal,
    random_teacher,  # noqa: E402
)

import mentor.distill.dskd  # noqa: F401  (registers dskd)
import mentor.distill.online  # noqa: F401  (registers mbd)
from mentor.distill.losses import diversity_loss, dskd_weights
from mentor.distill.online import FeatureFusion
from mentor.methods import METHODS, BuildInfo, StepContext, create_method
from mentor.models import create_model

# -- independent references in float64 numpy ---------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kd_ref(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    """T^2 times the batch mean of KL(softmax(teacher/T) || softmax(student/T)), one sample at a time."""
    rows = []
    for s_row, t_row in zip(student, teacher):
        log_s, log_t = _log_softmax(s_row / t), _log_softmax(t_row / t)
        rows.append(sum(math.exp(a) * (a - b) for a, b in zip(log_t, log_s)))
    return t * t * sum(rows) / len(rows)


def _ce_ref(logits: np.ndarray, y) -> float:
    return -sum(_log_softmax(row)[c] for row, c in zip(logits, y)) / len(y)


def _avg_pool_to(x: np.ndarray, size: int) -> np.ndarray:
    b, c, h, w = x.shape
    assert h % size == 0 and w % size == 0, (h, w, size)
    return x.reshape(b, c, size, h // size, size, w // size).mean((3, 5))


def _cd_ref(weights) -> float:
    """Mean over branch pairs of the mean over classes of cos^2 between the pair's class vectors."""
    pairs = []
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            cos2 = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) ** 2 for a, b in zip(weights[i], weights[j])]
            pairs.append(sum(cos2) / len(cos2))
    return sum(pairs) / len(pairs)


def _rampup_ref(epoch: float, length: float) -> float:
    return 1.0 if length <= 0 else math.exp(-5.0 * (1.0 - min(epoch, length) / length) ** 2)


# -- DSKD ----------------------------------------------------------------------------------------------


def test_dskd_weights_hand_worked_and_detached():
    e = math.e
    z = e ** -1 + e ** -2 + e ** -3
    want = [e ** -1 / z, e ** -2 / z, e ** -3 / z]
    assert dskd_weights(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx(want)
    # temperature 2: softmax(-[1, 3] / 2) = [1, e^-1] / (1 + e^-1)
    want = [1 / (1 + 1 / e), (1 / e) / (1 + 1 / e)]
    assert dskd_weights(torch.tensor([1.0, 3.0]), 2.0).tolist() == pytest.approx(want)
    # equal losses -> equal weights; the weighted sum's gradient w.r.t. each layer loss is that layer's weight
    assert dskd_weights(torch.full((4,), 7.0)).tolist() == pytest.approx([0.25] * 4)
    losses = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    w = dskd_weights(losses, 0.7)
    (w * losses).sum().backward()
    torch.testing.assert_close(losses.grad, w)
    with pytest.raises(ValueError, match="1-D"):
        dskd_weights(torch.ones(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        dskd_weights(torch.ones(2), 0.0)


def _dskd(tmp_path, batch_size=6, **hp):
    torch.manual_seed(0)
    m = create_method("dskd", create_model("resnet8", num_classes=10, in_channels=1), BuildInfo(),
                      teacher=random_teacher(tmp_path), **hp)
    batch = {"x": torch.randn(batch_size, 1, 28, 28), "y": torch.arange(batch_size) % 10}
    m.setup(batch)
    return m, batch


HP_DSKD = [{}, {"ce_weight": 0.7, "kd_weight": 0.5, "temperature": 2.0, "ds_weight": 2.0, "feat_weight": 0.25,
                "weight_temperature": 3.0}]


@pytest.mark.parametrize("hp", HP_DSKD, ids=["defaults", "custom"])
def test_dskd_every_term_matches_a_numpy_computation(tmp_path, hp):
    m, batch = _dskd(tmp_path, **hp)
    c = m.cfg
    assert list(m.shallow) == ["layer1", "layer2"]
    m.eval()  # BN on running statistics: the forwards below repeat the step's exactly
    with torch.no_grad():
        out = m.training_step(batch, StepContext(0, 10))
        f_t = _np(m.t_tap[m.t_name])
        s_maps = {n: m.s_tap[n] for n in m.shallow}
        student, teacher = _np(m.student(batch["x"])), _np(m.teacher(batch["x"]))
        side = f_t.shape[-1]
        fc_w, fc_b = _np(m.teacher.fc.weight), _np(m.teacher.fc.bias)
        layer_losses = []
        for name, proj in zip(m.shallow, m.projectors):
            pooled = _avg_pool_to(_np(s_maps[name]), side)
            h = _np(proj(torch.from_numpy(pooled).float()))
            assert h.shape == f_t.shape
            branch = h.mean((2, 3)) @ fc_w.T + fc_b  # the teacher's own average pool and classifier
            mse = ((h - f_t) ** 2).mean()
            layer = _kd_ref(branch, teacher, c.temperature) + c.feat_weight * mse
            layer_losses.append(layer)
            assert out[f"ds_{name}"].item() == pytest.approx(layer, rel=1e-4)
    w = np.exp(-np.array(layer_losses) / c.weight_temperature)
    w /= w.sum()
    for name, wi in zip(m.shallow, w):
        assert out[f"w_{name}"].item() == pytest.approx(wi, rel=1e-4)
    ds = float((w * np.array(layer_losses)).sum())
    ce, kd = _ce_ref(student, batch["y"].tolist()), _kd_ref(student, teacher, c.temperature)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-4)
    assert out["ds"].item() == pytest.approx(ds, rel=1e-4)
    assert out["loss"].item() == pytest.approx(c.ce_weight * ce + c.kd_weight * kd + c.ds_weight * ds, rel=1e-4)


def test_dskd_deep_supervision_trains_only_the_shallow_stages_and_its_branches(tmp_path):
    m, batch = _dskd(tmp_path, ce_weight=0.0, kd_weight=0.0)
    m.train()
    out = m.training_step(batch, StepContext(0, 10))
    out["loss"].backward()
    grads = {n: p.grad for n, p in m.student.named_parameters()}
    moved = {n.split(".")[0] for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert {"layer1", "layer2"} <= moved and not moved & {"layer3", "fc"}, moved
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projectors.parameters() if p.dim() > 1)
    assert all(p.grad is None for p in m.teacher.parameters())  # frozen, reused head included
    assert m.deployable() is m.student  # the branches are training-only


# -- MBD -----------------------------------------------------------------------------------------------


def test_diversity_loss_matches_a_numpy_loop_and_only_reaches_the_classifiers():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    assert diversity_loss(ws).item() == pytest.approx(_cd_ref([_np(w) for w in ws]), rel=1e-6)
    # hand-worked: identical classifiers -> 1; one class vector at 45 degrees, the other parallel -> 3/4
    eye = torch.eye(2)
    assert diversity_loss([eye, 3 * eye]).item() == pytest.approx(1.0)
    assert diversity_loss([eye, torch.tensor([[1.0, 1.0], [0.0, 2.0]])]).item() == pytest.approx(0.75)
    # scale-invariant (computed in float32), and its gradient is orthogonal to each class vector: it only
    # turns them, so shrinking the classifiers cannot lower it
    scaled = diversity_loss([w * s for w, s in zip(ws, (0.1, 3.0, 50.0))])
    assert scaled.item() == pytest.approx(diversity_loss(ws).item(), rel=1e-6)
    w0 = ws[0].clone().requires_grad_()
    diversity_loss([w0, *ws[1:]]).backward()
    radial = (w0.grad * w0.detach()).sum(1) / w0.detach().norm(dim=1)
    assert w0.grad.abs().max() > 1e-3 and radial.abs().max() < 1e-6 * w0.grad.abs().max() * 10


def test_feature_fusion_is_the_documented_depthwise_then_pointwise_mix():
    torch.manual_seed(0)
    b, c, k, h, n_cls = 2, 2, 3, 4, 5
    ffm = FeatureFusion(c, k, n_cls)
    for bn in (ffm.mix[1], ffm.mix[4]):  # non-trivial BN statistics and affine parameters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    ffm.eval()
    maps = [torch.randn(b, c, h, h) for _ in range(k)]
    with torch.no_grad():
        got = _np(ffm(maps))

    def bn_ref(x, bn):
        v = lambda t: _np(t).reshape(1, -1, 1, 1)  # noqa: E731
        return (x - v(bn.running_mean)) / np.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)

    x = np.concatenate([_np(mp) for mp in maps], 1)  # branch 0's channels first
    wide = c * k
    dw = _np(ffm.mix[0].weight)  # [wide, 1, 3, 3]
    assert dw.shape == (wide, 1, 3, 3)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.zeros_like(x)
    for s in range(b):
        for ch in range(wide):
            for i in range(h):
                for j in range(h):
                    y[s, ch, i, j] = (padded[s, ch, i:i + 3, j:j + 3] * dw[ch, 0]).sum()
    y = np.maximum(bn_ref(y, ffm.mix[1]), 0)
    pw = _np(ffm.mix[3].weight)[:, :, 0, 0]  # [c, wide]
    z = np.maximum(bn_ref(np.einsum("oc,bchw->bohw", pw, y), ffm.mix[4]), 0)
    want = z.mean((2, 3)) @ _np(ffm.fc.weight).T + _np(ffm.fc.bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _mbd(**hp):
    torch.manual_seed(0)
    cls = METHODS.get("mbd")
    return cls(cls.Config(name="mbd", **hp), create_model("resnet8", num_classes=10, in_channels=1), BuildInfo())


HP_MBD = [({}, 40, 1), ({"num_branches": 4, "temperature": 2.0, "kd_weight": 0.5, "diversity_weight": 3.0,
                         "rampup_epochs": 10.0}, 7, 2), ({"rampup_epochs": 0.0}, 0, 1)]


@pytest.mark.parametrize("hp,step,steps_per_epoch", HP_MBD, ids=["defaults-epoch40", "custom-epoch3.5", "no-ramp"])
def test_mbd_every_term_matches_a_numpy_computation(hp, step, steps_per_epoch):
    m = _mbd(**hp)
    c = m.cfg
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 3, 3, 9, 1, 5])
    m.eval()
    ctx = StepContext(step=step, max_steps=100, steps_per_epoch=steps_per_epoch)
    with torch.no_grad():
        out = m.training_step({"x": x, "y": y}, ctx)
        branches = [_np(net(x)) for net in m.net.branches]  # each branch alone: the zoo forward
        fused = _np(m.fusion(m.net(x).maps))
    assert len(branches) == c.num_branches
    ce = sum(_ce_ref(z, y.tolist()) for z in branches) + _ce_ref(fused, y.tolist())
    kd = sum(_kd_ref(z, fused, c.temperature) for z in branches)
    cd = _cd_ref([_np(net.fc.weight) for net in m.net.branches])
    ramp = _rampup_ref(step / steps_per_epoch, c.rampup_epochs)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-4)
    assert out["cd"].item() == pytest.approx(cd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + c.kd_weight * ramp * kd + c.diversity_weight * cd, rel=1e-5)


def test_mbd_gradients_the_fused_teacher_is_detached_and_cd_moves_only_classifiers():
    m = _mbd()
    m.train()
    out = m.training_step({"x": torch.randn(8, 1, 28, 28), "y": torch.arange(8)}, StepContext(80, 100))
    params = dict(m.named_parameters())

    def moved(term):
        grads = torch.autograd.grad(out[term], list(params.values()), retain_graph=True, allow_unused=True)
        return {n for n, g in zip(params, grads) if g is not None and g.abs().sum() > 0}

    # branch 0 is the student: its parameters (and the shared trunk's) are listed under "student."
    kd = moved("kd")
    assert not any(n.startswith("fusion.") for n in kd)  # the branches learn from z_F; z_F not from them
    assert {"student.fc.weight", "student.layer1.0.conv1.weight", "net.branches.1.fc.weight"} <= kd
    assert any(n.startswith("net.branches.2.layer3") for n in kd)
    assert moved("cd") == {"student.fc.weight", "net.branches.1.fc.weight", "net.branches.2.fc.weight"}
    assert any(n.startswith("fusion.") for n in moved("ce"))  # the fused branch learns from the labels
    assert m.deployable() is m.student is m.net.branches[0]


# -- short runs: train, interrupt, resume bit for bit, evaluate ---------------------------------------------


def _overrides(method, out, extra):
    from conftest import FMNIST_SMALL

    return [f"out_dir={out}", *FMNIST_SMALL, "model.name=resnet8", f"method.name={method}", "data.batch_size=32",
            "trainer.max_steps=6", "trainer.log_every=2", "trainer.eval_every=6", "trainer.ckpt_every=6", *extra]


@pytest.mark.parametrize("method", ["dskd", "mbd"])
def test_trains_resumes_bitwise_and_evaluates_on_tiny_data(method, fast_teachers, fmnist_tiny, tmp_path):
    from conftest import split_accuracy

    from mentor.config import load_config
    from mentor.engine import Trainer
    from mentor.engine.run import load_run

    extra = [f"method.teacher={fast_teachers[0]}"] if method == "dskd" else ["method.rampup_epochs=1.0"]
    cfg = lambda name: load_config(None, _overrides(method, tmp_path / name, extra))  # noqa: E731
    straight = Trainer(cfg("a"), splits=fmnist_tiny)
    start = {k: v.clone() for k, v in straight.method.state_dict().items()}
    ref_summary = straight.fit()
    ref = straight.method.state_dict()
    assert any(not torch.equal(start[k], ref[k]) for k in ref)  # it trained

    fit_until_signal(Trainer(cfg("b"), splits=fmnist_tiny), after_step=2)
    resumed = Trainer(cfg("b"), splits=fmnist_tiny)
    summary = resumed.fit()
    assert resumed.start_step == 3
    got = resumed.method.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert summary["test_acc_last"] == ref_summary["test_acc_last"]

    sp, method_obj = fmnist_tiny, resumed.method
    tol = 1 / len(sp.test) + 1e-9
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(method_obj.deployable(), sp.test, sp.train),
                                                     abs=tol)
    for name, net in method_obj.eval_heads().items():  # MBD: every branch and the fused teacher
        assert summary[f"test_acc_last_{name}"] == pytest.approx(split_accuracy(net, sp.test, sp.train), abs=tol)
    if method == "mbd":
        assert sorted(method_obj.eval_heads()) == ["branch0", "branch1", "branch2", "fused"]
    # `mentor eval` rebuilds the same network from the run directory
    _, loaded, _, _, step = load_run(resumed.run_dir / "last.pt", device="cpu")
    assert step == 6
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(loaded.predict(x), method_obj.predict(x))
