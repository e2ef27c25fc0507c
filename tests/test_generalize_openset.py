"""Open-set domain generalisation (mentor.generalize.openset) and MEDIC (mentor.generalize.medic): the H-score at
MEDIC's thresholds and OSCR against brute-force numpy loops (every threshold swept), a hand-worked OSCR, the
one-vs-all loss against a per-sample loop, MEDIC's second-order dualistic meta step against a separate
computation on explicitly selected sub-batches with hand-made fast weights, no host synchronisation in a step,
and engine runs on an open-set split."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg
from _nosync import NoHostSync
from torch import nn

from mentor.config import ConfigError
from mentor.data import ArrayDataset
from mentor.engine import Trainer
from mentor.engine.evaluate import Evaluator
from mentor.generalize.medic import MEDIC, binary_confidence, one_vs_all_head, ova_loss
from mentor.generalize.openset import OpenSetScore, open_set_metrics, open_set_score, oscr
from mentor.methods import METHODS, BuildInfo, StepContext


# -- brute-force references ------------------------------------------------------------------------------------
def brute_h_score(conf, pred, labels, k, hits=10):
    """MEDIC's eval.py rule, looped: ``hits`` evenly spaced thresholds, per image, the first best H-score."""
    lo, hi = min(conf), max(conf)
    best = (0.0, None, None)
    first = None
    for i in range(hits):
        t = lo + (hi - lo) * i / (hits - 1)
        ok_k = n_k = ok_u = n_u = 0
        for c, p, y in zip(conf, pred, labels):
            if y < k:
                n_k += 1
                ok_k += int(p == y and c >= t)
            else:
                n_u += 1
                ok_u += int(c < t)
        a_k, a_u = ok_k / n_k, ok_u / n_u
        h = 2 * a_k * a_u / (a_k + a_u) if a_k + a_u > 0 else 0.0
        if first is None:
            first = (h, a_k, a_u)
        if h > best[0]:
            best = (h, a_k, a_u)
    return best if best[1] is not None else first


def brute_oscr(conf, pred, labels, k):
    """Sweep every threshold (each distinct confidence, plus one above all): CCR and FPR counted image by image,
    the points ordered by threshold, the trapezoid rule."""
    points = []
    n_k = sum(y < k for y in labels)
    n_u = len(labels) - n_k
    for t in sorted(set(conf)) + [math.inf]:
        ccr = sum(1 for c, p, y in zip(conf, pred, labels) if y < k and p == y and c >= t) / n_k
        fpr = sum(1 for c, y in zip(conf, labels) if y >= k and c >= t) / n_u
        points.append((t, fpr, ccr))
    points.sort(key=lambda p: -p[0])
    fpr = np.array([p[1] for p in points])
    ccr = np.array([p[2] for p in points])
    return float(np.sum((fpr[1:] - fpr[:-1]) * (ccr[1:] + ccr[:-1]) / 2))


def random_open_split(seed, n=60, k=4, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    labels = torch.randint(0, k + 1, (n,), generator=g)  # k = unknown
    conf = torch.rand(n, generator=g)
    if ties:
        conf = (conf * 5).floor() / 5
    return logits, conf, labels


# -- the metrics -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hits", [10, 4])
def test_h_score_and_its_accuracies_match_medics_threshold_rule_in_a_loop(seed, hits):
    logits, conf, labels = random_open_split(seed)
    m = open_set_metrics(logits, conf, labels, 4, hits=hits)
    pred = logits.argmax(1).tolist()
    h, a_k, a_u = brute_h_score(conf.double().tolist(), pred, labels.tolist(), 4, hits)
    assert m["h_score"] == pytest.approx(h, abs=1e-12)
    assert m["known_acc"] == pytest.approx(a_k, abs=1e-12) and m["unknown_acc"] == pytest.approx(a_u, abs=1e-12)
    known = labels < 4
    assert m["closed_acc"] == pytest.approx((logits.argmax(1)[known] == labels[known]).float().mean().item())


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_oscr_matches_sweeping_every_threshold(seed, ties):
    logits, conf, labels = random_open_split(seed, ties=ties)
    m = open_set_metrics(logits, conf, labels, 4)
    ref = brute_oscr(conf.double().tolist(), logits.argmax(1).tolist(), labels.tolist(), 4)
    assert m["oscr"] == pytest.approx(ref, abs=1e-12)


def test_oscr_without_ties_is_medics_image_by_image_staircase():
    logits, conf, labels = random_open_split(5, n=40)
    pred = logits.argmax(1)
    order = sorted(range(40), key=lambda i: -float(conf[i]))
    n_k, n_u = int((labels < 4).sum()), int((labels == 4).sum())
    x = y = area = 0.0
    for i in order:  # one image at a time, highest confidence first
        nx = x + (1.0 / n_u if labels[i] == 4 else 0.0)
        ny = y + (1.0 / n_k if labels[i] < 4 and pred[i] == labels[i] else 0.0)
        area += (nx - x) * (ny + y) / 2
        x, y = nx, ny
    assert oscr(conf, pred == labels, labels == 4) == pytest.approx(area, abs=1e-12)


def test_oscr_of_a_hand_worked_example():
    # known: conf 0.9 correct, 0.7 wrong, 0.5 correct; unknown: conf 0.8, 0.3.
    # thresholds 0.9 -> (FPR 0, CCR 1/3); 0.8 -> (1/2, 1/3); 0.7 -> (1/2, 1/3); 0.5 -> (1/2, 2/3); 0.3 -> (1, 2/3)
    # area = 0.5 * 1/3 + 0.5 * 2/3 = 1/2
    conf = torch.tensor([0.9, 0.7, 0.5, 0.8, 0.3])
    correct = torch.tensor([True, False, True, False, False])
    unknown = torch.tensor([False, False, False, True, True])
    assert oscr(conf, correct, unknown) == pytest.approx(0.5)
    # a perfect separation with every known image right has OSCR 1
    assert oscr(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, True, False]),
                torch.tensor([False, False, True])) == pytest.approx(1.0)


