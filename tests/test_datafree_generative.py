"""The online-generator family of data-free distillation: the shared loss terms and the BN-statistics term,
each against an independent computation, and DFAD, DAFL, ZSKT and DFQ: their generator and student losses,
the direction of the generator's step, short runs through the engine and exact resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _datafree import df_cfg
from _helpers import resumes_bitwise
from torch import nn

from mentor.config import ConfigError
from mentor.datafree.losses import (
    activation,
    adversarial_kl,
    class_balance,
    js_divergence,
    logit_l1,
    masked_adversarial_kl,
    total_variation,
)
from mentor.engine import Trainer
from mentor.engine.trainer import train
from mentor.methods import StepContext
from mentor.nn.bnstats import BNStatistics, BNStatisticsError

pytest.importorskip("sklearn")



def _f(x: torch.Tensor) -> float:
    return float(x.detach())


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p_i || q_i) of each row."""
    return (p * (np.log(p) - np.log(q))).sum(-1)


# ------------------------------------------------------------------------------------------- the terms
def _logits_half_agreeing():
    """Student and teacher logits whose argmax agree on samples 0, 2, 4 and differ on 1, 3, 5."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, generator=g) * 2
    s = torch.randn(6, 5, generator=g) * 2
    top = t.argmax(1)
    for i in range(6):
        s[i, top[i]] = s[i].max() + (1.0 if i % 2 == 0 else -1.0)
        if i % 2:  # another class well above the teacher's
            s[i, (top[i] + 1) % 5] = s[i].max() + 1.0
    assert (s.argmax(1) == top).tolist() == [True, False] * 3
    return s, t


def test_masked_adversarial_kl_is_minus_the_mean_kl_of_the_agreeing_samples():
    s, t = _logits_half_agreeing()
    total = 0.0
    for i in range(6):
        ps, pt = _softmax(_np(s[i])), _softmax(_np(t[i]))
        if ps.argmax() == pt.argmax():
            total += sum(pt[c] * np.log(pt[c] / ps[c]) for c in range(5))
    got = masked_adversarial_kl(s, t)
    assert total > 0
    assert float(got) == pytest.approx(-total / 6, rel=1e-5)
    # no agreeing sample: no term; an all-agreeing batch: minus the plain KL
    assert float(masked_adversarial_kl(-t, t)) == 0.0
    assert float(masked_adversarial_kl(t + 0.1 * s, t)) == pytest.approx(
        -_kl_rows(_softmax(_np(t)), _softmax(_np(t + 0.1 * s))).mean(), rel=1e-5)


def test_adversarial_kl_is_minus_t2_times_the_kl_of_the_softened_beliefs():
    s, t = _logits_half_agreeing()
    for temp in (1.0, 2.5):
        kl = _kl_rows(_softmax(_np(t) / temp), _softmax(_np(s) / temp)).mean()
        assert float(adversarial_kl(s, t, temp)) == pytest.approx(-temp * temp * kl, rel=1e-5)


def test_logit_l1_is_the_mean_absolute_logit_difference():
    s, t = _logits_half_agreeing()
    per = [abs(float(s[i, c]) - float(t[i, c])) for i in range(6) for c in range(5)]
    assert float(logit_l1(s, t)) == pytest.approx(sum(per) / len(per), rel=1e-6)


def test_js_divergence_clamps_the_three_distributions_like_the_official_code():
    s, t = _logits_half_agreeing()
    s = s * 3  # confident enough that the clamp at 0.01 / 0.99 acts
    temp = 3.0
    p, q = _softmax(_np(s) / temp), _softmax(_np(t) / temp)
    m = np.clip(0.5 * (p + q), 0.01, 0.99)
    p, q = np.clip(p, 0.01, 0.99), np.clip(q, 0.01, 0.99)
    assert (_softmax(_np(s) / temp) < 0.01).any()  # the clamp is exercised
    want = 0.5 * (_kl_rows(m, p).mean() + _kl_rows(m, q).mean())
    assert float(js_divergence(s, t, temp)) == pytest.approx(want, rel=1e-5)
    # without the clamp the number differs: the check would see a missing clamp
    mu = 0.5 * (_softmax(_np(s) / temp) + _softmax(_np(t) / temp))
    unclamped = 0.5 * (_kl_rows(mu, _softmax(_np(s) / temp)).mean() + _kl_rows(mu, _softmax(_np(t) / temp)).mean())
    assert abs(unclamped - want) > 1e-3


def test_class_balance_is_minus_the_entropy_of_the_batch_mean_prediction():
    _, t = _logits_half_agreeing()
    pbar = _softmax(_np(t)).mean(0)
    entropy = -sum(pc * np.log(pc) for pc in pbar)
    assert float(class_balance(t)) == pytest.approx(-entropy, rel=1e-6)
    # a batch spread evenly over the classes reaches the minimum -log C
    assert float(class_balance(torch.eye(5) * 40)) == pytest.approx(-np.log(5), rel=1e-5)


def test_activation_is_minus_the_mean_absolute_feature():
    f = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -4.5]])
    assert float(activation(f)) == pytest.approx(-(1 + 2 + 0.5 + 0 + 3 + 4.5) / 6)


def test_total_variation_matches_loops_over_pixels():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    a = _np(x)
    n, c, h, w = a.shape
    pairs = {"right": [], "down": [], "anti": [], "diag": []}
    for b in range(n):
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    if j + 1 < w:
                        pairs["right"].append(a[b, k, i, j] - a[b, k, i, j + 1])
                    if i + 1 < h:
                        pairs["down"].append(a[b, k, i, j] - a[b, k, i + 1, j])
                    if i + 1 < h and j + 1 < w:
                        pairs["anti"].append(a[b, k, i + 1, j] - a[b, k, i, j + 1])
                        pairs["diag"].append(a[b, k, i, j] - a[b, k, i + 1, j + 1])
    l1 = sum(np.mean(np.abs(d)) for d in pairs.values())
    l2 = sum(np.sqrt(np.sum(np.square(d))) for d in pairs.values())
    got1, got2 = total_variation(x)
    assert float(got1) == pytest.approx(l1, rel=1e-5)
    assert float(got2) == pytest.approx(l2, rel=1e-5)


# --------------------------------------------------------------------------------------- BN statistics
class _ThreeBN(nn.Module):
    """Two BatchNorm2d (the second after a strided conv) and a BatchNorm1d on a vector."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def bn_inputs(self, x):
        h1 = self.conv1(x)
        h2 = self.conv2(torch.relu(self.bn1(h1)))
        h3 = self.fc(torch.relu(self.bn2(h2)).mean((2, 3)))
        return h1, h2, h3

    def forward(self, x):
        return self.bn3(self.bn_inputs(x)[2])


