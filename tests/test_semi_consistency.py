"""The consistency-regularisation methods (pi_model, mean_teacher, vat, mixmatch, remixmatch): each loss
against an explicit per-sample computation, BN statistics untouched by the unlabelled forwards, repeated view names,
and real runs on the digits that train, save and resume bitwise."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from _helpers import BNNet, FixedMLP, fit_until_signal
from torch import nn

from mentor.config import load_config
from mentor.engine import Trainer
from mentor.engine.inputs import TrainInputs, load_splits, view_keys
from mentor.errors import ConfigError
from mentor.methods import BuildInfo, Inputs, Refresh, StepContext, create_method

METHODS = ("pi_model", "mean_teacher", "vat", "mixmatch", "remixmatch")
B, MU_B, C = 6, 8, 10  # labelled images, unlabelled images, classes


class PoolMLP(nn.Module):
    """A no-BN network for 8x8 images with the zoo's ``pool`` (the pooled features) and ``fc``."""

    def __init__(self, num_classes=C):
        super().__init__()
        self.layer1 = nn.Linear(64, 16)
        self.pool = nn.Tanh()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer1(x.flatten(1))))


class BNPoolNet(BNNet):
    """BNNet with a ``pool`` module (ReMixMatch's rotation head reads it)."""

    def __init__(self, num_classes=C):
        super().__init__(num_classes)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))))


# ------------------------------------------------------------------------------------------ view names


def test_a_view_name_listed_again_gets_its_occurrence_number():
    assert view_keys("u", ("weak", "weak")) == ["u_weak", "u_weak_1"]
    assert view_keys("x", ("weak", "none", "weak", "weak")) == ["x_weak", "x_none", "x_weak_1", "x_weak_2"]
    assert view_keys("u", ("weak", "strong")) == ["u_weak", "u_strong"]  # names listed once: as before
    with pytest.raises(ConfigError, match="some twice"):
        view_keys("u", ("weak", "weak_1", "weak"))


