"""Domain generalisation with unlabelled source data: DSBF (one labelled domain; mentor.generalize.dsbf) and
MultiMatch (few labels per domain; mentor.generalize.multimatch). The information-maximisation loss, the per-domain
centroid pseudo-labels, the channel attention and the filtering losses against loops and numpy; which parameters
each DSBF loss trains; MultiMatch's step against separate plain networks, one per task, and its fused prediction
against separate forwards; no host synchronisation in a step; engine runs and an exact resume."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg, resumes_bitwise
from _nosync import NoHostSync
from torch import nn

from mentor.config import ConfigError
from mentor.data import ArrayDataset
from mentor.engine import Trainer
from mentor.engine.evaluate import Evaluator
from mentor.generalize.dsbf import DSBF, DomainAttention, grouped_pseudo_labels, im_loss
from mentor.generalize.multimatch import MultiMatch, TaskBatchNorm2d, fuse
from mentor.methods import BuildInfo, Refresh, StepContext
from mentor.nn.dsbn import routing

K = 4


class MLP(nn.Module):
    def __init__(self, num_classes=K, in_channels=1):
        super().__init__()
        self.body = nn.Linear(16 * in_channels, 6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x.flatten(1))))


class SmallBN(nn.Module):
    def __init__(self, num_classes=K, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def ctx(step=0, seed=3):
    return StepContext(step=step, max_steps=100, generator=torch.Generator().manual_seed(seed))


# -- DSBF ------------------------------------------------------------------------------------------------------
POOL, U, M, B = 40, 2, 10, 6  # pool images, unlabelled domains, images per domain block, labelled images


def make_dsbf(net=None, pools=U, **hp):
    info = BuildInfo(num_classes=K, in_channels=1, image_size=4, num_domains=1, domain_names=("lab",),
                     unlabeled_domains=tuple(f"u{i}" for i in range(pools)), unlabeled_size=POOL, max_steps=100,
                     steps_per_epoch=10)
    hp.setdefault("bottleneck_dim", 5)
    return DSBF(DSBF.Config(name="dsbf", **hp), net or MLP(), info)


def dsbf_batch(seed=0, pools=U):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, 1, 4, 4, generator=g), "y": torch.randint(0, K, (B,), generator=g),
            "domain": torch.zeros(B, dtype=torch.long), "index": torch.arange(B),
            "u": torch.randn(pools * M, 1, 4, 4, generator=g),
            "u_index": torch.randperm(POOL, generator=g)[: pools * M],
            "u_domain": torch.arange(pools).repeat_interleave(M)}


def test_dsbf_im_loss_is_mean_entropy_minus_entropy_of_the_mean_in_a_loop():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, generator=g) * 2
    p = [[math.exp(v) for v in row] for row in z.tolist()]
    p = [[v / sum(row) for v in row] for row in p]
    cond = sum(-sum(v * math.log(v + 1e-5) for v in row) for row in p) / 5
    mean = [sum(row[c] for row in p) / 5 for c in range(3)]
    marg = -sum(v * math.log(v + 1e-5) for v in mean)
    assert im_loss(z).item() == pytest.approx(cond - marg, rel=1e-5)


def numpy_obtain_label(feats, probs):
    """DSBF's obtain_label written out: softmax-weighted centroids of the (1-appended, L2-normalised) features,
    nearest centroid by cosine distance in a loop, one refinement with hard labels."""
    f = np.concatenate([feats, np.ones((len(feats), 1))], 1)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)

    def nearest(centres):
        out = []
        for row in f:
            d = [1 - row @ c / (np.linalg.norm(row) * np.linalg.norm(c)) if np.linalg.norm(c) > 0 else 1.0
                 for c in centres]
            out.append(int(np.argmin(d)))
        return np.array(out)

    k = probs.shape[1]
    centres = [(probs[:, c:c + 1] * f).sum(0) / (1e-8 + probs[:, c].sum()) for c in range(k)]
    labels = nearest(centres)
    hard = np.eye(k)[labels]
    centres = [(hard[:, c:c + 1] * f).sum(0) / (1e-8 + hard[:, c].sum()) for c in range(k)]
    return nearest(centres)


def test_dsbf_pseudo_labels_are_obtain_label_per_domain():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(30, 5, generator=g)
    probs = (torch.randn(30, K, generator=g) * 2).softmax(1)
    group = torch.tensor([0] * 12 + [1] * 14 + [-1] * 4)
    got = grouped_pseudo_labels(feats, probs, group)
    f64, p64 = feats.double().numpy(), probs.double().numpy()
    joint = numpy_obtain_label(f64, p64)
    for idx in (slice(0, 12), slice(12, 26)):
        assert got[idx].tolist() == numpy_obtain_label(f64[idx], p64[idx]).tolist()
    assert got[26:].tolist() == joint[26:].tolist()  # images of no known domain: the whole pool's clustering


def test_dsbf_attention_matches_a_per_row_channel_loop():
    torch.manual_seed(0)
    att = DomainAttention(2, 3, divisor=3.0)
    with torch.no_grad():
        att.gamma.copy_(torch.tensor([0.7, -1.3]))
    h = torch.randn(2, 4, 3)
    att.requires_grad_(False)
    got = att(h)

    def relu_lin(seq, v):
        return torch.relu(seq[0](v))

    for i in range(2):
        for n in range(4):
            k, v = relu_lin(att.key[i], h[i, n]), relu_lin(att.value[i], h[i, n])
            total = torch.zeros(3)
            for j in range(2):
                q = relu_lin(att.query[i], h[j, n])
                for p in range(3):
                    e = torch.tensor([q[p] * k[r] for r in range(3)])
                    w = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
                    total[p] += sum(w[r] * v[r] for r in range(3))
            ref = h[i, n] + att.gamma[i] * total / 3.0
            assert torch.allclose(got[i, n], ref, atol=1e-6)


def test_dsbf_pairs_are_drawn_among_the_images_of_the_same_pseudo_class():
    m = make_dsbf()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    pseudo = torch.tensor([[0, 0, 1, 1, 2, 2, 0, 1, 2, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    counts = torch.zeros(U, B, M)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        pick, found = m.pair(y, pseudo, g)
        counts[torch.arange(U)[:, None], torch.arange(B)[None], pick] += 1
    assert found.tolist() == [[1, 1, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0]]
    for u in range(U):
        for n in range(B):
            if found[u, n]:
                hits = counts[u, n]
                assert set(torch.nonzero(hits).flatten().tolist()) == set(
                    torch.nonzero(pseudo[u] == y[n]).flatten().tolist())
                assert hits[hits > 0].min() > 0.5 * 300 / (pseudo[u] == y[n]).sum()  # about uniform among them


def reference_filtering(m, batch, pseudo_u, pick, found):
    """The filtering loss assembled term by term: per domain, per row, with the method's own modules."""
    head = m.head
    x, y = batch["x"], batch["y"]
    feats = lambda v: torch.relu(m.student.body(v.flatten(1)))  # noqa: E731  (F of the MLP)
    fx, fu = feats(x), feats(batch["u"]).view(U, M, -1)
    bx = torch.tanh(head.bottleneck(fx))
    debias = 0.0
    for u in range(U):
        z = head.classifier(torch.tanh(head.bottleneck(fu[u])))
        debias = debias + F.cross_entropy(z, pseudo_u[u]) + im_loss(z)
    iv, proj = 0.0, torch.zeros(U, B, bx.shape[1])
    for u in range(U):
        errs = []
        for n in range(B):
            proj[u, n] = torch.tanh(m.projectors[u](fu[u, int(pick[u, n])]))
            if found[u, n]:
                errs.append(((proj[u, n] - bx[n]) ** 2).mean())
        iv = iv + (sum(errs) / len(errs) if errs else 0.0)
    iv = iv / U
    rows = [n for n in range(B) if found[:, n].all()]
    out = m.attention(proj)
    cal = 0.0
    for u in range(U):
        terms = [F.cross_entropy(head.classifier(out[u, n])[None], y[n:n + 1]) for n in rows]
        cal = cal + (sum(terms) / len(terms) if terms else 0.0)
    cal = cal / U
    return m.cfg.lambda_ * debias + m.cfg.gamma * (iv + cal)


