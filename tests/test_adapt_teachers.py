"""CoTTA, MEMO, LAME, RoTTA and T3A: each statistic and loss against an independent computation, and each
method end to end through the adaptation runner on the digits shift."""

import colorsys
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _adapt_shift import digit_shift, train_bn_source
from _helpers import BNNet  # noqa: F401  (registers test_bncnn)
from _nosync import NoHostSync

from mentor.adapt.cotta import TTAViews
from mentor.adapt.lame import knn_affinity, laplacian_assignments
from mentor.adapt.memo import AUGMIX_OPS, AugMix, PriorBatchNorm2d, marginal_entropy
from mentor.adapt.rotta import CategoryBalancedMemory, RobustBN, sample_mask
from mentor.data import load_dataset
from mentor.data.augment import OPS
from mentor.engine.adapt import AdaptPlan, adapt, build_adapt_config
from mentor.methods import BuildInfo, StepContext, create_method
from mentor.models import create_model

pytest.importorskip("sklearn")

INFO = BuildInfo(num_classes=10, in_channels=1, image_size=8, mean=(0.3,), std=(0.4,))


_shift = digit_shift


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return train_bn_source(tmp_path_factory)


def _run(tmp_path, source_run, method, setting="reset", *extra):
    cfg = build_adapt_config([f"method.name={method}", f"out_dir={tmp_path / method / setting}",
                              "data.batch_size=50", *extra])
    return adapt(AdaptPlan(run=str(source_run), shift="test_digit_shift", setting=setting), cfg)


def _accs(summary):
    return [summary[f"acc@{n}"] for n in ("clean", "dark", "inverted")]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _network(source_run):
    net = create_model("test_bncnn", num_classes=10, in_channels=1)
    net.load_state_dict(torch.load(source_run / "best.pt", weights_only=True)["model"])
    return net.eval()


def _normalise(images):
    ds = load_dataset("digits", "test")
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def _batches(ds, size=50, seed=0):
    """The runner's read order of a stream: a seeded permutation in batches."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(ds), size):
        idx = order[start:start + size]
        yield _normalise(ds.images[idx]), ds.labels[idx]


def _features(net, x):
    """BNNet's penultimate features (eval mode), written out layer by layer."""
    h = F.batch_norm(net.conv(x), net.bn.running_mean, net.bn.running_var, net.bn.weight, net.bn.bias, False, 0.0,
                     net.bn.eps)
    return F.adaptive_avg_pool2d(torch.relu(h), 1).flatten(1)


def _net(seed=0):
    torch.manual_seed(seed)
    net = BNNet(10)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    return net


def _ctx(seed=0, step=0):
    return StepContext(step=step, max_steps=0, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# CoTTA


def test_cotta_views_with_neutral_draws_return_the_image_and_jitter_like_pil():
    torch.manual_seed(0)
    aug = TTAViews(noise_std=0.0)
    x = torch.rand(4, 3, 9, 9)
    p = aug.sample_params(x.shape, torch.Generator().manual_seed(1))
    neutral = {**p, "brightness": torch.ones(4), "contrast": torch.ones(4), "saturation": torch.ones(4),
               "hue": torch.zeros(4), "gamma": torch.ones(4), "angle": torch.zeros(4), "scale": torch.ones(4),
               "shift": torch.zeros(4, 2), "sigma": torch.full((4,), 1e-3), "flip": torch.zeros(4, dtype=torch.bool)}
    assert torch.allclose(aug.apply(x, neutral), x, atol=1e-5)
    # one op at a time against hand formulas: brightness 1.3 and contrast 0.8 on image 0, a hue turn on image 1
    only = {**neutral, "order": torch.arange(5).expand(4, 5), "brightness": torch.tensor([1.3, 1, 1, 1]),
            "contrast": torch.tensor([0.8, 1, 1, 1]), "hue": torch.tensor([0.0, 0.05, 0, 0])}
    out = aug.apply(x, only)
    bright = (x[0] * 1.3).clamp(0, 1)
    gray_mean = (0.299 * bright[0] + 0.587 * bright[1] + 0.114 * bright[2]).mean()
    assert torch.allclose(out[0], (gray_mean + 0.8 * (bright - gray_mean)).clamp(0, 1), atol=1e-5)
    for i, j in [(0, 0), (3, 5), (8, 2)]:  # colorsys: an independent HSV round trip
        h, s, v = colorsys.rgb_to_hsv(*x[1, :, i, j].tolist())
        expected = colorsys.hsv_to_rgb((h + 0.05) % 1.0, s, v)
        assert torch.allclose(out[1, :, i, j], torch.tensor(expected), atol=1e-5)
    # a pure shift of one pixel right moves the content: out[:, :, :, 1:] == x[:, :, :, :-1]
    shifted = aug.apply(x, {**neutral, "shift": torch.tensor([[1.0, 0.0]] * 4)})
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-5)
    # a one-channel batch: saturation and hue do nothing
    g = torch.rand(2, 1, 9, 9)
    one = {k: v[:2] for k, v in neutral.items() if k != "noise"} | {"noise": torch.zeros(2, 1, 9, 9)}
    one |= {"saturation": torch.tensor([0.5, 1.5]), "hue": torch.tensor([0.06, -0.06])}
    assert torch.allclose(aug.apply(g, one), g, atol=1e-5)