def test_without_unknown_images_only_the_closed_accuracy_is_defined():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    m = open_set_metrics(logits, None, torch.tensor([0, 0, 0]), 2)
    assert m["closed_acc"] == pytest.approx(2 / 3)
    assert all(math.isnan(m[k]) for k in ("known_acc", "unknown_acc", "h_score", "oscr"))
    m = open_set_metrics(logits, None, torch.tensor([2, 2, 2]), 2)
    assert math.isnan(m["closed_acc"]) and math.isnan(m["oscr"])


def test_the_default_confidence_is_the_maximum_softmax_probability():
    logits, _, labels = random_open_split(7)
    msp = logits.softmax(1).max(1).values
    assert open_set_metrics(logits, None, labels, 4) == open_set_metrics(logits, msp, labels, 4)


def _split(n=50, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, k + 1, (n,), generator=g)
    return ArrayDataset(images, labels, k, "toy", [str(i) for i in range(k)], (0.5,), (0.25,))


def _ev():
    return Evaluator(torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1), 16,
                     torch.device("cpu"))


def test_open_set_score_reads_the_whole_split_in_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    split, ev = _split(), _ev()
    got = open_set_score(net, split, ev, 3)
    x = (split.images.float() / 255 - 0.5) / 0.25
    ref = open_set_metrics(net(x).detach(), None, split.labels, 3)
    assert got["acc"] == got["closed_acc"] == pytest.approx(ref["closed_acc"])
    for k in ("known_acc", "unknown_acc", "h_score", "oscr"):
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k


class _Base(nn.Module):
    def score(self, net, split, ev):
        return {"acc": -1.0}


class _Scored(OpenSetScore, _Base):
    def __init__(self, open_set):
        super().__init__()
        self.info = BuildInfo(num_classes=3, open_set=open_set)


def test_the_mixin_reports_open_set_numbers_only_in_an_open_set_run():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    assert _Scored(False).score(net, _split(), _ev()) == {"acc": -1.0}
    assert {"acc", "closed_acc", "h_score", "oscr", "known_acc", "unknown_acc"} <= set(_Scored(True).score(
        net, _split(), _ev()))


# -- MEDIC -----------------------------------------------------------------------------------------------------
K = 6


class MLP(nn.Module):
    """No BatchNorm, so a forward depends on the images it gets and the weights only."""

    def __init__(self, num_classes=K, in_channels=1):
        super().__init__()
        self.body = nn.Linear(16 * in_channels, 5)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x.flatten(1))))


def make_medic(num_domains, net=None, k=K, **hp):
    info = BuildInfo(num_classes=k, in_channels=1, image_size=4, num_domains=num_domains,
                     domain_names=tuple(f"d{i}" for i in range(num_domains)), open_set=True)
    return MEDIC(MEDIC.Config(name="medic", **hp), net or MLP(k), info)


def medic_batch(num_domains, b=6, seed=0, k=K):
    g = torch.Generator().manual_seed(seed)
    n = num_domains * b
    x = torch.randn(n, 1, 4, 4, generator=g)
    return {"x": x, "y": torch.randint(0, k, (n,), generator=g),
            "domain": torch.arange(num_domains).repeat_interleave(b), "index": torch.arange(n)}