def test_repeated_views_are_independent_draws_of_the_same_images():
    pytest.importorskip("sklearn")
    cfg = load_config(None, ["data.name=digits", "data.val_size=200", "data.labels_per_class=4", "data.batch_size=8",
                             "data.unlabeled_ratio=2", "data.padding=1"])
    inputs = TrainInputs(load_splits(cfg.data), cfg.data, Inputs(labeled=("weak", "none"),
                                                                 unlabeled=("weak", "weak", "strong")),
                         seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    batch = inputs(3)
    assert set(batch) == {"x", "x_weak", "x_none", "y", "index", "u", "u_weak", "u_weak_1", "u_strong", "u_index",
                          "_u_y"}
    assert batch["u"] is batch["u_weak"] and batch["x"] is batch["x_weak"]
    assert batch["u_weak"].shape == batch["u_weak_1"].shape == (16, 1, 8, 8)
    assert not torch.equal(batch["u_weak"], batch["u_weak_1"])  # two draws of the weak augmentation
    again = inputs(3)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


# -------------------------------------------------------------------- losses against per-sample loops


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    u1 = torch.randn(MU_B, 1, 8, 8, generator=g)
    return {"x": torch.randn(B, 1, 8, 8, generator=g), "y": torch.randint(0, C, (B,), generator=g),
            "u": u1, "u_weak": u1, "u_weak_1": torch.randn(MU_B, 1, 8, 8, generator=g),
            "u_strong": torch.randn(MU_B, 1, 8, 8, generator=g), "u_strong_1": torch.randn(MU_B, 1, 8, 8, generator=g),
            "u_index": torch.arange(MU_B)}


def _probs(net, image):
    """softmax of one image's logits, by hand, as Python floats."""
    with torch.no_grad():
        z = [float(v) for v in net(image[None])[0]]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def _method(name, student=None, **hp):
    torch.manual_seed(0)
    student = student or (PoolMLP(C) if name == "remixmatch" else FixedMLP(C))
    return create_method(name, student, BuildInfo(num_classes=C), **hp).train()


def _ce(p, y):
    return -math.log(p[y])


def _mse(p, q):
    return sum((a - b) ** 2 for a, b in zip(p, q))


def _soft_ce(p, target):
    return -sum(t * math.log(q) for t, q in zip(target, p))


def _warm(step, max_steps, warmup):
    return min(1.0, (step + 1) / (warmup * max_steps))


STEP, MAX = 9, 100  # the ramp weight at step 9 of 100 with a 0.4 warm-up: 10 / 40


@pytest.mark.parametrize("name", ["pi_model", "mean_teacher"])
def test_pi_model_and_mean_teacher_losses_equal_a_per_sample_loop(name):
    m = _method(name, lambda_u=7.0)
    if name == "mean_teacher":  # a teacher that differs from the student
        with torch.no_grad():
            for p in m.teacher.parameters():
                p.add_(0.3 * torch.randn_like(p))
    target_net = m.teacher if name == "mean_teacher" else m.student
    b = _batch()
    out = m.training_step(b, StepContext(step=STEP, max_steps=MAX))
    sup = sum(_ce(_probs(m.student, b["x"][i]), int(b["y"][i])) for i in range(B)) / B
    unsup = sum(_mse(_probs(m.student, b["u_weak_1"][i]), _probs(target_net, b["u_weak"][i]))
                for i in range(MU_B)) / (MU_B * C)
    assert float(out["sup"]) == pytest.approx(sup, rel=1e-5)
    assert float(out["unsup"]) == pytest.approx(unsup, rel=1e-5)
    assert out["loss"].item() == pytest.approx(sup + 7.0 * _warm(STEP, MAX, 0.4) * unsup, rel=1e-5)
    # The paper's sigmoid ramp-up: exp(-5 (1 - t)^2) at t = 0.25.
    sig = _method(name, lambda_u=7.0, warmup_shape="sigmoid")
    sig.load_state_dict(m.state_dict())
    out = sig.training_step(b, StepContext(step=STEP, max_steps=MAX))
    assert out["loss"].item() == pytest.approx(sup + 7.0 * math.exp(-5 * 0.75**2) * unsup, rel=1e-5)


def test_vat_loss_equals_a_per_sample_loop(monkeypatch):
    import mentor.semi.vat as vat_module

    seen = {}
    real = vat_module.vat_perturbation
    monkeypatch.setattr(vat_module, "vat_perturbation", lambda *a, **k: seen.setdefault("r", real(*a, **k)))
    m = _method("vat", vat_eps=1.5)
    b = _batch()
    out = m.training_step(b, StepContext(step=STEP, max_steps=MAX))
    r = seen["r"]
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((MU_B,), 1.5))
    sup = sum(_ce(_probs(m.student, b["x"][i]), int(b["y"][i])) for i in range(B)) / B
    kl, ent = 0.0, 0.0
    for i in range(MU_B):
        p, q = _probs(m.student, b["u"][i]), _probs(m.student, b["u"][i] + r[i])
        kl += sum(a * math.log(a / c) for a, c in zip(p, q)) / MU_B
        ent -= sum(a * math.log(a) for a in p) / MU_B
    assert float(out["unsup"]) == pytest.approx(kl, rel=1e-4)
    assert float(out["entropy"]) == pytest.approx(ent, rel=1e-5)
    assert out["loss"].item() == pytest.approx(sup + 1.0 * _warm(STEP, MAX, 0.4) * kl + 0.06 * ent, rel=1e-5)


def test_vat_perturbation_is_a_function_of_seed_and_step(monkeypatch):
    import mentor.semi.vat as vat_module

    seen = []
    real = vat_module.vat_perturbation
    monkeypatch.setattr(vat_module, "vat_perturbation", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    m = _method("vat", vat_xi=1e-2)
    b = _batch()
    for step in (3, 3, 4):
        m.training_step(b, StepContext(step=step, max_steps=MAX))
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])