def _bn_net():
    torch.manual_seed(3)
    net = _ThreeBN()
    for bn in (net.bn1, net.bn2, net.bn3):
        bn.running_mean.copy_(torch.randn_like(bn.running_mean))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    return net.eval().requires_grad_(False)


def _moments(h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = _np(h)
    axes = (0, 2, 3) if a.ndim == 4 else (0,)
    mean = a.mean(axes)
    var = ((a - mean.reshape((1, -1) + (1,) * (a.ndim - 2))) ** 2).mean(axes)  # biased
    return mean, var


def _bn_term(bn: nn.Module, mean: np.ndarray, var: np.ndarray) -> float:
    return float(np.linalg.norm(_np(bn.running_mean) - mean) + np.linalg.norm(_np(bn.running_var) - var))


def test_bn_statistics_loss_is_the_sum_of_plain_l2_norms_per_layer_with_the_first_weighted():
    net = _bn_net()
    x = torch.randn(6, 2, 5, 5) * 2 + 1
    layers = (net.bn1, net.bn2, net.bn3)
    plain = [_bn_term(bn, *_moments(h)) for bn, h in zip(layers, net.bn_inputs(x))]
    stats = BNStatistics(net)
    assert stats.num_layers == 3
    with stats.active():
        net(x)
    assert [float(v) for v in stats.per_layer()] == pytest.approx(plain, rel=1e-5)
    assert float(stats.loss()) == pytest.approx(sum(plain), rel=1e-5)
    stats.remove()
    weighted = BNStatistics(net, first_multiplier=10.0)
    with weighted.active():
        net(x)
    assert float(weighted.loss()) == pytest.approx(10 * plain[0] + plain[1] + plain[2], rel=1e-5)


def test_bn_statistics_gradient_reaches_the_input():
    net = _bn_net()
    x = torch.randn(4, 2, 5, 5, requires_grad=True)
    stats = BNStatistics(net)
    with stats.active():
        net(x)
        loss = stats.loss()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bn_statistics_moving_average_follows_the_hand_recursion_over_rounds():
    net = _bn_net()
    m = 0.9
    stats = BNStatistics(net, momentum=m)
    layers = (net.bn1, net.bn2, net.bn3)
    ema: list[tuple[np.ndarray, np.ndarray]] | None = None
    g = torch.Generator().manual_seed(5)
    for r in range(4):
        x = torch.randn(5, 2, 5, 5, generator=g) * (1 + r) + r
        batch = [_moments(h) for h in net.bn_inputs(x)]
        with stats.active():
            net(x)
        if ema is None:  # before the first update the batch alone is compared
            compared = batch
        else:
            compared = [((1 - m) * bm + m * em, (1 - m) * bv + m * ev) for (bm, bv), (em, ev) in zip(batch, ema)]
        want = sum(_bn_term(bn, *mv) for bn, mv in zip(layers, compared))
        assert float(stats.loss()) == pytest.approx(want, rel=1e-5), r
        stats.update_ema()
        ema = batch if ema is None else [(m * em + (1 - m) * bm, m * ev + (1 - m) * bv)
                                         for (bm, bv), (em, ev) in zip(batch, ema)]
    for i, (em, ev) in enumerate(ema):
        assert _np(getattr(stats, f"ema_mean_{i}")) == pytest.approx(em, rel=1e-5, abs=1e-6)
        assert _np(getattr(stats, f"ema_var_{i}")) == pytest.approx(ev, rel=1e-5, abs=1e-6)
    # the averages are buffers, so a checkpoint of the method that owns the term carries them
    assert {"ema_mean_0", "ema_var_2", "has_ema"} <= set(stats.state_dict())


def test_bn_statistics_hooks_record_only_inside_active():
    net = _bn_net()
    stats = BNStatistics(net, momentum=0.5)
    x, other = torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5) * 3 + 2
    net(x)  # outside: nothing recorded
    assert float(stats.loss()) == 0.0 and all(mv is None for mv in stats._moments)
    with stats.active():
        net(x)
    recorded = float(stats.loss())
    net(other)  # a later forward outside the block changes neither the term nor what the average folds in
    assert float(stats.loss()) == recorded
    stats.update_ema()
    mean0, _ = _moments(net.bn_inputs(x)[0])
    assert _np(stats.ema_mean_0) == pytest.approx(mean0, rel=1e-5, abs=1e-6)
    # the hooks go away with remove()
    stats.remove()
    with stats.active():
        net(other)
    assert float(stats.loss()) == recorded