def test_medic_ova_loss_matches_a_loop_over_samples_and_classes():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 2, 5, generator=g) * 3
    y = torch.randint(0, 5, (7,), generator=g)
    got = ova_loss(z, y)
    for i in range(7):
        p = [[math.exp(z[i, s, c]) / (math.exp(z[i, 0, c]) + math.exp(z[i, 1, c])) for c in range(5)]
             for s in range(2)]
        pos = -math.log(p[1][int(y[i])] + 1e-8)
        neg = max(-math.log(p[0][c] + 1e-8) for c in range(5) if c != int(y[i]))
        assert got[i].item() == pytest.approx(0.5 * (pos + neg), rel=1e-5)


@pytest.mark.parametrize("k,length,groups,drawn", [(6, 1, 6, 2), (8, 1, 8, 3), (10, 1, 10, 4), (20, 2, 10, 4),
                                                   (25, 3, 9, 3)])
def test_medic_class_groups_follow_the_codes_sizes(k, length, groups, drawn):
    m = make_medic(3, k=k)
    assert (m.group_length, m.num_groups, m.meta_groups) == (length, groups, drawn)
    _, in_group = m.meta_split(0, torch.Generator().manual_seed(1), torch.device("cpu"))
    chosen = in_group.view(-1)
    # whole groups of consecutive classes are in or out, and ``drawn`` groups are in
    g = torch.arange(k) // length
    assert all(chosen[g == i].unique().numel() == 1 for i in range(groups))
    assert sum(int(chosen[g == i][0]) for i in range(groups)) == drawn


@pytest.mark.parametrize("d", [2, 3, 5])
def test_medic_exp_domain_turns_round_robin_and_the_others_are_distinct(d):
    m = make_medic(d)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for step in range(12):
        domains, _ = m.meta_split(torch.tensor(step) if step % 2 else step, g, torch.device("cpu"))
        dom = domains.tolist()
        assert dom[-1] == step % d and len(dom) == min(3, d) and len(set(dom)) == len(dom)
        seen.add(tuple(dom[:-1]))
    assert d < 5 or len(seen) > d  # with 5 domains the pair varies beyond the exp domain


def reference_medic_loss(m, batch, domains, in_group, meta_lr, d):
    """L_tr + L_te from explicitly selected sub-batches (boolean indexing), a hand-written forward of the MLP
    with its (fast) weights, and autograd.grad for the inner step."""
    head = one_vs_all_head(m.student)
    params = {"w1": m.student.body.weight, "b1": m.student.body.bias, "wm": head.main.weight, "bm": head.main.bias,
              "wb": head.binary.weight, "bb": head.binary.bias}

    def loss(p, x, y):
        if x.shape[0] == 0:
            return torch.zeros(())
        h = torch.relu(x.flatten(1) @ p["w1"].T + p["b1"])
        z, b = h @ p["wm"].T + p["bm"], (h @ p["wb"].T + p["bb"]).view(-1, 2, K)
        return F.cross_entropy(z, y) + ova_loss(b, y).mean()

    xs, ys = m.per_domain(batch["x"]), m.per_domain(batch["y"])
    sel = [int(v) for v in domains]
    parts = []
    for s in sel:
        inside = in_group[ys[s]].bool()
        parts.append(((xs[s][~inside], ys[s][~inside]), (xs[s][inside], ys[s][inside])))
    if d == 2:
        (o_out, o_in), (e_out, e_in) = parts
        l_tr = 2 * loss(params, *o_out) + loss(params, *e_in)
    else:
        (i_out, i_in), (j_out, j_in), (e_out, e_in) = parts
        l_tr = loss(params, *i_out) + loss(params, *j_out) + loss(params, *e_in)
    grads = torch.autograd.grad(l_tr, list(params.values()), create_graph=True)
    fast = {n: p - meta_lr * g for (n, p), g in zip(params.items(), grads)}
    if d == 2:
        l_te = loss(fast, *o_in) + 2 * loss(fast, *e_out)
    else:
        pooled = (torch.cat([i_in[0], j_in[0]]), torch.cat([i_in[1], j_in[1]]))
        l_te = loss(fast, *pooled) + 2 * loss(fast, *e_out)
    return l_tr + l_te