def test_mixmatch_loss_equals_a_per_sample_loop(monkeypatch):
    import mentor.semi.mixmatch as mm

    seen = {}
    real = mm.mixup
    monkeypatch.setattr(mm, "mixup", lambda *a, **k: seen.setdefault("mixed", real(*a, **k)))
    m = _method("mixmatch", lambda_u=30.0, temperature=0.5, mixup_alpha=0.75)
    b = _batch()
    out = m.training_step(b, StepContext(step=STEP, max_steps=MAX))
    mixed = seen["mixed"]
    assert mixed.lam.shape == (1,)
    lam = float(mixed.lam[0])
    # Label guesses: the mean of the two views' distributions, squared (T = 0.5) and renormalised.
    guesses = []
    for i in range(MU_B):
        mean = [(a + c) / 2 for a, c in zip(_probs(m.student, b["u_weak"][i]), _probs(m.student, b["u_weak_1"][i]))]
        guesses.append([v**2 / sum(w**2 for w in mean) for v in mean])
    rows = [*b["x"], *b["u_weak"], *b["u_weak_1"]]
    targets = [[float(c == int(b["y"][i])) for c in range(C)] for i in range(B)] + guesses + guesses
    sup = unsup = 0.0
    for r in range(len(rows)):
        j = int(mixed.index[r])
        image = lam * rows[r] + (1 - lam) * rows[j]
        target = [lam * a + (1 - lam) * c for a, c in zip(targets[r], targets[j])]
        p = _probs(m.student, image)
        if r < B:
            sup -= sum(t * math.log(q) for t, q in zip(target, p)) / B
        else:
            unsup += _mse(p, target) / (2 * MU_B * C)
    assert float(out["sup"]) == pytest.approx(sup, rel=1e-5)
    assert float(out["unsup"]) == pytest.approx(unsup, rel=1e-5)
    assert out["loss"].item() == pytest.approx(sup + 30.0 * _warm(STEP, MAX, 0.4) * unsup, rel=1e-5)
    # A labelled image mixed with an unlabelled one (and vice versa) happens: one shuffle of everything.
    assert (mixed.index[:B] >= B).any() and (mixed.index[B:] < B).any()


@pytest.mark.parametrize("name", METHODS)
def test_a_step_given_as_a_tensor_works_as_in_a_captured_step(name):
    # In a CUDA-graph step ctx.step is a 0-d tensor: the ramps take it, and the random draws fall back
    # to the device's default generator (so the same global seed gives the same terms).
    b = _batch()
    outs = []
    for _ in range(2):
        m = _method(name, vat_xi=1e-2) if name == "vat" else _method(name)
        torch.manual_seed(1)
        outs.append(m.training_step(b, StepContext(step=torch.tensor(STEP), max_steps=MAX)))
    assert set(outs[0]) >= {"loss", "sup", "unsup"}
    for k, v in outs[0].items():
        assert v.dim() == 0 and torch.isfinite(v), k
        assert torch.equal(v, outs[1][k]), k
    if name in ("pi_model", "mean_teacher"):  # no random draw: the same as with an int step
        eager = _method(name).training_step(b, StepContext(step=STEP, max_steps=MAX))
        torch.testing.assert_close(outs[0]["loss"], eager["loss"])


