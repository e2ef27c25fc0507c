"""SemCKD and MMKD in their papers' form (queries, keys and feature weights from the batch's
sample-similarity matrices), checked against the equations computed with explicit loops over layers,
teachers and samples; their pooled variants; EBKD's scale against the CA-MKD code's EBKD baseline."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mentor.distill.mmkd  # noqa: F401  (registers mmkd)
import mentor.distill.multi_teacher  # noqa: F401  (registers ebkd)
import mentor.distill.semckd  # noqa: F401  (registers semckd)
from mentor.config import ConfigError, load_config
from mentor.distill.losses import sample_similarity
from mentor.distill.mmkd import FeatureWeightNet, PooledFeatureWeightNet
from mentor.distill.semckd import QueryKeyEmbed, SimilarityEmbed
from mentor.engine import checkpoint as ckpt
from mentor.methods import BuildInfo, StepContext, create_method
from mentor.models import create_model

B = 8  # the batch size every method here is set up with
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "distill"


def random_teacher(tmp_path, name):
    """A checkpoint of an untrained zoo network in the format `mentor train` writes (best.pt)."""
    net = create_model(name, num_classes=10, in_channels=1)
    path = tmp_path / f"{name}.pt"
    if not path.exists():
        ckpt.atomic_save({"model": net.state_dict(), "info": {"model": name, "num_classes": 10, "in_channels": 1,
                                                              "image_size": 28, "dataset": "test",
                                                              "method": "supervised"}}, path)
    return str(path)


def batch(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 28, 28, generator=g), "y": torch.arange(n) % 10}


def build(method, tmp_path, teachers, seed=0, **hp):
    torch.manual_seed(seed)
    paths = [random_teacher(tmp_path, t) for t in teachers]
    key = {"teacher": paths[0]} if method == "semckd" else {"teachers": paths}
    m = create_method(method, create_model("resnet8", num_classes=10, in_channels=1), BuildInfo(), **key, **hp)
    m.setup(batch())
    return m


# -- plain math in float64, sample by sample --------------------------------------------------------


def gram(f):
    """A[a][b] = <F[a], F[b]> of the flattened features, one dot product at a time."""
    rows = f.detach().double().reshape(f.shape[0], -1)
    return [[float(torch.dot(rows[a], rows[b])) for b in range(len(rows))] for a in range(len(rows))]


def two_layer(mlp, v):
    """Linear -> ReLU -> Linear of the module ``mlp`` (a Sequential) on the list ``v``, by hand."""
    w1, b1 = mlp[0].weight.detach().double(), mlp[0].bias.detach().double()
    w2, b2 = mlp[2].weight.detach().double(), mlp[2].bias.detach().double()
    h = [max(0.0, float(b1[o]) + sum(float(w1[o, i]) * v[i] for i in range(len(v)))) for o in range(len(b1))]
    return [float(b2[o]) + sum(float(w2[o, i]) * h[i] for i in range(len(h))) for o in range(len(b2))]


def unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def pair(s, t):
    """SemCKD's / MMKD's spatial alignment: the larger map average-pooled to the smaller one's size."""
    if s.shape[-1] > t.shape[-1]:
        return F.adaptive_avg_pool2d(s, t.shape[-2:]), t
    return s, F.adaptive_avg_pool2d(t, s.shape[-2:])


def sample_mse(a, b, i):
    d = (a[i].detach().double() - b[i].detach().double()).flatten()
    return float((d * d).sum()) / d.numel()


def test_sample_similarity_is_the_gram_matrix_of_the_flattened_features():
    f = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert sample_similarity(f).flatten().tolist() == pytest.approx(sum(gram(f), []), rel=1e-5, abs=1e-5)
    assert sample_similarity(torch.tensor([[1.0, 2.0], [3.0, 0.0]])).tolist() == [[5.0, 3.0], [3.0, 9.0]]
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        sample_similarity(torch.ones(3))


