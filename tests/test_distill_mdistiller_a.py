"""NST, PKT, SP and VID: their losses against the papers' equations computed another way (plain-Python
loops over channels, pairs and elements, hand-worked examples, invariances), VID's variance
parameterisation and regressors, the default taps, and each method trained, resumed bit for bit and
evaluated on a Fashion-MNIST subset."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    fit_until_signal,  # noqa: E402
)
from _helpers import make_distiller as make
from conftest import FMNIST_SMALL, split_accuracy

import mentor.distill.nst
import mentor.distill.pkt
import mentor.distill.sp
import mentor.distill.vid  # noqa: F401  (registers nst, pkt, sp, vid)
from mentor.config import ConfigError, load_config
from mentor.distill.losses import (
    batch_similarity,
    nst_loss,
    nst_mmd,
    pkt_loss,
    sp_loss,
    vid_alpha_init,
    vid_loss,
    vid_variance,
)
from mentor.distill.vid import GaussianRegressor
from mentor.engine import Trainer
from mentor.engine.inputs import Splits, load_splits
from mentor.methods import StepContext


def block_pool(f, k):
    """[B, C, H, W] numpy -> mean over k x k blocks (adaptive pooling when k divides H and W)."""
    b, c, h, w = f.shape
    return f.reshape(b, c, h // k, k, w // k, k).mean((3, 5))


# -- NST ------------------------------------------------------------------------------------------


def mmd_loop(s, t, degree, c):
    """Squared MMD of one image: s [C_s][N], t [C_t][N] nested lists, each channel L2-normalised here."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    s, t = [unit(v) for v in s], [unit(v) for v in t]

    def k(a, b):
        return (sum(x * y for x, y in zip(a, b)) + c) ** degree

    tt = sum(k(a, b) for a in t for b in t) / len(t) ** 2
    ss = sum(k(a, b) for a in s for b in s) / len(s) ** 2
    st = sum(k(a, b) for a in s for b in t) / (len(s) * len(t))
    return tt + ss - 2 * st


@pytest.mark.parametrize("degree,c", [(2, 0.0), (1, 1.0), (3, 0.5)])
def test_nst_mmd_matches_a_loop_over_channel_pairs(degree, c):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 6, 2, 2, generator=g)  # widths, resolutions differ
    ps = block_pool(s.numpy().astype(np.float64), 2)  # the student pooled to the teacher's 2x2
    want = np.mean([mmd_loop(ps[b].reshape(4, -1).tolist(), t[b].reshape(6, -1).tolist(), degree, c)
                    for b in range(3)])
    assert nst_mmd(s, t, degree, c).item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert want > 1e-3


def test_nst_hand_example_and_distribution_invariances():
    # Teacher: both channels along e1 (every kernel value 1). Student: e1 and e2, so k(s, s) has mean
    # (1 + 0 + 0 + 1) / 4 and k(s, t) mean (1 + 0) / 2: MMD^2 = 1 + 1/2 - 2 * 1/2 = 1/2.
    t = torch.tensor([[1.0, 0.0], [3.0, 0.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[2.0, 0.0], [0.0, 5.0]]).view(1, 2, 1, 2)
    assert nst_mmd(s, t).item() == pytest.approx(0.5, rel=1e-6)
    # The student's neurons as a distribution: permuting, rescaling or repeating channels changes nothing.
    f = torch.rand(2, 5, 3, 3, generator=torch.Generator().manual_seed(1))
    same = torch.cat([f[:, [4, 2, 0, 3, 1]] * torch.tensor([2.0, 0.5, 3.0, 1.0, 7.0]).view(1, 5, 1, 1), f], 1)
    assert nst_mmd(same, f).item() == pytest.approx(0.0, abs=1e-6)
    # nst_loss sums the stages
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)
    assert nst_loss([a, b], [b, a]).item() == pytest.approx(nst_mmd(a, b).item() + nst_mmd(b, a).item(), rel=1e-6)
    with pytest.raises(ValueError, match="as many"):
        nst_loss([a], [a, b])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        nst_mmd(torch.randn(2, 3), torch.randn(2, 3))


