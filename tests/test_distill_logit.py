"""Logit distillation: KD, logit matching, DKD and RLD losses against independent computations, and
the kd / dkd / rld methods trained, resumed and evaluated on a Fashion-MNIST subset."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FMNIST_SMALL, split_accuracy

import mentor.distill.dkd
import mentor.distill.kd
import mentor.distill.rld  # noqa: F401  (registers kd, dkd, rld)
from mentor.config import load_config
from mentor.distill import TeacherError
from mentor.distill.dkd import warmup_factor
from mentor.distill.losses.logit import dkd_loss, kd_loss, logit_mse_loss, rld_loss
from mentor.engine import Trainer
from mentor.methods import StepContext

# -- an independent reference: plain Python per sample ----------------------------------------------


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def rows(x):
    return x.double().tolist()


def ref_kd(zs, zt, T):
    out = [T * T * kl(softmax([v / T for v in t]), softmax([v / T for v in s])) for s, t in zip(rows(zs), rows(zt))]
    return sum(out) / len(out)


def ref_dkd_terms(s, t, y, T):
    """(tckd, nckd, p^T_y) of one sample."""
    ps, pt = softmax([v / T for v in s]), softmax([v / T for v in t])
    tckd = T * T * kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    keep = [c for c in range(len(s)) if c != y]
    nckd = T * T * kl(softmax([t[c] / T for c in keep]), softmax([s[c] / T for c in keep]))
    return tckd, nckd, pt[y]


def ref_dkd(zs, zt, y, alpha, beta, T):
    terms = [ref_dkd_terms(s, t, c, T) for s, t, c in zip(rows(zs), rows(zt), y.tolist())]
    tckd = sum(a for a, _, _ in terms) / len(terms)
    nckd = sum(b for _, b, _ in terms) / len(terms)
    return tckd, nckd, alpha * tckd + beta * nckd


def ref_rld(zs, zt, y, alpha, beta, T, Ta):
    scd = mcd = 0.0
    for s, t, c in zip(rows(zs), rows(zt), y.tolist()):
        ps, pt = softmax([v / Ta for v in s]), softmax([v / Ta for v in t])
        top = max(range(len(t)), key=lambda k: t[k])
        scd += Ta * Ta * kl([pt[top], 1 - pt[top]], [ps[c], 1 - ps[c]])
        keep = [k for k in range(len(t)) if t[k] < t[c]]  # classes the teacher ranks below the label
        if keep:
            mcd += T * T * kl(softmax([t[k] / T for k in keep]), softmax([s[k] / T for k in keep]))
    n = len(y)
    return scd / n, mcd / n, alpha * scd / n + beta * mcd / n


def random_logits(b=12, c=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return zs, zt, y


# -- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_matches_per_sample_loop(T):
    zs, zt, _ = random_logits()
    assert kd_loss(zs, zt, T).item() == pytest.approx(ref_kd(zs, zt, T), rel=1e-5)


@pytest.mark.parametrize("T,alpha,beta", [(1.0, 1.0, 8.0), (4.0, 0.5, 2.0)])
def test_dkd_loss_matches_per_sample_loop(T, alpha, beta):
    zs, zt, y = random_logits()
    zt[0, y[0]] = 5000.0  # a target logit / T more than 1000 above the rest: still removed exactly
    got = dkd_loss(zs, zt, y, alpha=alpha, beta=beta, temperature=T)
    want = ref_dkd(zs, zt, y, alpha, beta, T)
    for g, w in zip((got.tckd, got.nckd, got.loss), want):
        assert g.item() == pytest.approx(w, rel=1e-9)


@pytest.mark.parametrize("T,Ta", [(4.0, 1.0), (2.0, 3.0)])
def test_rld_loss_matches_per_sample_loop(T, Ta):
    zs, zt, y = random_logits(b=16)
    zt[0] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    y[0] = 5  # the teacher ranks the label last: no class is left for MCD
    zt[1] = torch.tensor([2.0, 2.0, 1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    y[1] = 1  # a tie with the label is removed too
    got = rld_loss(zs, zt, y, alpha=0.7, beta=3.0, temperature=T, scd_temperature=Ta)
    want = ref_rld(zs, zt, y, 0.7, 3.0, T, Ta)
    assert (zt.argmax(1) != y).any() and (zt.argmax(1) == y).any()  # both cases are exercised
    for g, w in zip((got.scd, got.mcd, got.loss), want):
        assert g.item() == pytest.approx(w, rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_is_tckd_plus_weighted_nckd(T):
    # The DKD paper's decomposition, per sample: T^2 KL = TCKD + (1 - p^T_t) NCKD, every term at the
    # same T and each scaled by T^2 (NCKD unscaled by beta). The weight is per sample: one at a time.
    zs, zt, y = random_logits(b=6)
    for i in range(len(y)):
        s, t, c = zs[i:i + 1], zt[i:i + 1], y[i:i + 1]
        d = dkd_loss(s, t, c, alpha=1.0, beta=1.0, temperature=T)
        p_t = math.exp(t[0, c.item()].item() / T) / sum(math.exp(v / T) for v in t[0].tolist())
        assert kd_loss(s, t, T).item() == pytest.approx(d.tckd.item() + (1 - p_t) * d.nckd.item(), rel=1e-5)


def test_rld_equals_dkd_when_the_teacher_is_right():
    zs, zt, _ = random_logits(b=10)
    y = zt.argmax(1)  # the teacher's top class is the label on every sample
    for T in (1.0, 4.0):
        r = rld_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=T, scd_temperature=T)
        d = dkd_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=T)
        assert r.scd.item() == pytest.approx(d.tckd.item(), rel=1e-12)
        assert r.mcd.item() == pytest.approx(d.nckd.item(), rel=1e-12)
        assert r.loss.item() == pytest.approx(d.loss.item(), rel=1e-12)
    # with the default SCD temperature (1) RLD's first term differs from TCKD at T = 4
    assert rld_loss(zs, zt, y).scd.item() != pytest.approx(dkd_loss(zs, zt, y).tckd.item(), rel=1e-3)


def test_hand_worked_dkd_and_rld():
    # DKD, T = 1, 3 classes, label 0. Student logits 0 -> p_s = (1/3, 1/3, 1/3).
    # Teacher logits (ln 4, ln 2, 0) -> p_t = (4/7, 2/7, 1/7).
    # TCKD = 4/7 ln((4/7)/(1/3)) + 3/7 ln((3/7)/(2/3)) = 4/7 ln(12/7) + 3/7 ln(9/14)
    #      = 4/7 * 0.5389965 + 3/7 * (-0.4418328) = 0.3079980 - 0.1893569 = 0.1186411
    # NCKD over classes {1, 2}: teacher (2/3, 1/3), student (1/2, 1/2)
    #      = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.1917880 - 0.1351550 = 0.0566330
    # loss (alpha 1, beta 8) = 0.1186411 + 8 * 0.0566330 = 0.5717051
    # KD = 4/7 ln(12/7) + 2/7 ln(6/7) + 1/7 ln(3/7) = 0.3079980 - 0.0440431 - 0.1210426 = 0.1429123
    #    = TCKD + (1 - 4/7) NCKD = 0.1186411 + 0.0242713
    zs = torch.zeros(1, 3, dtype=torch.float64)
    zt = torch.tensor([[math.log(4), math.log(2), 0.0]], dtype=torch.float64)
    d = dkd_loss(zs, zt, torch.tensor([0]), alpha=1.0, beta=8.0, temperature=1.0)
    assert d.tckd.item() == pytest.approx(0.1186411, abs=2e-7)
    assert d.nckd.item() == pytest.approx(0.0566330, abs=2e-7)
    assert d.loss.item() == pytest.approx(0.5717051, abs=2e-6)
    assert kd_loss(zs, zt, 1.0).item() == pytest.approx(0.1429123, abs=2e-7)

    # RLD, T = Ta = 1, 4 classes, label 1, a WRONG teacher: logits (ln 6, ln 3, ln 2, 0) ->
    # p_t = (1/2, 1/4, 1/6, 1/12), top class 0. Student logits 0 -> p_s = 1/4 each.
    # SCD = KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410
    # MCD removes {0, 1} (teacher logit >= the label's); on {2, 3}: teacher (2/3, 1/3), student
    #     (1/2, 1/2) -> 0.0566330 as above. loss (1, 8) = 0.1438410 + 0.4530640 = 0.5969050
    zs = torch.zeros(1, 4, dtype=torch.float64)
    zt = torch.tensor([[math.log(6), math.log(3), math.log(2), 0.0]], dtype=torch.float64)
    r = rld_loss(zs, zt, torch.tensor([1]), alpha=1.0, beta=8.0, temperature=1.0, scd_temperature=1.0)
    assert r.scd.item() == pytest.approx(0.1438410, abs=2e-7)
    assert r.mcd.item() == pytest.approx(0.0566330, abs=2e-7)
    assert r.loss.item() == pytest.approx(0.5969050, abs=2e-6)


def test_logit_mse_and_the_high_temperature_limit_of_kd():
    zs, zt, _ = random_logits(b=32, c=10, scale=1.0)
    want = sum(0.5 * (a - b) ** 2 for s, t in zip(rows(zs), rows(zt)) for a, b in zip(s, t)) / zs.numel()
    assert logit_mse_loss(zs, zt).item() == pytest.approx(want, rel=1e-12)
    # T^2 KL -> mean_c (d_c - mean d)^2 / 2 with d = z_s - z_t (Hinton 2015, Sec. 2.1): the same as
    # logit matching when the two logit vectors have equal means, a centred version otherwise.
    d = zs - zt
    centred = 0.5 * ((d - d.mean(1, keepdim=True)) ** 2).mean().item()
    assert kd_loss(zs, zt, 20.0).item() == pytest.approx(centred, rel=1e-2)
    # KD ignores a per-sample shift of the logits; raw logit matching does not (the "extra
    # regularisation" of Chen 2021 is this mean term)
    shifted = zs + 2.0
    assert kd_loss(shifted, zt, 20.0).item() == pytest.approx(centred, rel=1e-2)
    assert logit_mse_loss(shifted, zt).item() > centred + 1.5
    equal_mean = zs - zs.mean(1, keepdim=True) + zt.mean(1, keepdim=True)
    assert kd_loss(equal_mean, zt, 20.0).item() == pytest.approx(logit_mse_loss(equal_mean, zt).item(), rel=1e-2)


def test_kd_with_ce_is_label_smoothing_with_the_teacher_distribution():
    # At T = 1: a CE(y) + b KL(p_t || p_s) = (a + b) CE(q) - b H(p_t), q = (a onehot + b p_t) / (a + b).
    zs, zt, y = random_logits(b=8, c=5, scale=2.0)
    a, b = 0.3, 0.7
    lhs = a * F.cross_entropy(zs, y) + b * kd_loss(zs, zt, 1.0)
    rhs = 0.0
    for s, t, c in zip(rows(zs), rows(zt), y.tolist()):
        ps, pt = softmax(s), softmax(t)
        q = [(a * (k == c) + b * pt[k]) / (a + b) for k in range(len(s))]
        rhs += (a + b) * -sum(qk * math.log(pk) for qk, pk in zip(q, ps)) + b * sum(p * math.log(p) for p in pt)
    assert lhs.item() == pytest.approx(rhs / len(y), rel=1e-5)
    # a uniform teacher is label smoothing of strength b / (a + b) (up to the constant b ln C)
    uniform = torch.zeros_like(zt)
    lhs = a * F.cross_entropy(zs, y) + b * kd_loss(zs, uniform, 1.0)
    ls = (a + b) * F.cross_entropy(zs, y, label_smoothing=b / (a + b)) - b * math.log(zs.shape[1])
    assert lhs.item() == pytest.approx(ls.item(), rel=1e-5)


def test_gradients_reach_the_student_logits_only_and_are_exact():
    zs, zt, y = random_logits(b=5, c=4)
    zs.requires_grad_(True)
    T = 4.0
    # Hinton 2015, Eq. 2 times T^2 and 1/B: d(T^2 KL)/dz_s = T (p_s - p_t) / B
    (g,) = torch.autograd.grad(kd_loss(zs, zt, T), zs)
    want = [[T * (a - b) / len(y) for a, b in zip(softmax([v / T for v in s]), softmax([v / T for v in t]))]
            for s, t in zip(rows(zs.detach()), rows(zt))]
    assert torch.allclose(g.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # NCKD never sees the label class: its gradient there is exactly 0, elsewhere not
    (g,) = torch.autograd.grad(dkd_loss(zs, zt, y).nckd, zs)
    gt = F.one_hot(y, 4).bool()
    assert (g[gt] == 0).all() and (g[~gt] != 0).all()
    # a row whose label the teacher ranks last keeps no MCD class: zero (not NaN) gradient
    zt2 = zt.clone()
    zt2[0] = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    y2 = y.clone()
    y2[0] = 3
    (g,) = torch.autograd.grad(rld_loss(zs, zt2, y2).mcd, zs)
    assert torch.isfinite(g).all() and (g[0] == 0).all() and (g[1:] != 0).any()
    # the losses never detach the teacher themselves (online methods may train both sides); the
    # methods pass teacher logits computed without gradient
    teacher = zt.clone().requires_grad_(True)
    for loss in (kd_loss(zs, teacher), dkd_loss(zs, teacher, y).loss, rld_loss(zs, teacher, y).loss):
        assert loss.requires_grad


@pytest.mark.parametrize("fn", ["kd", "mse", "dkd", "rld"])
def test_bf16_inputs_give_float32_losses_close_to_float32(fn):
    zs, zt, y = random_logits(b=16, c=10, scale=2.0)
    zs, zt = zs.float(), zt.float()
    call = {"kd": lambda a, b: kd_loss(a, b), "mse": logit_mse_loss,
            "dkd": lambda a, b: dkd_loss(a, b, y).loss, "rld": lambda a, b: rld_loss(a, b, y).loss}[fn]
    low = call(zs.bfloat16(), zt.bfloat16())
    assert low.dtype == torch.float32
    # exact up to float32 rounding on the bf16-rounded inputs, and close to the float32 inputs
    assert low.item() == pytest.approx(call(zs.bfloat16().float(), zt.bfloat16().float()).item(), rel=1e-5)
    assert low.item() == pytest.approx(call(zs, zt).item(), rel=3e-2)


def test_warmup_factor_ramps_per_step_and_matches_the_reference_at_epoch_ends():
    spe, W = 10, 4

    def f(step):
        return warmup_factor(StepContext(step=step, max_steps=100, steps_per_epoch=spe), W)

    assert f(0) == pytest.approx(1 / 40)
    for epoch in range(1, W + 1):  # reference: min(epoch / W, 1), epochs from 1, at the epoch's last step
        assert f(epoch * spe - 1) == pytest.approx(min(epoch / W, 1.0))
    assert f(W * spe) == 1.0 and f(1000) == 1.0
    assert warmup_factor(StepContext(step=0, max_steps=1, steps_per_epoch=spe), 0) == 1.0


# -- methods on Fashion-MNIST ------------------------------------------------------------------------


def _train_events(run):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["split"] == "train"]


@pytest.fixture(scope="module")
def small_splits():
    """The distillation subset with a 1000-image test split (the full 10k dominates a CPU run)."""
    from mentor.engine.inputs import load_splits

    splits = load_splits(load_config(None, FMNIST_SMALL).data)
    return dataclasses.replace(splits, test=splits.test.subset(torch.arange(1000)))


METHODS = [
    ("kd", [], {"ce", "kd"}),
    ("dkd", ["method.warmup_epochs=0"], {"ce", "kd", "tckd", "nckd"}),
    ("rld", ["method.warmup_epochs=0"], {"ce", "kd", "scd", "mcd"}),
]


def _check_trained_resumed_run(resumed, summary, run, method, terms, steps, splits):
    assert summary["method"] == method and summary["steps"] == steps[-1]
    events = _train_events(run)
    assert [e["step"] for e in events] == steps
    assert terms <= set(events[0])
    first = sum(e["loss"] for e in events[:2]) / 2
    last = sum(e["loss"] for e in events[-2:]) / 2
    assert last < first, [e["loss"] for e in events]
    # the reported number is the final student's accuracy on the test split
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(resumed.method.deployable(), splits.test,
                                                                    splits.train), abs=1 / len(splits.test) + 1e-9)
    teacher = list(resumed.method.teacher.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher)  # only the student learns
    # the checkpoint keeps what training changes; the frozen teacher reloads from its own run
    saved = torch.load(run / "last.pt", weights_only=True)["method"]
    assert saved and not any(k.startswith("teacher.") for k in saved)
    assert any(p.grad is not None for p in resumed.method.student.parameters())


@pytest.mark.parametrize("method,extra,terms", METHODS)
def test_method_trains_resumes_and_evaluates_on_tiny_data(method, extra, terms, fast_teachers, fmnist_tiny,
                                                          tmp_path):
    # 4 steps, then the same recipe with 8 steps resumes from the checkpoint at step 4; 256 training
    # images seen twice, 64 validation and 64 test images
    base = [f"out_dir={tmp_path / 'student'}", *FMNIST_SMALL, "model.name=resnet8", f"method.name={method}",
            f"method.teacher={fast_teachers[0]}", *extra, "data.batch_size=32", "trainer.log_every=2",
            "trainer.eval_every=4", "trainer.ckpt_every=4"]
    Trainer(load_config(None, [*base, "trainer.max_steps=4"]), splits=fmnist_tiny).fit()
    resumed = Trainer(load_config(None, [*base, "trainer.max_steps=8"]), splits=fmnist_tiny)
    summary = resumed.fit()
    assert resumed.start_step == 4
    _check_trained_resumed_run(resumed, summary, tmp_path / "student", method, terms, [2, 4, 6, 8], fmnist_tiny)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,terms", METHODS)
def test_method_trains_resumes_and_evaluates(method, extra, terms, fmnist_teachers, distill_overrides,
                                             small_splits, tmp_path):
    # 50 steps, then the same recipe with 100 steps resumes from the checkpoint at step 50, with a
    # trained teacher: the student learns well above chance (0.1). DKD's and RLD's eightfold weight on
    # the non-target term slows the start: about 0.3 after 100 steps, where KD's student reaches 0.55.
    base = [*distill_overrides, f"method.name={method}", f"method.teacher={fmnist_teachers[0]}", *extra,
            "data.batch_size=32", "trainer.log_every=25", "trainer.eval_every=50", "trainer.ckpt_every=50"]
    Trainer(load_config(None, [*base, "trainer.max_steps=50"]), splits=small_splits).fit()
    resumed = Trainer(load_config(None, [*base, "trainer.max_steps=100"]), splits=small_splits)
    summary = resumed.fit()
    assert resumed.start_step == 50
    _check_trained_resumed_run(resumed, summary, tmp_path / "student", method, terms, [25, 50, 75, 100],
                               small_splits)
    assert summary["test_acc_last"] > 0.25, summary["test_acc_last"]


@pytest.mark.parametrize("method,a,b", [("dkd", "tckd", "nckd"), ("rld", "scd", "mcd")])
def test_warmup_scales_the_distillation_terms_in_training_step(method, a, b, fast_teachers):
    from mentor.methods import BuildInfo, create_method
    from mentor.models import create_model

    torch.manual_seed(0)
    info = BuildInfo(num_classes=10, in_channels=1, image_size=28, steps_per_epoch=10)
    m = create_method(method, create_model("resnet8", num_classes=10, in_channels=1), info,
                      teacher=fast_teachers[0], alpha=0.5, beta=2.0, warmup_epochs=2)
    batch = {"x": torch.randn(6, 1, 28, 28), "y": torch.arange(6)}
    for step, factor in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        out = m.training_step(batch, StepContext(step=step, max_steps=100, steps_per_epoch=10))
        want = factor * (0.5 * out[a] + 2.0 * out[b])
        assert out["kd"].item() == pytest.approx(want.item(), rel=1e-6)
        assert out["loss"].item() == pytest.approx((out["ce"] + out["kd"]).item(), rel=1e-6)  # CE weight 1


def test_teacher_for_other_data_is_a_clear_error(tmp_path, distill_overrides, fmnist_tiny):
    pytest.importorskip("sklearn")
    from mentor.engine import train

    digits = tmp_path / "digits_teacher"
    train(load_config(None, [f"out_dir={digits}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
                             "model.name=resnet8", "trainer.max_steps=2", "trainer.eval_every=2",
                             "trainer.ckpt_every=2", "trainer.progress=false"]))
    cfg = load_config(None, [*distill_overrides, "method.name=kd", f"method.teacher={digits}"])
    with pytest.raises(TeacherError, match="image size") as e:
        Trainer(cfg, splits=fmnist_tiny)
    assert "8" in str(e.value) and "28" in str(e.value)