def test_similarity_inputs_stay_float32_under_autocast():
    f = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    embed, weights = SimilarityEmbed(4, 2), FeatureWeightNet(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, e, w = sample_similarity(f), embed(f), weights([f, f], f)
    assert a.dtype == e.dtype == w.dtype == torch.float32
    assert torch.allclose(a, f.flatten(1) @ f.flatten(1).t(), rtol=1e-6)
    assert torch.allclose(e, embed(f)) and torch.allclose(w, weights([f, f], f))


# -- SemCKD ------------------------------------------------------------------------------------------


def test_semckd_defaults_to_the_papers_similarity_attention(tmp_path):
    m = build("semckd", tmp_path, ["resnet14"])
    assert m.cfg.attention_input == "similarity" and m.cfg.beta == 400 and m.cfg.attention_temperature == 1
    # MLPEmbed(B, B // 4): Linear(B -> 2 B/4) -> ReLU -> Linear(-> B/4), one per stage after the stem
    assert len(m.query) == len(m.key) == 3 and all(isinstance(e, SimilarityEmbed) for e in [*m.query, *m.key])
    assert [(e.mlp[0].in_features, e.mlp[0].out_features, e.mlp[2].out_features) for e in m.query] == [(B, 4, 2)] * 3
    assert build("semckd", tmp_path, ["resnet14"], embed_dim=5).query[0].mlp[2].out_features == 5
    pooled = build("semckd", tmp_path, ["resnet14"], attention_input="pooled")
    assert all(isinstance(e, QueryKeyEmbed) for e in pooled.query)
    assert [e.mlp[0].in_features for e in pooled.query] == [16, 32, 64] and pooled.query[0].mlp[2].out_features == 16


def test_semckd_loss_matches_the_papers_equations_sample_by_sample(tmp_path):
    m = build("semckd", tmp_path, ["resnet14"], attention_temperature=0.5)
    m.train()
    b = batch(seed=1)
    out = m.training_step(b, StepContext(0, 10))
    s_feats = [m.s_tap[n] for n in m.s_names]
    t_feats = [m.t_tap[n] for n in m.t_names]
    n_s, n_t = len(s_feats), len(t_feats)
    # q_{b,i} = l2norm(MLPEmbed_i(A^S_i[b])), k_{b,j} = l2norm(MLPEmbed_j(A^T_j[b])), A_l = F_l F_l^T
    q = [[unit(two_layer(m.query[i].mlp, row)) for row in gram(f)] for i, f in enumerate(s_feats)]
    k = [[unit(two_layer(m.key[j].mlp, row)) for row in gram(f)] for j, f in enumerate(t_feats)]
    total = 0.0
    with torch.no_grad():  # train-mode BN: the regressors give the step's outputs again
        for i in range(n_s):
            att = [softmax([sum(a * c for a, c in zip(q[i][s], k[j][s])) / 0.5 for j in range(n_t)]) for s in range(B)]
            for j in range(n_t):
                f_s, f_t = pair(s_feats[i], t_feats[j])
                proj = m.regressors[i][j](f_s)
                total += sum(att[s][j] * sample_mse(proj, f_t, s) for s in range(B))
    assert out["semckd"].item() == pytest.approx(total / (B * n_s), rel=1e-4)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kd"].item() + 400 * out["semckd"].item(),
                                               rel=1e-5)
    # not detached: the loss trains the query/key embeddings
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.query.parameters())


def test_semckd_similarity_attention_depends_on_the_batch_and_needs_its_size(tmp_path):
    def attention_of_first_sample(m, x):
        with torch.no_grad():
            m.student(x)
            m.teacher(x)
            return m.attention([m.s_tap[n] for n in m.s_names], [m.t_tap[n] for n in m.t_names])[0]

    x = batch()["x"]
    other = x.clone()
    other[-1] = torch.randn(1, 28, 28)
    for form, depends in (("similarity", True), ("pooled", False)):
        m = build("semckd", tmp_path, ["resnet14"], attention_input=form)
        m.eval()
        a, b = attention_of_first_sample(m, x), attention_of_first_sample(m, other)
        assert torch.allclose(a.sum(-1), torch.ones(3), atol=1e-6)
        assert (not torch.allclose(a, b, atol=1e-7)) is depends, form
    m = build("semckd", tmp_path, ["resnet14"])
    with pytest.raises(ConfigError, match=r"attention_input=similarity .* exactly 8 .* got 5\b.*data.batch_size"):
        m.training_step(batch(5), StepContext(0, 10))


# -- MMKD --------------------------------------------------------------------------------------------