def _cotta(ap, **kw):
    return create_method("cotta", _net(), INFO, ap=ap, n_augmentations=3, **kw)


@pytest.mark.parametrize("ap", [1.0, 0.0])
def test_cotta_teacher_averages_its_views_only_when_the_anchor_is_unsure(ap):
    method = _cotta(ap)
    method.snapshot()
    method.prepare()
    source = copy.deepcopy(method.student).train()  # batch statistics, as CoTTA normalises
    x = torch.randn(6, 1, 8, 8)
    out = method.adapt_step({"x": x}, _ctx(3))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        confidence = source(x).softmax(1).max(1).values.mean()
        views = [method.views(x, gen) for _ in range(3)]
        averaged = sum(source(v) for v in views) / 3
        plain = source(x)
    expected = averaged if confidence < ap else plain
    assert torch.allclose(out["logits"], expected, atol=1e-5)
    assert out["augmented"].item() == float(confidence < ap)
    student = source(x)
    ce = [-(expected[i].softmax(0) * student[i].log_softmax(0)).sum() for i in range(6)]
    assert out["loss"].item() == pytest.approx(sum(ce).item() / 6, rel=1e-5)


def test_cotta_picks_between_views_and_plain_by_the_anchors_mean_confidence():
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        c = _net().train()(x).softmax(1).max(1).values.mean().item()
    below, above = _cotta(c - 1e-4), _cotta(c + 1e-4)
    for m in (below, above):
        m.prepare()
    assert below.adapt_step({"x": x}, _ctx())["augmented"].item() == 0.0
    assert above.adapt_step({"x": x}, _ctx())["augmented"].item() == 1.0


def test_cotta_ema_then_stochastic_restore_at_rate_p():
    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=10, in_channels=1)
    method = create_method("cotta", net, INFO)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
        for p in method.teacher.parameters():
            p.sub_(1.0)
    student = [p.detach().clone() for p in method.student.parameters()]
    teacher = [p.detach().clone() for p in method.teacher.parameters()]
    anchor = [p.detach().clone() for p in method.anchor.parameters()]
    with NoHostSync():
        method.after_step(_ctx(5))
    for t_old, s_old, t_new in zip(teacher, student, method.teacher.parameters()):
        assert torch.allclose(t_new, 0.999 * t_old + 0.001 * s_old, atol=1e-6)
    restored = total = 0
    for s_old, a, s_new in zip(student, anchor, method.student.parameters()):
        back = s_new == a
        assert torch.equal(s_new[~back], s_old[~back])  # the rest untouched
        restored += back.sum().item()
        total += a.numel()
    rate, sd = 0.01, math.sqrt(0.01 * 0.99 / total)
    assert total > 50_000 and abs(restored / total - rate) < 5 * sd
    off = create_method("cotta", copy.deepcopy(net), INFO, restore=0.0)
    before = [p.detach().clone() for p in off.student.parameters()]
    off.after_step(_ctx())
    assert all(torch.equal(a, b) for a, b in zip(before, off.student.parameters()))


