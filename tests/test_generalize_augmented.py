"""DomainBed's algorithms that train on altered features: SagNet (style and content randomisation of a stage's
maps, three optimizers), RSC (muting the features the true class leans on) and SelfReg (same-class logit and
feature regularisation with mixup). Each is checked against the formula computed another way (per-sample and
per-channel loops, numpy percentiles, the student's own forward), then trains a few engine steps."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg
from _helpers import BNNet
from _nosync import NoHostSync
from torch import nn

from mentor.config import ConfigError
from mentor.engine import Trainer
from mentor.generalize.rsc import rsc_mask
from mentor.generalize.sagnet import randomize
from mentor.generalize.selfreg import class_partners
from mentor.methods import BuildInfo, StepContext, create_method
from mentor.models import create_model

C = 10


def _info(domains=2):
    return BuildInfo(num_classes=C, in_channels=1, image_size=8, num_domains=domains,
                     domain_names=tuple(f"d{i}" for i in range(domains)))


def _method(name, domains=2, net=None, **hp):
    torch.manual_seed(0)
    return create_method(name, net if net is not None else BNNet(C), _info(domains), **hp)


def _sagnet(**hp):
    torch.manual_seed(0)
    return create_method("sagnet", create_model("resnet8", num_classes=C, in_channels=1), _info(), **hp)


def _batch(domains, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(domains * b, 1, 8, 8, generator=g)
    y = torch.randint(0, C, (domains * b,), generator=g)
    return {"x": x, "y": y, "domain": torch.arange(domains).repeat_interleave(b), "index": torch.arange(domains * b)}


def _bnnet_features(net, x):
    return F.adaptive_avg_pool2d(torch.relu(net.bn(net.conv(x))), 1).flatten(1)


# -- SagNet --------------------------------------------------------------------------------------------------
def _maps(n=5, c=3, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64) * 3 + 0.5
    shift = torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64) * 2
    return torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64) * scale + shift


def test_sagnet_style_randomisation_mixes_each_channels_statistics_with_another_samples_loop():
    h = _maps()
    n, c = h.shape[:2]
    alpha = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    got = randomize(h, "style", alpha, perm, eps=1e-5).numpy()
    x = h.numpy()
    for i in range(n):
        j, a = int(perm[i]), float(alpha[i])
        for k in range(c):
            own, other = x[i, k].ravel(), x[j, k].ravel()
            m_i, v_i = own.mean(), own.var(ddof=1)
            m_j, v_j = other.mean(), other.var(ddof=1)
            mean, var = a * m_i + (1 - a) * m_j, a * v_i + (1 - a) * v_j
            ref = (x[i, k] - m_i) / np.sqrt(v_i + 1e-5) * np.sqrt(var + 1e-5) + mean
            np.testing.assert_allclose(got[i, k], ref, rtol=1e-10, atol=1e-12)
    # alpha 1 leaves a map as it is; alpha 0 gives it exactly the other sample's statistics
    np.testing.assert_allclose(got[4], x[4], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got[0].reshape(c, -1).mean(1), x[3].reshape(c, -1).mean(1), atol=1e-10)


def test_sagnet_content_randomisation_puts_another_samples_content_under_each_samples_statistics_loop():
    h = _maps(seed=1).requires_grad_(True)
    n, c = h.shape[:2]
    perm = torch.tensor([2, 3, 0, 4, 1])
    out = randomize(h, "content", torch.rand(n, dtype=torch.float64), perm, eps=1e-5)
    x = h.detach().numpy()
    for i in range(n):
        j = int(perm[i])
        for k in range(c):
            own, other = x[i, k].ravel(), x[j, k].ravel()
            content = (x[j, k] - other.mean()) / np.sqrt(other.var(ddof=1) + 1e-5)
            ref = content * np.sqrt(own.var(ddof=1) + 1e-5) + own.mean()
            np.testing.assert_allclose(out[i, k].detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    # no gradient flows through the borrowed content: sample 0's output depends on sample 0 alone
    (grad,) = torch.autograd.grad(out[0].pow(2).sum(), h)
    assert grad[0].abs().max() > 0 and grad[1:].abs().max() == 0


def test_sagnet_splits_the_student_at_the_stage_below_the_last_and_copies_the_rest_as_the_style_network():
    m = _sagnet()
    assert m.stage == "layer2" and m.upper_names == ("layer3", "pool", "fc")
    x = _batch(2, 4)["x"]
    m.eval()
    with torch.no_grad():
        # without randomisation the content path is the student's own forward, and the style copy starts equal
        torch.testing.assert_close(m.content(m.extract(x)), m.student(x))
        torch.testing.assert_close(m.style(m.extract(x)), m.student(x))
    content, style, adv = m.phases()
    assert (content.name, style.name, adv.name) == ("content", "style", "adv")
    student = {id(p) for p in m.student.parameters()}
    assert {id(p) for p in content.params} == student and len(content.params) == len(student)
    assert {id(p) for p in style.params} == {id(p) for p in m.style_net.parameters()} and not student & {
        id(p) for p in style.params}
    lower = {id(p) for n in ("stem", "layer1", "layer2") for p in getattr(m.student, n).parameters()}
    assert {id(p) for p in adv.params} == lower
    assert _sagnet(stage="layer3").upper_names == ("pool", "fc")
    with pytest.raises(ConfigError, match="method.stage='layer9' is not a stage"):
        _sagnet(stage="layer9")
    with pytest.raises(ConfigError, match="not a staged network"):
        _method("sagnet")  # the test network has no named stages


def test_sagnet_phase_losses_and_which_networks_each_one_trains():
    m = _sagnet(w_adv=0.3)
    batch = _batch(2, 6)
    alpha, perm = torch.rand(12), torch.randperm(12)
    m.draw = lambda n, ctx, device: (alpha, perm)
    x, y = batch["x"], batch["y"]

    def grads(phase):
        m.zero_grad(set_to_none=True)
        out = m.training_step(batch, StepContext(step=0, max_steps=1, phase=phase))
        out["loss"].backward()
        return out, {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}

    out, touched = grads("content")
    assert all(n.startswith("student.") for n in touched) and "student.stem.0.weight" in touched
    ref = F.cross_entropy(m.content(randomize(m.extract(x), "style", alpha, perm)), y)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)

    out, touched = grads("style")
    assert touched and all(n.startswith("style_net.") for n in touched)  # the features are not trained by it

    out, touched = grads("adv")
    assert any(n.startswith("student.layer2") for n in touched)
    assert not any(n.startswith(("student.layer3", "student.fc")) for n in touched)
    logits = m.style(randomize(m.extract(x), "content", alpha, perm)).detach().double().numpy()
    # the cross-entropy against the uniform distribution: log-sum-exp minus the mean logit, averaged
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ref = 0.3 * np.mean(lse - logits.mean(1))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="phases content, style and adv"):
        m.training_step(batch, StepContext(step=0, max_steps=1))


# -- RSC -----------------------------------------------------------------------------------------------------
def _rsc_reference(feats, head, y, f_drop, b_drop):
    """RSC's mask by a loop over samples: autograd of each sample's true logit, numpy percentiles of the float32
    values as DomainBed takes them (``np.percentile`` of ``all_g.cpu()``, then ``lt``)."""
    n, width = feats.shape
    masks_f = []
    for i in range(n):
        fi = feats[i:i + 1].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(head(fi)[0, y[i]], fi)
        g = g[0].numpy()
        masks_f.append((g < np.float32(np.percentile(g, (1 - f_drop) * 100))).astype(np.float32))
    mask_f = np.stack(masks_f)
    with torch.no_grad():
        p = F.softmax(head(feats), 1).numpy()
        p_muted = F.softmax(head(feats * torch.tensor(mask_f)), 1).numpy()
    change = np.array([p[i, y[i]] - p_muted[i, y[i]] for i in range(n)], dtype=np.float32)
    kept = change < np.float32(np.percentile(change, (1 - b_drop) * 100))
    return np.where(kept[:, None], 1.0, mask_f).astype(np.float32)


@pytest.mark.parametrize("f_drop,b_drop", [(1 / 3, 1 / 3), (0.5, 0.25)])
def test_rsc_mask_matches_a_per_sample_loop_with_numpy_percentiles(f_drop, b_drop):
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, C))  # non-linear: gradients differ per sample
    feats = torch.randn(16, 12).requires_grad_(True)
    y = torch.randint(0, C, (16,))
    mask = rsc_mask(feats, head(feats), head, y, f_drop, b_drop)
    ref = _rsc_reference(feats, head, y, f_drop, b_drop)
    np.testing.assert_array_equal(mask.numpy(), ref)
    assert 0 < (ref == 0).mean() < f_drop  # some muted, only in the challenged rows


def test_rsc_loss_and_gradient_are_those_of_the_classifier_on_the_muted_features():
    m = _method("rsc", domains=3)
    net = copy.deepcopy(m.student)
    batch = _batch(3, 8)
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    out["loss"].backward()
    feats = _bnnet_features(net, batch["x"])
    mask = torch.tensor(_rsc_reference(feats, net.fc, batch["y"], 1 / 3, 1 / 3))
    loss = F.cross_entropy(net.fc(feats * mask), batch["y"])
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert out["muted"].item() == pytest.approx(1 - mask.mean().item(), rel=1e-6) and out["muted"] > 0
    for p, g in zip(m.student.parameters(), torch.autograd.grad(loss, list(net.parameters()))):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# -- SelfReg -------------------------------------------------------------------------------------------------
def test_selfreg_class_partners_are_random_same_class_permutations():
    y = torch.tensor([3, 1, 3, 3, 0, 1, 7, 3, 1, 0])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        p = class_partners(y, g)
        assert sorted(p.tolist()) == list(range(10)) and torch.equal(y[p], y)
        seen.add(tuple(p.tolist()))
    assert p[6] == 6  # the only 7
    # every same-class assignment is drawn: 4! * 3! * 2! = 288 of them, most seen in 200 draws
    assert len(seen) > 100
    hits = np.zeros((10, 10))
    for _ in range(400):
        p = class_partners(y, g)
        hits[np.arange(10), p.numpy()] += 1
    assert np.all(hits[0, [0, 2, 3, 7]] > 60)  # roughly uniform over the four 3s


@pytest.mark.parametrize("confident", [False, True])
def test_selfreg_loss_matches_a_loop_over_samples(confident):
    m = _method("selfreg", domains=2, feature_weight=0.4).double()
    batch = _batch(2, 6, seed=1)
    batch["x"] = batch["x"].double()
    if confident:  # a cross-entropy below 1: the regulariser's weight is the cross-entropy itself
        batch["y"] = torch.tensor([2, 2, 2, 5, 5, 2, 2, 5, 5, 5, 2, 2])
        with torch.no_grad():
            m.student.fc.bias[2] += 4
            m.student.fc.bias[5] += 4
    y = batch["y"]
    g = torch.Generator().manual_seed(5)
    a, b = class_partners(y, g), class_partners(y, g)
    lam = 0.3
    m.draw = lambda y_, ctx: (a, b, torch.tensor(lam, dtype=torch.float64))
    net, proj = copy.deepcopy(m.student), copy.deepcopy(m.projector)
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    with torch.no_grad():
        h = _bnnet_features(net, batch["x"])
        z, q = net.fc(h), proj(h)
    h, z, q = h.numpy(), z.numpy(), q.numpy()
    n = len(y)
    ind_logit = sum(np.sum((z[i] - z[a[i]]) ** 2) for i in range(n)) / z.size
    hdl_logit = sum(np.sum((z[i] - lam * z[a[i]] - (1 - lam) * z[b[i]]) ** 2) for i in range(n)) / z.size
    ind_feat = 0.4 * sum(np.sum((h[i] - q[a[i]]) ** 2) for i in range(n)) / h.size
    hdl_feat = 0.4 * sum(np.sum((h[i] - lam * q[a[i]] - (1 - lam) * q[b[i]]) ** 2) for i in range(n)) / h.size
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    ce = -np.mean(logp[np.arange(n), y.numpy()])
    assert (ce < 1) == confident
    ref = ce + min(ce, 1.0) * (lam * (ind_logit + ind_feat) + (1 - lam) * (hdl_logit + hdl_feat))
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)
    assert out["nll"].item() == pytest.approx(ce, rel=1e-10)


def test_selfreg_projection_is_domainbeds_three_layer_mlp():
    m = _method("selfreg")
    widths = [(layer.in_features, layer.out_features) for layer in m.projector if isinstance(layer, nn.Linear)]
    assert widths == [(8, 16), (16, 16), (16, 8)]
    assert sum(isinstance(layer, nn.BatchNorm1d) for layer in m.projector) == 3


# -- engine runs ---------------------------------------------------------------------------------------------
RUNS = {"sagnet": (["model.name=resnet8"], {"content/loss", "style/loss", "adv/loss", "adv/adv_ce"}),
        "rsc": ([], {"loss", "muted"}), "selfreg": ([], {"loss", "nll", "reg", "lam"})}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_each_method_trains_in_the_engine(tmp_path, name):
    extra, terms = RUNS[name]
    summary = Trainer(dg_cfg(tmp_path, "run", name, *extra)).fit()
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last@rolled"] <= 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 4 and all(terms <= set(e) for e in train)
    assert all(math.isfinite(e[k]) for e in train for k in terms)


def test_rsc_trains_on_a_single_domain(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "one", "rsc", "data.test_domains=[rolled, inverted]")).fit()
    assert summary["steps"] == 4


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_step_reads_nothing_back_to_the_host(name):
    m = _sagnet() if name == "sagnet" else _method(name, domains=3)
    batch = _batch(3, 4) if name != "sagnet" else _batch(2, 4)
    with NoHostSync():
        for phase in [p.name for p in m.phases()]:
            m.training_step(batch, StepContext(step=torch.tensor(3), max_steps=10, phase=phase))["loss"].backward()
