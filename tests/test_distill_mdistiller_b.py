"""OFD, ReviewKD and KD-SVD: their losses against independent computations (a numerical integral of the
Gaussian for OFD's margin, element loops, numpy's SVD, explicit pyramids), the BN layers OFD reads, the
fusion modules' shapes, and the three methods trained, resumed exactly and evaluated on a Fashion-MNIST
subset."""

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import make_distiller
from conftest import FMNIST_SMALL, split_accuracy

import mentor.distill.kdsvd
import mentor.distill.ofd
import mentor.distill.reviewkd  # noqa: F401  (registers)
from mentor.config import ConfigError, load_config
from mentor.distill.losses.margin import ofd_loss, ofd_margin, partial_l2
from mentor.distill.losses.review import hcl_level, hcl_loss
from mentor.distill.losses.svd import (
    _TopEigh,
    align_singular_vectors,
    kdsvd_loss,
    sign_fixed,
    truncated_svd,
)
from mentor.distill.ofd import bn_before_relu
from mentor.distill.reviewkd import ABF
from mentor.engine import Trainer
from mentor.methods import StepContext
from mentor.models import FeatureTap, create_model

# -- OFD -----------------------------------------------------------------------------------------------

def numerical_negative_mean(mean, std):
    """E[x | x < 0] for x ~ N(mean, std^2), by the trapezoidal rule on a fine grid, and P(x < 0)."""
    x = np.linspace(mean - 14 * std, 0.0, 400001)
    pdf = np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    mass = np.trapezoid(pdf, x)
    return np.trapezoid(x * pdf, x) / mass, mass


def test_ofd_margin_matches_a_numerical_integral_of_the_gaussian():
    weight = torch.tensor([1.0, 0.5, 2.0, -1.5, 0.3, 1.0, 1.0])
    bias = torch.tensor([0.0, 0.3, -1.0, 0.2, 0.8, 2.5, 4.0])
    margin = ofd_margin(weight, bias)
    assert margin.dtype == torch.float32 and margin.shape == (7,)
    for i, (w, b) in enumerate(zip(weight.tolist(), bias.tolist())):
        expected, mass = numerical_negative_mean(b, abs(w))
        if mass > 1e-3:
            assert margin[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (w, b)
        else:  # too little negative mass: -3 std (the reference's cut-off)
            assert margin[i].item() == pytest.approx(-3 * abs(w)), (w, b)
    assert mass < 1e-3  # the last channel (mean 4 std) takes the cut-off branch
    assert margin[0].item() == pytest.approx(-math.sqrt(2 / math.pi))  # a standard normal's negative half
    assert (margin < 0).all()
    # zero std: the limit, not NaN
    limit = ofd_margin(torch.zeros(3), torch.tensor([-0.5, 0.0, 0.5]))
    assert limit.tolist() == pytest.approx([-0.5, 0.0, 0.0], abs=1e-9)


def partial_l2_loop(s, t, m):
    """The reference's three cases on the raw teacher map, element by element, summed, / batch."""
    total = 0.0
    b, c, h, w = s.shape
    for n in range(b):
        for ch in range(c):
            mg = m[ch]
            for i in range(h):
                for j in range(w):
                    src, tgt = s[n, ch, i, j], t[n, ch, i, j]
                    if tgt <= mg:
                        total += (src - mg) ** 2 if src > mg else 0.0
                    elif tgt <= 0:
                        total += (src - tgt) ** 2 if src > tgt else 0.0
                    else:
                        total += (src - tgt) ** 2
    return total / b


def test_partial_l2_hand_example_and_loop():
    # margin -1: targets max(t, -1) = [-1, -0.5, 0.5, -0.5]; the first two students are below their
    # non-positive targets (0), then (0 - 0.5)^2 = 0.25 and (1 + 0.5)^2 = 2.25
    s = torch.tensor([-1.5, -0.7, 0.0, 1.0]).view(1, 1, 2, 2)
    t = torch.tensor([-2.0, -0.5, 0.5, -0.5]).view(1, 1, 2, 2)
    assert partial_l2(s, t, torch.tensor([-1.0])).item() == pytest.approx(2.5)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 3, 2, generator=g), torch.randn(3, 4, 3, 2, generator=g)
    m = -torch.rand(4, generator=g)
    assert partial_l2(s, t, m).item() == pytest.approx(partial_l2_loop(s.numpy(), t.numpy(), m.numpy()), rel=1e-5)
    with pytest.raises(ValueError, match="differ"):
        partial_l2(s, t[:, :, :2], m)


