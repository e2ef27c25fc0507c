"""DomainBed's feature-alignment algorithms: CORAL and MMD (a discrepancy between every pair of training domains'
features) and the domain-adversarial DANN and CDANN (a discriminator and the network taking turns). Each penalty
is checked against the formula computed another way (numpy, a double loop over samples, a closed-form input
gradient, separate networks), the alternation against DomainBed's ``update_count`` rule, then each method trains
a few engine steps and DANN's two optimizers resume bit for bit."""

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg, resumes_bitwise
from _helpers import BNNet
from _nosync import NoHostSync

from mentor.engine import Trainer
from mentor.generalize.dann import input_gradient_penalty
from mentor.methods import BuildInfo, StepContext, create_method

C = 10  # classes of the digit domains


def _method(name, domains=2, **hp):
    torch.manual_seed(0)
    info = BuildInfo(num_classes=C, in_channels=1, image_size=8, num_domains=domains,
                     domain_names=tuple(f"d{i}" for i in range(domains)))
    return create_method(name, BNNet(C), info, **hp)


def _batch(domains, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(domains * b, 1, 8, 8, generator=g)
    y = torch.randint(0, C, (domains * b,), generator=g)
    return {"x": x, "y": y, "domain": torch.arange(domains).repeat_interleave(b), "index": torch.arange(domains * b)}


def _features(d, b, width, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(d * b, width, generator=g, dtype=torch.float64)


def _bnnet_features(net, x):
    """BNNet's penultimate features, computed from its layers (not through any tap)."""
    return F.adaptive_avg_pool2d(torch.relu(net.bn(net.conv(x))), 1).flatten(1)


# -- CORAL ---------------------------------------------------------------------------------------------------
def test_coral_penalty_is_the_mean_over_domain_pairs_of_mean_and_covariance_gaps_numpy():
    d, b, width = 3, 7, 5
    feats = _features(d, b, width, seed=1)
    # domains of different statistics, so every term matters
    feats = feats * torch.tensor([1.0, 2.0, 0.5]).repeat_interleave(b).view(-1, 1).double() + \
        torch.tensor([0.0, 1.0, -1.0]).repeat_interleave(b).view(-1, 1).double()
    z = feats.numpy().reshape(d, b, width)
    ref = []
    for i, j in itertools.combinations(range(d), 2):
        mean_gap = np.mean((z[i].mean(0) - z[j].mean(0)) ** 2)
        cov_gap = np.mean((np.cov(z[i], rowvar=False, ddof=1) - np.cov(z[j], rowvar=False, ddof=1)) ** 2)
        ref.append(mean_gap + cov_gap)
    got = _method("coral", domains=d).penalty(feats)
    assert got.item() == pytest.approx(np.mean(ref), rel=1e-10) and np.mean(ref) > 0.1


# -- MMD -----------------------------------------------------------------------------------------------------
GAMMAS = (0.001, 0.01, 0.1, 1, 10, 100, 1000)


def test_mmd_penalty_matches_a_double_loop_over_samples():
    d, b, width = 3, 4, 3
    feats = _features(d, b, width, seed=2, scale=0.3)
    feats[b:2 * b] += 0.5  # one domain shifted
    z = feats.numpy().reshape(d, b, width)

    def k(u, v):
        return sum(math.exp(-g * float(np.sum((u - v) ** 2))) for g in GAMMAS)

    def mean_k(p, q):
        return sum(k(p[s], q[t]) for s in range(b) for t in range(b)) / (b * b)

    ref = np.mean([mean_k(z[i], z[i]) + mean_k(z[j], z[j]) - 2 * mean_k(z[i], z[j])
                   for i, j in itertools.combinations(range(d), 2)])
    m = _method("mmd", domains=d)
    got = m.penalty(feats)
    assert got.item() == pytest.approx(ref, rel=1e-9) and ref > 1e-2
    # the pooled kernel matrix gives the per-pair form DomainBed computes with three matrices per pair
    per_pair = np.mean([m.discrepancy(feats[i * b:(i + 1) * b], feats[j * b:(j + 1) * b]).item()
                        for i, j in itertools.combinations(range(d), 2)])
    assert per_pair == pytest.approx(ref, rel=1e-9)
    # the penalty's gradient reaches the features
    feats.requires_grad_(True)
    (grad,) = torch.autograd.grad(m.penalty(feats), feats)
    assert grad.abs().max() > 0


@pytest.mark.parametrize("name", ["coral", "mmd"])
def test_the_alignment_loss_is_the_cross_entropy_plus_the_weighted_penalty_of_the_features(name):
    m = _method(name, domains=3, penalty_weight=2.5)
    net = copy.deepcopy(m.student)
    batch = _batch(3, 6)
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    feats = _bnnet_features(net, batch["x"])
    nll = F.cross_entropy(net.fc(feats), batch["y"])
    penalty = m.penalty(feats)
    assert out["nll"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert out["penalty"].item() == pytest.approx(penalty.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(nll.item() + 2.5 * penalty.item(), rel=1e-5)


# -- DANN / CDANN --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_steps", [1, 2, 3])
def test_dann_phases_alternate_as_domainbeds_update_count(d_steps):
    m = _method("dann", d_steps_per_g_step=d_steps)
    disc, gen = m.phases()
    assert (disc.name, gen.name) == ("disc", "gen")
    for step in range(24):
        update_count = step + 1  # DomainBed increments it before reading it
        disc_due = update_count % (1 + d_steps) < d_steps
        assert disc.due(step) == disc_due and gen.due(step) == (not disc_due), step
    if d_steps == 1:
        assert [gen.due(s) for s in range(4)] == [True, False, True, False]  # the network steps first


def test_dann_phases_hold_the_discriminator_and_the_student_with_domainbeds_adam():
    m = _method("cdann", lr_d=2e-3, lr_g=3e-3, weight_decay_d=0.1, weight_decay_g=0.2, beta1=0.3)
    disc, gen = m.phases()
    ids = {id(p) for p in disc.params}
    assert ids == {id(p) for p in [*m.discriminator.parameters(), *m.class_embeddings.parameters()]}
    assert [id(p) for p in gen.params] == [id(p) for p in m.student.parameters()]
    adam = {"name": "adamw", "betas": (0.3, 0.9), "decay_norm_bias": True}
    assert disc.optim == {**adam, "lr": 2e-3, "weight_decay": 0.1}
    assert gen.optim == {**adam, "lr": 3e-3, "weight_decay": 0.2}
    assert _method("dann", lr_d=None, lr_g=None).phases()[0].optim == {}  # the run's optim section
    # DomainBed's discriminator: mlp_width 256, mlp_depth 3 (two ReLU layers), one output per domain
    widths = [(layer.in_features, layer.out_features) for layer in m.discriminator.modules()
              if isinstance(layer, torch.nn.Linear)]
    assert widths == [(8, 256), (256, 256), (256, 2)]


def test_dann_generator_step_follows_the_negated_discriminator_gradient():
    lam = 0.7
    m = _method("dann", domains=3, lambda_adv=lam)
    net, disc = copy.deepcopy(m.student), copy.deepcopy(m.discriminator)
    batch = _batch(3, 6)
    # reference: the classifier's gradient minus lambda times the discriminator loss's, on separate copies
    feats = _bnnet_features(net, batch["x"])
    nll = F.cross_entropy(net.fc(feats), batch["y"])
    disc_loss = F.cross_entropy(disc(feats), batch["domain"])
    g_nll = torch.autograd.grad(nll, list(net.parameters()), retain_graph=True, allow_unused=True)
    g_disc = torch.autograd.grad(disc_loss, list(net.parameters()), allow_unused=True)

    out = m.training_step(batch, StepContext(step=0, max_steps=2, phase="gen"))
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(nll.item() - lam * disc_loss.item(), rel=1e-5)
    moved = 0
    for (name, p), a, c in zip(m.student.named_parameters(), g_nll, g_disc):
        a = torch.zeros_like(p) if a is None else a
        c = torch.zeros_like(p) if c is None else c
        torch.testing.assert_close(p.grad, a - lam * c, rtol=1e-4, atol=1e-6)
        moved += int(name != "fc.weight" and name != "fc.bias" and c.abs().max() > 1e-6)
    assert moved > 0  # the features below the classifier do receive the discriminator's (negated) gradient

    # the discriminator's step: the discriminator's own gradient, nothing for the network
    m.zero_grad(set_to_none=True)
    out = m.training_step(batch, StepContext(step=1, max_steps=2, phase="disc"))
    out["loss"].backward()
    assert all(p.grad is None for p in m.student.parameters())
    feats = _bnnet_features(net, batch["x"]).detach()
    ref = torch.autograd.grad(F.cross_entropy(disc(feats), batch["domain"]), list(disc.parameters()))
    for p, g in zip(m.discriminator.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_dann_gradient_penalty_matches_the_closed_form_input_gradient_of_a_one_hidden_layer_discriminator():
    m = _method("dann", domains=3, mlp_depth=2, mlp_width=6, grad_penalty=0.5).double()
    disc = m.discriminator
    z = _features(3, 5, 8, seed=4).requires_grad_(True)
    labels = torch.arange(3).repeat_interleave(5)
    out = disc(z)
    got = input_gradient_penalty(out, labels, z)
    # d/dz sum_n CE(W2 relu(W1 z + b1) + b2, d_n) = W1^T [(h > 0) * (W2^T (softmax - onehot))], per row
    w1, b1 = disc.input.weight.detach().numpy(), disc.input.bias.detach().numpy()
    w2, b2 = disc.output.weight.detach().numpy(), disc.output.bias.detach().numpy()
    zz = z.detach().numpy()
    h = zz @ w1.T + b1
    logits = np.maximum(h, 0) @ w2.T + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = p - np.eye(3)[labels.numpy()]
    grad = ((err @ w2) * (h > 0)) @ w1
    ref = np.mean(np.sum(grad ** 2, axis=1))
    assert got.item() == pytest.approx(ref, rel=1e-10) and ref > 1e-3
    # differentiable: it trains the discriminator
    gw = torch.autograd.grad(got, disc.input.weight)[0]
    assert gw.abs().max() > 0
    # the discriminator's loss adds grad_penalty times it
    batch = _batch(3, 5)
    step = m.training_step({k: v.double() if v.is_floating_point() else v for k, v in batch.items()},
                           StepContext(step=1, max_steps=2, phase="disc"))
    assert step["loss"].item() == pytest.approx(
        F.cross_entropy(disc(_bnnet_features(m.student, batch["x"].double())), batch["domain"]).item()
        + 0.5 * step["grad_penalty"].item(), rel=1e-8)


def test_cdann_discriminator_reads_the_class_embedding_and_weighs_classes_as_domainbed():
    m = _method("cdann", domains=2)
    net, disc, emb = copy.deepcopy(m.student), copy.deepcopy(m.discriminator), copy.deepcopy(m.class_embeddings)
    batch = _batch(2, 6, seed=3)
    y = torch.tensor([0, 0, 0, 3, 3, 5, 5, 0, 3, 3, 3, 1])  # the largest label 5 < C - 1
    batch["y"] = y
    out = m.training_step(batch, StepContext(step=1, max_steps=2, phase="disc"))
    feats = _bnnet_features(net, batch["x"])
    ce = F.cross_entropy(disc(feats + emb(y)), batch["domain"], reduction="none").detach().numpy()
    # DomainBed: y_counts = F.one_hot(y).sum(0) (width max(y) + 1), weights 1 / (y_counts[y] * width), summed
    counts = np.bincount(y.numpy())
    weights = 1.0 / (counts[y.numpy()] * len(counts))
    ref = float(np.sum(weights * ce))
    assert len(counts) == 6 and out["loss"].item() == pytest.approx(ref, rel=1e-5)
    # every class present has the same total weight
    totals = [weights[y.numpy() == c].sum() for c in np.unique(y.numpy())]
    assert np.allclose(totals, 1.0 / 6)


# -- engine runs ---------------------------------------------------------------------------------------------
TERMS = {"coral": {"loss", "nll", "penalty"}, "mmd": {"loss", "nll", "penalty"},
         "dann": {"gen/loss", "gen/nll", "gen/disc_loss", "disc/loss", "disc/disc_acc"},
         "cdann": {"gen/loss", "gen/nll", "gen/disc_loss", "disc/loss", "disc/disc_acc"}}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_each_method_trains_in_the_engine(tmp_path, name):
    summary = Trainer(dg_cfg(tmp_path, "run", name)).fit()
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last@rolled"] <= 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 4
    seen = set().union(*(set(e) for e in train))
    assert TERMS[name] <= seen
    assert all(math.isfinite(v) for e in train for k, v in e.items() if k.endswith("loss"))
    if name in ("dann", "cdann"):  # one phase a step: the network at even steps, the discriminator at odd
        assert ["gen/loss" in e and "disc/loss" not in e for e in train] == [True, False, True, False]


@pytest.mark.parametrize("name", ["dann", "cdann"])
def test_a_resumed_run_ends_with_the_straight_runs_network_and_discriminator(tmp_path, name):
    extra = ["method.grad_penalty=0.1"]
    start, ref = resumes_bitwise(lambda run: dg_cfg(tmp_path, run, name, *extra), stop_after=1)
    moved = ["discriminator.input.weight", "student.conv.weight"] + (["class_embeddings.weight"] if name == "cdann"
                                                                     else [])
    assert all(not torch.equal(ref[k], start[k]) for k in moved)  # both optimizers stepped


@pytest.mark.parametrize("name", sorted(TERMS))
def test_a_step_reads_nothing_back_to_the_host(name):
    m = _method(name, domains=3, **({"grad_penalty": 0.1} if "dann" in name else {}))
    batch = _batch(3, 4)
    with NoHostSync():
        for phase in ([p.name for p in m.phases()]):
            m.training_step(batch, StepContext(step=torch.tensor(3), max_steps=10, phase=phase))["loss"].backward()