def test_bn_statistics_of_a_network_without_batchnorm_is_a_clear_error():
    with pytest.raises(BNStatisticsError, match=r"teacher MLP Sequential has no BatchNorm.*layers are LayerNorm"):
        BNStatistics(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), what="teacher MLP")
    with pytest.raises(BNStatisticsError, match="no normalisation layer"):
        BNStatistics(nn.Linear(3, 4))
    with pytest.raises(BNStatisticsError, match="track_running_stats"):  # BN without running statistics
        BNStatistics(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)))


# ------------------------------------------------------------------------------------------------ DFAD
def _method(tmp_path, name, teacher, *extra):
    m = Trainer(df_cfg(tmp_path, name, name, teacher, "trainer.max_steps=4", *extra)).method
    return m.train()


def _ctx(phase: str) -> StepContext:
    return StepContext(step=0, max_steps=4, phase=phase)


def _gap_after_step(m, key: str, z, y, lr: float, sign: float = 1.0):
    """The named generator term on ``G(z)`` before and after one plain gradient step on the generator's loss."""
    out = m.generator_terms(m.net_view(m.generate(z, y)), z, y, _ctx("generator"))
    params = m.generator_params()
    grads = torch.autograd.grad(out["loss"], params)
    with torch.no_grad():
        before = m.generator_terms(m.net_view(m.generate(z, y)), z, y, _ctx("generator"))[key]
        for p, gr in zip(params, grads):
            p.sub_(lr * gr)
        after = m.generator_terms(m.net_view(m.generate(z, y)), z, y, _ctx("generator"))[key]
    return out, float(before), float(after)