def test_ofd_loss_pools_the_teacher_and_halves_shallower_stages():
    g = torch.Generator().manual_seed(1)
    s0, t0 = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 4, 4, generator=g)  # teacher pooled 2x2
    s1, t1 = torch.randn(2, 5, 1, 1, generator=g), torch.randn(2, 5, 1, 1, generator=g)
    m0, m1 = -torch.rand(3, generator=g), -torch.rand(5, generator=g)
    t0_pooled = t0.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    expected = (partial_l2_loop(s0.numpy(), t0_pooled, m0.numpy()) / 2
                + partial_l2_loop(s1.numpy(), t1.numpy(), m1.numpy()))
    assert ofd_loss([s0, s1], [t0, t1], [m0, m1]).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="as many"):
        ofd_loss([s0], [t0, t1], [m0])


@pytest.mark.parametrize("model,expected", [
    # the residual branch's last BN of the stage's last block, never the projection shortcut's BN
    ("resnet8", ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]),
    ("resnet20", ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"]),
    ("vgg8", ["layer1.2", "layer2.2", "layer3.2", "layer4.1"]),  # the conv group's BN before its ReLU
    # pre-activation blocks: the next stage's first BN; layer3 ends with the network's own BN + ReLU
    ("wrn_16_1", ["layer2.0.bn1", "layer3.0.bn1", "layer3.2"]),
])
def test_ofd_finds_the_bn_before_each_stages_final_relu(model, expected):
    net = create_model(model, num_classes=10, in_channels=1)
    for stage, name in zip(net.stage_names[1:], expected):
        assert bn_before_relu(net, stage) is net.get_submodule(name), (stage, name)


def test_ofd_refuses_stages_without_a_bn_before_relu_unless_named(tmp_path):
    net = create_model("mobilenetv2", num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match="teacher_bns"):
        bn_before_relu(net, net.stage_names[-1])
    # named explicitly, any BN of the right width is used
    m, _ = make("ofd", tmp_path, teacher="resnet8", teacher_bns=["layer1.0.bn1", "layer2.0.bn1", "layer3.0.bn1"])
    assert m.bns[1] is m.teacher.layer2[0].bn1
    assert torch.equal(m.margins()[1], ofd_margin(m.teacher.layer2[0].bn1.weight, m.teacher.layer2[0].bn1.bias))
    with pytest.raises(ConfigError, match="one BatchNorm2d per layer"):
        make("ofd", tmp_path, teacher="resnet8", teacher_bns=["layer1.0.bn1"])
    with pytest.raises(ConfigError, match="not a BatchNorm2d"):
        make("ofd", tmp_path, teacher="resnet8", teacher_bns=["layer1.0.bn1", "layer2.0.conv1", "layer3.0.bn1"])
    with pytest.raises(ConfigError, match="channels"):
        make("ofd", tmp_path, teacher="resnet8", teacher_bns=["layer1.0.bn1", "layer1.0.bn2", "layer3.0.bn1"])


