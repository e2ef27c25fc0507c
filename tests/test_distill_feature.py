"""Feature and relation baselines: FitNet hints, attention transfer, RKD and CRD (memory bank, NCE)
against independent computations (plain-Python loops, hand-worked examples, identities), connectors
sized by dry runs for several zoo pairs, and the four methods trained, resumed and evaluated on a
Fashion-MNIST subset."""

import copy
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import FMNIST_SMALL, split_accuracy

import mentor.distill.at
import mentor.distill.crd
import mentor.distill.fitnet
import mentor.distill.rkd  # noqa: F401  (registers fitnet, at, rkd, crd)
from mentor.config import load_config
from mentor.distill.connectors import ConvRegressor, EmbedHead
from mentor.distill.losses.contrastive import NCE, CRDLoss, MemoryBank, nce_loss
from mentor.distill.losses.feature import (
    align_spatial,
    at_loss,
    attention_map,
    hint_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from mentor.engine import Trainer
from mentor.engine.inputs import Splits, load_splits
from mentor.methods import BuildInfo, StepContext, create_method
from mentor.models import create_model

# -- independent references: plain Python ---------------------------------------------------------


def adaptive_avg_pool(f, out_h, out_w):
    """[C][H][W] nested lists -> [C][out_h][out_w]: bins [floor(i*H/o), ceil((i+1)*H/o))."""
    H, W = len(f[0]), len(f[0][0])
    out = []
    for ch in f:
        rows = []
        for i in range(out_h):
            h0, h1 = (i * H) // out_h, -(-((i + 1) * H) // out_h)
            row = []
            for j in range(out_w):
                w0, w1 = (j * W) // out_w, -(-((j + 1) * W) // out_w)
                vals = [ch[h][w] for h in range(h0, h1) for w in range(w0, w1)]
                row.append(sum(vals) / len(vals))
            rows.append(row)
        out.append(rows)
    return out


def attention_loop(f, p):
    """[C][H][W] -> flattened, L2-normalised sum_c |f|^p."""
    H, W = len(f[0]), len(f[0][0])
    v = [sum(abs(ch[h][w]) ** p for ch in f) for h in range(H) for w in range(W)]
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_loops(s, t):
    """(distance loss, angle loss) of two lists of points, by loops over pairs and triplets."""
    n = len(s)

    def dist(e):
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[x / mu for x in row] for row in d]

    def cos(e, j, i, k):
        if i == j or k == j:
            return 0.0
        a = [x - y for x, y in zip(e[i], e[j])]
        b = [x - y for x, y in zip(e[k], e[j])]
        return sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))

    ds, dt = dist(s), dist(t)
    ld = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    la = sum(huber(cos(s, j, i, k) - cos(t, j, i, k)) for i in range(n) for j in range(n) for k in range(n)) / n**3
    return ld, la


def nce_loop(scores, n_data, T, Z=None):
    """CRD's NCE by its definition, with Z = N * mean exp(s/T) over all scores when not given."""
    flat = [x for row in scores for x in row]
    if Z is None:
        Z = n_data * sum(math.exp(x / T) for x in flat) / len(flat)
    K = len(scores[0]) - 1
    c = K / n_data
    total = 0.0
    for row in scores:
        P = [math.exp(x / T) / Z for x in row]
        total += math.log(P[0] / (P[0] + c)) + sum(math.log(c / (p + c)) for p in P[1:])
    return -total / len(scores), Z


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


# -- hint, attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("s_hw,t_hw", [(8, 4), (7, 4), (4, 7), (5, 5)])
def test_hint_loss_pools_the_larger_map_then_takes_the_mse(s_hw, t_hw):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, s_hw, s_hw, generator=g), torch.randn(2, 3, t_hw, t_hw, generator=g)
    m = min(s_hw, t_hw)
    total, count = 0.0, 0
    for b in range(2):
        ps, pt = adaptive_avg_pool(s[b].tolist(), m, m), adaptive_avg_pool(t[b].tolist(), m, m)
        for c in range(3):
            for i in range(m):
                for j in range(m):
                    total += (ps[c][i][j] - pt[c][i][j]) ** 2
                    count += 1
    assert hint_loss(s, t).item() == pytest.approx(total / count, rel=1e-5)
    a, b = align_spatial(s, t)
    assert a.shape == b.shape == (2, 3, m, m)
    with pytest.raises(ValueError, match="channels"):
        hint_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))


