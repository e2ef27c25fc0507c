"""DFKD-FGVC: the attention generator's spatial attention, the mixed high-order attention and its
distillation loss, the teacher-anchored contrast, the generator's sign, a short run and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _datafree import df_cfg
from _helpers import resumes_bitwise
from _nosync import NoHostSync

from mentor.config import ConfigError
from mentor.datafree.fgvc import (
    AttentionGenerator,
    MixedHighOrderAttention,
    SpatialAttention,
    frozen_spectral_norm,
    mhad_loss,
    teacher_anchored_infonce,
)
from mentor.engine import Trainer
from mentor.engine.trainer import train
from mentor.methods import StepContext

pytest.importorskip("sklearn")

FGVC = ["method.g_steps=2", "method.s_steps=2", "method.proj_hidden=32", "method.proj_dim=16"]


# --------------------------------------------------------------------------------- spatial attention
def test_spatial_attention_keeps_the_shape_and_lambda_zero_is_the_identity():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 7, 7)  # odd size: the max-unpool puts values back at 7x7
    sam = SpatialAttention(16, reduction=4, lam=0.0)
    assert sam.attention(x).shape == x.shape
    assert torch.equal(sam(x), x)


def test_spatial_attention_blends_a_per_channel_softmax_over_positions():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 4, 5)
    sam = SpatialAttention(8, reduction=2, lam=0.05)
    a = sam.attention(x)
    expect = torch.empty_like(x)
    for n in range(2):
        for c in range(8):
            e = torch.exp(a[n, c] - a[n, c].max())
            expect[n, c] = x[n, c] + 0.05 * (e / e.sum() * 20) * x[n, c]
    assert torch.allclose(sam(x), expect, atol=1e-5)
    w = sam.weights(x)
    assert (w > 0).all() and torch.allclose(w.mean((2, 3)), torch.ones(2, 8), atol=1e-5)


@pytest.mark.parametrize("size,channels,start", [(28, 1, 7), (8, 1, 2), (224, 3, 14)])
def test_attention_generator_makes_the_teachers_image_size_in_0_1(size, channels, start):
    torch.manual_seed(0)
    g = AttentionGenerator(nz=8, ngf=4, size=size, channels=channels)
    x = g(torch.randn(2, 8))
    assert x.shape == (2, channels, size, size) and x.min() >= 0 and x.max() <= 1
    assert g.init_size == start
    assert g.widths == ((8, 4, 4) if size < 64 else (32, 16, 8, 4, 4))  # 224 px: the paper's 8-4-2-1-1 x ngf


def test_samples_do_not_move_the_spectral_norm_estimate():
    g = AttentionGenerator(nz=8, ngf=4, size=8, channels=1)
    u = g.ups[0].parametrizations.weight[0]._u
    before = u.clone()
    with torch.no_grad(), frozen_spectral_norm(g):
        g(torch.randn(2, 8))
    assert torch.equal(u, before) and g.ups[0].parametrizations.weight[0].training
    with torch.no_grad():
        g(torch.randn(2, 8))  # a training forward takes a power-iteration step
    assert not torch.equal(u, before)


# --------------------------------------------------------------------------------- MHA, MHAD, SFCL
def naive_mha(m: MixedHighOrderAttention, x: torch.Tensor) -> torch.Tensor:
    """The attended map position by position and order by order."""
    out = torch.empty_like(x)
    n_, c_, h_, w_ = x.shape
    for n in range(n_):
        xn = x[n] / math.sqrt(float((x[n] ** 2).mean()) + 1e-6)
        for i in range(h_):
            for j in range(w_):
                v = xn[:, i, j]
                logit = torch.zeros(c_)
                for r in range(m.order):
                    prod = torch.ones(m.alpha.shape[2])
                    for k in range(r + 1):
                        prod = prod * (m.factors[r, k] @ v)
                    logit = logit + m.alpha[r] @ prod
                out[n, :, i, j] = x[n, :, i, j] / (1 + torch.exp(-logit))
    return out


def test_mixed_high_order_attention_matches_a_loop_over_samples_positions_and_orders():
    torch.manual_seed(2)
    m = MixedHighOrderAttention(5, order=3, rank=4)
    x = torch.randn(2, 5, 3, 4).relu() * 3
    assert torch.allclose(m(x), naive_mha(m, x), atol=1e-5)
    # factors a lower order does not use are zero; the buffers are saved with the method
    assert torch.equal(m.factors[0, 1:], torch.zeros_like(m.factors[0, 1:]))
    assert set(m.state_dict()) == {"factors", "alpha"}
    # the gate reads the map's shape, not its scale
    assert torch.allclose(m(5 * x), 5 * m(x), atol=1e-4)


def test_mhad_loss_matches_the_per_sample_per_channel_recomputation():
    torch.manual_seed(3)
    mha = torch.nn.ModuleList([MixedHighOrderAttention(4, 3), MixedHighOrderAttention(6, 3)])
    t = [torch.randn(3, 4, 4, 4).relu(), torch.randn(3, 6, 2, 2).relu()]
    s = [torch.randn(3, 4, 4, 4), torch.randn(3, 6, 2, 2)]
    expect = 0.0
    for m, a, b in zip(mha, t, s):
        at, bs = naive_mha(m, a), naive_mha(m, b)
        n, c = a.shape[:2]
        expect += sum(float(((at[i, j] - bs[i, j]) ** 2).mean()) for i in range(n) for j in range(c)) / (n * c)
    assert abs(float(mhad_loss(mha, t, s)) - expect) < 1e-5
    assert float(mhad_loss(mha, t, t)) == 0.0


def test_sfcl_matches_a_loop_over_teacher_anchors():
    torch.manual_seed(4)
    zt, zs, tau = torch.randn(5, 7), torch.randn(5, 7), 0.5
    feats = [v / v.norm() for v in [*zt, *zs]]
    total = 0.0
    for i in range(5):
        a = feats[i]
        logits = {k: float(a @ feats[k]) / tau for k in range(10) if k != i}
        total += -(logits[5 + i] - math.log(sum(math.exp(v) for v in logits.values())))
    assert abs(float(teacher_anchored_infonce(zt, zs, tau)) - total / 5) < 1e-5
    # student features equal to the teacher's, far apart between images: the loss is near its floor
    e = torch.eye(5, 7) * 10
    assert float(teacher_anchored_infonce(e, e, 0.1)) < 1e-3


# --------------------------------------------------------------------------------- the method
@pytest.fixture
def teacher(digits_teacher):  # the session fixture of tests/conftest.py
    return digits_teacher


def test_generator_step_maximises_kd_and_pays_alpha_bn(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "g", "dfkd_fgvc", teacher, *FGVC, "trainer.max_steps=4"))
    m = t.method
    assert m.cfg.bn == 0.3 and m.cfg.adv == 1.0 and (m.cfg.mhad, m.cfg.sfcl) == (10.0, 8.0)
    assert m.phase_adam()["betas"] == (0.5, 0.99)
    ctx = StepContext(step=0, max_steps=4, phase="generator")
    torch.manual_seed(0)
    with NoHostSync():
        out = m.training_step({}, ctx)
    assert torch.allclose(out["loss"], 0.3 * out["bn"] - out["kd"])
    # a small gradient step on the generator alone raises the KL it is scored on (bn off)
    m.cfg.bn = 0.0
    z = torch.randn(16, m.cfg.nz)
    kd = lambda: float(m.generator_terms(m.net_view(m.generator(z)), z, None, ctx)["kd"].detach())  # noqa: E731
    with frozen_spectral_norm(m.generator):
        before = kd()
        m.generator.zero_grad()
        m.generator_terms(m.net_view(m.generator(z)), z, None, ctx)["loss"].backward()
        with torch.no_grad():
            for p in m.generator.parameters():
                p -= 1e-3 * p.grad
        assert kd() > before


def test_student_step_has_the_papers_terms_and_trains_adapters_and_projectors(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "s", "dfkd_fgvc", teacher, *FGVC, "trainer.max_steps=4"))
    m = t.method
    assert m.t_names == m.s_names == ["layer1", "layer2", "layer3"]
    with NoHostSync():
        out = m.training_step({}, StepContext(step=2, max_steps=4, phase="student"))
    assert set(out) == {"loss", "kd", "mhad", "sfcl", "agree"}
    assert torch.allclose(out["loss"], out["kd"] + 10 * out["mhad"] + 8 * out["sfcl"])
    student = {id(p) for p in t.phases[1].all_params()}
    for part in (m.adapters, m.proj_t, m.proj_s, m.student):
        assert all(id(p) in student for p in part.parameters())
    assert not any(id(p) in student for p in m.generator.parameters())
    assert not any(id(p) in student for p in m.teacher.parameters())
    # a grid of samples leaves the trained state as it was: BN statistics and spectral-norm vectors (BN's
    # num_batches_tracked counts the forward, as in every generative method; no layer here reads it)
    state = {k: v.clone() for k, v in m.trained_state().items() if not k.endswith("num_batches_tracked")}
    grid = m.samples(12)
    assert grid.shape == (12, 1, 8, 8) and 0 <= grid.min() and grid.max() <= 1
    assert all(torch.equal(v, m.trained_state()[k]) for k, v in state.items())


def test_a_short_run_synthesises_images_and_resumes_exactly(tmp_path, teacher):
    s = train(df_cfg(tmp_path, "run", "dfkd_fgvc", teacher, *FGVC, "trainer.max_steps=8"))
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r[k] for r in logs for k in ("generator/loss", "student/loss") if k in r]
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses)
    assert s["images_synthesised"] == 4 * 16 and set(s["phase_seconds"]) == {"generator", "student"}
    # stopped in the middle of a generator window: Adam, spectral-norm vectors, BN statistics carry over
    resumes_bitwise(lambda name: df_cfg(tmp_path, name, "dfkd_fgvc", teacher, *FGVC, "trainer.max_steps=8",
                                        "trainer.ckpt_every=3"), stop_after=4)


def test_a_generator_of_normalised_images_is_refused(tmp_path, teacher):
    with pytest.raises(ConfigError, match="unconditional and emits images in"):
        Trainer(df_cfg(tmp_path, "x", "dfkd_fgvc", teacher, "method.output=tanh_bn"))


def test_mhad_pairs_the_last_blocks_of_networks_of_different_depth(tmp_path, teacher):
    t = Trainer(df_cfg(tmp_path, "v", "dfkd_fgvc", teacher, *FGVC, "model.name=vgg8", "trainer.max_steps=2"))
    m = t.method
    assert m.t_names == ["layer1", "layer2", "layer3"] and m.s_names == ["layer2", "layer3", "layer4"]
    out = m.training_step({}, StepContext(step=2, max_steps=2, phase="student"))
    assert torch.isfinite(out["loss"])
    assert F.mse_loss(out["loss"], out["kd"] + 10 * out["mhad"] + 8 * out["sfcl"]) < 1e-8
