"""CPSC-DFKD and DFDG: each loss term against an independent computation (loops over anchors, samples and
pairs, hand-worked numbers, hooks of the test's own), the step pattern of their phases, and short runs
through the engine with exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _datafree import df_cfg
from _helpers import resumes_bitwise  # noqa: F401  (registers test_bncnn)
from torch import nn

from mentor.config import ConfigError
from mentor.datafree.cpsc import ikd_generator, ikd_student
from mentor.datafree.dfdg import ACGenerator, cross_divergence, diversity_loss, transfer_kl
from mentor.datafree.generators import ConditionalBatchNorm2d
from mentor.engine import Trainer
from mentor.engine.trainer import train
from mentor.methods import StepContext
from mentor.nn.contrast import sup_con
from mentor.nn.norm import evaluating

pytest.importorskip("sklearn")


@pytest.fixture
def teacher(digits_teacher):  # the session fixture of tests/conftest.py
    return digits_teacher

CPSC = ["method.g_steps=2", "method.s_steps=1"]
DFDG = ["method.g_steps=2", "method.s_steps=1"]


# ------------------------------------------------------------------------------------------ shared parts
def test_conditional_bn_is_batchnorm_then_a_per_class_gain_and_bias():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(3, 4)
    with torch.no_grad():
        cbn.gamma.weight.normal_()
        cbn.beta.weight.normal_()
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 1, 1])
    got = cbn(x, y)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    xhat = (x - mean) / torch.sqrt(var + 1e-5)
    for i in range(6):
        want = cbn.gamma.weight[y[i]].view(3, 1, 1) * xhat[i] + cbn.beta.weight[y[i]].view(3, 1, 1)
        assert torch.allclose(got[i], want, atol=1e-5)
    # a fresh layer is the plain BatchNorm
    assert torch.allclose(ConditionalBatchNorm2d(3, 4)(x, y), xhat, atol=1e-5)


def supcon_loop(views, labels, tau):
    """Khosla et al.'s L^sup_out, one anchor at a time."""
    b, v, _ = views.shape
    f = [views[i, a] for a in range(v) for i in range(b)]
    lab = [int(labels[i]) for _ in range(v) for i in range(b)]
    total = 0.0
    for i in range(len(f)):
        denom = sum(math.exp(float(f[i] @ f[k]) / tau) for k in range(len(f)) if k != i)
        pos = [p for p in range(len(f)) if p != i and lab[p] == lab[i]]
        total += -sum(math.log(math.exp(float(f[i] @ f[p]) / tau) / denom) for p in pos) / len(pos)
    return total / len(f)


def test_sup_con_matches_a_per_anchor_loop():
    torch.manual_seed(1)
    views = F.normalize(torch.randn(6, 2, 5, dtype=torch.float64), dim=2)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    for tau in (0.5, 0.07):
        got = sup_con(views, labels, tau)
        assert abs(float(got) - supcon_loop(views, labels, tau)) < 1e-4 * max(1.0, abs(float(got)))
    # the labels matter: with all samples of distinct classes only the other view is a positive
    distinct = sup_con(views, torch.arange(6), 0.5)
    assert abs(float(distinct) - supcon_loop(views, torch.arange(6), 0.5)) < 1e-4
    assert abs(float(distinct) - float(sup_con(views, labels, 0.5))) > 1e-3


def test_ikd_terms_on_a_hand_worked_batch():
    s, t = torch.zeros(2, 3), torch.full((2, 3), 2.0)  # every difference 2: MSE 4, ||t - s||_2 = 2 sqrt(6)
    assert torch.isclose(ikd_generator(s, t, log=False), torch.tensor(-4.0))
    assert torch.isclose(ikd_generator(s, t, log=True), torch.tensor(-math.log(4.0)))
    assert torch.isclose(ikd_student(s, t, log=False), torch.tensor(4.0))
    assert torch.isclose(ikd_student(s, t, log=True), torch.tensor(math.log(2 * math.sqrt(6))))
    # the generator's term reaches the images through the student only
    s, t = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    ikd_generator(s, t, log=True).backward()
    assert t.grad is None and s.grad is not None


