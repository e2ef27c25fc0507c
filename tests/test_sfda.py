"""SHOT, SHOT-IM, NRC and AaD: their losses and pseudo-labels against independent computations, the target
banks, and source-free runs on the digits (printed fonts -> handwritten) that adapt, resume exactly and keep
SHOT's classifier frozen."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _ssl_runs import resumes_bitwise

from mentor.adapt.aad import aad_terms
from mentor.adapt.nrc import nrc_terms
from mentor.adapt.sfda import TargetBanks
from mentor.config import load_config
from mentor.engine import Trainer, train
from mentor.methods import StepContext
from mentor.models import MODELS, register_model
from mentor.nn.pseudo import centroid_pseudo_labels, im_loss, im_terms

pytest.importorskip("sklearn")


class SmallCNN(torch.nn.Module):
    """Two BN conv layers, average pooling and ``fc``: a source network whose 32 pooled features cluster the
    target well enough for the methods to work on (the 8 of ``test_bncnn`` do not)."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, width // 2, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(width // 2)
        self.conv2 = torch.nn.Conv2d(width // 2, width, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(width)
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


if "test_sfda_cnn" not in MODELS:
    register_model("test_sfda_cnn")(lambda num_classes, in_channels=1, **kw: SmallCNN(num_classes, in_channels, **kw))


# ------------------------------------------------------------------------------------------- the IM loss
def test_im_loss_is_the_mean_entropy_minus_the_entropy_of_the_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    eps = 1e-5
    rows = []
    for z in logits.tolist():
        m = max(z)
        e = [math.exp(v - m) for v in z]
        rows.append([v / sum(e) for v in e])
    cond = sum(-sum(p * math.log(p + eps) for p in row) for row in rows) / len(rows)
    mean = [sum(row[c] for row in rows) / len(rows) for c in range(5)]
    marg = -sum(p * math.log(p + eps) for p in mean)
    ent, div = im_terms(logits, eps)
    assert ent.item() == pytest.approx(cond, rel=1e-6) and div.item() == pytest.approx(marg, rel=1e-6)
    assert im_loss(logits).item() == pytest.approx(cond - marg, rel=1e-5, abs=1e-6)
    # a confident, balanced batch scores better than a confident collapsed one
    assert im_loss(torch.eye(5) * 20) < im_loss(torch.zeros(5, 5).index_fill_(1, torch.tensor([0]), 20.0))


# ------------------------------------------------------------------------------ SHOT's centroid labelling
def _shot_obtain_label(features, scores, rounds, momentum=None, weights="softmax", threshold=0, recount=True):
    """SHOT's obtain_label written as loops from its pseudocode (NumPy, float64): features augmented with 1
    and L2-normalised; soft centroids weighted by the scores; nearest centroid by cosine distance among the
    classes with more than ``threshold`` members; ``rounds`` hard refinements (optionally an EMA of them)."""
    f = np.concatenate([features.double().numpy(), np.ones((len(features), 1))], 1)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    s = scores.double().numpy()
    w = np.exp(s) if weights == "exp_logits" else s
    n, k = w.shape
    labels = [int(np.argmax(row)) for row in s]

    def centroids(wt):
        out = np.zeros((k, f.shape[1]))
        for c in range(k):
            tot = sum(wt[i][c] for i in range(n))
            out[c] = sum(wt[i][c] * f[i] for i in range(n)) / (1e-8 + tot)
        return out

    def assign(cent, allowed):
        out = []
        for i in range(n):
            best, arg = None, None
            for c in allowed:
                norm = np.linalg.norm(cent[c])
                d = 1.0 - (f[i] @ cent[c]) / norm if norm > 0 else 1.0
                if best is None or d < best:
                    best, arg = d, c
            out.append(arg)
        return out

    def allowed_of(lab):
        return [c for c in range(k) if sum(1 for v in lab if v == c) > threshold]

    cent = centroids(w)
    allowed = allowed_of(labels)
    labels = assign(cent, allowed)
    for _ in range(rounds):
        hard = np.zeros((n, k))
        for i, c in enumerate(labels):
            hard[i, c] = 1.0
        new = centroids(hard)
        cent = new if momentum is None else momentum * cent + (1 - momentum) * new
        if recount:
            allowed = allowed_of(labels)
        labels = assign(cent, allowed)
    return labels


def _clustered(n=60, d=6, k=4, seed=0, empty=3):
    """Features around ``k`` cluster centres and probabilities that never predict class ``empty``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 2
    truth = torch.arange(n) % k
    feats = centres[truth] + torch.randn(n, d, generator=g)
    logits = torch.randn(n, k, generator=g) + 2.5 * F.one_hot(truth, k)
    logits[:, empty] = -30.0
    return feats, logits


def test_centroid_pseudo_labels_follow_shots_obtain_label():
    feats, logits = _clustered()
    probs = logits.softmax(1)
    for rounds in (0, 1, 3):
        got = centroid_pseudo_labels(feats, probs, rounds=rounds)
        assert got.dtype == torch.long and got.tolist() == _shot_obtain_label(feats, probs, rounds)
    got = centroid_pseudo_labels(feats, probs)
    assert 3 not in got.tolist()  # no image predicts class 3: it takes no centroid and no label
    # the labels differ from the argmax: the centroids do something
    assert (got != probs.argmax(1)).any()


def test_centroid_pseudo_labels_threshold_momentum_and_exp_logit_weights():
    feats, logits = _clustered(seed=1)
    probs = logits.softmax(1)
    counts = torch.bincount(probs.argmax(1), minlength=4)
    thr = int(counts[counts > 0].min())  # drops the least predicted class
    assert centroid_pseudo_labels(feats, probs, threshold=thr).tolist() == _shot_obtain_label(feats, probs, 1,
                                                                                              threshold=thr)
    assert set(centroid_pseudo_labels(feats, probs, threshold=thr).tolist()) <= set(
        torch.nonzero(counts > thr).flatten().tolist())
    # ARFNet's form: exp(logit) weights, five refinements with an EMA of the centroids, the classes fixed
    want = _shot_obtain_label(feats, logits, 5, momentum=0.9, weights="exp_logits", recount=False)
    got = centroid_pseudo_labels(feats, logits, rounds=5, momentum=0.9, weights="exp_logits", recount=False)
    assert got.tolist() == want
    with pytest.raises(ValueError, match="weights"):
        centroid_pseudo_labels(feats, probs, weights="uniform")


# ---------------------------------------------------------------------------------- the target banks
def test_banks_write_normalised_features_and_scores_at_the_batch_indices():
    banks = TargetBanks(10, 3, 4)
    g = torch.Generator().manual_seed(0)
    feats, probs = torch.randn(10, 3, generator=g), torch.rand(10, 4, generator=g).softmax(1)
    banks.fill(feats, probs)
    assert torch.allclose(banks.features.norm(dim=1), torch.ones(10))
    before_f, before_s = banks.features.clone(), banks.scores.clone()
    new_f, new_s = torch.randn(3, 3, generator=g) * 5, torch.rand(3, 4, generator=g)
    index = torch.tensor([7, 2, 5])
    banks.update(new_f, new_s, index)
    for row, i in enumerate(index.tolist()):
        assert torch.allclose(banks.features[i], new_f[row] / new_f[row].norm())
        assert torch.equal(banks.scores[i], new_s[row])
    rest = [i for i in range(10) if i not in index.tolist()]
    assert torch.equal(banks.features[rest], before_f[rest]) and torch.equal(banks.scores[rest], before_s[rest])
    # an index twice in a batch keeps its last row
    banks.update(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]), torch.eye(4)[:2], torch.tensor([4, 4]))
    assert torch.equal(banks.features[4], torch.tensor([0.0, 1, 0])) and torch.equal(banks.scores[4], torch.eye(4)[1])


# ------------------------------------------------------------------------------ NRC's and AaD's losses
def _bank(n=20, d=5, c=4, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    fea_bank = F.normalize(torch.randn(n, d, generator=g), dim=1)
    score_bank = torch.randn(n, c, generator=g).softmax(1)
    index = torch.randperm(n, generator=g)[:b]
    probs = torch.randn(b, c, generator=g).softmax(1)
    fea_bank[index] = F.normalize(fea_bank[index] + 0.01 * torch.randn(b, d, generator=g), dim=1)
    score_bank[index] = probs  # the banks after the step's update
    return fea_bank, score_bank, index, probs


def _neighbours(fea_bank, row, k):
    """The ``k`` rows most similar to bank row ``row`` (by dot product), the row itself excluded."""
    sims = [(float(fea_bank[row] @ fea_bank[j]), j) for j in range(len(fea_bank)) if j != row]
    return [j for _, j in sorted(sims, reverse=True)[:k]]


def test_nrc_terms_match_a_loop_over_neighbours_and_their_neighbours():
    fea_bank, score_bank, index, probs = _bank()
    k, kk, r, eps = 3, 2, 0.1, 1e-5
    for reciprocal in (True, False):
        near_sum, exp_sum = 0.0, 0.0
        for b, i in enumerate(index.tolist()):
            for j in _neighbours(fea_bank, i, k):
                nn_j = _neighbours(fea_bank, j, kk)
                w = 1.0 if (reciprocal and i in nn_j) else r
                near_sum += w * float(score_bank[j] @ probs[b])
                for m in nn_j:
                    exp_sum += r * float(score_bank[m] @ probs[b])
        pbar = probs.mean(0)
        want_div = float((pbar * torch.log(pbar + eps)).sum())
        got = nrc_terms(probs, fea_bank[index], index, fea_bank, score_bank, k, kk, r, eps, reciprocal)
        assert got["neighbour"].item() == pytest.approx(-near_sum / len(index), rel=1e-5)
        assert got["expanded"].item() == pytest.approx(-exp_sum / len(index), rel=1e-5)
        assert got["diversity"].item() == pytest.approx(want_div, rel=1e-5)
    # some neighbour in this bank is reciprocal, so the two weightings differ
    a = nrc_terms(probs, fea_bank[index], index, fea_bank, score_bank, k, kk, r, eps, True)["neighbour"]
    b = nrc_terms(probs, fea_bank[index], index, fea_bank, score_bank, k, kk, r, eps, False)["neighbour"]
    assert a < b


def test_aad_terms_attract_neighbours_and_disperse_the_batch():
    fea_bank, score_bank, index, probs = _bank(seed=3)
    k = 4
    attract = 0.0
    for b, i in enumerate(index.tolist()):
        attract += sum(float(score_bank[j] @ probs[b]) for j in _neighbours(fea_bank, i, k))
    disperse = 0.0
    for a in range(len(index)):
        disperse += sum(float(probs[a] @ probs[c]) for c in range(len(index)) if c != a)
    got = aad_terms(probs, fea_bank[index], fea_bank, score_bank, k)
    assert got["attract"].item() == pytest.approx(-attract / len(index), rel=1e-5)
    assert got["disperse"].item() == pytest.approx(disperse / len(index), rel=1e-5)
    # the dispersion's gradient reaches every row through both factors of p_i . p_j
    p = probs.clone().requires_grad_(True)
    aad_terms(p, fea_bank[index], fea_bank, score_bank, k)["disperse"].backward()
    assert torch.allclose(p.grad, 2 * (probs.sum(0, keepdim=True) - probs) / len(index))


def test_aad_coefficient_decays_as_the_official_schedule():
    from mentor.adapt.aad import dispersion_weight

    for step, total in ((0, 100), (37, 100), (99, 100)):
        assert dispersion_weight(step, total, alpha=1.0, beta=5.0).item() == pytest.approx(
            (1 + 10 * step / total) ** -5.0, rel=1e-6)
    assert dispersion_weight(torch.tensor(50), 100, 0.5, 2.0).item() == pytest.approx(0.5 * 6.0 ** -2, rel=1e-6)


# ------------------------------------------------------------------------------------------ digits runs
# The weak view of the target batches (``u_weak``) with padding 0 and no flip is the image itself: a
# mirrored or shifted 8x8 digit is another digit, or none.
TARGET = ["model.name=test_sfda_cnn", "data.name=digits_domains", "data.domains=[handwritten]",
          "data.test_domains=[handwritten]", "data.augment=none", "data.padding=0", "data.flip=false",
          "trainer.progress=false", "trainer.log_every=1"]


def _printed(out, **kw):
    return [f"out_dir={out}", "data.name=digits_domains", "data.domains=[dejavu,liberation,freefont,urw]",
            "data.test_domains=[handwritten]", "data.batch_size=64", "data.augment=none",
            "model.name=test_sfda_cnn", "trainer.progress=false", "optim.lr=0.1",
            *[f"{k}={v}" for k, v in kw.items()]]


def _source(tmp_path_factory, steps):
    out = tmp_path_factory.mktemp("printed") / "run"
    train(load_config(None, _printed(out, **{"method.name": "erm", "trainer.max_steps": steps,
                                              "trainer.eval_every": steps, "trainer.ckpt_every": steps})))
    return out


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """ERM on the four printed font families, 20 steps: a source network for the mechanics tests."""
    return _source(tmp_path_factory, 20)


@pytest.fixture(scope="module")
def trained_source(tmp_path_factory):
    """ERM on the four printed font families, 300 steps: about 73% on the handwritten digits."""
    return _source(tmp_path_factory, 300)


@pytest.fixture(scope="module")
def target_splits():
    """The target's splits, read once (rendering the printed domains takes seconds)."""
    from mentor.engine.inputs import load_splits

    return load_splits(load_config(None, ["method.name=shot", *TARGET]).data)


def _target(out, source, method, steps, **kw):
    return load_config(None, [f"out_dir={out}", f"method.name={method}", f"model.init_from={source}", *TARGET,
                              "data.batch_size=64", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                              f"trainer.ckpt_every={steps}", "schedule.name=constant",
                              *[f"{k}={v}" for k, v in kw.items()]])


def _source_target_acc(trainer):
    """The source network's accuracy on the target test split (before any adaptation step)."""
    trainer.method.eval()
    acc = trainer.evaluator().accuracy(trainer.method.deployable(), trainer.splits.tests["handwritten"])
    trainer.method.train()
    return acc


@pytest.mark.slow
@pytest.mark.parametrize("method", ["shot", "shot_im", "nrc", "aad"])
def test_adaptation_raises_the_target_accuracy(tmp_path, trained_source, target_splits, method):
    source_run = trained_source
    # two epochs of the 1,438 target images with each method's default optimizer (lr 1e-2 or 1e-3)
    trainer = Trainer(_target(tmp_path / method, source_run, method, 44), splits=target_splits)
    before = _source_target_acc(trainer)
    head = {k: v.clone() for k, v in trainer.method.tap.head.state_dict().items()}
    summary = trainer.fit()
    after = summary["test_acc_last"]
    # 72.9% -> 89.0% (shot), 85.6% (shot_im), 80.5% (nrc), 80.1% (aad) on this CPU
    assert after > before + (0.05 if method == "shot" else 0.02), (before, after)
    changed = any(not torch.equal(v, trainer.method.tap.head.state_dict()[k]) for k, v in head.items())
    assert changed == (method in ("nrc", "aad"))  # SHOT keeps the source hypothesis; NRC and AaD train it
    events = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["split"] == "train"]
    assert len(train_events) == 44 and all(math.isfinite(e["loss"]) for e in train_events)


