"""SimKD, SemCKD and DSKD: their losses against plain-math computations, SimKD's deployable network,
the batch-size independence of SemCKD's pooled variant, DSKD's layer weights, and short runs on the
Fashion-MNIST subset."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import make_distiller as make
from conftest import FMNIST_SMALL, HAVE_FMNIST, needs_fmnist

import mentor.distill.dskd  # noqa: F401  (registers)
import mentor.distill.semckd  # noqa: F401
import mentor.distill.simkd  # noqa: F401
from mentor.distill.losses.crosslayer import dskd_weights, semckd_attention, semckd_loss, simkd_loss
from mentor.distill.simkd import ReusedHeadNet
from mentor.methods import StepContext

# -- losses against independent computations -------------------------------------------------------

def test_simkd_loss_is_the_mean_squared_error_over_every_element():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    total = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist()))
    assert simkd_loss(s, t).item() == pytest.approx(total / s.numel(), rel=1e-6)
    assert simkd_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="same shape"):
        simkd_loss(s, t[:, :2])


def test_semckd_attention_hand_example_and_rows_sum_to_one():
    q = torch.tensor([[[1.0, 0.0]]])                  # B=1, one student layer
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])      # two teacher layers
    e = math.e
    assert semckd_attention(q, k)[0, 0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])
    a = semckd_attention(torch.randn(5, 3, 4), torch.randn(5, 2, 4))
    assert a.shape == (5, 3, 2) and (a > 0).all()
    assert torch.allclose(a.sum(-1), torch.ones(5, 3))


def test_semckd_loss_hand_example():
    # One sample, one student layer, two teacher layers: pair MSEs (1 + 4) / 2 = 2.5 and 4 / 2 = 2.
    s = [[torch.tensor([[[[1.0, 3.0]]]]), torch.tensor([[[[0.0, 0.0]]]])]]
    t = [[torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[2.0, 0.0]]]])]]
    att = torch.tensor([[[0.25, 0.75]]])
    assert semckd_loss(s, t, att).item() == pytest.approx(0.25 * 2.5 + 0.75 * 2.0)


def test_semckd_loss_matches_an_explicit_loop():
    g = torch.Generator().manual_seed(1)
    bsz, n_s, n_t = 3, 2, 3
    shapes = [(4, 2, 2), (2, 3, 3), (5, 1, 1)]  # pair (i, j) lives in teacher layer j's shape
    s = [[torch.randn(bsz, *shapes[j], generator=g) for j in range(n_t)] for _ in range(n_s)]
    t = [[torch.randn(bsz, *shapes[j], generator=g) for j in range(n_t)] for _ in range(n_s)]
    att = torch.softmax(torch.randn(bsz, n_s, n_t, generator=g), -1)
    expected = 0.0
    for b in range(bsz):
        for i in range(n_s):
            for j in range(n_t):
                a, c = s[i][j][b].flatten().tolist(), t[i][j][b].flatten().tolist()
                expected += att[b, i, j].item() * sum((u - v) ** 2 for u, v in zip(a, c)) / len(a)
    expected /= bsz * n_s
    assert semckd_loss(s, t, att).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="teacher layers"):
        semckd_loss([row[:2] for row in s], [row[:2] for row in t], att)


def test_dskd_weights_sum_to_one_favour_the_lower_loss_and_are_detached():
    losses = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    w = dskd_weights(losses)
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3])  # softmax(0, -ln 2) = (1, 1/2) / 1.5
    assert not w.requires_grad
    w2 = dskd_weights(torch.tensor([3.0, 1.0, 2.0]), temperature=2.0)
    z = [math.exp(-v / 2.0) for v in (3.0, 1.0, 2.0)]
    assert w2.tolist() == pytest.approx([v / sum(z) for v in z])
    assert w2.sum().item() == pytest.approx(1.0) and w2.argmax().item() == 1
    with pytest.raises(ValueError):
        dskd_weights(torch.ones(2, 2))


# -- SimKD's deployable --------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["vgg8", "resnet14"])  # vgg8 ends at 3x3: the 7x7 student map is pooled
def test_simkd_deployable_is_student_backbone_projector_teacher_head(tmp_path, teacher):
    m, batch = make("simkd", tmp_path, teacher=teacher)
    m.eval()
    net = m.deployable()
    assert net is m.deployable()
    x = batch["x"]
    s, t = m.student, m.teacher
    with torch.no_grad():
        f = s.layer3(s.layer2(s.layer1(s.stem(x))))
        t_map = x
        for name in t.stage_names:
            t_map = getattr(t, name)(t_map)
        if t_map.shape[-1] < f.shape[-1]:
            f = F.adaptive_avg_pool2d(f, t_map.shape[-2:])
        manual = t.fc(t.pool(m.projector(f)))

    def forbid(*_):
        raise AssertionError("the teacher's backbone ran at inference")
    hooks = [mod.register_forward_pre_hook(forbid) for mod in [t] + [getattr(t, n) for n in t.stage_names]]
    try:
        assert torch.allclose(net(x), manual, atol=1e-5)
        assert torch.allclose(m.predict(x), manual, atol=1e-5)
    finally:
        for h in hooks:
            h.remove()
    # Its weights: the student's stages, the projector and the teacher's frozen classifier, nothing else.
    ids = {id(p) for p in net.parameters()}
    expected = {id(p) for n in s.stage_names for p in getattr(s, n).parameters()}
    expected |= {id(p) for p in m.projector.parameters()} | {id(p) for p in t.fc.parameters()}
    assert ids == expected
    assert not any(p.requires_grad for p in t.fc.parameters())
    assert not any(p.requires_grad for p in s.fc.parameters())  # the student's own head is unused
    # A standalone checkpoint: its state dict restores the same network in a fresh method.
    (tmp_path / "other").mkdir()
    other, _ = make("simkd", tmp_path / "other", teacher=teacher, seed=1)
    other.eval()
    assert not torch.allclose(other.predict(x), manual, atol=1e-3)
    other.deployable().load_state_dict(net.state_dict())
    assert torch.allclose(other.predict(x), manual, atol=1e-5)


# -- SemCKD's pooled variant: batch-size independent queries/keys ---------------------------------
# (the paper's similarity-matrix form: tests/test_distill_paper_forms.py)

def test_semckd_pooled_runs_on_two_batch_sizes_and_attention_rows_sum_to_one(tmp_path):
    m, batch = make("semckd", tmp_path, teacher="wrn_16_1", batch_size=8, attention_input="pooled")
    m.train()
    for bsz in (8, 5):
        b = {"x": batch["x"][:bsz], "y": batch["y"][:bsz]}
        out = m.training_step(b, StepContext(0, 10))
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["semckd"] > 0
        assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kd"].item() + 400 * out["semckd"].item(),
                                                   rel=1e-5)
        att = m.attention([m.s_tap[n] for n in m.s_names], [m.t_tap[n] for n in m.t_names])
        assert att.shape == (bsz, 3, 3)
        assert torch.allclose(att.sum(-1), torch.ones(bsz, 3), atol=1e-6)
    assert all(p.grad is not None for p in m.query.parameters())
    # A sample's attention does not depend on the rest of its batch (eval mode: BN uses running stats).
    m.eval()
    with torch.no_grad():
        att = []
        for x in (batch["x"], batch["x"][:5]):
            m.student(x)
            m.teacher(x)
            att.append(m.attention([m.s_tap[n] for n in m.s_names], [m.t_tap[n] for n in m.t_names]))
    assert torch.allclose(att[0][:5], att[1], atol=1e-6)


def test_dskd_step_weights_follow_the_layer_losses(tmp_path):
    m, batch = make("dskd", tmp_path)
    out = m.training_step(batch, StepContext(0, 10))
    ds = torch.stack([out["ds_layer1"], out["ds_layer2"]])
    w = torch.stack([out["w_layer1"], out["w_layer2"]])
    assert w.sum().item() == pytest.approx(1.0)
    assert w.tolist() == pytest.approx(torch.softmax(-ds, 0).tolist(), rel=1e-5)
    assert out["ds"].item() == pytest.approx((w * ds).sum().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kd"].item() + out["ds"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.projectors.parameters())


# -- short runs on the Fashion-MNIST subset ------------------------------------------------------

@pytest.fixture(scope="module")
def small_splits():
    """The distillation subset, loaded once, with the first 1000 test images (every run of this
    module evaluates its test split up to three times)."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    from mentor.config import load_config
    from mentor.engine.inputs import load_splits

    splits = load_splits(load_config(None, FMNIST_SMALL).data)
    return dataclasses.replace(splits, test=splits.test.subset(torch.arange(1000)))