@pytest.mark.parametrize("d,step", [(2, 0), (2, 1), (3, 0), (3, 2), (4, 1), (5, 3)])
def test_medic_gradient_is_the_second_order_dualistic_meta_step(d, step):
    torch.manual_seed(d)
    m = make_medic(d, meta_lr=0.3)
    batch = medic_batch(d, seed=step)
    out = m.training_step(batch, StepContext(step=step, max_steps=10, generator=torch.Generator().manual_seed(9)))
    params = list(m.student.parameters())
    got = torch.autograd.grad(out["loss"], params)
    domains, in_group = m.meta_split(step, torch.Generator().manual_seed(9), torch.device("cpu"))
    ref_loss = reference_medic_loss(m, batch, domains, in_group, 0.3, d)
    assert out["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-5)
    ref = torch.autograd.grad(ref_loss, params)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_medic_needs_second_order_terms():
    """With the inner gradient detached the meta-test gradient differs: the step keeps the Hessian terms."""
    torch.manual_seed(0)
    m = make_medic(3, meta_lr=0.5)
    batch = medic_batch(3, seed=4)
    ctx = StepContext(step=1, max_steps=10, generator=torch.Generator().manual_seed(2))
    second = torch.autograd.grad(m.training_step(batch, ctx)["loss"], list(m.student.parameters()))
    original = torch.autograd.grad

    def first_order(outputs, inputs, **kw):
        kw.update(create_graph=False, retain_graph=True)
        return original(outputs, inputs, **kw)

    torch.autograd.grad = first_order
    try:
        ctx = StepContext(step=1, max_steps=10, generator=torch.Generator().manual_seed(2))
        loss = m.training_step(batch, ctx)["loss"]
    finally:
        torch.autograd.grad = original
    first = original(loss, list(m.student.parameters()))
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(first, second))


def test_medic_confidence_is_the_binary_known_probability_of_the_closed_prediction():
    z = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    b = torch.randn(2, 2, 3)
    conf = binary_confidence(z, b)
    for i, k in enumerate([1, 0]):
        p = torch.softmax(b[i, :, k], 0)[1]
        assert conf[i].item() == pytest.approx(p.item())
    m = make_medic(2).eval()
    x = torch.randn(5, 1, 4, 4)
    logits, confs = m.open_set_outputs(m.student, x)
    assert torch.allclose(logits, m.student(x)) and set(confs) == {"", "_msp"}
    assert torch.allclose(confs["_msp"], logits.softmax(1).max(1).values)


def test_medic_step_reads_nothing_back_to_the_host():
    m = make_medic(3)
    batch = medic_batch(3)
    with NoHostSync():
        for step in (0, torch.tensor(4)):
            m.training_step(batch, StepContext(step=step, max_steps=10))["loss"].backward()


def test_medic_needs_two_domains_and_a_linear_classifier(tmp_path):
    with pytest.raises(ConfigError, match="needs at least 2"):
        Trainer(dg_cfg(tmp_path, "one", "medic", "data.test_domains=[rolled, inverted]"))

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Identity()

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ConfigError, match="linear"):
        make_medic(2, net=NoLinear())


def _events(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_medic_open_set_engine_run(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "medic", "data.unknown_classes=[8, 9]")).fit()
    assert summary["steps"] == 4
    for key in ("closed_acc", "h_score", "oscr", "known_acc", "unknown_acc", "h_score_msp", "oscr_msp"):
        for tail in ("_last", "_best"):
            assert 0 <= summary[f"test_{key}{tail}"] <= 1, key
    assert summary["test_acc_last"] == summary["test_closed_acc_last"]
    events = _events(tmp_path / "run")
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(e["loss"]) and {"meta_train", "meta_test"} <= set(e) for e in train)
    val = [e for e in events if e["split"] == "val"]
    assert val and all(0 <= e["val_acc"] <= 1 and math.isnan(e["val_h_score"]) for e in val)


def test_medic_closed_set_run_reports_accuracy(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "medic")).fit()
    assert 0 <= summary["test_acc_last"] <= 1 and "test_h_score_last" not in summary


def test_medic_is_registered():
    assert METHODS.get("medic") is MEDIC


@pytest.mark.slow
def test_medic_learns_the_known_classes_and_separates_the_unknown_ones(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "medic", "medic", "data.unknown_classes=[8, 9]", "model.name=resnet8",
                             "data.batch_size=32", "trainer.max_steps=120", "trainer.eval_every=120",
                             "trainer.ckpt_every=120", "trainer.log_every=40")).fit()
    assert summary["val_acc_last"] > 0.6, summary["val_acc_last"]  # chance is 1/8
    # OSCR is at most the closed-set accuracy, and half of it for a confidence that ranks at random
    assert summary["test_oscr_last"] > 0.6 * summary["test_closed_acc_last"] > 0.05, summary