@pytest.mark.parametrize("name", METHODS)
def test_only_the_labelled_forward_moves_bn_statistics(name, monkeypatch):
    import mentor.semi.mixmatch as mm

    seen = {}
    real = mm.mixup
    monkeypatch.setattr(mm, "mixup", lambda *a, **k: seen.setdefault("mixed", real(*a, **k)))
    import mentor.semi.remixmatch as rm

    monkeypatch.setattr(rm, "mixup", lambda *a, **k: seen.setdefault("mixed", real(*a, **k)))
    m = _method(name, student=BNPoolNet(C))
    reference = copy.deepcopy(m.student)
    teacher_before = copy.deepcopy(m.teacher.state_dict()) if name == "mean_teacher" else None
    b = _batch()
    m.training_step(b, StepContext(step=STEP, max_steps=MAX))
    with torch.no_grad():
        reference(seen["mixed"].x if name in ("mixmatch", "remixmatch") else b["x"])
    assert torch.equal(m.student.bn.running_mean, reference.bn.running_mean)
    assert torch.equal(m.student.bn.running_var, reference.bn.running_var)
    if name == "mean_teacher":
        assert not m.teacher.training and not m.teacher.bn.training  # eval mode restored
        assert torch.equal(m.teacher.bn.running_mean, teacher_before["bn.running_mean"])


def test_mean_teacher_targets_use_the_unlabelled_batch_statistics():
    m = _method("mean_teacher", student=BNPoolNet(C))
    with torch.no_grad():
        m.teacher.bn.running_mean.fill_(5.0)  # far from the batch's: eval-mode targets would differ
    u = _batch()["u_weak"]
    train_mode = copy.deepcopy(m.teacher).train()
    with torch.no_grad():
        expected = train_mode(u).softmax(1)
    torch.testing.assert_close(m.targets(u), expected)


def test_rotate_matches_a_hand_worked_example():
    from mentor.semi.remixmatch import rotate

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(4, 1, 2, 2)
    got = rotate(x, torch.tensor([0, 1, 2, 3]))[:, 0]
    # Quarter turns counter-clockwise: the top-right corner comes to the top-left first.
    expected = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 4.0], [1.0, 3.0]], [[4.0, 3.0], [2.0, 1.0]],
                             [[3.0, 1.0], [4.0, 2.0]]])
    assert torch.equal(got, expected)