@pytest.mark.parametrize("lam,gamma", [(1.0, 1.0), (0.5, 2.0)])
def test_dsbf_filtering_loss_matches_a_term_by_term_loop(lam, gamma):
    torch.manual_seed(0)
    m = make_dsbf(lambda_=lam, gamma=gamma, warmup=0.0)
    with torch.no_grad():
        m.attention.gamma.fill_(0.5)
    batch = dsbf_batch(1)
    m.pseudo.copy_(torch.randint(0, K - 1, (POOL,), generator=torch.Generator().manual_seed(2)))  # no class 3
    out = m.training_step(batch, ctx(seed=5))
    pseudo_u = m.pseudo[batch["u_index"]].view(U, M)
    pick, found = m.pair(batch["y"], pseudo_u, torch.Generator().manual_seed(5))
    assert 0 < found.prod(0).sum() < B  # some rows found in every domain, some not
    ref = reference_filtering(m, batch, pseudo_u, pick, found)
    assert out["loss"].item() == pytest.approx(float(ref.detach()), rel=1e-5)
    assert out["warmup"].item() == 0.0


def _grad_norms(m, loss):
    groups = {"F": list(m.student.body.parameters()), "B": list(m.head.bottleneck.parameters()),
              "C": list(m.head.classifier.parameters()), "IV": list(m.projectors.parameters()),
              "A": list(m.attention.parameters())}
    out = {}
    for name, params in groups.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = sum(0.0 if g is None else g.abs().sum().item() for g in grads)
    return out