# -- PKT ------------------------------------------------------------------------------------------


def pkt_loop(s, t, eps):
    """The authors' PKT by loops: cosine kernel (cos + 1) / 2 to every sample (self included), rows
    normalised, sum p_t log((p_t + eps) / (p_s + eps)) over all N^2 entries / N^2."""
    n = len(s)

    def probs(e):
        e = [[x / (math.sqrt(sum(y * y for y in v)) + eps) for x in v] for v in e]
        k = [[(sum(x * y for x, y in zip(e[i], e[j])) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[kij / sum(row) for kij in row] for row in k]

    ps, pt = probs(s), probs(t)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


def test_pkt_matches_a_loop_over_pairs():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 9, generator=g)
    for eps in (1e-7, 0.0, 0.1):
        want = pkt_loop(s.tolist(), t.tolist(), eps)
        assert pkt_loss(s, t, eps).item() == pytest.approx(want, rel=1e-5)
    # eps = 0: the mean over samples of KL(p_t(.|i) || p_s(.|i)), divided by N
    kl = []
    for i in range(6):
        cs = [(F.cosine_similarity(s[i], s[j], dim=0).item() + 1) / 2 for j in range(6)]
        ct = [(F.cosine_similarity(t[i], t[j], dim=0).item() + 1) / 2 for j in range(6)]
        ps, pt = [x / sum(cs) for x in cs], [x / sum(ct) for x in ct]
        kl.append(sum(p * math.log(p / q) for p, q in zip(pt, ps)))
    assert pkt_loss(s, t, 0.0).item() == pytest.approx(sum(kl) / 6 / 6, rel=1e-5)


def test_pkt_ignores_rotation_and_scale_and_stays_finite_on_zero_embeddings():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(5, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    s = (t @ q) * torch.tensor([1.0, 2.0, 0.5, 3.0, 4.0]).view(5, 1)  # cosines unchanged
    assert pkt_loss(s, t).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.randn(5, 4, generator=g)
    s[2] = 0.0  # a dead ReLU embedding
    s.requires_grad_(True)
    loss = pkt_loss(s, t)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="N >= 2"):
        pkt_loss(torch.randn(1, 3), torch.randn(1, 3))


# -- SP -------------------------------------------------------------------------------------------


def sp_loop(s, t):
    """||G_t - G_s||_F^2 / b^2 by loops: Gram of flattened features, each row divided by its L2 norm."""
    b = len(s)

    def gram(q):
        g = [[sum(x * y for x, y in zip(q[i], q[j])) for j in range(b)] for i in range(b)]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in g]

    gs, gt = gram(s), gram(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_matches_a_loop_over_pairs_and_sums_feature_pairs():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 8, 2, 2, generator=g)  # any shapes
    want = sp_loop(s.flatten(1).tolist(), t.flatten(1).tolist())
    assert sp_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    s2, t2 = torch.randn(5, 7, generator=g), torch.randn(5, 2, generator=g)
    want2 = sp_loop(s2.tolist(), t2.tolist())
    assert sp_loss([s, s2], [t, t2]).item() == pytest.approx(want + want2, rel=1e-5)
    assert torch.allclose(batch_similarity(t).norm(dim=1), torch.ones(5))
    # Row-normalised Gram: a global rescaling of the features changes nothing.
    assert sp_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="batches differ"):
        sp_loss(torch.randn(4, 3), torch.randn(5, 3))


# -- VID ------------------------------------------------------------------------------------------