# ------------------------------------------------------------------------------------------------ CPSC
def finite_losses(run) -> set[str]:
    """The phases' losses logged in ``run``'s metrics, after checking every logged value of them is finite."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(k, v) for r in rows if r["split"] == "train" for k, v in r.items() if k.endswith("/loss")]
    assert losses and all(math.isfinite(v) for _, v in losses)
    return {k for k, _ in losses}


def fc_inputs(net):
    """The input of ``net``'s classifier ``fc`` on its next forward, by a hook of the test's own."""
    seen = {}
    handle = dict(net.named_modules())["fc"].register_forward_pre_hook(lambda m, a: seen.__setitem__("f", a[0]))
    return seen, handle


def bn_term(net, x):
    """DeepInversion's L_BN recomputed with hooks of the test's own: sum_l ||mu - mu_run|| + ||var - var_run||."""
    terms = []

    def hook(m, a):
        inp = a[0]
        mu, var = inp.mean((0, 2, 3)), inp.var((0, 2, 3), unbiased=False)
        terms.append((m.running_mean - mu).norm() + (m.running_var - var).norm())

    hs = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    out = net(x)
    for h in hs:
        h.remove()
    return out, sum(terms)


def kl_loop(s, t, tau=1.0):
    """KL(p_t || p_s) at ``tau``, sample by sample, batch mean."""
    out, s, t = 0.0, s.detach(), t.detach()
    for i in range(s.shape[0]):
        p, q = F.softmax(t[i] / tau, 0), F.softmax(s[i] / tau, 0)
        out += float((p * (p.log() - q.log())).sum())
    return out / s.shape[0]


@pytest.mark.parametrize("model", ["resnet8", "test_bncnn"])
def test_cpsc_generator_loss_matches_a_recomputation(tmp_path, teacher, model):
    t = Trainer(df_cfg(tmp_path, "g", "cpsc_dfkd", teacher, f"model.name={model}", *CPSC))
    m = t.method
    torch.manual_seed(3)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out = m.generator_terms(x, None, y, StepContext(step=0, max_steps=6, phase="generator"))

    seen_t, h1 = fc_inputs(m.teacher)
    seen_s, h2 = fc_inputs(m.student)
    tl, bn = bn_term(m.teacher, x)
    sl = m.student(x)
    h1.remove()
    h2.remove()
    f_s = seen_s["f"]
    if model == "test_bncnn":  # 8 student features to the teacher's 64 through the adapter
        assert m.adapter is not None and m.adapter[-1].out_features == seen_t["f"].shape[1]
        f_s = m.adapter(f_s)
    else:
        assert m.adapter is None
    views = torch.stack([F.normalize(f_s, dim=1), F.normalize(seen_t["f"], dim=1)], 1)
    kl = kl_loop(sl, tl)
    ikd = -float(F.mse_loss(sl, tl).detach())
    scl = supcon_loop(views.detach().double(), y, 0.07)
    ce_logits = float(F.cross_entropy(tl, y))
    want = -kl + 5 * ikd + 1 * float(bn) + 0.7 * scl + 0.7 * ce_logits
    assert abs(float(out["ce"].detach()) - ce_logits) < 1e-5
    assert abs(ce_logits - float(F.cross_entropy(F.softmax(tl, 1), y))) > 1e-2  # not the double softmax
    for key, value in (("kl", kl), ("ikd", ikd), ("bn", float(bn)), ("scl", scl)):
        assert abs(float(out[key].detach()) - value) < 1e-4 * max(1.0, abs(value)), key
    assert abs(float(out["loss"].detach()) - want) < 1e-4 * max(1.0, abs(want))
    # the adapter is trained by the generator's phase, not the student's
    gen, stu = (set(map(id, p.all_params())) for p in t.phases)
    assert m.adapter is None or all(id(p) in gen and id(p) not in stu for p in m.adapter.parameters())
    assert all(id(p) in gen for p in m.generator.parameters())


def test_cpsc_student_loss_matches_a_recomputation_with_ce_on_logits(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "s", "cpsc_dfkd", teacher, "method.ikd_log=true", *CPSC))
    m = t.method
    torch.manual_seed(4)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out = m.student_batch(x, y)
    with torch.no_grad():
        tl = m.teacher(x)
    with torch.no_grad():
        sl = m.student(x)
    ce = float(F.cross_entropy(sl, y))
    ikd = math.log(math.sqrt(float(((tl - sl) ** 2).sum())))
    want = kl_loop(sl, tl) + 5 * ikd + 0.7 * ce
    assert abs(float(out["ce"].detach()) - ce) < 1e-5 and abs(float(out["ikd"].detach()) - ikd) < 1e-5
    assert abs(float(out["loss"].detach()) - want) < 1e-4 * max(1.0, abs(want))
    assert abs(ce - float(F.cross_entropy(F.softmax(sl, 1), y))) > 1e-2


def test_cpsc_runs_through_the_engine_and_needs_a_conditional_generator(tmp_path, teacher):
    s = train(df_cfg(tmp_path, "run", "cpsc_dfkd", teacher, "trainer.max_steps=6", *CPSC))
    assert finite_losses(tmp_path / "run") == {"generator/loss", "student/loss"}
    assert s["images_synthesised"] == 2 * 16  # 2 student steps of 16 images
    assert set(s["phase_seconds"]) == {"generator", "student"}
    t = Trainer(df_cfg(tmp_path, "p", "cpsc_dfkd", teacher, "method.g_steps=6", "method.s_steps=5"))
    gen, stu = t.phases
    assert "".join("G" if gen.due(i) else "S" if stu.due(i) else "-" for i in range(22)) == "GGGGGGSSSSS" * 2
    with pytest.raises(ConfigError, match="conditional"):
        Trainer(df_cfg(tmp_path, "c", "cpsc_dfkd", teacher, "method.conditional=false"))


def test_cpsc_resumes_exactly(tmp_path, teacher):
    resumes_bitwise(lambda name: df_cfg(tmp_path, name, "cpsc_dfkd", teacher, "model.name=test_bncnn",
                                        "trainer.max_steps=7", "trainer.ckpt_every=3", *CPSC), stop_after=4)


# ------------------------------------------------------------------------------------------------ DFDG
def test_transferability_is_kl_student_to_teacher_on_teacher_right_student_wrong():
    tau = 2.0
    y = torch.tensor([0, 1, 2, 0])
    t = torch.tensor([[3.0, 0, 0], [0, 2, 1], [1, 0, 0], [0.5, 0, 2]], requires_grad=True)  # right, right, wrong, wrong
    s = torch.tensor([[0.0, 2, 1], [0, 3, 0], [2, 0, 1], [0, 1, 0]], requires_grad=True)    # wrong, right, wrong, wrong
    got, rate = transfer_kl(s, t, y, tau)
    p_s, p_t = F.softmax(s[0].detach() / tau, 0), F.softmax(t[0].detach() / tau, 0)  # only sample 0 is selected
    want = (p_s * (p_s.log() - p_t.log())).sum()
    reverse = (p_t * (p_t.log() - p_s.log())).sum()
    assert torch.isclose(got, want, atol=1e-6) and float(rate) == 0.25
    assert abs(float(want - reverse)) > 1e-3  # the direction is tested, not only the value
    got.backward()
    assert s.grad is None and t.grad is not None and t.grad[1:].abs().sum() == 0
    none, rate = transfer_kl(s, t, torch.tensor([1, 0, 1, 1]), tau)  # the teacher right nowhere the student is wrong
    assert float(none.detach()) == 0.0 and float(rate) == 0.0


def test_diversity_loss_matches_a_double_loop():
    torch.manual_seed(5)
    h, x = torch.randn(5, 7), torch.rand(5, 2, 3, 3) * 2 - 1
    total = 0.0
    for i in range(5):
        for j in range(5):
            total += float(((h[i] - h[j]) ** 2).mean()) * float(((x[i] - x[j]) ** 2).mean())
    assert abs(float(diversity_loss(h, x)) - math.exp(-total / 25)) < 1e-5


@pytest.mark.parametrize("same_label", [False, True])
def test_cross_divergence_matches_a_pairwise_recomputation(same_label):
    torch.manual_seed(6)
    tau = 3.0
    t, t_o = torch.randn(5, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    y, y_o = torch.tensor([0, 1, 2, 1, 3]), torch.tensor([1, 1, 0, 2, 2, 0])
    got = cross_divergence(t, t_o, y, y_o, tau, same_label)
    pairs = [(i, j) for i in range(5) for j in range(6) if not same_label or y[i] == y_o[j]]
    kls = [F.kl_div(F.log_softmax(t[i] / tau, 0), F.softmax(t_o[j] / tau, 0), reduction="sum") for i, j in pairs]
    assert len(pairs) == (30 if not same_label else 8)
    assert torch.isclose(got, torch.stack(kls).mean(), atol=1e-6)
    got.backward()
    assert t_o.grad is None and t.grad is not None
    assert float(cross_divergence(t, t_o, y, y_o + 9, tau, True).detach()) == 0.0  # no pair of one class


@pytest.mark.parametrize("size,channels,stages", [(32, 3, 3), (28, 1, 2), (8, 1, 1), (64, 3, 4)])
def test_ac_generator_adapts_the_reference_stack_to_the_image_shape(size, channels, stages):
    g = ACGenerator(100, 10, size, channels, ngf=8)
    convs = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == 1 + stages and convs[0].in_channels == 100 and convs[-1].out_channels == channels
    assert [c.out_channels for c in convs[:-1]] == [64 // 2 ** i for i in range(stages)]
    z, y = torch.randn(4, 100), torch.tensor([0, 3, 3, 9])
    x = g(z, y)
    assert x.shape == (4, channels, size, size) and x.abs().max() <= 1
    assert torch.equal(g.code(z, y), z * g.embedding.weight[y])


def test_dfdg_phases_alternate_two_generators_and_the_student(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "p", "dfdg", teacher))
    g1, g2, st = t.phases
    pattern = "".join("1" if g1.due(i) else "2" if g2.due(i) else "S" if st.due(i) else "-" for i in range(84))
    assert pattern == ("1" * 20 + "2" * 20 + "SS") * 2
    assert g1.fresh and g2.fresh and not st.fresh
    m = t.method
    assert {id(p) for p in g1.params} == {id(p) for p in m.generator.parameters()}
    assert {id(p) for p in g2.params} == {id(p) for p in m.generator2.parameters()}
    with pytest.raises(ConfigError, match="BN-statistics"):
        Trainer(df_cfg(tmp_path, "b", "dfdg", teacher, "method.bn=1"))


def test_dfdg_draws_one_batch_of_codes_per_iteration(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "z", "dfdg", teacher, "trainer.max_steps=10", *DFDG))
    m = t.method
    seen = []
    for step in range(10):
        t._train_step(step)
        seen.append((m.z1.clone(), m.y1.clone()))
        assert torch.equal(m.z1, m.z2) and torch.equal(m.y1, m.y2)  # no dual noise
    for a in (0, 5):
        assert all(torch.equal(seen[a][0], seen[a + k][0]) for k in range(5))
    assert not torch.equal(seen[0][0], seen[5][0]) and seen[0][0].std() > 0.5
    assert int(m.synthesised) == 2 * 2 * 16  # 2 student steps, each on both generators' 16 images


def test_dfdg_generator_and_student_losses_match_a_recomputation(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "r", "dfdg", teacher, "method.cd_same_label=true", *DFDG))
    m = t.method
    torch.manual_seed(7)
    with torch.no_grad():
        m.z1.normal_()
        m.y1.copy_(torch.randint(0, 10, (16,)))
        m.z2.normal_()
        m.y2.copy_(torch.randint(0, 10, (16,)))
        for g in (m.generator, m.generator2):  # running statistics away from their start
            g(torch.randn(16, 16), torch.randint(0, 10, (16,)))
    out = m.training_step({}, StepContext(step=1, max_steps=10, phase="gen2"))  # no redraw off step 0
    tau = 10.0

    def norm(o):
        return m.normalize((o + 1) / 2)

    with torch.no_grad():  # the recomputation: G2 in training mode, the student and G1 in eval mode
        o2 = m.generator2(m.z2, m.y2)
        tl = m.teacher(norm(o2))
        with evaluating(m.student, m.generator):
            sl = m.student(norm(o2))
            tl_o = m.teacher(norm(m.generator(m.z1, m.y1)))
        fid = float(F.cross_entropy(tl, m.y2))
        sel = [i for i in range(16) if tl[i].argmax() == m.y2[i] and sl[i].argmax() != m.y2[i]]
        tran = sum(float(F.kl_div(F.log_softmax(tl[i] / tau, 0), F.softmax(sl[i] / tau, 0), reduction="sum"))
                   for i in sel) / max(1, len(sel))
        h = m.z2 * m.generator2.embedding.weight[m.y2]
        div = float(diversity_loss(h, o2))
        pairs = [(i, j) for i in range(16) for j in range(16) if m.y2[i] == m.y1[j]]
        cd = sum(float(F.kl_div(F.log_softmax(tl[i] / tau, 0), F.softmax(tl_o[j] / tau, 0), reduction="sum"))
                 for i, j in pairs) / len(pairs)
    for key, value in (("fid", fid), ("tran", tran), ("div", div), ("cd", cd)):
        assert abs(float(out[key].detach()) - value) < 1e-4 * max(1.0, abs(value)), key
    assert abs(float(out["loss"].detach()) - (fid - tran + div - cd)) < 1e-4 * max(1.0, abs(fid))
    # the diversity is near 1 on small images: compare its exponent, mean_ij D_h D_x, to read which codes it took
    assert abs(math.log(float(out["div"].detach())) / math.log(div) - 1) < 1e-2
    assert m.student.training and m.generator.training  # modes restored after the step

    out = m.training_step({}, StepContext(step=4, max_steps=10, phase="student"))
    with torch.no_grad(), evaluating(m.generator, m.generator2):
        x1, x2 = norm(m.generator(m.z1, m.y1)), norm(m.generator2(m.z2, m.y2))
        t1, t2 = m.teacher(x1), m.teacher(x2)
    want = kl_loop(m.student(x1), t1, tau) + kl_loop(m.student(x2), t2, tau)
    assert abs(float(out["loss"].detach()) - tau * tau * want) < 1e-5 * max(1.0, tau * tau * want)
    m.cfg.tau_squared = False  # the reference's unscaled KL
    out = m.training_step({}, StepContext(step=4, max_steps=10, phase="student"))
    assert abs(float(out["loss"].detach()) - want) < 1e-5 * max(1.0, want)


def test_dfdg_runs_through_the_engine(tmp_path, teacher):
    s = train(df_cfg(tmp_path, "run", "dfdg", teacher, "trainer.max_steps=10", *DFDG))
    assert s["images_synthesised"] == 2 * 32  # 2 student steps on both generators' 16 images
    assert set(s["phase_seconds"]) == {"gen1", "gen2", "student"}
    assert finite_losses(tmp_path / "run") == {"gen1/loss", "gen2/loss", "student/loss"}
    t = Trainer(df_cfg(tmp_path, "run", "dfdg", teacher, "trainer.max_steps=10", *DFDG))
    t.load(tmp_path / "run" / "last.pt")
    grid = t.method.samples(6)
    assert grid.shape == (6, 1, 8, 8) and 0 <= float(grid.min()) and float(grid.max()) <= 1


def test_dfdg_resumes_exactly(tmp_path, teacher):
    # stopped mid-iteration (step 6 of iterations of 5): the iteration's codes and Adam's state carry over
    resumes_bitwise(lambda name: df_cfg(tmp_path, name, "dfdg", teacher, "trainer.max_steps=12",
                                        "trainer.ckpt_every=3", *DFDG), stop_after=6)