def test_mmkd_feature_weights_and_loss_match_the_papers_equations(tmp_path):
    m = build("mmkd", tmp_path, ["resnet14", "wrn_16_1"])
    k = len(m.teachers)
    assert m.cfg.feature_weight_input == "similarity" and isinstance(m.feat_net, FeatureWeightNet)
    # the input is the B x B similarity matrices of the K teachers' and the student's last maps: B (K + 1)
    assert (m.feat_net.mlp[0].in_features, m.feat_net.mlp[0].out_features) == (B * (k + 1), B * (k + 1) // 2)
    m.train()
    out = m.training_step(batch(seed=2), StepContext(0, 10, phase="student"))
    f_s, f_t = m.last_maps()
    sims = [gram(f) for f in [*f_t, f_s]]  # teachers first, then the student, as the reference concatenates
    v = [softmax(two_layer(m.feat_net.mlp, [a for g in sims for a in g[s]])) for s in range(B)]  # [B][K]
    assert m.feat_net(f_t, f_s).t().flatten().tolist() == pytest.approx(sum(v, []), rel=1e-4, abs=1e-6)
    for t in range(k):
        assert out[f"v{t}"].item() == pytest.approx(sum(v[s][t] for s in range(B)) / B, rel=1e-4, abs=1e-6)
    # L_feat = sum_b sum_k v_{b,k} MSE_b(Embed_k(f_s), f_t_k) / B
    total = 0.0
    with torch.no_grad():
        for t in range(k):
            s_in, target = pair(f_s, f_t[t])
            e = m.embeds[t](s_in)
            total += sum(v[s][t] * sample_mse(e, target, s) for s in range(B))
    assert out["feat"].item() == pytest.approx(total / B, rel=1e-4)
    with pytest.raises(ConfigError, match=r"method.feature_weight_input=similarity .* exactly 8 .* got 4\b"):
        m.feat_net([f[:4] for f in f_t], f_s[:4])


def test_mmkd_feature_weight_net_on_small_maps_reads_the_teachers_then_the_student():
    # The real maps' dot products are in the thousands, so the weights above are one-hot (as in the
    # reference); small maps keep the softmax away from saturation, so the order of the input shows.
    torch.manual_seed(0)
    net = FeatureWeightNet(4, 2)
    g = torch.Generator().manual_seed(1)
    t_maps = [0.3 * torch.randn(4, 2, 2, 2, generator=g) for _ in range(2)]
    s_map = (0.3 * torch.randn(4, 3, 2, 2, generator=g)).requires_grad_()
    got = net(t_maps, s_map)
    sims = [gram(f) for f in [*t_maps, s_map]]
    want = [softmax(two_layer(net.mlp, [a for g in sims for a in g[s]])) for s in range(4)]
    assert got.t().flatten().tolist() == pytest.approx(sum(want, []), rel=1e-5)
    assert min(sum(want, [])) > 0.05  # not saturated
    got.sum().backward()
    assert s_map.grad is None  # the student's map enters detached, as in the reference


def test_mmkd_pooled_feature_weights_take_any_batch_and_ignore_the_other_samples(tmp_path):
    m = build("mmkd", tmp_path, ["resnet14", "wrn_16_1"], feature_weight_input="pooled")
    assert isinstance(m.feat_net, PooledFeatureWeightNet)
    assert m.feat_net.mlp[0].in_features == 64 + 64 + 64  # channels of the last maps: two teachers, the student
    m.eval()
    x = batch()["x"]
    with torch.no_grad():
        weights = []
        for xs in (x, x[:3]):
            m.teacher_logits(xs)
            m.student(xs)
            f_s, f_t = m.last_maps()
            weights.append(m.feat_net(f_t, f_s))
    assert weights[1].shape == (2, 3) and torch.allclose(weights[0][:, :3], weights[1], atol=1e-6)


# -- EBKD's scale ------------------------------------------------------------------------------------


def camkd_ebkd_baseline(student_logits, teacher_logits, temperature=4.0):
    """The CA-MKD code's EBKD loss: sum_{b,k} (1 - H_k / sum_j H_j) T^2 KL_b(p_k || p_s) / (B K)."""
    k, b = len(teacher_logits), len(student_logits)
    total = 0.0
    for s in range(b):
        h = [-sum(p * math.log(p) for p in softmax(teacher_logits[t][s]) if p > 0) for t in range(k)]
        p_s = softmax([z / temperature for z in student_logits[s]])
        for t in range(k):
            p_t = softmax([z / temperature for z in teacher_logits[t][s]])
            kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s) if pt > 0)
            total += (1 - h[t] / sum(h)) * temperature ** 2 * kl
    return total / (b * k)


@pytest.mark.parametrize("teachers", [["resnet14", "wrn_16_1"], ["resnet14", "wrn_16_1", "resnet8"]])
def test_ebkd_is_k_over_k_minus_1_times_the_camkd_baseline_which_weight_norm_camkd_reproduces(tmp_path, teachers):
    k = len(teachers)
    b = batch(seed=3)
    outs = {}
    for norm in ("one", "camkd"):
        m = build("ebkd", tmp_path, teachers, weight_norm=norm)
        m.train()
        outs[norm] = m.training_step(b, StepContext(0, 10))
    assert outs["one"]["kd"].item() == pytest.approx(k / (k - 1) * outs["camkd"]["kd"].item(), rel=1e-5)
    with torch.no_grad():  # train-mode BN: the step's logits again
        s, t = m.student(b["x"]).tolist(), m.teacher_logits(b["x"]).tolist()
    assert outs["camkd"]["kd"].item() == pytest.approx(camkd_ebkd_baseline(s, t), rel=1e-4)
    assert sum(outs["one"][f"w{i}"].item() for i in range(k)) == pytest.approx(1.0)
    assert sum(outs["camkd"][f"w{i}"].item() for i in range(k)) == pytest.approx(k - 1.0)


def test_ebkd_camkd_weights_need_two_teachers(tmp_path):
    with pytest.raises(ConfigError, match="weight_norm=camkd.*at least two"):
        build("ebkd", tmp_path, ["resnet14"], weight_norm="camkd")
    assert build("ebkd", tmp_path, ["resnet14"]).cfg.weight_norm == "one"  # one teacher: plain KD


# -- recipes -----------------------------------------------------------------------------------------


def test_recipes_use_the_papers_forms():
    cfgs = {n: load_config(RECIPES / f"fmnist_{n}.yaml").method for n in ("semckd", "mmkd", "ebkd")}
    assert cfgs["semckd"].attention_input == "similarity" and cfgs["semckd"].embed_dim is None
    assert cfgs["mmkd"].feature_weight_input == "similarity"
    assert cfgs["ebkd"].weight_norm == "one"