def test_ofd_step_uses_pre_relu_maps_connectors_and_teacher_margins(tmp_path):
    m, batch = make("ofd", tmp_path, teacher="resnet14")
    m.train()
    post_s = FeatureTap(m.student, m.s_names)
    post_t = FeatureTap(m.teacher, m.t_names)
    out = m.training_step(batch, StepContext(0, 10))
    fs = [m.s_tap[n] for n in m.s_names]
    ft = [m.t_tap[n] for n in m.t_names]
    for pre, name, tap in [*zip(fs, m.s_names, [post_s] * 3), *zip(ft, m.t_names, [post_t] * 3)]:
        assert (pre < 0).any() and torch.equal(F.relu(pre), tap[name])  # the input of the stage's last ReLU
    margins = [ofd_margin(m.teacher.get_submodule(f"layer{i}.1.bn2").weight,
                          m.teacher.get_submodule(f"layer{i}.1.bn2").bias) for i in (1, 2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(m.margins(), margins))
    assert len(set(margins[0].tolist())) > 1  # per channel
    expected = ofd_loss([c(f) for c, f in zip(m.connectors, fs)], ft, margins)
    assert out["ofd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + 1e-3 * out["ofd"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.connectors.parameters())
    assert [c[0].kernel_size for c in m.connectors] == [(1, 1)] * 3
    assert [(c[0].in_channels, c[0].out_channels) for c in m.connectors] == [(16, 16), (32, 32), (64, 64)]
    assert not any(k.startswith("margin") for k in m.state_dict())  # teacher constants, not checkpointed


def test_ofd_pairs_the_deepest_stages_when_counts_differ(tmp_path):
    m, _ = make("ofd", tmp_path, teacher="vgg8")  # 4 teacher stages after the stem, 3 student ones
    assert m.s_names == ["layer1", "layer2", "layer3"] and m.t_names == ["layer2", "layer3", "layer4"]


# -- ReviewKD ------------------------------------------------------------------------------------------

def adaptive_pool_np(a, size):
    """[B, C, H, W] -> [B, C, size, size]: bins [floor(i H / o), ceil((i + 1) H / o))."""
    b, c, h, w = a.shape
    out = np.zeros((b, c, size, size))
    for i in range(size):
        h0, h1 = (i * h) // size, -(-((i + 1) * h) // size)
        for j in range(size):
            w0, w1 = (j * w) // size, -(-((j + 1) * w) // size)
            out[:, :, i, j] = a[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("size,weights", [
    (7, {7: 1.0, 4: 0.5, 2: 0.25, 1: 0.125}),
    (4, {4: 1.0, 2: 0.5, 1: 0.25}),     # the 4x4 level is the map itself, counted once
    (2, {2: 1.0, 1: 0.5}),
    (1, {1: 1.0}),
])
def test_hcl_level_matches_an_explicit_pyramid(size, weights):
    g = torch.Generator().manual_seed(size)
    s, t = torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size, size, generator=g)
    a, b = s.numpy().astype(np.float64), t.numpy().astype(np.float64)
    expected = sum(w * np.mean((adaptive_pool_np(a, lvl) - adaptive_pool_np(b, lvl)) ** 2)
                   for lvl, w in weights.items()) / sum(weights.values())
    assert hcl_level(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert hcl_loss([s, s], [t, t]).item() == pytest.approx(2 * expected, rel=1e-5)


def test_hcl_hand_example():
    # 2x2 maps: the map's MSE (16 / 4 = 4) and the 1x1 level's ((4 - 0) / 4)^2 = 1, weights 1 and 1/2
    s = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])
    assert hcl_level(s, torch.zeros_like(s)).item() == pytest.approx((4.0 + 0.5 * 1.0) / 1.5)


def test_abf_fuses_the_upsampled_residual_with_attention_and_resizes():
    torch.manual_seed(0)
    abf = ABF(8, 6, 5, fuse=True).eval()
    x, res = torch.randn(2, 8, 4, 4), torch.randn(2, 6, 2, 2)
    out, new_res = abf(x, res, (8, 8))
    assert out.shape == (2, 5, 8, 8) and new_res.shape == (2, 6, 8, 8)
    with torch.no_grad():
        h = abf.conv1(x)
        up = res.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest, 2x
        logits = torch.einsum("oc,bchw->bohw", abf.att[0].weight[:, :, 0, 0], torch.cat([h, up], 1))
        a = torch.sigmoid(logits + abf.att[0].bias.view(1, 2, 1, 1))
        fused = h * a[:, :1] + up * a[:, 1:]
        fused = fused.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.allclose(new_res, fused, atol=1e-6)
    assert torch.allclose(out, abf.conv2(fused), atol=1e-6)
    assert abf.conv2[0].kernel_size == (3, 3) and abf.conv1[0].kernel_size == (1, 1)
    deepest = ABF(8, 6, 5, fuse=False).eval()
    assert deepest.att is None
    out, new_res = deepest(torch.randn(2, 8, 1, 1), out_size=(1, 1))
    assert out.shape == (2, 5, 1, 1) and new_res.shape == (2, 6, 1, 1)
    with pytest.raises(ValueError, match="residual"):
        abf(x)


def test_reviewkd_review_path_shapes_and_channels(tmp_path):
    # vgg8 teacher: its last three stages (7x7, 3x3, 3x3) and pooled vector against resnet8's (28, 14, 7)
    m, batch = make("reviewkd", tmp_path, teacher="vgg8")
    assert m.s_names == ["layer1", "layer2", "layer3", "pool"]
    assert m.t_names == ["layer2", "layer3", "layer4", "pool"]
    assert [a.conv1[0].in_channels for a in m.abfs] == [16, 32, 64, 64]
    assert [a.conv1[0].out_channels for a in m.abfs] == [64] * 4  # mid = min(512, pooled width 64)
    assert [a.conv2[0].out_channels for a in m.abfs] == [256, 512, 512, 512]
    assert [a.att is not None for a in m.abfs] == [True, True, True, False]
    m.eval()
    with torch.no_grad():
        m.student(batch["x"])
        m.teacher(batch["x"])
        fused = m.review([m.s_tap[n] for n in m.s_names])
        ft = [m.t_tap[n] for n in m.t_names]
    assert [tuple(f.shape) for f in fused] == [(8, 256, 7, 7), (8, 512, 3, 3), (8, 512, 3, 3), (8, 512, 1, 1)]
    assert [tuple(f.shape[1:]) for f in ft[:3]] == [(256, 7, 7), (512, 3, 3), (512, 3, 3)]
    assert (ft[0] < 0).any() and (m.s_tap["layer1"] >= 0).all()  # teacher pre-ReLU, student post-ReLU


def test_reviewkd_step_warms_the_loss_up_linearly(tmp_path):
    m, batch = make("reviewkd", tmp_path, beta=5.0, warmup_epochs=2.0)
    m.train()
    for step, w in [(0, 0.25), (1, 0.5), (3, 1.0), (9, 1.0)]:  # 2 steps an epoch: (step + 1) / 4, at most 1
        out = m.training_step(batch, StepContext(step, 20, steps_per_epoch=2))
        assert out["reviewkd_warmup"].item() == pytest.approx(w)
        ft = [m.t_tap[n] for n in m.t_names]
        expected = hcl_loss(m.review([m.s_tap[n] for n in m.s_names]), [ft[0], ft[1], ft[2], ft[3][:, :, None, None]])
        assert out["reviewkd"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert out["loss"].item() == pytest.approx(out["ce"].item() + 5.0 * w * out["reviewkd"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.abfs.parameters())


# -- KD-SVD --------------------------------------------------------------------------------------------

def np_svd_top(f, n):
    """numpy: per sample, the (H*W) x C matrix's n largest singular values and right singular vectors."""
    b, c, h, w = f.shape
    values, vectors = [], []
    for x in f.astype(np.float64).reshape(b, c, h * w).transpose(0, 2, 1):
        _, sv, vh = np.linalg.svd(x, full_matrices=False)
        values.append(sv[:n])
        vectors.append(vh[:n].T)
    return np.stack(values), np.stack(vectors)


def np_sign_fixed(v):
    v = v.copy()
    for b in range(v.shape[0]):
        for j in range(v.shape[2]):
            if v[b, np.argmax(np.abs(v[b, :, j])), j] < 0:
                v[b, :, j] *= -1
    return v


def np_align(vs, vt):
    out = np.zeros((vs.shape[0], vs.shape[1], vt.shape[2]))
    for b in range(vs.shape[0]):
        for j in range(vt.shape[2]):
            cos = [float(vs[b, :, i] @ vt[b, :, j]) for i in range(vs.shape[2])]
            i = int(np.argmax(np.abs(cos)))
            out[b, :, j] = np.sign(cos[i]) * vs[b, :, i]
    return out


def np_kdsvd(fs_list, ft_list, k):
    total, prev = 0.0, None
    for fs, ft in zip(fs_list, ft_list):
        st, vt = np_svd_top(ft, k)
        vt = np_sign_fixed(vt)
        _, vs = np_svd_top(fs, k + 3)
        vs = np_align(vs, vt)
        w = st / np.linalg.norm(st, axis=1, keepdims=True)
        vs, vt = vs * w[:, None, :], vt * w[:, None, :]
        if prev is not None:
            ps, pt = prev
            for b in range(fs.shape[0]):
                for a in range(vs.shape[1]):
                    for c in range(ps.shape[1]):
                        for q in range(k):
                            srbf = math.exp(-((vs[b, a, q] - ps[b, c, q]) ** 2) / 8)
                            trbf = math.exp(-((vt[b, a, q] - pt[b, c, q]) ** 2) / 8)
                            total += (srbf - trbf) ** 2
        prev = (vs, vt)
    return total / fs_list[0].shape[0]


def test_truncated_svd_matches_numpy_and_signs_follow_the_convention():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 6, 4, 5), (2, 8, 2, 2)]:  # H*W > C and H*W < C (rank 4 of 8 channels)
        f = torch.randn(*shape, generator=g)
        s, v = truncated_svd(f, 3)
        s_np, v_np = np_svd_top(f.numpy(), 3)
        assert s.shape == (shape[0], 3) and v.shape == (shape[0], shape[1], 3)
        assert np.allclose(s.numpy(), s_np, rtol=1e-4)
        assert np.allclose(sign_fixed(v).numpy(), np_sign_fixed(v_np), atol=1e-4)
    # n is capped at min(H*W, C)
    assert truncated_svd(torch.randn(2, 8, 1, 2), 5)[1].shape == (2, 8, 2)


def test_align_singular_vectors_matches_a_loop_and_undoes_sign_flips():
    g = torch.Generator().manual_seed(2)
    _, vs = np_svd_top(torch.randn(3, 7, 4, 4, generator=g).numpy(), 4)
    _, vt = np_svd_top(torch.randn(3, 7, 4, 4, generator=g).numpy(), 2)
    got = align_singular_vectors(torch.tensor(vs), torch.tensor(vt))
    assert got.shape == (3, 7, 2)
    assert np.allclose(got.numpy(), np_align(vs, vt))
    # a student whose vectors are the teacher's, permuted and negated, aligns back to the teacher's exactly
    flipped = torch.tensor(vt)[:, :, [1, 0]] * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(align_singular_vectors(flipped, torch.tensor(vt)), torch.tensor(vt))


def test_kdsvd_loss_matches_a_numpy_computation():
    g = torch.Generator().manual_seed(3)
    # channels agree stage by stage, resolutions need not (the correlations are over channels)
    fs = [torch.randn(2, c, h, h, generator=g) for c, h in [(4, 6), (6, 3), (5, 2)]]
    ft = [torch.randn(2, c, h, h, generator=g) for c, h in [(4, 5), (6, 4), (5, 2)]]
    for k in (1, 2):
        expected = np_kdsvd([f.numpy() for f in fs], [f.numpy() for f in ft], k)
        assert kdsvd_loss(fs, ft, k).item() == pytest.approx(expected, rel=1e-4)
    assert kdsvd_loss(ft, ft, 1).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="channels"):
        kdsvd_loss(fs, [ft[0], ft[2], ft[1]], 1)
    with pytest.raises(ValueError, match="two stages"):
        kdsvd_loss(fs[:1], ft[:1], 1)


