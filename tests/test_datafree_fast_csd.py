"""Fast (meta-learned generator, FOMAML or REPTILE meta step) and CSD (synthesis against a rotation-by-class
head on the student, feature-aligned student, a head of its own): each term against an independent
computation, short engine runs and exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _datafree import df_cfg
from _helpers import resumes_bitwise

from mentor.datafree.csd import AlignHead, RotationHead, rotations
from mentor.datafree.fast import PRESETS
from mentor.engine import Trainer
from mentor.engine.trainer import train
from mentor.methods import StepContext

pytest.importorskip("sklearn")


@pytest.fixture
def teacher(digits_teacher):  # the session fixture of tests/conftest.py
    return digits_teacher


FAST = ["method.g_steps=3", "method.kd_steps=2", "method.warmup_rounds=0", "method.reset_l0=0"]
CSD = ["method.g_steps=2", "method.kd_steps=2", "method.warmup_rounds=0", "method.pool_size=200"]


def _params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------------------------------------ Fast
def test_fomaml_meta_step_is_adam_on_the_summed_inner_gradients(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "f", "fast", teacher, "trainer.max_steps=10", *FAST))
    m, g = t.method, 3
    meta0 = _params(m.meta_generator)
    summed = [torch.zeros_like(p) for p in meta0]
    starts = []
    synthesize = m.synthesize

    def record():
        if len(starts) < 2 * g:
            starts.append(_params(m.generator))
        return synthesize()

    m.synthesize = record
    for step in range(g):
        t._train_step(step)
        for acc, p in zip(summed, m.generator.parameters()):
            acc += p.grad  # the gradient the engine's inner step applied
    # the buffer holds the same sum, and the meta generator moved by one Adam step on it
    assert torch.allclose(m.meta_grad, torch.cat([s.flatten() for s in summed]), atol=1e-6)
    ref = [p.clone().requires_grad_(True) for p in meta0]
    adam = torch.optim.Adam(ref, lr=m.cfg.lr_g * g, betas=(m.cfg.beta1, 0.999))
    for p, s in zip(ref, summed):
        p.grad = s.clone()
    adam.step()
    for want, got in zip(ref, m.meta_generator.parameters()):
        assert torch.allclose(want, got, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(meta0, m.meta_generator.parameters()))
    # every round's fast generator starts from the meta generator: round 0 from the initial one, round 1
    # from the one the meta step gave
    for step in range(g, 5 + 1):
        t._train_step(step)
    for a, b in zip(starts[0], meta0):
        assert torch.equal(a, b)
    for a, b in zip(starts[g], m.meta_generator.parameters()):
        assert torch.equal(a, b)


def test_reptile_meta_gradient_is_the_scaled_difference_to_the_adapted_generator(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "r", "fast", teacher, "trainer.max_steps=10", "method.meta=reptile",
                       "method.reptile_scale=5", *FAST))
    m = t.method
    for step in range(2):
        t._train_step(step)
    before = _params(m.meta_generator)
    t._train_step(2)  # the last inner step, then the meta step
    fast = _params(m.generator)
    ref = [p.clone().requires_grad_(True) for p in before]
    adam = torch.optim.Adam(ref, lr=m.cfg.lr_g * 3, betas=(m.cfg.beta1, 0.999))
    for p, b, f, q in zip(ref, before, fast, m.meta_generator.parameters()):
        assert torch.allclose(q.grad, 5.0 * (b - f), atol=1e-7)
        p.grad = 5.0 * (b - f)
    adam.step()
    for want, got in zip(ref, m.meta_generator.parameters()):
        assert torch.allclose(want, got, atol=1e-7)
    assert float(m.meta_grad.abs().sum()) == 0.0  # REPTILE keeps no inner gradients


def test_fast_inner_loss_terms_and_the_adversarial_warmup(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "l", "fast", teacher, "trainer.max_steps=10", "method.augment=false",
                       "method.g_steps=3", "method.kd_steps=2", "method.warmup_rounds=1", "method.reset_l0=0"))
    m = t.method
    warm = m.training_step({}, StepContext(step=0, max_steps=10, phase="synthesis"))
    assert float(warm["adv"]) == 0.0  # no adversarial term while the pool is warming up
    with torch.no_grad():  # a student close to the teacher, so that some samples agree and count
        m.student.load_state_dict(m.teacher.state_dict())
        m.student.fc.weight.add_(0.02 * torch.randn_like(m.student.fc.weight))
    x = m.normalize(m.synthesize())
    with torch.no_grad():
        later = m.synthesis_terms(m.synthesize(), StepContext(step=5, max_steps=10, phase="synthesis"))
        tl = m.teacher(x)
        m.student.eval()
        sl = m.student(x)
        m.student.train()
    # the masked KL one sample at a time: only samples the student still classifies as the teacher count
    per = []
    for i in range(x.shape[0]):
        p_t, log_s = tl[i].softmax(0), sl[i].log_softmax(0)
        kl = (p_t * (tl[i].log_softmax(0) - log_s)).sum()
        per.append(kl if int(tl[i].argmax()) == int(sl[i].argmax()) else torch.zeros(()))
    assert any(bool(p > 0) for p in per)  # samples on which the two agree count
    assert torch.allclose(later["adv"], -torch.stack(per).mean(), atol=1e-5)
    ce = torch.stack([-tl[i].log_softmax(0)[m.y[i]] for i in range(x.shape[0])]).mean()
    assert torch.allclose(later["ce"], ce, atol=1e-5)
    want = m.cfg.bn * later["bn"] + m.cfg.oh * ce + m.cfg.adv * later["adv"]
    assert torch.allclose(later["loss"], want, atol=1e-5)


def test_reset_l0_reinitialises_the_meta_generators_first_layer_once(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "z", "fast", teacher, "trainer.max_steps=12", "method.g_steps=2",
                       "method.kd_steps=1", "method.warmup_rounds=0", "method.reset_l0=1"))
    m = t.method
    for step in range(3):
        t._train_step(step)
    conv = _params(m.meta_generator.c1)
    t._train_step(3)  # the first step of round 1
    l1 = m.meta_generator.l1
    assert torch.equal(l1.bias, torch.zeros_like(l1.bias)) and abs(float(l1.weight.detach().std()) - 0.02) < 0.005
    assert all(torch.equal(a, b) for a, b in zip(conv, m.meta_generator.c1.parameters()))  # only the first Linear
    for step in range(4, 7):
        t._train_step(step)
    assert not torch.equal(m.meta_generator.l1.bias, torch.zeros_like(l1.bias))  # meta-learned again, no reset


def test_fast_presets_are_the_scripts_step_counts_and_rates():
    assert PRESETS["fast2"] == {"g_steps": 2, "lr_g": 5e-3, "lr_z": 0.015}
    assert PRESETS["fast5"] == {"g_steps": 5, "lr_g": 3e-3, "lr_z": 0.01}
    assert PRESETS["fast10"] == {"g_steps": 10, "lr_g": 2e-3, "lr_z": 0.01}


def test_fast_runs_through_the_engine(tmp_path, teacher):
    s = train(df_cfg(tmp_path, "e", "fast", teacher, "trainer.max_steps=8", "method.g_steps=2",
                     "method.kd_steps=2", "method.warmup_rounds=1", "method.reset_l0=1"))
    assert s["images_synthesised"] == 32 and set(s["phase_seconds"]) == {"synthesis", "meta", "student"}
    assert 0.0 <= s["test_acc_last"] <= 1.0


def test_fast_resumes_exactly_mid_round(tmp_path, teacher):
    # stopped after the second inner step of round 1: the summed inner gradients are in the checkpoint
    resumes_bitwise(lambda name: df_cfg(tmp_path, name, "fast", teacher, "trainer.max_steps=12",
                                        "trainer.ckpt_every=3", *FAST), stop_after=6)


# ------------------------------------------------------------------------------------------------ CSD
def test_rotations_are_rot90_per_image_with_rotation_class_labels():
    x = torch.randn(3, 2, 5, 5)
    y = torch.tensor([0, 7, 2])
    xr, yr = rotations(x, y)
    assert xr.shape == (12, 2, 5, 5)
    for i in range(3):
        for k in range(4):
            assert torch.equal(xr[4 * i + k], torch.rot90(x[i], k, (1, 2)))
            assert int(yr[4 * i + k]) == 4 * int(y[i]) + k
    # a 90-degree turn moves the top-right corner to the top-left (counter-clockwise)
    assert torch.equal(xr[1, :, 0, 0], x[0, :, 0, -1])


def test_align_head_maps_student_maps_onto_the_teachers():
    same = AlignHead((2, 16, 4, 4), (2, 32, 4, 4))
    assert same.size is None and same(torch.randn(2, 16, 4, 4)).shape == (2, 32, 4, 4)
    pooled = AlignHead((2, 8, 8, 8), (2, 24, 2, 2))
    assert pooled.size == (2, 2) and pooled(torch.randn(3, 8, 8, 8)).shape == (3, 24, 2, 2)
    convs = [m for m in pooled.regressor if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(8, 48, (1, 1)), (48, 48, (3, 3)),
                                                                              (48, 24, (1, 1))]
    head = RotationHead(6, 10)
    assert head(torch.randn(5, 6)).shape == (5, 40)
    assert torch.allclose(head(torch.randn(5, 6)).norm(dim=1), torch.ones(5))


def _pooled(net, x):
    h = x
    for name in net.stage_names:
        h = getattr(net, name)(h)
    return net.pool(h), h


def test_csd_synthesis_term_is_the_heads_rotation_ce_and_the_step_raises_it(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "c", "csd", teacher, "trainer.max_steps=10", "method.augment=false",
                       "method.oh=0", "method.bn=0", "method.csd=1", "method.lr_g=0.05", *CSD))
    m = t.method
    out = m.training_step({}, StepContext(step=0, max_steps=10, phase="synthesis"))
    # the term recomputed image by image and rotation by rotation, the student in eval mode
    with torch.no_grad():
        x = m.normalize(m.synthesize())
        m.student.eval()
        ces = []
        for i in range(x.shape[0]):
            for k in range(4):
                f, _ = _pooled(m.student, torch.rot90(x[i:i + 1], k, (2, 3)))
                ces.append(F.cross_entropy(m.head(f), (4 * m.y[i] + k).view(1)))
        m.student.train()
    before = torch.stack(ces).mean()
    assert torch.allclose(out["csd"], before, atol=1e-5)
    assert torch.allclose(out["loss"], -before, atol=1e-5)
    out["loss"].backward()
    t.optimizers[0].step()
    with torch.no_grad():
        logits, yr = m.rotation_logits(m.normalize(m.synthesize()), m.y)
        after = F.cross_entropy(logits, yr)
    assert after > before  # the synthesiser makes images the head finds harder


def test_csd_student_loss_matches_a_recomputation(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "s", "csd", teacher, "trainer.max_steps=10", "method.augment=false",
                       "method.fea=3", *CSD))
    m = t.method
    x01, y = torch.rand(8, *m.shape), torch.randint(0, 10, (8,))
    state = copy.deepcopy(m.student.state_dict())
    out = m.student_terms(x01, y)
    m.student.load_state_dict(state)  # the same running statistics for the recomputation
    x = m.normalize(x01)
    with torch.no_grad():
        _, f_t = _pooled(m.teacher, x)
        t_logits = m.teacher(x)
        s_pool, f_s = _pooled(m.student, x)
        s_logits = m.student.fc(s_pool)
        T = m.cfg.temperature
        p_t = (t_logits / T).softmax(1)
        kd = T * T * (p_t * ((t_logits / T).log_softmax(1) - (s_logits / T).log_softmax(1))).sum(1).mean()
        ce = -s_logits.log_softmax(1)[torch.arange(8), y].mean()
        fea = ((m.align(f_s) - f_t) ** 2).mean()
    assert torch.allclose(out["kd"], kd, atol=1e-4) and torch.allclose(out["ce"], ce, atol=1e-5)
    assert torch.allclose(out["fea"], fea, atol=1e-5)
    assert torch.allclose(out["loss"], kd + ce + 3 * fea, atol=1e-4)
    # the align head trains with the student, in the student's phase
    student_phase = t.phases[1]
    assert student_phase.name == "student" and all(any(p is q for q in student_phase.params)
                                                   for p in m.align.parameters())


def test_csd_head_step_learns_on_detached_features_and_restarts_each_round(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "h", "csd", teacher, "trainer.max_steps=10", "method.augment=false",
                       *CSD))
    m = t.method
    head = t.phases[2]
    assert (head.name, head.every, head.offset, head.span, head.fresh) == ("head", 4, 2, 2, True)
    assert [s for s in range(12) if head.due(s)] == [s for s in range(12) if t.phases[1].due(s)]
    x01, y = torch.rand(6, *m.shape), torch.randint(0, 10, (6,))
    m.student_terms(x01, y)
    m.student.zero_grad(set_to_none=True)
    out = m.training_step({}, StepContext(step=2, max_steps=10, phase="head"))  # the round's first head step
    assert torch.equal(m.head.fc1.bias, torch.zeros_like(m.head.fc1.bias))  # re-initialised: N(0, 0.02), 0
    assert abs(float(m.head.fc1.weight.detach().std()) - 0.02) < 0.01
    with torch.no_grad():
        m.student.eval()
        f, _ = _pooled(m.student, rotations(m.normalize(x01), y)[0])
        m.student.train()
        want = F.cross_entropy(m.head(f), rotations(x01, y)[1])
    assert torch.allclose(out["loss"], want, atol=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in m.student.parameters())  # the student's features are detached
    assert all(p.grad is not None for p in m.head.parameters())


def test_csd_warmup_rounds_fill_the_pool_without_the_csd_term(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "w", "csd", teacher, "trainer.max_steps=10", "method.g_steps=2",
                       "method.kd_steps=2", "method.warmup_rounds=1"))
    m = t.method
    out = m.training_step({}, StepContext(step=0, max_steps=10, phase="synthesis"))
    assert float(out["csd"]) == 0.0
    assert [p.offset for p in t.phases] == [0, 6, 6]  # student and head start after the warm-up round


def test_csd_runs_through_the_engine(tmp_path, teacher):
    s = train(df_cfg(tmp_path, "e", "csd", teacher, "trainer.max_steps=8", *CSD[:2],
                     "method.warmup_rounds=1", "method.pool_size=200"))
    assert s["images_synthesised"] == 32 and set(s["phase_seconds"]) == {"synthesis", "student", "head"}
    assert 0.0 <= s["test_acc_last"] <= 1.0


def test_csd_resumes_exactly_mid_round(tmp_path, teacher):
    # stopped at the first student step of round 1: the head's reset, the align head's BN and the pool carry over
    resumes_bitwise(lambda name: df_cfg(tmp_path, name, "csd", teacher, "trainer.max_steps=12",
                                        "trainer.ckpt_every=3", *CSD), stop_after=6)