def test_attention_map_is_the_normalised_channel_sum_of_powers():
    f = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    for p in (1.0, 2.0, 3.0):
        got = attention_map(f, p)
        assert got.shape == (2, 20)
        for b in range(2):
            assert got[b].tolist() == pytest.approx(attention_loop(f[b].tolist(), p), rel=1e-5, abs=1e-7)


def test_at_loss_sums_the_mean_squared_attention_difference_over_aligned_pairs():
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 4, 4, generator=g)),
             (torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g))]
    want = 0.0
    for s, t in pairs:
        m = min(s.shape[-1], t.shape[-1])
        for b in range(2):
            qs = attention_loop(adaptive_avg_pool(s[b].tolist(), m, m), 2)
            qt = attention_loop(adaptive_avg_pool(t[b].tolist(), m, m), 2)
            want += sum((x - y) ** 2 for x, y in zip(qs, qt)) / (2 * m * m)
    got = at_loss([s for s, _ in pairs], [t for _, t in pairs], p=2)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # Attention ignores a positive rescaling of the map and the channel count.
    s = pairs[1][0]
    assert at_loss(s, 7.0 * torch.cat([s, s], 1)).item() == pytest.approx(0.0, abs=1e-12)


# -- RKD ------------------------------------------------------------------------------------------


def test_rkd_on_four_points_matches_loops_over_pairs_and_triplets():
    # A tight cluster far from the origin, and one point farther still.
    s = [[50.0, 50.0, 50.0], [50.01, 50.0, 50.0], [50.0, 50.02, 50.0], [56.0, 51.0, 48.0]]
    t = [[1.0, 0.5, 0.0], [-1.0, 0.3, 0.2], [0.1, -1.2, 0.7], [0.4, 0.9, -1.1]]
    ld, la = rkd_loops(s, t)
    S, T = torch.tensor(s), torch.tensor(t)
    assert rkd_distance_loss(S, T).item() == pytest.approx(ld, rel=1e-5)
    assert rkd_angle_loss(S, T).item() == pytest.approx(la, rel=1e-5)
    assert ld > 0.1 and la > 0.05


def test_rkd_hand_worked_line_against_equilateral_triangle():
    # Student 0, 1, 2 on a line: distances 1, 1, 2, mean over ordered pairs 4/3 -> 0.75, 0.75, 1.5.
    # Teacher equilateral: all 1. Huber of -0.25, -0.25, 0.5, each twice, over 9 entries = 1/24.
    # Angles: at the middle point the two rays are opposite (cos -1, teacher 0.5: Huber 1.0, twice);
    # at an end both rays coincide (cos 1 vs 0.5: Huber 0.125, twice per end): 2.5 over 27 triplets.
    line = torch.tensor([[0.0], [1.0], [2.0]])
    tri = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert rkd_distance_loss(line, tri).item() == pytest.approx(1 / 24, rel=1e-5)
    assert rkd_angle_loss(line, tri).item() == pytest.approx(2.5 / 27, rel=1e-5)


def test_rkd_is_invariant_to_similarity_transforms_and_has_finite_gradients():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4, generator=g, requires_grad=True)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    t = 3.0 * s.detach() @ q + torch.randn(4, generator=g)  # rotate, scale, translate
    assert rkd_distance_loss(s, t).item() == pytest.approx(0.0, abs=1e-9)
    assert rkd_angle_loss(s, t).item() == pytest.approx(0.0, abs=1e-9)
    (rkd_distance_loss(s, t.flip(0)) + rkd_angle_loss(s, t.flip(0))).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# -- memory bank and NCE --------------------------------------------------------------------------