@pytest.mark.parametrize("hp,step,trains", [
    ({"lambda_": 1.0, "gamma": 0.0}, 40, {"F", "B"}),  # debiasing: F and B (C frozen)
    ({"lambda_": 0.0, "gamma": 1.0}, 40, {"IV", "C", "A"}),  # projection (IV) and calibration (C and A)
    ({"lambda_": 1.0, "gamma": 1.0}, 0, {"F", "B", "C"}),  # warm-up: cross-entropy on the labelled domain
])
def test_dsbf_each_loss_trains_only_the_parts_dsbf_updates_with_it(hp, step, trains):
    torch.manual_seed(1)
    m = make_dsbf(warmup=0.25, **hp)
    with torch.no_grad():
        m.attention.gamma.fill_(0.5)
    m.pseudo.copy_(torch.randint(0, K, (POOL,), generator=torch.Generator().manual_seed(3)))
    out = m.training_step(dsbf_batch(2), ctx(step))
    norms = _grad_norms(m, out["loss"])
    assert {k for k, v in norms.items() if v > 0} == trains, norms


def test_dsbf_warmup_is_cross_entropy_on_the_labelled_domain_until_an_epoch_start():
    m = make_dsbf(warmup=0.25)  # 25 of 100 steps, rounded up to the epoch start at 30
    assert m.warmup_steps == 30
    batch = dsbf_batch(3)
    for step, warm in ((0, 1.0), (29, 1.0), (30, 0.0), (torch.tensor(31), 0.0)):
        out = m.training_step(batch, ctx(step))
        assert out["warmup"].item() == warm
        if warm:
            assert out["loss"].item() == pytest.approx(out["sup"].item())
    assert make_dsbf(warmup=0.0).warmup_steps == 0
    with pytest.raises(ConfigError, match="leaves no step for the filtering stage"):
        make_dsbf(warmup=0.95)


def _pool_refresh(n=POOL, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = ArrayDataset(torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8),
                        torch.randint(0, K, (n,), generator=g), K, "pool", [str(i) for i in range(K)], (0.5,), (0.25,))
    ev = Evaluator(torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1), 16, torch.device("cpu"))
    return pool, Refresh(labeled=None, unlabeled=pool, evaluator=ev, device=torch.device("cpu"))


def test_dsbf_pseudo_labels_are_refreshed_per_recorded_domain_after_the_warmup():
    torch.manual_seed(0)
    m = make_dsbf(warmup=0.25)
    pool, refresh = _pool_refresh()
    m.on_epoch(2, refresh)  # step 20 < 30: still warming up
    assert m.pseudo.eq(0).all()
    batch = dsbf_batch(4)
    m.training_step(batch, ctx(30))
    assert m.pool_domain[batch["u_index"]].tolist() == batch["u_domain"].tolist()
    m.on_epoch(3, refresh)
    m.eval()
    x = (pool.images.float() / 255 - 0.5) / 0.25
    f = torch.relu(m.student.body(x.flatten(1)))
    b = m.head.embed(f)
    ref = grouped_pseudo_labels(b.detach(), m.head.classifier(b).softmax(1).detach(), m.pool_domain)
    assert m.pseudo.tolist() == ref.tolist() and (m.pool_domain >= 0).sum() == U * M