# --------------------------------------------------------------------------------------------------
# MEMO


def test_marginal_entropy_is_the_entropy_of_the_mean_prediction():
    torch.manual_seed(0)
    for scale in (1.0, 30.0):
        z = scale * torch.randn(7, 5)
        mean = z.double().softmax(1).mean(0)
        expected = -(mean * mean.clamp_min(1e-300).log()).sum()
        assert marginal_entropy(z).item() == pytest.approx(expected.item(), abs=1e-5)


def test_prior_bn_mixes_source_and_batch_statistics_without_their_gradient():
    torch.manual_seed(0)
    layer = PriorBatchNorm2d(3).eval()
    layer.prior = 16 / 17
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = (2 * torch.randn(4, 3, 5, 5) + 1).requires_grad_(True)
    out = layer(x)
    flat = x.detach().transpose(0, 1).reshape(3, -1)
    mean = 16 / 17 * layer.running_mean + flat.mean(1) / 17
    var = 16 / 17 * layer.running_var + flat.var(1, unbiased=True) / 17
    scale = layer.weight / torch.sqrt(var + layer.eps)
    expected = (x.detach() - mean.view(1, 3, 1, 1)) * scale.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()  # statistics are constants: d out / d x is the per-channel scale
    assert torch.allclose(x.grad, scale.view(1, 3, 1, 1).expand_as(x), atol=1e-6)


def test_augmix_draws_only_augmix_ops_at_severity_one():
    aug = AugMix()
    p = aug.sample_params(4000, 32, torch.Generator().manual_seed(0))
    names = {OPS[i] for i in p["ops"].unique().tolist()}
    assert names == set(AUGMIX_OPS) | {"Identity"}
    depth = (p["ops"] != OPS.index("Identity")).sum(-1)
    assert set(depth.flatten().tolist()) == {1, 2, 3}  # every chain has 1 to 3 operations
    ops, mags = p["ops"], p["magnitudes"]

    def values(name):
        return mags[ops == OPS.index(name)]

    assert set(values("Rotate").abs().tolist()) <= {0.0, 1.0, 2.0}
    assert values("ShearX").abs().max().item() <= 0.03
    assert set((values("TranslateX") * 32).round().abs().tolist()) <= {0.0, 1.0}
    assert set(values("Posterize").tolist()) == {4.0}
    assert values("Solarize").min().item() >= 231 / 255 - 1e-6 and values("Solarize").max().item() <= 254 / 255 + 1e-6
    assert torch.allclose(p["weights"].sum(1), torch.ones(4000))
    views = aug(torch.rand(6, 1, 32, 32), torch.Generator().manual_seed(1))
    assert views.shape == (6, 1, 32, 32) and views.min().item() >= 0 and views.max().item() <= 1


def _resnet8():
    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=10, in_channels=1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("model,prior_strength", [("bncnn", 16.0), ("bncnn", -1.0), ("resnet8", 16.0)])
def test_memo_adapts_each_point_as_a_fresh_copy_of_the_model_would(model, prior_strength):
    net = _net() if model == "bncnn" else _resnet8()
    method = create_method("memo", net, INFO, n_augmentations=6, prior_strength=prior_strength, padding=1,
                           chunk_size=2)
    method.prepare()
    source = copy.deepcopy(method.student)
    x = torch.randn(3, 1, 8, 8)
    out = method.adapt_step({"x": x}, _ctx(4))
    assert out["backward_samples"].item() == 3
    copies = method.copies(x, torch.Generator().manual_seed(4))
    entropies = []
    for i in range(3):  # a fresh copy per point, adapted alone with autograd and torch's SGD
        net = copy.deepcopy(source).eval()
        opt = torch.optim.SGD(net.parameters(), lr=0.005)
        probs = net(copies[i]).softmax(1).mean(0)
        loss = -(probs * probs.log()).sum()
        loss.backward()
        opt.step()
        entropies.append(loss.item())
        with torch.no_grad():
            assert torch.allclose(out["logits"][i], net(x[i:i + 1])[0], atol=1e-5), i
    assert out["marginal_entropy"].item() == pytest.approx(sum(entropies) / 3, rel=1e-5)
    for a, b in zip(source.state_dict().values(), method.student.state_dict().values()):
        assert torch.equal(a, b)  # the student itself never moves
    if prior_strength < 0:  # source statistics: the unadapted prediction is plain eval mode
        with torch.no_grad():
            assert torch.allclose(method.student(x), _net().eval()(x), atol=1e-6)
    assert any(isinstance(m, PriorBatchNorm2d) for m in method.student.modules())