def read_train_losses(run):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["split"] == "train"]


# beta = 400 at the subset's lr 0.1 diverges within 8 steps without clipping (the recipe clips too);
# SemCKD's nine pair regressors make its step about three times KD's: half the batch keeps the test short.
EXTRA = {"simkd": [], "semckd": ["trainer.clip_grad=5.0", "data.batch_size=32"], "dskd": []}


def _check_trained_resumed_run(trainer, summary, steps, splits):
    from conftest import split_accuracy

    from mentor.engine.run import load_run

    assert trainer.start_step == steps // 2
    run = trainer.run_dir
    losses = read_train_losses(run)
    assert len(losses) == 4  # two logs of the first run, two of the resumed one
    assert sum(losses[2:]) < sum(losses[:2]), losses
    # the reported number is the accuracy of the deployable network on the test split
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(trainer.method.deployable(), splits.test,
                                                                    splits.train), abs=1 / len(splits.test) + 1e-9)
    if trainer.cfg.method.name == "simkd":
        # Evaluation goes through the deployable (student + projector + reused teacher head), and
        # `mentor eval` (load_run) rebuilds that network from the run directory.
        _, loaded, _, _, step = load_run(run / "last.pt", device="cpu")
        assert step == steps and isinstance(loaded.deployable(), ReusedHeadNet)
        x = torch.randn(16, 1, 28, 28)
        assert torch.allclose(loaded.predict(x), trainer.method.predict(x), atol=1e-5)


