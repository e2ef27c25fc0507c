"""Multi-teacher distillation: the teacher weightings and weighted losses against plain-math loops,
and avg_mkd / ebkd / camkd / mmkd end to end on the Fashion-MNIST subset."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import mentor.distill.multi_teacher  # noqa: F401  (registers avg_mkd, ebkd, camkd)
from mentor.distill.losses import (
    multi_teacher_feature_loss,
    multi_teacher_kd_loss,
    teacher_weights_average,
    teacher_weights_confidence,
    teacher_weights_entropy,
)
from mentor.distill.mmkd import MMKD  # (registers mmkd)
from mentor.methods import StepContext

# -- plain math on Python lists ---------------------------------------------------------------------


def softmax(row, t=1.0):
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def entropy(p):
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def cross_entropy(row, y):
    return -math.log(softmax(row)[y])


def kd(s_row, t_row, t=4.0):
    return t * t * kl(softmax(t_row, t), softmax(s_row, t))


def close(a, b, tol=1e-5):
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    teachers, student = torch.randn(3, 6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    return teachers, student, torch.randint(0, 5, (6,), generator=g)


# -- weightings -------------------------------------------------------------------------------------


def test_every_weighting_matches_a_per_sample_loop_and_sums_to_one(logits):
    t, _, y = logits
    k, b = t.shape[:2]
    got = {"average": teacher_weights_average(k, b), "entropy": teacher_weights_entropy(t),
           "confidence": teacher_weights_confidence(t, y)}
    for i in range(b):
        rows = [t[j, i].tolist() for j in range(k)]
        h = [entropy(softmax(r)) for r in rows]
        ce = softmax([cross_entropy(r, int(y[i])) for r in rows])
        want = {"average": [1 / k] * k,
                "entropy": [(1 - hj / sum(h)) / (k - 1) for hj in h],
                "confidence": [(1 - c) / (k - 1) for c in ce]}
        for name, w in got.items():
            assert close(float(w[:, i].sum()), 1.0), name
            for j in range(k):
                assert close(float(w[j, i]), want[name][j]), (name, i, j)


def test_ebkd_prefers_the_lower_entropy_teacher():
    # Teacher 0 is confident, teacher 1 uniform over 3 classes: with K = 2, w_0 = H_1 / (H_0 + H_1).
    t = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    w = teacher_weights_entropy(t)
    p0 = softmax([4.0, 0.0, 0.0])
    h0, h1 = entropy(p0), math.log(3)
    assert w[0, 0] > w[1, 0]
    assert close(float(w[0, 0]), h1 / (h0 + h1)) and close(float(w[1, 0]), h0 / (h0 + h1))


def test_camkd_prefers_the_teacher_with_the_lower_cross_entropy():
    t = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]]])
    for label, better in ((0, 0), (1, 1)):
        w = teacher_weights_confidence(t, torch.tensor([label]))
        ce = [cross_entropy(t[j, 0].tolist(), label) for j in range(2)]
        # K = 2: w_j = 1 - softmax(ce)_j = exp(ce_other) / (exp(ce_0) + exp(ce_1))
        assert w[better, 0] > w[1 - better, 0]
        assert close(float(w[0, 0]), math.exp(ce[1]) / (math.exp(ce[0]) + math.exp(ce[1])))


# -- losses -----------------------------------------------------------------------------------------


def test_multi_teacher_kd_loss_equals_an_explicit_loop(logits):
    t, s, _ = logits
    w = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))  # any weights, not only convex ones
    want = sum(float(w[k, b]) * kd(s[b].tolist(), t[k, b].tolist()) for k in range(3) for b in range(6)) / 6
    assert close(float(multi_teacher_kd_loss(s, t, w, temperature=4.0)), want)


def test_multi_teacher_feature_loss_equals_an_explicit_loop():
    g = torch.Generator().manual_seed(2)
    fs = [torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 5, 1, 1, generator=g)]
    ft = [torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 5, 1, 1, generator=g)]
    w = torch.rand(2, 4, generator=g)
    want = 0.0
    for b in range(4):
        for k in range(2):
            a, c = fs[k][b].flatten().tolist(), ft[k][b].flatten().tolist()
            want += float(w[k, b]) * sum((u - v) ** 2 for u, v in zip(a, c)) / len(a)
    assert close(float(multi_teacher_feature_loss(fs, ft, w)), want / 4)


def test_identical_teachers_reduce_every_weighting_to_single_teacher_kd(logits):
    one, s, y = logits[0][0], logits[1], logits[2]
    t = one.expand(3, *one.shape)
    single = sum(kd(s[b].tolist(), one[b].tolist()) for b in range(6)) / 6
    for w in (teacher_weights_average(3, 6), teacher_weights_entropy(t), teacher_weights_confidence(t, y)):
        assert torch.allclose(w, torch.full_like(w, 1 / 3))
        assert close(float(multi_teacher_kd_loss(s, t, w)), single)


# -- methods on the Fashion-MNIST subset ------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    """The distillation subset, loaded once, with 1000 test images (the summary reads the test set)."""
    from conftest import FMNIST_SMALL, HAVE_FMNIST

    from mentor.config import load_config
    from mentor.engine.inputs import load_splits

    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    s = load_splits(load_config(None, FMNIST_SMALL).data)
    s.test = s.test.subset(torch.arange(1000))
    return s


def _trainer(splits, overrides, teachers, method, *extra):
    from mentor.config import load_config
    from mentor.engine import Trainer

    return Trainer(load_config(None, [*overrides, f"method.name={method}", f"method.teachers={json.dumps(teachers)}",
                                      *extra]), splits=splits)


def _train_rows(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["split"] == "train" and key in r]  # a phase logs when it ran


METHODS = [
    ("avg_mkd", "loss", []),
    ("ebkd", "loss", []),
    ("camkd", "loss", ["method.feat_warmup_epochs=0"]),  # the feature term from step 0, not after an epoch
    # one virtual step per meta step to keep the test short
    ("mmkd", "student/loss", ["method.virtual_steps=1"]),
]


def _train_and_resume(splits, overrides, teachers, method, key, extra, tmp_path, steps=6):
    """``steps`` steps, then the same run resumed to ``2 * steps``, logging every ``steps // 2``."""
    from conftest import split_accuracy

    every = [f"trainer.log_every={steps // 2}", f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}"]
    if method == "mmkd":  # meta steps at 0 and at the first step after resuming
        extra = [*extra, f"method.meta_every={steps}"]
    args = (splits, [*overrides, *every], teachers, method, *extra)
    _trainer(*args, f"trainer.max_steps={steps}").fit()
    second = _trainer(*args, f"trainer.max_steps={2 * steps}")
    summary = second.fit()
    assert second.start_step == steps
    losses = _train_rows(tmp_path / "student", key)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    # the reported number is the final student's accuracy on the test split
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(second.method.deployable(), splits.test,
                                                                    splits.train), abs=1 / len(splits.test) + 1e-9)
    if method == "mmkd":
        meta = _train_rows(tmp_path / "student", "meta/loss")
        assert len(meta) == 2 and all(math.isfinite(v) for v in meta)
        state = torch.load(tmp_path / "student" / "last.pt", weights_only=True)["method"]
        assert 0 < int(state["hard_count"]) <= 256 and "hard_x" in state and "hard_ptr" in state
    if method == "camkd":
        # The flag decides whether the feature weights carry gradients (the reference's behaviour).
        m, batch = second.method, second.inputs(0)
        for detach in (True, False):
            m.cfg.detach_feature_weights = detach
            m.training_step(batch, StepContext(step=0, max_steps=1))
            assert m.feature_term(batch["y"])[1].requires_grad is not detach
    return summary