# --------------------------------------------------------------------------------------------------
# LAME


def test_knn_affinity_marks_each_points_nearest_others():
    torch.manual_seed(0)
    f = torch.randn(9, 4)
    w = knn_affinity(f, 3)
    for i in range(9):
        others = sorted((torch.dist(f[i], f[j]).item(), j) for j in range(9) if j != i)
        assert {j for _, j in others[:3]} == set(torch.nonzero(w[i]).flatten().tolist())
    assert knn_affinity(f[:2], 5).sum().item() == 2  # capped at the other point
    assert knn_affinity(f[:1], 5).sum().item() == 0


def _lame_loop(probs, feats, k=5, steps=100):
    """LAME written per point: ``y_i <- (p_i + 1e-10) * exp(sum_{j in kNN(i)} y_j) / Z_i`` (float64 lists)."""
    n = len(probs)
    f = F.normalize(feats.double(), dim=1)
    nbrs = []
    for i in range(n):
        d = sorted(((f[i] - f[j]).norm().item(), j) for j in range(n) if j != i)
        nbrs.append([j for _, j in d[:min(k, n - 1)]])
    p = (probs.double() + 1e-10).tolist()
    y = [[v / sum(row) for v in row] for row in p]
    for _ in range(steps):
        new = []
        for i in range(n):
            pull = [sum(y[j][c] for j in nbrs[i]) for c in range(len(p[i]))]
            top = max(pull)
            row = [p[i][c] * math.exp(pull[c] - top) for c in range(len(p[i]))]
            new.append([v / sum(row) for v in row])
        y = new
    return torch.tensor(y, dtype=torch.float64)


def test_lame_reaches_the_fixed_point_of_a_per_point_iteration():
    torch.manual_seed(0)
    probs = (2 * torch.randn(20, 4)).softmax(1)
    feats = torch.randn(20, 6)
    w = knn_affinity(F.normalize(feats, dim=1), 5)
    log_p = torch.log(probs + 1e-10)
    y = laplacian_assignments(log_p, w, 100)
    assert torch.allclose(y.double(), _lame_loop(probs, feats), atol=1e-5)
    assert torch.allclose(y, (log_p + w @ y).softmax(1), atol=1e-5)  # a fixed point of the update
    assert (y.argmax(1) != probs.argmax(1)).any()  # the neighbours changed some decisions


def test_lame_end_to_end_predicts_the_laplacian_assignments_of_each_batch(tmp_path, source_run):
    reset = _run(tmp_path, source_run, "lame")
    continual = _run(tmp_path, source_run, "lame", "continual")
    assert _accs(reset) == _accs(continual) and reset["backward_per_sample"] == 0.0  # nothing is learnt
    net = _network(source_run)
    ds = _shift().domains["dark"]
    correct = 0
    with torch.no_grad():
        for x, y in _batches(ds):
            pred = _lame_loop(net(x).softmax(1), _features(net, x)).argmax(1)
            correct += (pred == y).sum().item()
    assert reset["acc@dark"] == pytest.approx(correct / len(ds), abs=1e-9)


# --------------------------------------------------------------------------------------------------
# T3A