def test_vid_variance_is_softplus_plus_eps_and_starts_at_init_pred_var():
    for a in (-30.0, -1.0, 0.0, 0.7, 4.0, 25.0):
        got = vid_variance(torch.tensor([a]), 1e-5).item()
        assert got == pytest.approx(math.log1p(math.exp(a)) + 1e-5, rel=1e-6)
    for v in (5.0, 0.01, 1e-4, 80.0):
        alpha = vid_alpha_init(v, 1e-5)
        assert math.log1p(math.exp(alpha)) + 1e-5 == pytest.approx(v, rel=1e-9)
        assert vid_variance(torch.tensor([alpha], dtype=torch.float64), 1e-5).item() == pytest.approx(v, rel=1e-9)
    assert vid_alpha_init(1e6, 1e-5) == 1e6 - 1e-5  # no overflow: softplus(a) = a to double precision
    # mdistiller/RepDistiller's expression for the default
    assert vid_alpha_init(5.0, 1e-5) == pytest.approx(np.log(np.exp(5.0 - 1e-5) - 1.0), rel=1e-12)
    assert vid_variance(torch.tensor([-200.0]), 1e-5).item() == pytest.approx(1e-5, rel=1e-6)  # the floor
    with pytest.raises(ValueError, match="must exceed eps"):
        vid_alpha_init(1e-6, 1e-5)


def test_vid_loss_is_the_gaussian_nll_per_element():
    g = torch.Generator().manual_seed(5)
    mu, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    var = torch.tensor([0.5, 2.0, 5.0])
    total, count = 0.0, 0
    for b in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    r = t[b, c, i, j].item() - mu[b, c, i, j].item()
                    # -log N(t; mu, var) without its constant 0.5 log(2 pi)
                    nll = -(-0.5 * r * r / var[c].item() - 0.5 * math.log(var[c].item()))
                    total, count = total + nll, count + 1
    assert vid_loss(mu, t, var).item() == pytest.approx(total / count, rel=1e-6)
    # pooled vectors [B, C] too
    assert vid_loss(mu[:, :, 0, 0], t[:, :, 0, 0], var).item() == pytest.approx(
        np.mean(0.5 * ((t[:, :, 0, 0] - mu[:, :, 0, 0]).numpy() ** 2 / var.numpy() + np.log(var.numpy()))), rel=1e-6)
    with pytest.raises(ValueError, match="one variance per channel"):
        vid_loss(mu, t, torch.ones(4))
    with pytest.raises(ValueError, match="differ"):
        vid_loss(mu, t[:, :2], var)