def test_memory_bank_update_is_the_momentum_average_renormalised():
    bank = MemoryBank(5, 2, views=2, momentum=0.25, seed=0)
    bank.memory.zero_()
    bank.memory[0, 1] = torch.tensor([1.0, 0.0])
    bank.memory[0, 3] = torch.tensor([0.0, 2.0])
    bank.memory[1, 1] = torch.tensor([0.0, 1.0])
    bank.memory[1, 3] = torch.tensor([0.6, 0.8])
    before = bank.memory.clone()
    emb = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.6, 0.8]]])  # [views, B, dim]
    bank.update(torch.tensor([1, 3]), emb, labels=torch.tensor([7, 2]))
    m = 0.25
    for v in range(2):
        for b, i in enumerate((1, 3)):
            raw = [m * before[v, i, d].item() + (1 - m) * emb[v, b, d].item() for d in range(2)]
            assert bank.memory[v, i].tolist() == pytest.approx(unit(raw), rel=1e-6)
    assert bank.memory[0, 1].tolist() == pytest.approx([0.25 / math.hypot(0.25, 0.75), 0.75 / math.hypot(0.25, 0.75)])
    for i in (0, 2, 4):
        assert torch.equal(bank.memory[:, i], before[:, i])
    assert bank.labels.tolist() == [-1, 7, -1, 2, -1]


def test_memory_bank_sampling_is_on_the_device_reproducible_and_avoids_the_anchor_class():
    n, k = 400, 300
    bank = MemoryBank(n, 4, seed=123)
    index = torch.tensor([5, 17, 42, 399])
    idx = bank.sample(index, k)
    assert idx.shape == (4, 1 + k) and torch.equal(idx[:, 0], index)
    assert idx.min() >= 0 and idx.max() < n and idx.dtype == torch.long
    # The stream continues from the saved state: a bank loaded from this one draws the same next.
    twin = MemoryBank(n, 4, seed=999)
    twin.load_state_dict(bank.state_dict())
    assert torch.equal(twin.sample(index, k), bank.sample(index, k))
    assert not torch.equal(bank.sample(index, k), bank.sample(index, k))  # fresh negatives each draw
    # Labels: 10 balanced classes; negatives of the anchor's class are redrawn.
    bank.labels.copy_(torch.arange(n) % 10)
    y = torch.tensor([0, 3, 3, 9])
    uniform = (bank.labels[bank.sample(index, k)[:, 1:]] == y[:, None]).float().mean().item()
    other = (bank.labels[bank.sample(index, k, labels=y)[:, 1:]] == y[:, None]).float().mean().item()
    assert 0.05 < uniform < 0.15 and other < 1e-3