class T3AReference:
    """The official T3A written with Python lists and a sort per class."""

    def __init__(self, fc, filter_k):
        self.fc, self.k = fc, filter_k
        w = fc.weight.detach()
        out = fc(w).detach()
        self.items = [(w[i], out[i].argmax().item(), self._ent(out[i])) for i in range(len(w))]

    @staticmethod
    def _ent(z):
        p = z.softmax(0)
        return -(p * z.log_softmax(0)).sum().item()

    def __call__(self, z):
        out = self.fc(z).detach()
        self.items += [(z[i], out[i].argmax().item(), self._ent(out[i])) for i in range(len(z))]
        kept = []
        for c in range(self.fc.out_features):
            mine = [it for it in self.items if it[1] == c]
            kept += sorted(mine, key=lambda it: it[2])[:self.k]
        self.items = kept
        cols = []
        for c in range(self.fc.out_features):
            total = sum((F.normalize(f, dim=0) for f, lab, _ in kept if lab == c), torch.zeros(z.shape[1]))
            cols.append(F.normalize(total, dim=0))
        return z @ torch.stack(cols, 1)


def test_t3a_matches_a_per_class_sort_of_the_supports():
    net = _net().eval()
    method = create_method("t3a", net, INFO, filter_k=3)
    method.prepare()
    ref = T3AReference(net.fc, 3)
    torch.manual_seed(1)
    for step in range(4):
        x = torch.randn(7, 1, 8, 8)
        with NoHostSync():
            out = method.adapt_step({"x": x}, _ctx(step=step))
        with torch.no_grad():
            expected = ref(_features(net, x))
        assert torch.allclose(out["logits"], expected, atol=1e-5), step
    assert (torch.isfinite(method.support_entropy).sum(1) <= 3).all()
    kept = sorted(e for _, _, e in ref.items)
    assert torch.allclose(method.support_entropy[torch.isfinite(method.support_entropy)].sort().values,
                          torch.tensor(kept), atol=1e-5)


def test_t3a_end_to_end_reset_starts_each_stream_from_the_classifier(tmp_path, source_run):
    reset = _run(tmp_path, source_run, "t3a")
    continual = _run(tmp_path, source_run, "t3a", "continual")
    assert reset["acc@clean"] == continual["acc@clean"] and reset["backward_per_sample"] == 0.0
    net = _network(source_run)
    for name in ("dark", "inverted"):
        ds = _shift().domains[name]
        ref, correct = T3AReference(net.fc, 100), 0
        with torch.no_grad():
            for x, y in _batches(ds):
                correct += (ref(_features(net, x)).argmax(1) == y).sum().item()
        assert reset[f"acc@{name}"] == pytest.approx(correct / len(ds), abs=1e-9), name


# --------------------------------------------------------------------------------------------------
# RoTTA


def test_robust_bn_statistics_follow_the_stream_with_momentum_alpha():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    rbn = RobustBN(bn, 0.05).train()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    for t in range(4):
        x = 3 * torch.randn(5, 3, 4, 4) + t
        out = rbn(x)
        per_channel = x.transpose(0, 1).reshape(3, -1)
        mean = 0.95 * mean + 0.05 * per_channel.mean(1)
        var = 0.95 * var + 0.05 * per_channel.var(1, unbiased=False)
        assert torch.allclose(rbn.running_mean, mean, atol=1e-5) and torch.allclose(rbn.running_var, var, atol=1e-5)
        expected = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + bn.eps)
        assert torch.allclose(out, expected * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1), atol=1e-5)
    rbn.eval()
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(rbn(x), F.batch_norm(x, mean, var, rbn.weight, rbn.bias, False, 0.0, bn.eps), atol=1e-5)
    # a mask: the statistics of the marked samples only, as if the others were not in the batch
    masked, alone = RobustBN(bn, 0.05).train(), RobustBN(bn, 0.05).train()
    x = torch.randn(6, 3, 4, 4)
    keep = torch.tensor([1.0, 0, 1, 1, 0, 1])
    with sample_mask(masked, keep):
        out = masked(x)
    assert masked.mask is None
    assert torch.allclose(out[keep.bool()], alone(x[keep.bool()]), atol=1e-5)
    assert torch.allclose(masked.running_var, alone.running_var, atol=1e-6)