def test_remixmatch_loss_equals_a_per_sample_loop(monkeypatch):
    import mentor.semi.remixmatch as rm

    seen = {}
    real_mixup, real_rotate = rm.mixup, rm.rotate
    monkeypatch.setattr(rm, "mixup", lambda *a, **k: seen.setdefault("mixed", real_mixup(*a, **k)))

    def rotate(x, k):
        seen["k"] = k
        return real_rotate(x, k)

    monkeypatch.setattr(rm, "rotate", rotate)
    m = _method("remixmatch", unsup_warmup=0.4, lambda_u=1.5, u1_weight=0.5, rot_weight=0.7)
    counts = [3, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # an unbalanced labelled split: p_target = counts / 12
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    m.on_epoch(0, Refresh(labeled=SimpleNamespace(labels=labels), unlabeled=None, evaluator=None, device="cpu"))
    b = _batch()
    out = m.training_step(b, StepContext(step=STEP, max_steps=MAX))
    mixed, k = seen["mixed"], seen["k"]
    lam = float(mixed.lam[0])
    # Distribution alignment at its first batch: p_model is the batch's mean prediction.
    probs = [_probs(m.student, b["u_weak"][i]) for i in range(MU_B)]
    p_model = [sum(p[c] for p in probs) / MU_B for c in range(C)]
    p_target = [n / 12 for n in counts]
    guesses = []
    for p in probs:
        aligned = [p[c] * (p_target[c] + 1e-6) / (p_model[c] + 1e-6) for c in range(C)]
        sq = [(a / sum(aligned)) ** 2 for a in aligned]
        guesses.append([v / sum(sq) for v in sq])
    rows = [*b["x"], *b["u_strong"], *b["u_strong_1"], *b["u_weak"]]
    targets = [[float(c == int(b["y"][i])) for c in range(C)] for i in range(B)] + guesses * 3
    sup = unsup = 0.0
    for r in range(len(rows)):
        j = int(mixed.index[r])
        p = _probs(m.student, lam * rows[r] + (1 - lam) * rows[j])
        target = [lam * a + (1 - lam) * c for a, c in zip(targets[r], targets[j])]
        if r < B:
            sup += _soft_ce(p, target) / B
        else:
            unsup += _soft_ce(p, target) / (3 * MU_B)
    u1 = sum(_soft_ce(_probs(m.student, b["u_strong"][i]), guesses[i]) for i in range(MU_B)) / MU_B
    rot = 0.0
    for i in range(MU_B):
        turned = torch.rot90(b["u_strong"][i], int(k[i]), dims=(1, 2))
        with torch.no_grad():
            z = m.rot_head(m.student.pool(m.student.layer1(turned.flatten()[None])))[0]
        rot -= float(z.log_softmax(0)[int(k[i])]) / MU_B
    assert float(out["sup"]) == pytest.approx(sup, rel=1e-5)
    assert float(out["unsup"]) == pytest.approx(unsup, rel=1e-5)
    assert float(out["u1"]) == pytest.approx(u1, rel=1e-5)
    assert float(out["rot"]) == pytest.approx(rot, rel=1e-5)
    w = _warm(STEP, MAX, 0.4)
    assert out["loss"].item() == pytest.approx(sup + w * (1.5 * unsup + 0.5 * u1) + 0.7 * rot, rel=1e-5)
    torch.testing.assert_close(m.dist_align.p_target, torch.tensor(p_target, dtype=m.dist_align.p_target.dtype))


def test_remixmatch_without_a_pool_module_says_what_to_do():
    with pytest.raises(ConfigError, match="rot_weight=0"):
        _method("remixmatch", student=FixedMLP(C))
    assert _method("remixmatch", student=FixedMLP(C), rot_weight=0.0).rot_head is None


# ----------------------------------------------------------------------- real runs through the engine


def _cfg(tmp_path, name, run):
    model = "resnet8" if name == "remixmatch" else "test_bncnn"  # the rotation head reads a zoo net's `pool`
    return load_config(None, [
        f"out_dir={tmp_path / run}", f"method.name={name}", "data.name=digits", "data.val_size=200",
        "data.labels_per_class=4", "data.batch_size=16", "data.unlabeled_ratio=1", "data.padding=1",
        "data.flip=false", f"model.name={model}", "trainer.max_steps=6", "trainer.eval_every=3",
        "trainer.ckpt_every=3", "trainer.log_every=3", "trainer.progress=false", "optim.lr=0.05"])


@pytest.mark.parametrize("name", METHODS)
def test_runs_train_save_and_resume_bitwise(tmp_path, name):
    pytest.importorskip("sklearn")
    straight = Trainer(_cfg(tmp_path, name, "a"))
    initial = {k: v.clone() for k, v in straight.method.student.state_dict().items()}
    summary = straight.fit()
    assert math.isfinite(summary["test_acc_last"])
    events = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 2 and all(math.isfinite(e["unsup"]) and math.isfinite(e["loss"]) for e in train)
    assert any(e["unsup"] > 0 for e in train) and all("pl_acc" in e for e in train)
    if name == "mean_teacher":
        assert all("val_acc_teacher" in e for e in events if e["split"] == "val")
    if name == "remixmatch":  # the labelled split's class distribution: 4 of each digit
        torch.testing.assert_close(straight.method.dist_align.p_target, torch.full((10,), 0.1))
        assert all(math.isfinite(e["rot"]) for e in train)
    trained = straight.method.student.state_dict()
    assert not torch.equal(trained["fc.weight"], initial["fc.weight"])

    resumed_cfg = _cfg(tmp_path, name, "c")
    fit_until_signal(Trainer(resumed_cfg), after_step=1)
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["step"] == 2
    second = Trainer(resumed_cfg)
    second.fit()
    assert second.start_step == 2
    ref, got = straight.method.state_dict(), second.method.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