@pytest.mark.parametrize("method", ["simkd", "semckd", "dskd"])
def test_method_trains_resumes_and_evaluates_on_tiny_data(method, fast_teachers, fmnist_tiny, tmp_path):
    from mentor.config import load_config
    from mentor.engine import Trainer

    overrides = [f"out_dir={tmp_path / 'student'}", *FMNIST_SMALL, "model.name=resnet8", f"method.name={method}",
                 f"method.teacher={fast_teachers[0]}", "trainer.log_every=2", "trainer.eval_every=4",
                 "trainer.ckpt_every=4", "data.batch_size=32", *EXTRA[method]]
    Trainer(load_config(None, [*overrides, "trainer.max_steps=4"]), splits=fmnist_tiny).fit()
    trainer = Trainer(load_config(None, [*overrides, "trainer.max_steps=8"]), splits=fmnist_tiny)
    _check_trained_resumed_run(trainer, trainer.fit(), 8, fmnist_tiny)


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("method", ["simkd", "semckd", "dskd"])
def test_method_trains_resumes_and_evaluates(method, fmnist_teachers, distill_overrides, small_splits):
    from mentor.config import load_config
    from mentor.engine import Trainer

    # 50 steps, then resumed to 100, with a trained teacher: the student learns well above chance (0.1)
    overrides = [*distill_overrides, f"method.name={method}", f"method.teacher={fmnist_teachers[0]}",
                 "trainer.log_every=25", "trainer.eval_every=50", "trainer.ckpt_every=50", *EXTRA[method]]
    Trainer(load_config(None, [*overrides, "trainer.max_steps=50"]), splits=small_splits).fit()
    trainer = Trainer(load_config(None, [*overrides, "trainer.max_steps=100"]), splits=small_splits)
    summary = trainer.fit()
    _check_trained_resumed_run(trainer, summary, 100, small_splits)
    assert summary["test_acc_last"] > 0.4, summary["test_acc_last"]
