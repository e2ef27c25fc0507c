"""ARFNet: its loss terms, dynamic-centroid labels, local crops and attention residual fusion against
independent computations, and source-free runs on the digits (printed fonts -> handwritten) that adapt and
resume exactly."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _nosync import NoHostSync
from _ssl_runs import resumes_bitwise

from mentor.adapt.arfnet import (
    ARFNet,
    FusedNet,
    SpatialFusion,
    global_local_contrast,
    local_crops,
    self_distillation,
)
from mentor.config import ConfigError, load_config
from mentor.engine import Trainer, train
from mentor.methods import BuildInfo, StepContext, create_method
from mentor.models import create_model
from mentor.nn.pseudo import centroid_pseudo_labels

pytest.importorskip("sklearn")


# ------------------------------------------------------------------------------------ global-local contrast
def _contrast_loop(a, b, t, base):
    """SupCon without labels written pair by pair: every feature of both views is an anchor, its positive the
    other view of its image, its denominator every other feature."""
    z = [v / np.linalg.norm(v) for v in np.concatenate([a.double().numpy(), b.double().numpy()])]
    n, half = len(z), len(a)
    total = 0.0
    for i in range(n):
        p = (i + half) % n
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[p]) / t) / den)
    return (t / base) * total / n


def test_global_local_contrast_matches_a_loop_over_pairs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for t, base in ((0.07, 0.07), (0.5, 0.07), (1.0, 1.0)):
        got = global_local_contrast(a, b, t, base).item()
        assert got == pytest.approx(_contrast_loop(a, b, t, base), rel=1e-5)
    # symmetric in the two views, blind to the features' scale
    assert global_local_contrast(b, a).item() == pytest.approx(global_local_contrast(a, b).item(), rel=1e-5)
    assert global_local_contrast(3 * a, b).item() == pytest.approx(global_local_contrast(a, b).item(), rel=1e-5)
    # views that agree score lower than views that do not
    assert global_local_contrast(a, a + 0.01 * b) < global_local_contrast(a, b)


# ------------------------------------------------------------------------------------- self-distillation
def test_self_distillation_is_the_sum_of_kls_from_the_detached_final_logits():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g) * 2
    heads = [torch.randn(6, 5, generator=g) for _ in range(3)]
    want = 0.0
    p = z.double().softmax(1)
    for y in heads:
        q = y.double().softmax(1)
        want += sum(float((p[i] * (p[i].log() - q[i].log())).sum()) for i in range(6)) / 6
    zz = z.clone().requires_grad_(True)
    hh = [y.clone().requires_grad_(True) for y in heads]
    got = self_distillation(hh, zz)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert zz.grad is None or not zz.grad.any()  # the final logits are the target, not trained by it
    for y, h in zip(heads, hh):
        assert torch.allclose(h.grad, (y.softmax(1) - z.softmax(1)) / 6, atol=1e-6)


# ------------------------------------------------------------------------------- dynamic-centroid labels
def _dynamic_centroids(features, logits, rounds=5, lamb=0.9):
    """obtain_label_multi_centriods of the authors' pseudo-code as loops (NumPy, float64): features with a 1
    appended, L2-normalised; exp(logit)-weighted centroids; the classes some image predicts; nearest centroid
    by cosine distance; ``rounds`` hard centroids averaged into an EMA, each followed by a new assignment."""
    f = np.concatenate([features.double().numpy(), np.ones((len(features), 1))], 1)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    w = np.exp(logits.double().numpy())
    n, k = w.shape
    labelset = sorted({int(np.argmax(row)) for row in w})

    def cos_assign(c):
        out = []
        for i in range(n):
            d = [1 - f[i] @ c[j] / np.linalg.norm(c[j]) for j in labelset]
            out.append(labelset[int(np.argmin(d))])
        return out

    cent = np.stack([sum(w[i, j] * f[i] for i in range(n)) / (1e-8 + w[:, j].sum()) for j in range(k)])
    labels = cos_assign(cent)
    for _ in range(rounds):
        hard = np.zeros((k, f.shape[1]))
        for j in range(k):
            members = [f[i] for i in range(n) if labels[i] == j]
            hard[j] = sum(members) / (1e-8 + len(members)) if members else 0.0
        cent = lamb * cent + (1 - lamb) * hard
        labels = cos_assign(cent)
    return labels


def test_dynamic_centroid_labels_match_the_official_loops():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 6, generator=g) * 2
    truth = torch.arange(80) % 4
    feats = centres[truth] + torch.randn(80, 6, generator=g)
    logits = torch.randn(80, 4, generator=g) + 2.0 * F.one_hot(truth, 4)
    got = centroid_pseudo_labels(feats, logits, rounds=5, momentum=0.9, weights="exp_logits", recount=False)
    want = _dynamic_centroids(feats, logits)
    assert got.tolist() == want
    assert (got != logits.argmax(1)).any()  # the centroids relabel some images


# ------------------------------------------------------------------------------------------ local crops
def test_local_crops_are_resized_crops_inside_the_image():
    x = torch.zeros(64, 2, 12, 16)
    x[:, 0] = torch.arange(16.0)  # column index
    x[:, 1] = torch.arange(12.0)[:, None]  # row index
    full = local_crops(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(16 / 12, 16 / 12))
    assert torch.allclose(full, x, atol=1e-4)  # the whole image at its own aspect ratio: itself
    y = local_crops(x, torch.Generator().manual_seed(1))
    assert torch.equal(y, local_crops(x, torch.Generator().manual_seed(1)))  # a function of the generator
    # bilinear sampling of a ramp is exact between the outer pixel centres (border clamping outside them): the
    # middle samples give each crop's size, and the sampled coordinates extrapolated from them its place
    fw = y[:, 0, 0, 8] - y[:, 0, 0, 7]  # crop width / image width
    fh = y[:, 1, 6, 0] - y[:, 1, 5, 0]
    cols = y[:, 0, 0, 7:8] + (torch.arange(16.0) - 7) * fw[:, None]  # [64, 16] sampled column coordinates
    rows = y[:, 1, 5:6, 0] + (torch.arange(12.0) - 5) * fh[:, None]
    inside = (cols >= 0) & (cols <= 15)
    assert torch.allclose(y[:, 0, 0][inside], cols[inside], atol=1e-4)
    assert torch.allclose(y[:, 0, 3][inside], cols[inside], atol=1e-4)  # the same columns on every row
    area, aspect = fw * fh, (fw * 16) / (fh * 12)
    assert (area >= 0.25 - 1e-4).all() and (area <= 1 + 1e-4).all() and (area < 0.9).any()
    assert (aspect >= 3 / 4 - 1e-3).all() and (aspect <= 4 / 3 + 1e-3).all()
    assert (cols.amin(1) >= -0.5 - 1e-4).all() and (cols.amax(1) <= 15.5 + 1e-4).all()
    assert (rows.amin(1) >= -0.5 - 1e-4).all() and (rows.amax(1) <= 11.5 + 1e-4).all()
    assert (cols.amin(1) > 0.5).any() and (cols.amax(1) < 14.5).any()  # positions vary, not always centred


# ---------------------------------------------------------------------------- attention residual fusion
def test_spatial_fusion_by_hand():
    torch.manual_seed(0)
    fusion = SpatialFusion(tokens=False)
    x = torch.rand(2, 3, 4, 4)
    prev = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        fusion.gate.fill_(0.5)
        out, a = fusion(x, prev)
    desc = torch.stack([x.mean(1), x.max(1).values], 1)
    s = torch.sigmoid(F.conv2d(desc, fusion.spatial.weight, fusion.spatial.bias, padding=3))
    down = prev.view(2, 1, 4, 2, 4, 2).mean((3, 5))  # 2x2 average of the previous stage's attention
    assert torch.allclose(a, (s + down) / 2, atol=1e-6)
    assert torch.allclose(out, x + 0.5 * a * x, atol=1e-6)
    tokens = SpatialFusion(tokens=True)
    t = torch.rand(2, 5, 6)
    with torch.no_grad():
        tokens.gate.fill_(1.0)
        out, a = tokens(t, None)
    d = torch.stack([t.mean(-1), t.max(-1).values], -1)
    want = torch.sigmoid(d @ tokens.spatial.weight.T + tokens.spatial.bias)
    assert torch.allclose(a, want, atol=1e-6) and torch.allclose(out, t + want * t, atol=1e-6)


def test_the_fused_network_starts_as_the_source_network():
    torch.manual_seed(0)
    net = create_model("resnet8", 10, in_channels=1)
    m = create_method("arfnet", net, BuildInfo(num_classes=10, in_channels=1, image_size=8, unlabeled_size=4))
    fused = m.deployable()
    assert isinstance(fused, FusedNet) and list(m.fusion) == ["layer1", "layer2", "layer3"]
    assert m.head_stages == ("layer1", "layer2")  # the stages before the last, at most distill_heads
    net.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(fused(x), net(x))
    with torch.no_grad():
        m.fusion["layer2"].gate.fill_(0.3)
    assert not torch.allclose(fused(x), net(x))
    assert set(k.split(".")[0] for k in fused.state_dict()) == {"net", "fusion"}
    one = create_method("arfnet", create_model("resnet8", 10, in_channels=1),
                        BuildInfo(num_classes=10, in_channels=1, image_size=8), distill_heads=1, fusion=False)
    assert one.head_stages == ("layer2",) and not len(one.fusion) and one.deployable() is one.student


def test_a_network_without_stages_is_refused():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    net.fc = net[1]
    with pytest.raises(ConfigError, match="staged"):
        create_method("arfnet", net, BuildInfo(num_classes=10, in_channels=1, image_size=8))


# ------------------------------------------------------------------------------------------ digits runs
TARGET = ["model.name=resnet8", "data.name=digits_domains", "data.domains=[handwritten]",
          "data.test_domains=[handwritten]", "data.augment=none", "data.padding=0", "data.flip=false",
          "trainer.progress=false", "trainer.log_every=1"]


def _source(tmp_path_factory, steps):
    out = tmp_path_factory.mktemp("printed") / "run"
    train(load_config(None, [f"out_dir={out}", "data.name=digits_domains",
                             "data.domains=[dejavu,liberation,freefont,urw]", "data.test_domains=[handwritten]",
                             "data.batch_size=64", "data.augment=none",
                             "model.name=resnet8", "trainer.progress=false", "optim.lr=0.1", "method.name=erm",
                             f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                             f"trainer.ckpt_every={steps}"]))
    return out


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """ERM of resnet8 on the four printed font families, 20 steps: a source for the mechanics tests."""
    return _source(tmp_path_factory, 20)


@pytest.fixture(scope="module")
def trained_source(tmp_path_factory):
    """ERM of resnet8 on the four printed font families, 300 steps: about 66% on the handwritten digits."""
    return _source(tmp_path_factory, 300)


@pytest.fixture(scope="module")
def target_splits():
    from mentor.engine.inputs import load_splits

    return load_splits(load_config(None, ["method.name=arfnet", *TARGET]).data)


def _head_agreement(m, trainer):
    """How often each intermediate head predicts the final prediction on the target test images."""
    was = m.training
    m.eval()
    agree = {n: [] for n in m.head_stages}
    with torch.no_grad():
        for x, _ in trainer.evaluator().batches(trainer.splits.tests["handwritten"]):
            kept, _, logits = m.deployable().run(x, keep=m.head_stages)
            for n in m.head_stages:
                agree[n].append((m.heads[n](kept[n]).argmax(1) == logits.argmax(1)).float())
    m.train(was)
    return {n: torch.cat(v).mean().item() for n, v in agree.items()}


@pytest.mark.slow
def test_arfnet_raises_the_target_accuracy(tmp_path, trained_source, target_splits):
    source_run = trained_source
    # two epochs of the 1,438 target images, SGD at 1e-2 as the SHOT digits recipe
    cfg = load_config(None, [f"out_dir={tmp_path}", "method.name=arfnet", f"model.init_from={source_run}", *TARGET,
                             "data.batch_size=64", "trainer.max_steps=44", "trainer.eval_every=44",
                             "trainer.ckpt_every=44", "schedule.name=constant", "method.lr=0.01"])
    trainer = Trainer(cfg, splits=target_splits)
    m = trainer.method
    m.eval()
    before = trainer.evaluator().accuracy(m.deployable(), trainer.splits.tests["handwritten"])
    m.train()
    head = m.tap.head.weight.detach().clone()
    before_rates = _head_agreement(m, trainer)
    summary = trainer.fit()
    after = summary["test_acc_last"]
    assert after > before + 0.08, (before, after)  # 66.2% -> 85.0% on this CPU
    assert torch.equal(m.tap.head.weight, head)  # the source hypothesis stays frozen
    assert all(f.gate.abs().item() > 0 for f in m.fusion.values())  # the fusion took part
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["split"] == "train"]
    assert len(train_events) == 44
    for key in ("ent", "div", "ce", "contrast", "distill", "gate", "pl_acc"):
        assert all(math.isfinite(e[key]) for e in train_events), key
    # the intermediate heads learn the final predictions: they agree with them more than at the start
    after_rates = _head_agreement(m, trainer)
    assert after_rates["layer2"] > before_rates["layer2"] + 0.08, (before_rates, after_rates)


def test_the_refresh_is_the_dynamic_centroid_labelling_of_the_pool(tmp_path, source_run, target_splits):
    cfg = load_config(None, [f"out_dir={tmp_path}", "method.name=arfnet", f"model.init_from={source_run}", *TARGET,
                             "trainer.max_steps=1"])
    trainer = Trainer(cfg, splits=target_splits)
    m = trainer.method
    refresh = trainer._refresh()
    m.on_epoch(0, refresh)
    feats, logits = m.embed_logits(refresh.unlabeled, refresh)
    # the network's own features and logits of the pool, in pool order
    x = refresh.evaluator.batches(refresh.unlabeled)
    first, _ = next(iter(x))
    m.eval()
    with torch.no_grad():
        f0, z0 = m.tap(first)
    assert torch.allclose(feats[: len(first)], f0, atol=1e-5) and torch.allclose(logits[: len(first)], z0, atol=1e-5)
    want = _dynamic_centroids(feats[:300], logits[:300])
    got = centroid_pseudo_labels(feats[:300], logits[:300], rounds=5, momentum=0.9, weights="exp_logits",
                                 recount=False)
    assert got.tolist() == want
    full = centroid_pseudo_labels(feats, logits, rounds=5, momentum=0.9, weights="exp_logits", recount=False)
    assert torch.equal(m.pseudo_labels, full)
    # the step: both views of each image, one pseudo-label for both
    m.train()
    batch, _ = trainer._method_batch(trainer.inputs(0))
    assert set(batch) == {"u", "u_weak", "u_weak_1", "u_index"}
    with NoHostSync():  # no value read back to the host in the step or its backward
        out = m.training_step(batch, StepContext(step=0, max_steps=1, steps_per_epoch=trainer.inputs.steps_per_epoch))
        out["loss"].backward()
    assert set(out) == {"loss", "ent", "div", "ce", "contrast", "distill", "gate"}


def test_a_resumed_run_ends_bitwise_equal(tmp_path, source_run, target_splits):
    # batches of 256 over the 1,438 target images: epochs of 5 steps, so the 6 steps cross a refresh
    def cfg(name):
        return load_config(None, [f"out_dir={tmp_path / name}", "method.name=arfnet", f"model.init_from={source_run}",
                                  *TARGET, "data.batch_size=256", "trainer.max_steps=6", "trainer.eval_every=3",
                                  "trainer.ckpt_every=3", "method.lr=0.01"])

    straight, start, ref, _, saved = resumes_bitwise(cfg, tmp_path, splits=target_splits)
    assert isinstance(straight.method, ARFNet) and straight.inputs.steps_per_epoch == 5
    moved = [k for k in ref if k.startswith(("pseudo_labels", "fusion.", "heads."))
             and not torch.equal(start[k], ref[k])]
    assert any(k.startswith("pseudo_labels") for k in moved) and any(k.startswith("fusion.") for k in moved)
    assert all(torch.equal(saved[k].cpu(), ref[k].cpu()) for k in moved)