class CSTUReference:
    """RoTTA's memory written as the reference does: a list of items per class, one arrival at a time."""

    def __init__(self, capacity, classes):
        self.capacity, self.classes = capacity, classes
        self.data = [[] for _ in range(classes)]  # items: [uncertainty, age]

    def score(self, age, u):
        return 1 / (1 + math.exp(-age / self.capacity)) + u / math.log(self.classes)

    def add(self, c, u):
        if self._room(c, self.score(0, u)):
            self.data[c].append([u, 0])
        for items in self.data:
            for it in items:
                it[1] += 1

    def _room(self, c, new):
        sizes = [len(d) for d in self.data]
        if sizes[c] < self.capacity / self.classes:
            if sum(sizes) < self.capacity:
                return True
            return self._evict([k for k in range(self.classes) if sizes[k] == max(sizes)], new)
        return self._evict([c], new)

    def _evict(self, classes, new):
        best = None
        for k in classes:
            for idx, (u, age) in enumerate(self.data[k]):
                s = self.score(age, u)
                if best is None or s >= best[0]:
                    best = (s, k, idx)
        if best is None:
            return True
        if best[0] > new:
            self.data[best[1]].pop(best[2])
            return True
        return False

    def contents(self):
        return sorted((k, round(u, 5), age) for k in range(self.classes) for u, age in self.data[k])


def test_memory_bank_keeps_the_reference_items_and_balances_classes():
    gen = torch.Generator().manual_seed(0)
    labels = torch.where(torch.rand(240, generator=gen) < 0.6, 0, torch.randint(0, 5, (240,), generator=gen))
    unc = torch.rand(240, generator=gen) * math.log(5)
    bank = CategoryBalancedMemory(12, 5, (1, 2, 2))
    ref = CSTUReference(12, 5)
    for start in range(0, 240, 16):
        images = torch.arange(start, start + 16).float().view(16, 1, 1, 1).expand(16, 1, 2, 2)
        with NoHostSync():
            bank.add(images, labels[start:start + 16], unc[start:start + 16])
        for i in range(start, start + 16):
            ref.add(labels[i].item(), unc[i].item())
        v = bank.valid
        mine = sorted((k, round(u, 5), int(a)) for k, u, a in
                      zip(bank.labels[v].tolist(), bank.uncertainty[v].tolist(), bank.age[v].tolist()))
        assert mine == ref.contents(), start
    # each stored image is the one that arrived with that label and uncertainty
    v = bank.valid
    arrivals = bank.images[v][:, 0, 0, 0].long()
    assert torch.equal(labels[arrivals], bank.labels[v]) and torch.allclose(unc[arrivals], bank.uncertainty[v])
    counts = torch.bincount(bank.labels[v], minlength=5)
    assert v.all() and counts.max().item() <= 3  # full, and 60 % class-0 traffic holds at most ceil(12 / 5)
    assert torch.allclose(bank.weights(), torch.exp(-bank.age / 12) / (1 + torch.exp(-bank.age / 12)))


def test_rotta_updates_once_every_update_frequency_samples_with_the_weighted_bank_loss():
    method = create_method("rotta", _net(), INFO, memory_size=6, update_frequency=8)
    method.snapshot()
    method.reset()
    method.prepare()
    torch.manual_seed(2)
    updates = []
    for step in range(6):  # batches of 5: the counts 10, 20, 25 cross 8, 16, 24
        x = torch.randn(5, 1, 8, 8)
        teacher_before = copy.deepcopy(method.teacher)
        student_before = copy.deepcopy(method.student)
        bank_before = copy.deepcopy(method.memory)
        with NoHostSync():
            out = method.adapt_step({"x": x}, _ctx(10 + step, step))
        updates.append(out["loss"].requires_grad)
        with torch.no_grad():
            assert torch.allclose(out["logits"], teacher_before.eval()(x), atol=1e-5)  # eval: global statistics
        if not out["loss"].requires_grad:
            assert out["backward_samples"].item() == 0
            continue
        # the loss, from copies: the stored images alone through training-mode networks
        bank = copy.deepcopy(bank_before)
        with torch.no_grad():
            p = teacher_before.eval()(x).softmax(1)
            bank.add(x, p.argmax(1), -(p * torch.log(p + 1e-6)).sum(1))
        valid = bank.valid
        views = method.views(bank.images, torch.Generator().manual_seed(10 + step))[valid]
        target = teacher_before.train()(bank.images[valid]).detach()
        student = student_before.train()(views)
        weights = torch.exp(-bank.age[valid] / 6) / (1 + torch.exp(-bank.age[valid] / 6))
        ce = [-(target[i].softmax(0) * student[i].log_softmax(0)).sum() * weights[i] for i in range(len(views))]
        assert out["loss"].item() == pytest.approx((sum(ce) / len(views)).item(), rel=1e-5)
        assert out["backward_samples"].item() == valid.sum().item()
        out["loss"].backward()
        trained = [p.detach().clone() for p in method.student.parameters()]
        teacher = [p.detach().clone() for p in method.teacher.parameters()]
        method.after_step(_ctx())
        for t_new, t_old, s in zip(method.teacher.parameters(), teacher, trained):
            assert torch.allclose(t_new, 0.999 * t_old + 0.001 * s, atol=1e-7)
        # the teacher keeps the global statistics its own forward left (not copied from the student)
        rbn = [(a, b, c) for a, b, c in zip(method.teacher.modules(), teacher_before.modules(),
                                            method.student.modules()) if isinstance(a, RobustBN)]
        assert rbn and all(torch.allclose(a.running_mean, b.running_mean, atol=1e-6) for a, b, _ in rbn)
        assert not all(torch.allclose(a.running_mean, c.running_mean) for a, _, c in rbn)
    assert updates == [False, True, False, True, True, False]