@pytest.mark.parametrize("method,key,extra", METHODS)
def test_method_trains_saves_resumes_and_evaluates_on_tiny_data(fast_teachers, distill_overrides, fmnist_tiny,
                                                                tmp_path, method, key, extra):
    _train_and_resume(fmnist_tiny, [*distill_overrides, "data.batch_size=32"], fast_teachers, method, key, extra,
                      tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method,key,extra", METHODS)
def test_method_trains_saves_resumes_and_evaluates(fmnist_teachers, distill_overrides, splits, tmp_path, method, key,
                                                   extra):
    # 50 steps, then resumed to 100, with trained teachers: the student learns well above chance (0.1)
    summary = _train_and_resume(splits, distill_overrides, fmnist_teachers, method, key, extra, tmp_path, steps=50)
    assert summary["test_acc_last"] > 0.4, summary["test_acc_last"]


def test_mmkd_meta_step_trains_the_weight_nets_and_rolls_the_student_back(fast_teachers, distill_overrides,
                                                                          fmnist_tiny):
    tr = _trainer(fmnist_tiny, distill_overrides, fast_teachers, "mmkd")
    m, batch = tr.method, tr.inputs(0)
    m.train()
    # Student phase (no optimizer step): the buffer takes exactly the samples it misclassified.
    m(batch, StepContext(step=0, max_steps=40, phase="student"))
    with torch.no_grad():
        wrong = m.student(batch["x"]).argmax(1) != batch["y"]  # train-mode BN: the same logits again
    n = int(wrong.sum())
    assert 0 < n < len(wrong) and int(m.hard_count) == n and int(m.hard_ptr) == n
    assert torch.equal(m.hard_y[:n], batch["y"][wrong]) and torch.equal(m.hard_x[:n], batch["x"][wrong])

    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m(batch, StepContext(step=0, max_steps=40, phase="meta"))
    out["loss"].backward()
    meta_params = tr.phases[1].params
    assert all(p.grad is not None for p in meta_params) and any(p.grad.abs().sum() > 0 for p in meta_params)
    assert all(p.grad is None for p in tr.phases[0].params)  # the outer loss reaches the weight nets only
    tr.optimizers[1].step()
    after = m.state_dict()
    nets = ("logit_net.", "feat_net.")
    for k, v in before.items():
        if not k.startswith(nets):  # student, Embeds and their BN statistics: untouched
            assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(nets))


def test_hard_buffer_is_a_ring_of_misclassified_samples():
    cap = 4
    buf = SimpleNamespace(hard_x=torch.zeros(cap, 1, 2, 2), hard_y=torch.zeros(cap, dtype=torch.long),
                          hard_ptr=torch.zeros((), dtype=torch.long), hard_count=torch.zeros((), dtype=torch.long))
    ring, ptr, count, uid = [None] * cap, 0, 0, 0
    for flags in ([0, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]):
        x = torch.arange(uid, uid + 6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
        y = torch.arange(uid, uid + 6)
        MMKD.remember(buf, x, y, torch.tensor(flags, dtype=torch.bool))  # only the buffers are used
        for i, f in enumerate(flags):  # the plain ring: every flagged sample in order, oldest slot first
            if f:
                ring[ptr], ptr, count = uid + i, (ptr + 1) % cap, min(count + 1, cap)
        uid += 6
        assert int(buf.hard_ptr) == ptr and int(buf.hard_count) == count
        for slot, want in enumerate(ring):
            if want is not None:
                assert int(buf.hard_y[slot]) == want and bool((buf.hard_x[slot] == want).all())