def test_top_eigh_gradient_matches_torch_svd_and_gradcheck():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    weights = torch.randn(5, 5, generator=g, dtype=torch.float64)
    coef = torch.randn(3, generator=g, dtype=torch.float64)

    def objective(values, vectors):  # invariant to the vectors' signs
        d = vectors.shape[-2]
        return (weights[:d, :d] * (vectors @ vectors.transpose(-2, -1))).sum() + (coef * values).sum()

    ours = x.clone().requires_grad_(True)
    objective(*_TopEigh.apply(ours.transpose(1, 2) @ ours, 3)).backward()
    ref = x.clone().requires_grad_(True)
    _, sv, vh = torch.linalg.svd(ref, full_matrices=False)
    objective(sv[:, :3] ** 2, vh[:, :3].transpose(-2, -1)).backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-9)
    small = torch.randn(1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: objective(*_TopEigh.apply(a.transpose(1, 2) @ a, 3)), (small,))


def test_kdsvd_gradient_is_finite_with_dead_channels():
    g = torch.Generator().manual_seed(5)
    fs = [torch.relu(torch.randn(2, 8, 6, 6, generator=g)), torch.relu(torch.randn(2, 8, 3, 3, generator=g))]
    for f in fs:
        f[:, 2:5] = 0  # three dead channels: repeated zero singular values
    fs = [f.requires_grad_(True) for f in fs]
    ft = [torch.relu(torch.randn(2, 8, 6, 6, generator=g)), torch.relu(torch.randn(2, 8, 3, 3, generator=g))]
    loss = kdsvd_loss(fs, ft, 1)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in fs)