def test_vid_variance_gradient_vanishes_at_the_mean_squared_residual():
    # d/d var of 0.5 (r^2 / var + log var) is zero at var = E[r^2]: the learned variance converges to
    # each channel's residual energy.
    g = torch.Generator().manual_seed(6)
    mu, t = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g) * torch.tensor(
        [0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    target = (t - mu).pow(2).mean((0, 2, 3)).double()
    alpha = torch.tensor([vid_alpha_init(v, 1e-5) for v in target.tolist()], dtype=torch.float64, requires_grad=True)
    vid_loss(mu.double(), t.double(), vid_variance(alpha, 1e-5)).backward()
    assert alpha.grad.abs().max().item() < 1e-6
    alpha2 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    vid_loss(mu.double(), t.double(), vid_variance(alpha2, 1e-5)).backward()
    assert alpha2.grad.abs().min().item() > 1e-3


def test_gaussian_regressor_shape_init_and_reference_layout():
    r = GaussianRegressor(16, 32, init_var=5.0, eps=1e-5)
    convs = [m for m in r.mean if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (16, 32, (1, 1), None), (32, 32, (1, 1), None), (32, 32, (1, 1), None)]
    assert [type(m).__name__ for m in r.mean] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d"]
    assert r(torch.randn(2, 16, 5, 5)).shape == (2, 32, 5, 5)
    assert torch.allclose(r.variance(), torch.full((32,), 5.0), rtol=1e-6)


def test_vid_method_sums_the_stage_nll_and_trains_regressors_and_variances(tmp_path):
    m, batch = make("vid", tmp_path, teacher="vgg8")  # vgg8: 5 stages, other widths and resolutions
    assert m.s_names == ["layer1", "layer2", "layer3"] and m.t_names == ["layer1", "layer2", "layer3"]
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    fs, ft = [m.s_tap[n] for n in m.s_names], [m.t_tap[n] for n in m.t_names]
    assert [r.mean[0].in_channels for r in m.regressors] == [f.shape[1] for f in fs] == [16, 32, 64]
    assert [r.mean[-1].out_channels for r in m.regressors] == [f.shape[1] for f in ft] == [128, 256, 512]
    want = 0.0
    for r, s, t in zip(m.regressors, fs, ft):
        s = F.adaptive_avg_pool2d(s, t.shape[-2:])  # the student's 28, 14, 7 onto the teacher's 14, 7, 3
        mu, var = r(s).double(), r.variance().double().view(1, -1, 1, 1)
        want += (0.5 * ((t.double() - mu) ** 2 / var + var.log())).mean().item()
    assert out["vid"].item() == pytest.approx(want, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["vid"].item(), rel=1e-5)
    out["loss"].backward()
    for r in m.regressors:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())
    # mdistiller's fixed variances
    fixed, batch = make("vid", tmp_path, learn_variance=False)
    fixed.training_step(batch, StepContext(step=0, max_steps=1))["loss"].backward()
    assert all(not r.alpha.requires_grad and r.alpha.grad is None for r in fixed.regressors)
    assert all(r.mean[0].weight.grad is not None for r in fixed.regressors)
    with pytest.raises(ConfigError, match="init_pred_var"):
        make("vid", tmp_path, init_pred_var=1e-6)


# -- methods: taps, weights, errors ---------------------------------------------------------------


@pytest.mark.parametrize("method,teacher,s_names,t_names,loss", [
    ("nst", "resnet14", ["layer1", "layer2", "layer3"], ["layer1", "layer2", "layer3"], nst_loss),
    ("nst", "vgg8", ["layer1", "layer2", "layer3"], ["layer1", "layer2", "layer3"], nst_loss),
    ("pkt", "wrn_16_1", ["pool"], ["pool"], pkt_loss),
    ("sp", "resnet14", ["layer3"], ["layer3"], sp_loss),
    ("sp", "mobilenetv2", ["layer3"], ["head"], sp_loss),
])
def test_default_taps_weights_and_total(method, teacher, s_names, t_names, loss, tmp_path):
    m, batch = make(method, tmp_path, teacher=teacher)
    assert (m.s_names, m.t_names) == (s_names, t_names)
    defaults = {"nst": 50.0, "pkt": 30000.0, "sp": 3000.0}
    assert (m.cfg.ce_weight, m.cfg.kd_weight, m.cfg.beta) == (1.0, 0.0, defaults[method])
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    fs, ft = [m.s_tap[n] for n in m.s_names], [m.t_tap[n] for n in m.t_names]
    assert out[m.term].item() == pytest.approx(loss(fs, ft).item() if method != "pkt" else loss(fs[0], ft[0]).item(),
                                               rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + m.cfg.beta * out[m.term].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.layer1.parameters())


def test_explicit_layers_and_clear_errors(tmp_path):
    m, _ = make("nst", tmp_path, layers=["layer2", "layer3"], teacher_layers=["layer3", "layer3"])
    assert (m.s_names, m.t_names) == (["layer2", "layer3"], ["layer3", "layer3"])
    m, _ = make("sp", tmp_path, layers=["layer2", "pool"])
    assert m.t_names == ["layer2", "pool"]
    with pytest.raises(ConfigError, match="pair"):
        make("sp", tmp_path, layers=["layer2"], teacher_layers=["layer2", "layer3"])
    with pytest.raises(ConfigError, match="pair"):
        make("vid", tmp_path, layers=["layer2"], teacher_layers=["layer2", "layer3"])
    with pytest.raises(ConfigError, match="not a feature map"):
        make("nst", tmp_path, layers=["pool"])
    with pytest.raises(ConfigError, match="not a feature map"):
        make("vid", tmp_path, layers=["layer3"], teacher_layers=["pool"])
    with pytest.raises(ConfigError, match=r"method.layers names \['nope'\], not modules of the student"):
        make("vid", tmp_path, layers=["layer1", "nope"])
    with pytest.raises(ConfigError, match=r"method.teacher_layers names \['layer9'\], not modules of the teacher"):
        make("sp", tmp_path, layers=["layer3"], teacher_layers=["layer9"])
    with pytest.raises(ConfigError, match="method.layer names"):
        make("pkt", tmp_path, layer="head")  # the CIFAR ResNets have none


# -- train, resume exactly, evaluate --------------------------------------------------------------


def _train_events(run):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["split"] == "train"]