@pytest.mark.parametrize("size,dim,k", [(6, 4, 3), (100, 2, 2)])  # full score matrix, then row gather
def test_memory_scores_are_dot_products_and_the_update_does_not_break_backward(size, dim, k):
    g = torch.Generator().manual_seed(4)
    bank = MemoryBank(size, dim, views=2, seed=1)
    a = torch.randn(3, dim, generator=g, requires_grad=True)
    idx = bank.sample(torch.tensor([0, 2, 5]), k)
    mem = bank.memory[1].clone()
    got = bank.scores(a, 1, idx)
    for b in range(3):
        for j in range(1 + k):
            want = sum(a[b, d].item() * mem[idx[b, j], d].item() for d in range(dim))
            assert got[b, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    bank.update(torch.tensor([0, 2, 5]), torch.randn(2, 3, dim, generator=g))  # before backward, as CRD does
    got.sum().backward()
    want_grad = torch.stack([mem[idx[b]].sum(0) for b in range(3)])
    assert torch.allclose(a.grad, want_grad, atol=1e-6)


def test_nce_loss_matches_its_definition_and_z_is_estimated_once():
    s1 = [[0.9, 0.1, -0.3, 0.2], [0.4, 0.5, -0.8, 0.0]]
    s2 = [[0.7, 0.6, 0.2, -0.1], [-0.2, 0.3, 0.1, 0.8]]
    n, T = 10, 0.5
    want1, z1 = nce_loop(s1, n, T)
    assert nce_loss(torch.tensor(s1), n, T).item() == pytest.approx(want1, rel=1e-5)
    want_fixed, _ = nce_loop(s1, n, T, Z=3.0)
    assert nce_loss(torch.tensor(s1), n, T, log_z=math.log(3.0)).item() == pytest.approx(want_fixed, rel=1e-5)
    crit = NCE(n, T)
    assert crit(torch.tensor(s1)).item() == pytest.approx(want1, rel=1e-5)
    assert crit.z.item() == pytest.approx(z1, rel=1e-5)
    want2, _ = nce_loop(s2, n, T, Z=z1)  # the second batch keeps the first batch's Z
    assert crit(torch.tensor(s2)).item() == pytest.approx(want2, rel=1e-5)
    assert crit.state_dict()["z"].item() == pytest.approx(z1, rel=1e-5)


def test_crd_loss_contrasts_each_side_with_the_other_memory_then_updates_both():
    g = torch.Generator().manual_seed(5)
    n, dim, k, T = 12, 3, 4, 0.5
    crd = CRDLoss(n, dim, k, T, momentum=0.5)
    es = F.normalize(torch.randn(3, dim, generator=g), dim=1)
    et = F.normalize(torch.randn(3, dim, generator=g), dim=1)
    index, y = torch.tensor([2, 7, 11]), torch.tensor([0, 1, 0])
    twin = copy.deepcopy(crd.bank)
    idx = twin.sample(index, k, y).tolist()
    mem = crd.bank.memory.clone()
    ls, lt = crd(es, et, index, y)

    def scores(anchor, view):
        return [[sum(anchor[b, d].item() * mem[view, j, d].item() for d in range(dim)) for j in idx[b]]
                for b in range(3)]

    assert ls.item() == pytest.approx(nce_loop(scores(es, 1), n, T)[0], rel=1e-5)  # student vs teacher memory
    assert lt.item() == pytest.approx(nce_loop(scores(et, 0), n, T)[0], rel=1e-5)
    for v, e in ((0, es), (1, et)):
        for b, i in enumerate(index.tolist()):
            raw = [0.5 * mem[v, i, d].item() + 0.5 * e[b, d].item() for d in range(dim)]
            assert crd.bank.memory[v, i].tolist() == pytest.approx(unit(raw), rel=1e-5)
    assert crd.bank.labels[index].tolist() == [0, 1, 0]


# -- connectors sized by a dry run ----------------------------------------------------------------


def test_conv_regressor_reaches_the_teacher_shape():
    for s, t in [((16, 28, 28), (32, 14, 14)), ((256, 7, 7), (32, 14, 14)), ((8, 7, 7), (4, 4, 4)),
                 ((5, 9, 9), (6, 9, 9)), ((3, 28, 28), (7, 7, 7))]:
        out = ConvRegressor((2, *s), (2, *t)).eval()(torch.randn(2, *s))
        a, b = align_spatial(out, torch.zeros(2, *t))
        assert a.shape == b.shape == (2, *t)
    e = EmbedHead(10, 4)(torch.randn(3, 10))
    assert e.shape == (3, 4) and torch.allclose(e.norm(dim=1), torch.ones(3))


# (student, teacher index in fast_teachers, method, extra hyper-parameters)
PAIRS = [
    ("resnet8", 1, "fitnet", {}), ("resnet8", 0, "fitnet", {"student_layer": "layer1"}),
    ("vgg8", 0, "fitnet", {}), ("vgg8", 1, "at", {}), ("resnet8", 0, "rkd", {}),
    ("resnet8", 1, "crd", {"nce_k": 16}), ("vgg8", 0, "crd", {"nce_k": 16, "kd_weight": 0.5}),
]


@pytest.mark.parametrize("student,teacher,method,hp", PAIRS)
def test_connectors_are_sized_by_a_dry_run_for_any_pair(student, teacher, method, hp, fast_teachers):
    torch.manual_seed(0)
    info = BuildInfo(num_classes=10, in_channels=1, image_size=28, train_size=50)
    net = create_model(student, num_classes=10, in_channels=1)
    m = create_method(method, net, info, teacher=fast_teachers[teacher], **hp)
    batch = {"x": torch.randn(8, 1, 28, 28), "y": torch.arange(8) % 10, "index": torch.arange(8) * 3}
    bn_before = {k: v.clone() for k, v in net.state_dict().items()}
    m.setup(batch)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in bn_before.items())  # the dry run changed nothing
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    c = m.cfg
    assert out["loss"].item() == pytest.approx(
        c.ce_weight * out["ce"].item() + c.kd_weight * out["kd"].item() + c.beta * out[m.term].item(), rel=1e-5)
    out["loss"].backward()
    fs = [m.s_tap[n] for n in m.s_names]
    ft = [m.t_tap[n] for n in m.t_names]
    if method == "fitnet":
        assert m.regressor(fs[0]).shape[1] == ft[0].shape[1]
        assert m.regressor[0].weight.grad is not None
    if method == "at":
        assert m.s_names == list(net.stage_names[1:])[:len(m.t_names)]
    if method == "crd":
        assert m.embed_s.linear.in_features == net.num_features
        assert m.embed_t.linear.in_features == m.teacher.num_features
        assert m.embed_t.linear.weight.grad is not None
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_default_hint_layer_is_the_middle_stage(fast_teachers):
    m = create_method("fitnet", create_model("resnet8", num_classes=10, in_channels=1),
                      BuildInfo(), teacher=fast_teachers[0])
    assert m.s_names == ["layer2"] and m.t_names == ["layer2"]
    assert (m.cfg.ce_weight, m.cfg.kd_weight, m.cfg.beta) == (1.0, 0.0, 100.0)


