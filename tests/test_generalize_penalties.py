"""DomainBed's penalty and reweighting algorithms: IRM, V-REx, GroupDRO, inter-domain Mixup, first-order MLDG and
Fishr. Each penalty is checked against the formula computed another way (autograd through a dummy scale, numpy,
a hand-worked update, separate networks, a per-sample autograd loop), then each method trains a few engine steps,
and the stateful ones resume bit for bit."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg, resumes_bitwise
from _helpers import BNNet
from _nosync import NoHostSync
from torch import nn

from mentor.config import ConfigError
from mentor.engine import Trainer
from mentor.generalize.fishr import classifier_sample_grads
from mentor.methods import BuildInfo, StepContext, create_method

C = 10  # classes of the digit domains


def _method(name, domains=2, **hp):
    torch.manual_seed(0)
    info = BuildInfo(num_classes=C, in_channels=1, image_size=8, num_domains=domains,
                     domain_names=tuple(f"d{i}" for i in range(domains)))
    return create_method(name, BNNet(C), info, **hp)


def _batch(domains, b, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(domains * b, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, C, (domains * b,), generator=g)
    return {"x": x, "y": y, "domain": torch.arange(domains).repeat_interleave(b), "index": torch.arange(domains * b)}


def _logits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, C, generator=g, dtype=torch.float64)).requires_grad_(True), \
        torch.randint(0, C, (n,), generator=g)


# -- IRM -----------------------------------------------------------------------------------------------------
def test_irm_penalty_matches_autograd_through_a_dummy_scale_on_each_half():
    d, b = 3, 7  # an odd batch: halves of 4 and 3 rows
    logits, y = _logits(d * b)
    ref = 0.0
    for k in range(d):
        z, t = logits[k * b:(k + 1) * b], y[k * b:(k + 1) * b]
        grads = []
        for half in (slice(0, None, 2), slice(1, None, 2)):
            scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
            (g,) = torch.autograd.grad(F.cross_entropy(z[half] * scale, t[half]), scale, create_graph=True)
            grads.append(g)
        ref = ref + grads[0] * grads[1]
    ref = ref / d
    got = _method("irm", domains=d).penalty(None, logits, y)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6) and abs(ref.item()) > 1e-3
    # the penalty's gradient (it trains the network) is the double-backward one
    (g_ref,) = torch.autograd.grad(ref, logits)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,before,after,anneal", [("irm", 1.0, 100.0, 500), ("vrex", 1.0, 10.0, 500),
                                                      ("fishr", 0.0, 1000.0, 1500)])
def test_the_penalty_weight_switches_at_domainbeds_anneal_step(name, before, after, anneal):
    m = _method(name)
    for step in (anneal - 1, torch.tensor(anneal - 1)):
        assert m.penalty_weight(step).item() == before
    for step in (anneal, torch.tensor(anneal), anneal + 1000):
        assert m.penalty_weight(step).item() == after
    assert m.penalty_weight(0).item() == before
    assert _method(name, anneal_steps=0).penalty_weight(0).item() == after  # DomainBed: update_count 0 >= 0
    # the loss the step returns is nll + w * penalty on either side of the switch
    batch = _batch(2, 8)
    for step, w in ((anneal - 1, before), (anneal, after)):
        out = m.training_step(batch, StepContext(step=step, max_steps=anneal * 2))
        assert out["loss"].item() == pytest.approx(out["nll"].item() + w * out["penalty"].item(), rel=1e-5)


def test_irm_rescale_divides_the_loss_by_the_weight_once_it_exceeds_one():
    m = _method("irm", rescale=True, anneal_steps=3)
    batch = _batch(2, 8)
    early = m.training_step(batch, StepContext(step=2, max_steps=10))
    assert early["loss"].item() == pytest.approx(early["nll"].item() + early["penalty"].item(), rel=1e-5)
    late = m.training_step(batch, StepContext(step=3, max_steps=10))
    assert late["loss"].item() == pytest.approx((late["nll"].item() + 100 * late["penalty"].item()) / 100, rel=1e-5)


# -- V-REx ---------------------------------------------------------------------------------------------------
def test_vrex_penalty_is_the_variance_of_the_per_domain_risks():
    d, b = 3, 6
    logits, y = _logits(d * b, seed=1)
    z = logits.detach().numpy()
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    nll = -logp[np.arange(d * b), y.numpy()]
    risks = nll.reshape(d, b).mean(1)
    got = _method("vrex", domains=d).penalty(None, logits, y)
    assert got.item() == pytest.approx(np.var(risks), rel=1e-6) and np.var(risks) > 1e-3


# -- GroupDRO ------------------------------------------------------------------------------------------------
def test_groupdro_weights_follow_the_exponentiated_risks_for_two_steps():
    eta, d, b = 0.5, 3, 8
    m = _method("groupdro", domains=d, eta=eta)
    net = copy.deepcopy(m.student)
    q = np.full(d, 1.0 / d)
    for seed in (0, 1):
        batch = _batch(d, b, seed=seed)
        risks = [F.cross_entropy(net(batch["x"][k * b:(k + 1) * b]), batch["y"][k * b:(k + 1) * b]) for k in range(d)]
        r = np.array([v.item() for v in risks])
        q = q * np.exp(eta * r)
        q = q / q.sum()
        m.zero_grad()
        out = m.training_step(batch, StepContext(step=seed, max_steps=2))
        np.testing.assert_allclose(m.q.numpy(), q, rtol=1e-5)
        assert out["loss"].item() == pytest.approx(float(q @ r), rel=1e-5)
        # the gradient is that of sum_d q_d * risk_d with the updated q held constant
        out["loss"].backward()
        ref = torch.autograd.grad(sum(float(q[k]) * risks[k] for k in range(d)), list(net.parameters()))
        for p, g in zip(m.student.parameters(), ref):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert q.max() - q.min() > 0.01  # the weights moved


# -- Mixup ---------------------------------------------------------------------------------------------------
def test_mixup_is_two_cross_entropies_of_each_mixed_pair():
    d, b = 3, 8
    m = _method("mixup", domains=d)
    net = copy.deepcopy(m.student)
    first, second, lam = torch.tensor([2, 0, 1]), torch.tensor([0, 1, 2]), torch.tensor([0.3, 0.9, 0.55])
    m.draw = lambda ctx, device: (first, second, lam)
    batch = _batch(d, b)
    xs, ys = batch["x"].view(d, b, 1, 8, 8), batch["y"].view(d, b)
    ref = 0.0
    for (i, j), lm in zip([(2, 0), (0, 1), (1, 2)], [0.3, 0.9, 0.55]):
        out = net(lm * xs[i] + (1 - lm) * xs[j])
        ref = ref + lm * F.cross_entropy(out, ys[i]) + (1 - lm) * F.cross_entropy(out, ys[j])
    ref = ref / d
    got = m.training_step(batch, StepContext(step=0, max_steps=1))["loss"]
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_mixup_pairs_each_domain_with_the_next_in_a_random_order():
    m = _method("mixup", domains=4)
    ctx = StepContext(step=0, max_steps=1, generator=torch.Generator().manual_seed(0))
    orders = set()
    for _ in range(50):
        first, second, lam = m.draw(ctx, torch.device("cpu"))
        assert sorted(first.tolist()) == [0, 1, 2, 3] and torch.equal(second, first.roll(-1))
        assert ((lam >= 0) & (lam <= 1)).all()
        orders.add(tuple(first.tolist()))
    assert len(orders) > 5


# -- MLDG ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta_test,inner", [(1, "adam"), (2, "adam"), (1, "sgd")])
def test_mldg_gradient_is_first_order_mldg_on_separate_networks(meta_test, inner):
    d, b, beta, lr = 3, 8, 0.7, 0.05
    m = _method("mldg", domains=d, meta_test_domains=meta_test, beta=beta, inner_lr=lr, inner_optim=inner).double()
    pairs = {1: ([2, 0], [1, 1]), 2: ([1], [0])}[meta_test]
    m.meta_pairs = lambda ctx, device: tuple(torch.tensor(p) for p in pairs)
    net = copy.deepcopy(m.student)
    batch = _batch(d, b, dtype=torch.float64)
    xs, ys = batch["x"].view(d, b, 1, 8, 8), batch["y"].view(d, b)
    # DomainBed's procedure: a copy of the network per pair, one step of a fresh optimizer on domain i, the
    # copy's gradients at the start (G_i) and after the step on domain j (G_j), summed and divided by D
    ref = [torch.zeros_like(p) for p in net.parameters()]
    objective = 0.0
    for i, j in zip(*pairs):
        inner_net = copy.deepcopy(net)
        opt = (torch.optim.Adam if inner == "adam" else torch.optim.SGD)(inner_net.parameters(), lr=lr)
        li = F.cross_entropy(inner_net(xs[i]), ys[i])
        li.backward()
        opt.step()
        for acc, p in zip(ref, inner_net.parameters()):
            acc += p.grad / d
        lj = F.cross_entropy(inner_net(xs[j]), ys[j])
        for acc, g in zip(ref, torch.autograd.grad(lj, list(inner_net.parameters()))):
            acc += beta * g / d
        objective += (li.item() + beta * lj.item()) / d
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(objective, rel=1e-10)
    for p, g in zip(m.student.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)
    # the step at theta' changed the second gradient: not plain ERM's sum of gradients at theta
    plain = torch.autograd.grad(sum(F.cross_entropy(net(xs[i]), ys[i]) + beta * F.cross_entropy(net(xs[j]), ys[j])
                                    for i, j in zip(*pairs)) / d, list(net.parameters()))
    assert max((p.grad - g).abs().max().item() for p, g in zip(m.student.parameters(), plain)) > 1e-6


def test_mldg_meta_pairs_split_the_domains_like_domainbed():
    m = _method("mldg", domains=5, meta_test_domains=2)
    ctx = StepContext(step=0, max_steps=1, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        train, test = m.meta_pairs(ctx, torch.device("cpu"))
        assert len(train) == 3 and len(set(train.tolist())) == 3 and not set(train.tolist()) & set(test.tolist())
        assert len(set(test.tolist())) == 2 and test[0] == test[2] != test[1]  # cycling over the meta-test domains


def test_mldg_needs_a_meta_train_domain():
    with pytest.raises(ConfigError, match="method.meta_test_domains to at most 1"):
        _method("mldg", domains=2)


# -- Fishr ---------------------------------------------------------------------------------------------------
def test_fishr_sample_gradients_variances_and_penalty_match_a_per_sample_autograd_loop():
    d, b, width = 2, 5, 8
    ema = 0.9
    m = _method("fishr", domains=d, ema=ema).double()
    fc = nn.Linear(width, C).double()
    g = torch.Generator().manual_seed(3)
    running = None
    for _ in range(2):
        feats = torch.randn(d * b, width, generator=g, dtype=torch.float64).requires_grad_(True)
        y = torch.randint(0, C, (d * b,), generator=g)
        logits = fc(feats)
        rows = []
        for n in range(d * b):
            gw, gb = torch.autograd.grad(F.cross_entropy(fc(feats[n:n + 1]), y[n:n + 1]), [fc.weight, fc.bias],
                                         create_graph=True)
            rows.append(torch.cat([gw.flatten(), gb]))
        per_sample = torch.stack(rows)
        torch.testing.assert_close(classifier_sample_grads(feats, logits, y), per_sample)
        var = torch.stack([per_sample[k * b:(k + 1) * b].var(0, unbiased=False) for k in range(d)])
        running = (1 - ema) * var if running is None else ema * running.detach() + (1 - ema) * var
        corrected = running / (1 - ema)
        mean = corrected.mean(0)
        ref = sum(((corrected[k] - mean) ** 2).mean() for k in range(d)) / d
        got = m.penalty(feats, logits, y)
        assert got.item() == pytest.approx(ref.item(), rel=1e-9) and ref.item() > 0
        torch.testing.assert_close(m.grad_var, running.detach())
        g_ref = torch.autograd.grad(ref, feats, retain_graph=True)[0]
        g_got = torch.autograd.grad(got, feats)[0]
        torch.testing.assert_close(g_got, g_ref)


def test_fishr_needs_a_linear_classifier():
    net = BNNet(C)
    net.fc = nn.Sequential(nn.Linear(8, C))
    with pytest.raises(ConfigError, match="nn.Linear"):
        create_method("fishr", net, BuildInfo(num_classes=C, num_domains=2))


# -- engine runs ---------------------------------------------------------------------------------------------
EXTRA = {"irm": ["method.anneal_steps=2"], "vrex": ["method.anneal_steps=2"], "groupdro": [], "mixup": [],
         "mldg": ["method.meta_test_domains=1"], "fishr": ["method.anneal_steps=2"]}
TERMS = {"irm": {"nll", "penalty"}, "vrex": {"nll", "penalty"}, "groupdro": {"nll", "worst_risk"}, "mixup": {"lam"},
         "mldg": {"meta_train", "meta_test"}, "fishr": {"nll", "penalty"}}


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_each_method_trains_in_the_engine(tmp_path, name):
    summary = Trainer(dg_cfg(tmp_path, "run", name, *EXTRA[name])).fit()
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last@rolled"] <= 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(e["loss"]) and TERMS[name] <= set(e) for e in train)


@pytest.mark.parametrize("name,buffer", [("groupdro", "q"), ("fishr", "grad_var")])
def test_a_resumed_run_ends_with_the_straight_runs_state_and_buffers(tmp_path, name, buffer):
    extra = [*EXTRA[name], "method.eta=0.5"] if name == "groupdro" else EXTRA[name]
    start, ref = resumes_bitwise(lambda run: dg_cfg(tmp_path, run, name, *extra), stop_after=1)
    assert not torch.equal(ref[buffer], start[buffer])  # the buffer moved and is part of the state


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_a_step_reads_nothing_back_to_the_host(name):
    hp = {"meta_test_domains": 1} if name == "mldg" else {}
    m = _method(name, domains=3, **hp)
    batch = _batch(3, 4)
    with NoHostSync():
        for step in (0, torch.tensor(700), 2000):  # either side of every anneal step, an int or a 0-d tensor
            m.training_step(batch, StepContext(step=step, max_steps=3000))["loss"].backward()