def test_shot_refreshes_its_pseudo_labels_every_interval_epochs(tmp_path, source_run, target_splits):
    trainer = Trainer(_target(tmp_path / "t", source_run, "shot", 3, **{"method.interval": 2}), splits=target_splits)
    m = trainer.method
    calls = []
    original = m.refresh_labels

    def spy(refresh):
        calls.append(refresh)
        original(refresh)

    m.refresh_labels = spy
    refreshed = []
    for epoch in range(5):
        n = len(calls)
        m.on_epoch(epoch, trainer._refresh())
        refreshed += [epoch] * (len(calls) - n)
    assert refreshed == [0, 2, 4]
    feats, probs = m.embed(trainer._refresh().unlabeled, trainer._refresh())
    assert torch.equal(m.pseudo_labels, centroid_pseudo_labels(feats, probs).to(m.pseudo_labels.device))
    trainer_im = Trainer(_target(tmp_path / "im", source_run, "shot_im", 3), splits=target_splits)
    trainer_im.method.on_epoch(0, trainer_im._refresh())  # SHOT-IM has no pseudo-labels to refresh
    assert not trainer_im.method.pseudo_labels.any()


def test_nrc_banks_start_from_the_pool_and_follow_each_batch(tmp_path, source_run, target_splits):
    trainer = Trainer(_target(tmp_path / "t", source_run, "nrc", 1), splits=target_splits)
    m = trainer.method
    refresh = trainer._refresh()
    m.on_epoch(0, refresh)
    feats, probs = m.embed(refresh.unlabeled, refresh)
    assert torch.allclose(m.banks.features, F.normalize(feats, dim=1)) and torch.allclose(m.banks.scores, probs)
    before = m.banks.features.clone()
    m.on_epoch(1, refresh)  # later epochs leave the banks to the steps
    assert torch.equal(m.banks.features, before)
    batch, _ = trainer._method_batch(trainer.inputs(0))
    m.train()
    with torch.no_grad():
        f, logits = m.tap(batch["u_weak"])
    m.training_step(batch, StepContext(step=0, max_steps=1, steps_per_epoch=trainer.inputs.steps_per_epoch))
    idx = batch["u_index"]
    assert torch.allclose(m.banks.features[idx], F.normalize(f, dim=1), atol=1e-6)
    assert torch.allclose(m.banks.scores[idx], logits.softmax(1), atol=1e-6)
    others = torch.ones(len(before), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(m.banks.features[others], before[others])


@pytest.mark.parametrize("method", ["shot", "nrc", "aad"])
def test_a_resumed_run_ends_bitwise_equal(tmp_path, source_run, target_splits, method):
    # batches of 256 over the 1,438 target images: epochs of 5 steps, so the 6 steps cross a refresh
    def cfg(name):
        return load_config(None, [f"out_dir={tmp_path / name}", f"method.name={method}",
                                  f"model.init_from={source_run}", *TARGET, "data.batch_size=256",
                                  "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3"])

    straight, start, ref, _, saved = resumes_bitwise(cfg, tmp_path, splits=target_splits)
    assert straight.inputs.steps_per_epoch == 5
    moved = [k for k in ref if k.startswith(("pseudo_labels", "banks.")) and not torch.equal(start[k], ref[k])]
    assert moved  # the checkpointed state includes the labels or banks, and they changed in the run
    assert all(torch.equal(saved[k].cpu(), ref[k].cpu()) for k in moved)