def test_dsbf_step_reads_nothing_back_to_the_host():
    m = make_dsbf(warmup=0.25)
    batch = dsbf_batch(5)
    with NoHostSync():
        for step in (0, torch.tensor(40)):
            m.training_step(batch, ctx(step))["loss"].backward()


def test_dsbf_needs_unlabelled_domains(tmp_path):
    with pytest.raises(ConfigError, match="learns from unlabelled images"):
        Trainer(dg_cfg(tmp_path, "none", "dsbf", "method.warmup=0"))
    with pytest.raises(ConfigError, match="data.unlabeled_domains"):
        make_dsbf(pools=0)


def _events(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


DSBF_RUN = ["data.unlabeled_domains=[inverted]", "data.unlabeled_ratio=2", "method.warmup=0",
            "method.bottleneck_dim=16"]


def test_dsbf_engine_run_with_one_labelled_domain(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "dsbf", *DSBF_RUN)).fit()
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last@rolled"] <= 1
    train = [e for e in _events(tmp_path / "run") if e["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(e["loss"]) and {"debias_ce", "im", "iv", "cal", "pl_acc"} <= set(e)
                                   for e in train)


def test_dsbf_resumes_bitwise(tmp_path):
    def cfg(name):
        return dg_cfg(tmp_path, name, "dsbf", *DSBF_RUN, "trainer.max_steps=6", "trainer.eval_every=3",
                      "trainer.ckpt_every=3")

    _, ref = resumes_bitwise(cfg, stop_after=2)
    assert (ref["pool_domain"] >= 0).any() and ref["pseudo"].unique().numel() > 1


# -- MultiMatch ------------------------------------------------------------------------------------------------
D, MU = 2, 5  # labelled domains, unlabelled images per pool domain


def make_multimatch(net=None, pools=("d0", "d1"), **hp):
    info = BuildInfo(num_classes=K, in_channels=1, image_size=4, num_domains=D, domain_names=("d0", "d1"),
                     unlabeled_domains=tuple(pools), unlabeled_size=30)
    return MultiMatch(MultiMatch.Config(name="multimatch", **hp), net or SmallBN(), info)


def mm_batch(seed=0, pools=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(D * 3, 1, 4, 4, generator=g)
    return {"x": x, "x_weak": x, "y": torch.randint(0, K, (D * 3,), generator=g),
            "domain": torch.arange(D).repeat_interleave(3), "index": torch.arange(D * 3),
            "u_weak": torch.randn(pools * MU, 1, 4, 4, generator=g), "u_strong": torch.randn(pools * MU, 1, 4, 4,
                                                                                            generator=g),
            "u_index": torch.arange(pools * MU), "u_domain": torch.arange(pools).repeat_interleave(MU)}


def test_multimatch_task_batchnorm_normalises_each_task_like_its_own_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    layer = TaskBatchNorm2d.from_bn(bn, 3)
    x = torch.randn(9, 3, 2, 2)
    route = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 0])
    with routing(layer, route):
        got = layer(x)
    for t in range(3):
        ref = copy.deepcopy(bn)(x[route == t])
        assert torch.allclose(got[route == t], ref, atol=1e-5)
    # without a route every sample is the global task's (the last branch), running statistics in eval mode
    layer.eval()
    b2 = layer.tasks.bns[2]
    ref = (x - b2.running_mean.view(1, -1, 1, 1)) / torch.sqrt(b2.running_var.view(1, -1, 1, 1) + b2.eps)
    assert torch.allclose(layer(x), ref * b2.weight.view(1, -1, 1, 1) + b2.bias.view(1, -1, 1, 1), atol=1e-5)