def test_dfad_generator_ascends_the_l1_gap_and_the_student_descends_it(tmp_path, digits_teacher):
    m = _method(tmp_path, "dfad", digits_teacher)
    torch.manual_seed(0)
    z, y = m.draw(16)
    with torch.no_grad():
        x = m.net_view(m.generate(z, y))
        want = float((m.student(x) - m.teacher(x)).abs().mean())
    out, before, after = _gap_after_step(m, "gap", z, y, lr=1e-2)
    assert _f(out["gap"]) == pytest.approx(want, rel=1e-5) and before == pytest.approx(want, rel=1e-5)
    assert _f(out["loss"].detach()) == pytest.approx(-want, rel=1e-5)
    assert after > before  # the generator's step increases the gap it is trained on
    # the student's step: the same L1 gap, no gradient to the generator, and a step lowers it
    m.zero_grad(set_to_none=True)
    out = m.training_step({}, _ctx("student"))
    assert set(out) == {"loss", "l1", "agree"} and torch.equal(out["loss"], out["l1"])
    out["loss"].backward()
    assert all(p.grad is None for p in m.generator_params())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.parameters())
    s0 = _f(m.student_batch(x, y)["l1"])
    with torch.no_grad():
        m.zero_grad(set_to_none=True)
    loss = m.student_batch(x, y)["loss"]
    loss.backward()
    with torch.no_grad():
        for p in m.student.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    assert _f(m.student_batch(x, y)["l1"]) < s0


# ------------------------------------------------------------------------- DAFL, ZSKT, DFQ: the losses
def _features_and_logits(teacher, x):
    """The teacher's pooled features and logits, computed stage by stage (not through a hook)."""
    h = x
    for name in teacher.stage_names:
        h = getattr(teacher, name)(h)
    f = h.mean((2, 3))
    return f, f @ teacher.fc.weight.T + teacher.fc.bias


def _ce_to_argmax(t: np.ndarray) -> float:
    logp = t - t.max(1, keepdims=True) - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True))
    return float(-logp[np.arange(len(t)), t.argmax(1)].mean())


def _balance(t: np.ndarray) -> float:
    pbar = _softmax(t).mean(0)
    return float((pbar * np.log(pbar)).sum())


def test_method_defaults_are_fast_datafree_scripts(tmp_path, digits_teacher):
    from mentor.methods import METHODS

    dafl, zskt, dfq = (METHODS.get(n).Config() for n in ("dafl", "zskt", "dfq"))
    assert (dafl.nz, dafl.oh, dafl.act, dafl.balance, dafl.adv, dafl.bn) == (512, 1.0, 0.001, 20.0, 0.0, 0.0)
    assert (zskt.adv, zskt.oh, zskt.bn, zskt.nz) == (1.0, 0.0, 0.0, 256)
    assert (dfq.adv, dfq.bn, dfq.oh, dfq.balance, dfq.s_steps) == (1.0, 1.0, 1.0, 20.0, 10)
    for c in (dafl, zskt, dfq):
        assert (c.g_steps, c.lr_g, c.batch_size, c.temperature, c.output) == (1, 1e-3, 256, 1.0, "sigmoid")
    assert (dafl.s_steps, zskt.s_steps) == (5, 5)


def test_dafl_generator_loss_matches_a_stage_by_stage_recomputation(tmp_path, digits_teacher):
    m = _method(tmp_path, "dafl", digits_teacher, "method.act=0.5", "method.balance=3", "method.oh=0.7")
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 1.5
    out = m.generator_terms(x, None, None, _ctx("generator"))
    assert set(out) == {"loss", "oh", "act", "balance"}
    with torch.no_grad():
        f, t = _features_and_logits(m.teacher, x)
    assert torch.allclose(t, m.teacher(x), atol=1e-5)
    f, t = _np(f), _np(t)
    oh, act, bal = _ce_to_argmax(t), -float(np.abs(f).mean()), _balance(t)
    assert _f(out["oh"]) == pytest.approx(oh, rel=1e-5)
    assert _f(out["act"]) == pytest.approx(act, rel=1e-5)
    assert _f(out["balance"]) == pytest.approx(bal, rel=1e-5)
    assert _f(out["loss"]) == pytest.approx(0.7 * oh + 0.5 * act + 3 * bal, rel=1e-5)


def test_zskt_generator_loss_is_minus_the_kl_to_the_student_whose_statistics_stay(tmp_path, digits_teacher):
    m = _method(tmp_path, "zskt", digits_teacher, "method.adv=1.5", "method.temperature=2")
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    running = {k: v.clone() for k, v in m.student.state_dict().items() if "running" in k}
    out = m.generator_terms(x, None, None, _ctx("generator"))
    assert set(out) == {"loss", "kl"}
    # the student in training mode (batch statistics), on a copy so the copy's statistics may move
    with torch.no_grad():
        s, t = _np(copy.deepcopy(m.student).train()(x)), _np(m.teacher(x))
    kl = 4 * _kl_rows(_softmax(t / 2), _softmax(s / 2)).mean()
    assert _f(out["kl"]) == pytest.approx(kl, rel=1e-5)
    assert _f(out["loss"]) == pytest.approx(-1.5 * kl, rel=1e-5)
    for k, v in m.student.state_dict().items():
        if "running" in k:
            assert torch.equal(v, running[k]), k
    # and the generator's step increases that divergence
    torch.manual_seed(1)
    z, y = m.draw(16)
    _, before, after = _gap_after_step(m, "kl", z, y, lr=1e-2)
    assert after > before