# --------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("name,kw", [("cotta", {"n_augmentations": 2}), ("memo", {"n_augmentations": 2}),
                                     ("lame", {}), ("t3a", {"filter_k": 2}),
                                     ("rotta", {"memory_size": 6, "update_frequency": 4})])
def test_no_step_reads_a_value_back_to_the_host(name, kw):
    method = create_method(name, _net(), INFO, **kw)
    method.snapshot()
    method.reset()
    method.prepare()
    for step in range(2):
        ctx = _ctx(step, step)
        with NoHostSync():
            out = method.adapt_step({"x": torch.randn(5, 1, 8, 8)}, ctx)
        assert out["logits"].shape == (5, 10)
        if out.get("loss") is not None and out["loss"].requires_grad:
            out["loss"].backward()
            with NoHostSync():
                method.after_step(ctx)


def test_cotta_end_to_end_first_stream_shared_later_streams_carried(tmp_path, source_run):
    reset = _run(tmp_path, source_run, "cotta", "reset", "method.n_augmentations=8")
    continual = _run(tmp_path, source_run, "cotta", "continual", "method.n_augmentations=8")
    assert reset["acc@clean"] == continual["acc@clean"]  # both start from the source
    # the teacher moves slowly (0.999): the carried state shows first in the student's loss
    losses = {s: [r["loss"] for r in _records(tmp_path / "cotta" / s)] for s in ("reset", "continual")}
    assert losses["reset"][0] == losses["continual"][0]
    assert losses["reset"][1] != losses["continual"][1] and losses["reset"][2] != losses["continual"][2]
    assert reset["backward_per_sample"] == 1.0
    again = _run(tmp_path / "again", source_run, "cotta", "reset", "method.n_augmentations=8")
    assert _accs(again) == _accs(reset)  # the seeded generator makes the views reproducible


def test_memo_end_to_end_is_episodic(tmp_path, source_run):
    reset = _run(tmp_path, source_run, "memo", "reset", "method.padding=1", "method.n_augmentations=4")
    continual = _run(tmp_path, source_run, "memo", "continual", "method.padding=1", "method.n_augmentations=4")
    assert _accs(reset) == _accs(continual)  # every point starts from the source weights
    assert reset["backward_per_sample"] == 1.0


def test_rotta_end_to_end_first_stream_shared_later_streams_carried(tmp_path, source_run):
    reset = _run(tmp_path, source_run, "rotta")
    continual = _run(tmp_path, source_run, "rotta", "continual")
    assert reset["acc@clean"] == continual["acc@clean"]
    assert _accs(reset)[1:] != _accs(continual)[1:]
    # 599 images per stream in batches of 50: the counts cross a multiple of 64 nine times per stream, and
    # each update trains on at most the 64 stored samples
    assert 0 < reset["backward_per_sample"] <= 9 * 64 / 599