# -- methods on Fashion-MNIST ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits_for():
    """The run's splits, loaded once per data config, with a 500-image test split to keep it fast."""
    cache = {}

    def get(cfg):
        key = repr(cfg.data)
        if key not in cache:
            s = load_splits(cfg.data)
            cache[key] = Splits(s.train, s.val, s.test.subset(torch.arange(500)), s.train_index)
        return cache[key]

    return get


def _train_events(run):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["split"] == "train"]


def _check_trained_resumed_run(trainer, summary, run, method, terms, steps, splits, key="loss"):
    assert trainer.start_step == steps[len(steps) // 2 - 1]
    assert summary["method"] == method and summary["steps"] == steps[-1]
    events = _train_events(run)
    assert [e["step"] for e in events] == steps
    assert terms <= set(events[0])
    first = sum(e[key] for e in events[:2]) / 2
    last = sum(e[key] for e in events[-2:]) / 2
    assert last < first, [e[key] for e in events]
    # the reported number is the final student's accuracy on the test split
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(trainer.method.deployable(), splits.test,
                                                                    splits.train), abs=1 / len(splits.test) + 1e-9)
    assert all(p.grad is None for p in trainer.method.teacher.parameters())


# 256 training images. CRD's memory holds random vectors until every sample has been seen once and its
# NCE normaliser Z is estimated on the first batch, so its contrastive term grows over the first epochs
# (it falls only later, as in the slow test): its cross-entropy must fall.
@pytest.mark.parametrize("method,extra,terms,key", [
    ("fitnet", ["data.batch_size=32"], {"ce", "kd", "hint"}, "loss"),
    ("at", ["data.batch_size=32"], {"ce", "kd", "at"}, "loss"),
    ("rkd", ["data.batch_size=32"], {"ce", "kd", "rkd", "rkd_distance", "rkd_angle"}, "loss"),
    ("crd", ["method.nce_k=256"], {"ce", "kd", "crd", "crd_student", "crd_teacher"}, "ce"),
])
def test_method_trains_resumes_and_evaluates_on_tiny_data(method, extra, terms, key, fast_teachers, fmnist_tiny,
                                                          tmp_path):
    base = [f"out_dir={tmp_path / 'student'}", *FMNIST_SMALL, "model.name=resnet8", f"method.name={method}",
            f"method.teacher={fast_teachers[0]}", *extra, "trainer.log_every=2", "trainer.eval_every=4",
            "trainer.ckpt_every=4"]
    Trainer(load_config(None, [*base, "trainer.max_steps=4"]), fmnist_tiny).fit()
    resumed = Trainer(load_config(None, [*base, "trainer.max_steps=8"]), fmnist_tiny)
    summary = resumed.fit()
    _check_trained_resumed_run(resumed, summary, tmp_path / "student", method, terms, [2, 4, 6, 8], fmnist_tiny,
                               key)