def test_kdsvd_step_and_channel_check(tmp_path):
    m, batch = make("kdsvd", tmp_path, teacher="resnet14")
    m.train()
    out = m.training_step(batch, StepContext(0, 10))
    fs = [m.s_tap[n] for n in m.s_names]
    ft = [m.t_tap[n] for n in m.t_names]
    assert (fs[0] >= 0).all() and (ft[0] >= 0).all()  # post-ReLU stage outputs (the reference's feats)
    assert out["kdsvd"].item() == pytest.approx(kdsvd_loss(fs, ft, 1).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kdsvd"].item(), rel=1e-5)
    with pytest.raises(ConfigError, match="channels"):
        make("kdsvd", tmp_path, teacher="resnet8x4")


# -- short runs on the Fashion-MNIST subset ------------------------------------------------------------

# ReviewKD's warm-up spans the interruption (6 of 8 steps at 8 steps an epoch): its total grows with the weight,
# so its (unweighted) hierarchical context loss must fall.
EXTRA = {"ofd": [], "reviewkd": ["method.warmup_epochs=0.75"], "kdsvd": []}
TERMS = {"ofd": {"ofd"}, "reviewkd": {"reviewkd", "reviewkd_warmup"}, "kdsvd": {"kdsvd"}}
KEY = {"ofd": "loss", "reviewkd": "reviewkd", "kdsvd": "loss"}


@pytest.mark.parametrize("method", ["ofd", "reviewkd", "kdsvd"])
def test_method_trains_resumes_exactly_and_evaluates_on_tiny_data(method, fast_teachers, fmnist_tiny, tmp_path,
                                                                  monkeypatch):
    # 256 training images, batch 32: 8 steps, straight and interrupted after step 4 then resumed
    base = [*FMNIST_SMALL, "model.name=resnet8", f"method.name={method}", f"method.teacher={fast_teachers[0]}",
            "data.batch_size=32", "trainer.max_steps=8", "trainer.log_every=2", "trainer.eval_every=8",
            "trainer.ckpt_every=8", *EXTRA[method]]
    straight = Trainer(load_config(None, [*base, f"out_dir={tmp_path / 'straight'}"]), fmnist_tiny)
    summary = straight.fit()
    cfg = load_config(None, [*base, f"out_dir={tmp_path / 'split'}"])
    original = Trainer._train_step

    def interrupt_after_step_4(self, step):
        original(self, step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the engine saves between steps and stops

    monkeypatch.setattr(Trainer, "_train_step", interrupt_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, fmnist_tiny).fit()
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = Trainer(cfg, fmnist_tiny)
    resumed.fit()
    assert resumed.start_step == 5
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["method"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["method"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
    # it trained: the loss fell, every term is logged, the teacher got no gradient
    events = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert [e["step"] for e in train] == [2, 4, 6, 8]
    assert TERMS[method] | {"ce", "kd"} <= set(train[0])
    key = KEY[method]
    assert train[2][key] + train[3][key] < train[0][key] + train[1][key], [e[key] for e in train]
    assert all(p.grad is None for p in straight.method.teacher.parameters())
    # the reported number is the final student's accuracy on the test split
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(straight.method.deployable(), fmnist_tiny.test,
                                                                    fmnist_tiny.train),
                                                     abs=1 / len(fmnist_tiny.test) + 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ofd", "reviewkd", "kdsvd"])
def test_method_learns_from_a_trained_teacher(method, fmnist_teachers, distill_overrides, tmp_path):
    # 100 steps with a trained resnet14 teacher on the 2000-image subset: well above chance (0.1)
    overrides = [*distill_overrides, f"method.name={method}", f"method.teacher={fmnist_teachers[0]}",
                 "trainer.max_steps=100", "trainer.eval_every=50", "trainer.ckpt_every=50", "trainer.log_every=25",
                 *(["method.warmup_epochs=0.5"] if method == "reviewkd" else [])]
    summary = Trainer(load_config(None, overrides)).fit()
    events = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert all(math.isfinite(e["loss"]) for e in train)
    assert summary["test_acc_last"] > 0.4, summary["test_acc_last"]


def make(method, tmp_path, teacher="resnet14", student="resnet8", batch_size=8, **hp):
    """A method around a teacher whose BatchNorm statistics differ per channel (OFD's margins)."""
    return make_distiller(method, tmp_path, teacher, student, batch_size, spread_bn=True, **hp)