@pytest.mark.parametrize("method,extra", [
    ("nst", []), ("pkt", []), ("sp", []), ("vid", []),
])
def test_method_trains_resumes_exactly_and_evaluates_on_tiny_data(method, extra, fast_teachers, fmnist_tiny,
                                                                  tmp_path):
    def cfg(run):
        return load_config(None, [f"out_dir={tmp_path / run}", *FMNIST_SMALL, "model.name=resnet8",
                                  f"method.name={method}", f"method.teacher={fast_teachers[0]}", "data.batch_size=32",
                                  "trainer.log_every=2", "trainer.eval_every=4", "trainer.ckpt_every=4",
                                  "trainer.max_steps=8", *extra])

    straight = Trainer(cfg("a"), fmnist_tiny)
    summary = straight.fit()
    fit_until_signal(Trainer(cfg("b"), fmnist_tiny), after_step=2)
    resumed = Trainer(cfg("b"), fmnist_tiny)
    summary_b = resumed.fit()
    assert resumed.start_step == 3
    ref, got = straight.method.state_dict(), resumed.method.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bitwise on CPU
    if method == "vid":
        assert {f"regressors.{i}.alpha" for i in range(3)} <= set(ref)
        assert not torch.allclose(ref["regressors.0.alpha"], torch.full_like(ref["regressors.0.alpha"],
                                                                               vid_alpha_init(5.0, 1e-5)))
    events = _train_events(tmp_path / "a")
    assert [e["step"] for e in events] == [2, 4, 6, 8]
    assert {"ce", "kd", method} <= set(events[0])
    losses = [e["loss"] for e in events]
    assert sum(losses[2:]) < sum(losses[:2]), losses
    assert summary["method"] == method and summary["steps"] == 8
    assert summary_b["test_acc_last"] == summary["test_acc_last"]
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(straight.method.deployable(), fmnist_tiny.test,
                                                                    fmnist_tiny.train),
                                                     abs=1 / len(fmnist_tiny.test) + 1e-9)
    assert all(p.grad is None for p in straight.method.teacher.parameters())


@pytest.fixture(scope="module")
def small_splits():
    """The slow runs' splits (FMNIST_SMALL: 2000 training images), loaded once, with 500 test images."""
    cfg = load_config(None, [*FMNIST_SMALL, "data.batch_size=32"])
    s = load_splits(cfg.data)
    return Splits(s.train, s.val, s.test.subset(torch.arange(500)), s.train_index)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nst", "pkt", "sp", "vid"])
def test_method_learns_with_a_trained_teacher(method, fmnist_teachers, distill_overrides, small_splits, tmp_path):
    # 50 steps, then resumed to 100, with a trained teacher: the student learns well above chance (0.1)
    base = [*distill_overrides, f"method.name={method}", f"method.teacher={fmnist_teachers[0]}",
            "data.batch_size=32", "trainer.log_every=25", "trainer.eval_every=50", "trainer.ckpt_every=50"]
    Trainer(load_config(None, [*base, "trainer.max_steps=50"]), small_splits).fit()
    resumed = Trainer(load_config(None, [*base, "trainer.max_steps=100"]), small_splits)
    summary = resumed.fit()
    assert resumed.start_step == 50 and summary["steps"] == 100
    losses = [e["loss"] for e in _train_events(tmp_path / "student")]
    assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]), losses
    assert summary["test_acc_last"] > 0.4, summary["test_acc_last"]