# CRD runs on 256 images (4 steps an epoch): its memory holds random vectors until every sample has
# been seen once, so its loss first rises, then falls; the comparison starts after that epoch.
@pytest.mark.slow
@pytest.mark.parametrize("method,extra,terms", [
    ("fitnet", ["data.batch_size=32"], {"ce", "kd", "hint"}),
    ("at", ["data.batch_size=32"], {"ce", "kd", "at"}),
    ("rkd", ["data.batch_size=32"], {"ce", "kd", "rkd", "rkd_distance", "rkd_angle"}),
    ("crd", ["data.subset=256", "method.nce_k=4096"], {"ce", "kd", "crd", "crd_student", "crd_teacher"}),
])
def test_method_trains_resumes_and_evaluates(method, extra, terms, fmnist_teachers, distill_overrides, tmp_path,
                                             splits_for):
    # 50 steps, then resumed to 100, with a trained teacher: the student learns well above chance (0.1)
    base = [*distill_overrides, f"method.name={method}", f"method.teacher={fmnist_teachers[0]}", *extra,
            "trainer.log_every=25", "trainer.eval_every=50", "trainer.ckpt_every=50"]
    cfg = load_config(None, [*base, "trainer.max_steps=50"])
    Trainer(cfg, splits_for(cfg)).fit()
    resumed = Trainer(load_config(None, [*base, "trainer.max_steps=100"]), splits_for(cfg))
    summary = resumed.fit()
    _check_trained_resumed_run(resumed, summary, tmp_path / "student", method, terms, [25, 50, 75, 100],
                               splits_for(cfg))
    assert summary["test_acc_last"] > 0.4, summary["test_acc_last"]


def test_crd_resumes_exactly_memory_bank_included(fast_teachers, fmnist_tiny, distill_overrides, tmp_path,
                                                  monkeypatch):
    # 256 training images (fmnist_tiny), batch 64
    base = [*distill_overrides, "method.name=crd", f"method.teacher={fast_teachers[1]}", "method.nce_k=256",
            "trainer.max_steps=6", "trainer.eval_every=6", "trainer.ckpt_every=6"]
    straight = load_config(None, [*base, f"out_dir={tmp_path / 'straight'}"])
    splits = fmnist_tiny
    Trainer(straight, splits).fit()
    cfg = load_config(None, [*base, f"out_dir={tmp_path / 'split'}"])
    original = Trainer._train_step

    def interrupt_after_step_2(self, step):
        original(self, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the engine saves between steps and stops

    monkeypatch.setattr(Trainer, "_train_step", interrupt_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, splits).fit()
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = Trainer(cfg, splits)
    resumed.fit()
    assert resumed.start_step == 3
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["method"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["method"]
    assert a.keys() == b.keys()
    assert {"contrast.bank.memory", "contrast.bank.labels", "contrast.bank._extra_state",
            "contrast.nce_student.z", "contrast.nce_teacher.z"} <= set(a)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key  # bitwise on CPU
        else:
            assert a[key] == b[key], key
    assert (a["contrast.bank.labels"] >= 0).sum() == 256  # 1.5 epochs: every sample is in the bank
    assert a["contrast.nce_student.z"] > 0