def test_dfq_generator_loss_matches_an_independent_recomputation(tmp_path, digits_teacher):
    m = _method(tmp_path, "dfq", digits_teacher, "method.adv=0.8", "method.bn=0.3", "method.oh=1.2",
                "method.balance=5")
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(6)) + 0.3
    inputs: list[tuple[nn.Module, torch.Tensor]] = []
    bns = [mod for mod in m.teacher.modules() if isinstance(mod, nn.BatchNorm2d)]
    handles = [bn.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a[0].detach()))) for bn in bns]
    with torch.no_grad():
        t = _np(m.teacher(x))
        s = _np(copy.deepcopy(m.student).train()(x))
    for h in handles:
        h.remove()
    assert len(inputs) == len(bns) > 3
    bn = sum(_bn_term(mod, *_moments(h)) for mod, h in inputs)
    kl = _kl_rows(_softmax(t), _softmax(s)).mean()
    oh, bal = _ce_to_argmax(t), _balance(t)
    out = m.generator_terms(x, None, None, _ctx("generator"))
    assert set(out) == {"loss", "bn", "oh", "balance", "kl"}
    assert _f(out["bn"]) == pytest.approx(bn, rel=1e-4)
    assert _f(out["oh"]) == pytest.approx(oh, rel=1e-5)
    assert _f(out["balance"]) == pytest.approx(bal, rel=1e-5)
    assert _f(out["kl"]) == pytest.approx(kl, rel=1e-5)
    assert _f(out["loss"]) == pytest.approx(0.3 * bn + 1.2 * oh + 5 * bal - 0.8 * kl, rel=1e-4)
    # the BN hooks record only during the generator's step: the student's step leaves the term as it was
    recorded = float(m.bn_stats.loss())
    m.training_step({}, _ctx("student"))
    assert float(m.bn_stats.loss()) == recorded


@pytest.mark.parametrize("name", ["dafl", "zskt", "dfq"])
def test_the_student_learns_the_kl_at_the_recipes_temperature(tmp_path, digits_teacher, name):
    m = _method(tmp_path, name, digits_teacher, "method.temperature=3")
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    out = m.student_batch(x, None)
    with torch.no_grad():
        s, t = _np(copy.deepcopy(m.student).train()(x)), _np(m.teacher(x))
    assert _f(out["kd"]) == pytest.approx(9 * _kl_rows(_softmax(t / 3), _softmax(s / 3)).mean(), rel=1e-5)


@pytest.mark.parametrize(("name", "bad"), [("dafl", "method.adv=1"), ("dafl", "method.bn=1"),
                                           ("zskt", "method.oh=1"), ("zskt", "method.bn=1")])
def test_a_weight_the_method_does_not_have_is_refused(tmp_path, digits_teacher, name, bad):
    with pytest.raises(ConfigError, match=bad.split(".")[1].split("=")[0]):
        Trainer(df_cfg(tmp_path, "x", name, digits_teacher, bad))


# ------------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("name", ["dafl", "zskt", "dfq"])
def test_a_short_run_through_the_engine(tmp_path, digits_teacher, name):
    # rounds of 1 generator step and 3 student steps: 6 student steps of 16 images in 8 steps
    s = train(df_cfg(tmp_path, name, name, digits_teacher, "trainer.max_steps=8", "method.s_steps=3"))
    assert s["method"] == name and s["steps"] == 8
    assert s["images_synthesised"] == 96
    assert set(s["phase_seconds"]) == {"generator", "student"}
    assert np.isfinite(s["test_acc_last"]) and 0.0 <= s["test_acc_last"] <= 1.0


def test_dfq_resumes_exactly(tmp_path, digits_teacher):
    # stopped inside a student window (rounds of 1 + 2 steps): the generator's Adam state, the student and
    # both networks' BN statistics carry over
    start, end = resumes_bitwise(lambda name: df_cfg(tmp_path, name, "dfq", digits_teacher, "trainer.max_steps=9",
                                                     "trainer.ckpt_every=3", "method.s_steps=2"), stop_after=4)
    changed = [k for k in end if k.startswith("generator.") and not torch.equal(start[k], end[k])]
    assert changed