def test_multimatch_step_is_fixmatch_per_task_on_separate_plain_networks():
    torch.manual_seed(0)
    plain = SmallBN()
    m = make_multimatch(copy.deepcopy(plain), p_cutoff=0.33, lambda_u=0.7)
    batch = mm_batch(1)
    out = m.training_step(batch, ctx())

    def task_net(t):  # a plain copy with task t's classifier (every BN branch starts as the plain BN)
        net = copy.deepcopy(plain)
        net.fc.load_state_dict(m.student.fc.heads[t].state_dict())
        return net

    glob = m.num_tasks - 1
    x, uw, us = batch["x_weak"], batch["u_weak"], batch["u_strong"]
    # each task's samples in the one forward: local tasks take their own domain's images, the global one all
    logits = {}
    for t in range(m.num_tasks):
        parts = [x[batch["domain"] == t], uw[batch["u_domain"] == t], us[batch["u_domain"] == t]] if t < glob \
            else [x, uw, us]
        z = task_net(t)(torch.cat(parts))
        logits[t] = z.split([p.shape[0] for p in parts])
    zx_l = torch.cat([logits[t][0] for t in range(glob)])
    zw_l = torch.cat([logits[t][1] for t in range(glob)])
    zs_l = torch.cat([logits[t][2] for t in range(glob)])
    zx_g, zw_g, zs_g = logits[glob]
    sup = F.cross_entropy(zx_l, batch["y"]) + F.cross_entropy(zx_g, batch["y"])
    q = (zw_l.softmax(1) + zw_g.softmax(1)) / 2
    mask = (q.max(1).values >= 0.33).float()
    t = q.argmax(1)
    unsup = (F.cross_entropy(zs_l, t, reduction="none") * mask).mean() + \
        (F.cross_entropy(zs_g, t, reduction="none") * mask).mean()
    assert 0 < mask.sum() < mask.numel()
    assert out["sup"].item() == pytest.approx(sup.item(), rel=1e-5)
    assert out["unsup"].item() == pytest.approx(unsup.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((sup + 0.7 * unsup).item(), rel=1e-5)


def test_multimatch_prediction_fuses_the_global_task_with_the_mean_of_the_local_ones():
    torch.manual_seed(1)
    m = make_multimatch()
    m.training_step(mm_batch(2), ctx())  # move the branches' running statistics apart
    m.eval()
    x = torch.randn(5, 1, 4, 4)
    probs = []
    for t in range(m.num_tasks):
        with routing(m.student, torch.full((5,), t)):
            probs.append(m.student(x).softmax(1))
    ref = (probs[-1] + (probs[0] + probs[1]) / 2) / 2
    assert torch.allclose(m.deployable()(x).exp(), ref, atol=1e-6)
    assert torch.allclose(fuse(torch.stack(probs)), ref)
    assert torch.allclose(m.eval_heads()["global"](x).softmax(1), probs[-1], atol=1e-6)


def test_multimatch_unlabelled_only_domain_gets_its_own_local_task():
    m = make_multimatch(pools=("d0", "d1", "extra"))
    assert m.local_names == ["d0", "d1", "extra"] and m.num_tasks == 4
    assert m.pool_task.tolist() == [0, 1, 2] and len(m.student.fc.heads) == 4
    out = m.training_step(mm_batch(3, pools=3), ctx())
    assert math.isfinite(out["loss"].item())


def test_multimatch_step_reads_nothing_back_to_the_host():
    m = make_multimatch()
    with NoHostSync():
        m.training_step(mm_batch(4), ctx())["loss"].backward()


def test_multimatch_needs_batchnorm():
    with pytest.raises(ConfigError, match="no BatchNorm2d"):
        make_multimatch(MLP())


def test_multimatch_engine_run_with_few_labels(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "multimatch", "data.labels_per_class=4", "data.unlabeled_ratio=2")).fit()
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last"] <= 1 and "test_acc_last_global" in summary
    train = [e for e in _events(tmp_path / "run") if e["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(e["loss"]) and {"sup", "unsup", "mask_rate"} <= set(e)
                                   for e in train)


def test_recipes_load():
    from pathlib import Path

    from mentor.config import load_config

    root = Path(__file__).resolve().parents[1] / "recipes" / "generalize"
    for name in ("medic", "dsbf", "multimatch"):
        cfg = load_config(str(root / f"rotated_fmnist_{name}.yaml"), [])
        assert cfg.method.name == name


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("dsbf", ["data.unlabeled_domains=[inverted]", "data.unlabeled_ratio=1", "method.warmup=0.5"]),
    ("multimatch", ["data.labels_per_class=10", "data.unlabeled_ratio=1", "data.padding=1", "data.flip=false"]),
])
def test_each_method_learns_the_labelled_domains(tmp_path, name, extra):
    summary = Trainer(dg_cfg(tmp_path, name, name, "model.name=resnet8", "data.batch_size=32", "trainer.max_steps=120",
                             "trainer.eval_every=120", "trainer.ckpt_every=120", "trainer.log_every=40", *extra)).fit()
    assert summary["val_acc_last"] > 0.5, summary["val_acc_last"]  # chance is 0.1
