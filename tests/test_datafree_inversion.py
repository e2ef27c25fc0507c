"""The pool-based inversion methods DeepInversion (with ADI's competition term) and CMI: each loss term
against an independent computation, the pixel clipping, the local resized-crop view, the memory bank, the
generator reset per round, the best batch joining the pool, short runs and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _datafree import df_cfg
from _helpers import resumes_bitwise

from mentor.datafree.cmi import info_nce
from mentor.engine import Trainer
from mentor.engine.trainer import train
from mentor.methods import StepContext
from mentor.nn.norm import bn_layers

pytest.importorskip("sklearn")

ROUND = ["method.g_steps=3", "method.kd_steps=2"]
SMALL_BANK = ["method.bank_size=64", "method.n_neg=16"]
EXTRA = {"deepinversion": ROUND, "cmi": [*ROUND, *SMALL_BANK]}


def _method(tmp_path, teacher, name, *extra):
    return Trainer(df_cfg(tmp_path, name, name, teacher, "trainer.max_steps=10", *EXTRA[name], *extra))


def _ctx(step=0):
    return StepContext(step=step, max_steps=10, phase="synthesis")


# ------------------------------------------------------------------------------------------- DeepInversion
def test_pixels_are_clipped_to_the_image_range_after_every_synthesis_step(tmp_path, digits_teacher):
    t = _method(tmp_path, digits_teacher, "deepinversion")
    m = t.method
    lo, hi = (0 - m.mean) / m.std, (1 - m.mean) / m.std
    for step in range(3):
        t._train_step(step)
        p = m.pixels.detach()
        assert bool(((p >= lo - 1e-6) & (p <= hi + 1e-6)).all())
        assert bool((p == lo).any()) and bool((p == hi).any())  # N(0, 1) pixels reach both ends
    # the clip itself, per channel, against a hand-written clamp
    with torch.no_grad():
        m.pixels.copy_(torch.linspace(-4, 4, m.pixels.numel()).view_as(m.pixels))
    want = torch.maximum(torch.minimum(m.pixels.detach(), hi), lo)
    m.clip_pixels()
    assert torch.equal(m.pixels.detach(), want)


def _bn_reference(net, x, first):
    """L_BN from per-channel moments computed on a [C, N*H*W] layout with an explicit centred variance."""
    inputs = []
    hooks = [b.register_forward_hook(lambda mod, a, out: inputs.append((mod, a[0].detach()))) for b in bn_layers(net)]
    try:
        logits = net(x)
    finally:
        for h in hooks:
            h.remove()
    total = 0.0
    for i, (mod, a) in enumerate(inputs):
        flat = a.transpose(0, 1).reshape(a.shape[1], -1).double()
        mu = flat.sum(1) / flat.shape[1]
        var = ((flat - mu[:, None]) ** 2).sum(1) / flat.shape[1]
        term = ((mu - mod.running_mean.double()) ** 2).sum().sqrt() + \
            ((var - mod.running_var.double()) ** 2).sum().sqrt()
        total += term * (first if i == 0 else 1.0)
    return logits, total


def _tv_l2_reference(x):
    """TV_L2 as four sums over every pair of neighbouring pixels (right, down, both diagonals), each a norm."""
    _, _, h, w = x.shape
    out = 0.0
    for di, dj in ((0, 1), (1, 0), (1, -1), (1, 1)):
        sq = 0.0
        for i in range(h):
            for j in range(w):
                if 0 <= i + di < h and 0 <= j + dj < w:
                    sq = sq + ((x[:, :, i, j] - x[:, :, i + di, j + dj]).double() ** 2).sum()
        out = out + math.sqrt(float(sq))
    return out


def _js_reference(s, t, temp):
    p, q = F.softmax(s.double() / temp, 1), F.softmax(t.double() / temp, 1)
    m = ((p + q) / 2).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    per = 0.5 * (m * (m.log() - p.log())).sum(1) + 0.5 * (m * (m.log() - q.log())).sum(1)
    return per.mean()


def test_deepinversion_loss_matches_an_independent_recomputation(tmp_path, digits_teacher):
    t = _method(tmp_path, digits_teacher, "deepinversion", "method.augment=false", "method.tv_l2=0.01",
                "method.l2=0.003", "method.first_bn_multiplier=3", "method.adv=2")
    m = t.method
    gen = torch.Generator().manual_seed(0)
    x01 = torch.rand(16, 1, 8, 8, generator=gen)
    with torch.no_grad():
        m.y.copy_(torch.arange(16) % 10)
    running = [b.running_mean.clone() for b in bn_layers(m.student)]
    out = m.synthesis_terms(x01, _ctx())
    # the student ran in eval mode (nothing recorded into its BN statistics) and is back in training mode
    assert m.student.training
    assert all(torch.equal(b.running_mean, r) for b, r in zip(bn_layers(m.student), running))

    x = (x01 - m.mean) / m.std
    with torch.no_grad():
        tl, bn = _bn_reference(m.teacher, x, 3.0)
        m.student.eval()
        sl = m.student(x)
        m.student.train()
    ce = -F.log_softmax(tl.double(), 1)[torch.arange(16), m.y].mean()
    tv = _tv_l2_reference(x)
    norm = math.sqrt(float((x.double() ** 2).sum()))
    js = _js_reference(sl, tl, 3.0)
    assert float(out["ce"].detach()) == pytest.approx(float(ce), rel=1e-5)
    assert float(out["bn"].detach()) == pytest.approx(float(bn), rel=1e-4)
    assert float(out["tv"].detach()) == pytest.approx(tv, rel=1e-5)
    assert float(out["l2"].detach()) == pytest.approx(norm, rel=1e-5)
    assert float(out["js"].detach()) == pytest.approx(float(js), rel=1e-4, abs=1e-7)
    want = 1.0 * ce + 10.0 * bn + 0.01 * tv + 0.003 * norm - 2.0 * js
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-5)


# ------------------------------------------------------------------------------------------------ CMI
def _nce_loop(head, f_local, f_global, bank_local, bank_global, temp):
    """InfoNCE by anchor: explicit softmax over the positive and every negative (batch and bank)."""
    with torch.no_grad():
        anchors = head(torch.cat([f_local, bank_local]))
        cands = head(torch.cat([f_global, bank_global]))
    losses = []
    for i in range(len(anchors)):
        pos = torch.exp(anchors[i].double() @ cands[i].double() / temp)
        den = sum(torch.exp(anchors[i].double() @ cands[j].double() / temp) for j in range(len(cands)))
        losses.append(-torch.log(pos / den))
    n = len(f_local)
    batch = torch.stack(losses[:n]).mean()
    return batch + (torch.stack(losses[n:]).mean() if len(losses) > n else 0.0)


def test_cmi_infonce_matches_a_per_sample_loop_over_batch_and_bank_negatives(tmp_path, digits_teacher):
    t = _method(tmp_path, digits_teacher, "cmi", "method.bank_size=8", "method.n_neg=6", "method.cr_T=0.2")
    m = t.method
    f = m.feature_dim
    gen = torch.Generator().manual_seed(1)
    f_local = torch.randn(4, f, generator=gen).requires_grad_()
    f_global = torch.randn(4, f, generator=gen).requires_grad_()
    # an empty bank: the batch alone
    got = m.contrastive(f_local, f_global)
    want = _nce_loop(m.head, f_local, f_global, torch.zeros(0, f), torch.zeros(0, f), 0.2)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    # five stored pairs, six asked for: the five, each once, are extra anchors and negatives
    stored = torch.randn(5, 2 * f, generator=gen)
    m.bank_add(stored)
    torch.manual_seed(3)
    bl, bg, valid = m.bank_negatives()
    assert int(valid.sum()) == 5 and bl.shape == (6, f)
    rows = {tuple(r.tolist()) for r in torch.cat([bl, bg], 1)[valid]}
    assert rows == {tuple(r.tolist()) for r in stored}
    torch.manual_seed(3)
    got = m.contrastive(f_local, f_global)
    want = _nce_loop(m.head, f_local, f_global, bl[valid], bg[valid], 0.2)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    # gradients reach the local features and the head, not the global (positive) side
    got.backward()
    assert f_local.grad is not None and float(f_local.grad.abs().sum()) > 0
    assert f_global.grad is None or float(f_global.grad.abs().sum()) == 0
    assert all(p.grad is not None for p in m.head.parameters())
    # info_nce's masking leaves out invalid bank rows and columns entirely
    h = F.normalize(torch.randn(5, 3, generator=gen), dim=1)
    g = F.normalize(torch.randn(5, 3, generator=gen), dim=1)
    masked = info_nce(h, g, 0.5, torch.tensor([True, False]))
    keep = [0, 1, 2, 3]
    assert float(masked) == pytest.approx(float(info_nce(h[keep], g[keep], 0.5, torch.tensor([True]))), rel=1e-6)


def test_memory_bank_is_a_device_ring_and_checkpoints(tmp_path, digits_teacher):
    t = _method(tmp_path, digits_teacher, "cmi", "method.bank_size=8", "method.n_neg=8")
    m = t.method
    f2 = 2 * m.feature_dim
    a, b = torch.randn(5, f2), torch.randn(5, f2)
    m.bank_add(a)
    for _ in range(20):  # only the filled slots are drawn, each once
        _, _, valid = m.bank_negatives()
        assert int(valid.sum()) == 5
    m.bank_add(b)
    assert int(m.bank_added) == 10
    assert torch.equal(m.bank[:2], b[3:]) and torch.equal(m.bank[2:5], a[2:]) and torch.equal(m.bank[5:], b[:3])
    _, _, valid = m.bank_negatives()
    assert bool(valid.all())
    state = m.trained_state()
    assert {"bank", "bank_added", "best_feat"} <= set(state) and "bank" in dict(m.named_buffers())
    other = _method(tmp_path / "o", digits_teacher, "cmi", "method.bank_size=8", "method.n_neg=8").method
    other.load_trained_state(state)
    assert torch.equal(other.bank, m.bank) and int(other.bank_added) == 10


def test_cmi_resets_the_generator_every_round_with_a_fresh_optimizer(tmp_path, digits_teacher):
    t = _method(tmp_path, digits_teacher, "cmi")
    m = t.method
    snaps = []
    original = m.begin_round

    def begin():
        original()
        snaps.append({k: v.clone() for k, v in m.generator.state_dict().items()} | {"z": m.z.detach().clone()})

    m.begin_round = begin
    opt = t.optimizers[0]
    for step in range(5):
        t._train_step(step)
    end1 = {k: v.clone() for k, v in m.generator.state_dict().items()} | {"z": m.z.detach().clone()}
    head1 = [p.detach().clone() for p in m.head.parameters()]
    t._train_step(5)  # the first step of round 2
    assert len(snaps) == 2
    fresh = snaps[1]
    for k in ("l1.weight", "c1.weight", "c3.weight", "z"):
        assert not torch.equal(fresh[k], end1[k]), k
    # the DCGAN initialisation: N(0, 0.02) weights, BN gains near 1, zero biases
    assert float(fresh["c1.weight"].std()) == pytest.approx(0.02, rel=0.2)
    assert float((fresh["n1.norm.weight"] - 1).abs().max()) < 0.1
    assert float(fresh["l1.bias"].abs().max()) == 0
    # Adam's state restarted: one step for every parameter of the phase; the head is kept, not re-drawn
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {1}
    assert all(p in opt.state for p in m.head.parameters())
    # the head was not re-drawn: one Adam step moves each weight by at most lr_g
    moved = [float((a - p.detach()).abs().max()) for a, p in zip(head1, m.head.parameters())]
    assert max(moved) <= 1.001e-3 and max(moved) > 0


@pytest.mark.parametrize("name", ["deepinversion", "cmi"])
def test_the_rounds_lowest_loss_batch_joins_the_pool(tmp_path, digits_teacher, name):
    t = _method(tmp_path, digits_teacher, name)
    m = t.method
    seen = []
    original = m.synthesis_terms

    def record(x01, ctx):
        out = original(x01, ctx)
        seen.append((float(out["loss"].detach()), x01.detach().clone()))
        return out

    feats = []
    if name == "cmi":
        contrastive = m.contrastive

        def keep(f_local, f_global):
            feats.append(torch.cat([f_local, f_global], 1).detach().clone())
            return contrastive(f_local, f_global)

        m.contrastive = keep
    m.synthesis_terms = record
    for step in range(3):
        t._train_step(step)
    losses = [s[0] for s in seen]
    best = min(range(3), key=losses.__getitem__)
    assert float(m.best_loss) == pytest.approx(losses[best])
    assert torch.equal(m.best_x, seen[best][1])
    newest = m.pool.decode(torch.arange(16))
    assert torch.allclose(newest, (seen[best][1].clamp(0, 1) * 255).round() / 255, atol=1e-6)
    assert torch.equal(m.pool.labels[:16], m.y) and int(m.synthesised) == 16
    if name == "cmi":
        assert torch.equal(m.bank[:16], feats[best]) and int(m.bank_added) == 16


@pytest.mark.parametrize("name", ["deepinversion", "cmi"])
def test_a_short_run_through_the_engine(tmp_path, digits_teacher, name):
    s = train(df_cfg(tmp_path, "r", name, digits_teacher, "trainer.max_steps=10", *EXTRA[name]))
    assert s["images_synthesised"] == 32
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [r[k] for r in rows for k in ("synthesis/loss", "student/loss") if k in r]
    assert len(losses) >= 6 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ["deepinversion", "cmi"])
def test_inversion_runs_resume_exactly(tmp_path, digits_teacher, name):
    # stopped mid-round (step 6 of rounds of 5): pixels or generator, z, head, bank and Adam state carry over
    resumes_bitwise(lambda run: df_cfg(tmp_path, run, name, digits_teacher, "trainer.max_steps=12",
                                       "trainer.ckpt_every=3", *EXTRA[name]), stop_after=6)
