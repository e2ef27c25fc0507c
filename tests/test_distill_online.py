"""Online distillation (DML, OKDDip, MBD): losses against independent computations, the branch builder
on several zoo models, and short Fashion-MNIST runs that train, save, resume and report every peer."""

import json
import math

import pytest
import torch
from conftest import needs_fmnist

import mentor.distill.online  # noqa: F401  (registers dml, okddip, mbd)
from mentor.distill.branches import MultiBranchNet
from mentor.distill.losses.online import diversity_loss, dml_loss, okddip_distillation, okddip_targets, rampup
from mentor.models import create_model

# -- independent references: plain-math softmax / KL on python floats --------------------------------


def _softmax(row, t=1.0):
    m = max(v / t for v in row)
    e = [math.exp(v / t - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    """KL(p || q) for probability lists."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def _soft_kl_ref(student, teacher, t):
    """Batch-mean T^2 KL(softmax(teacher/T) || softmax(student/T)), one sample at a time."""
    rows = [_kl(_softmax(tr, t), _softmax(sr, t)) for sr, tr in zip(student.tolist(), teacher.tolist())]
    return t * t * sum(rows) / len(rows)


def _ce_ref(logits, y):
    return sum(-math.log(_softmax(row)[c]) for row, c in zip(logits.tolist(), y.tolist())) / len(y)


# -- losses -------------------------------------------------------------------------------------------


def test_rampup_is_the_closed_form():
    assert rampup(0, 80) == pytest.approx(0.006737947)  # exp(-5)
    assert rampup(40, 80) == pytest.approx(0.2865048)  # exp(-5 / 4)
    assert rampup(60, 80) == pytest.approx(0.7316156)  # exp(-5 / 16)
    assert rampup(80, 80) == 1.0 and rampup(300, 80) == 1.0
    assert rampup(0.5, 1.0) == pytest.approx(0.2865048)  # fractional epochs and lengths
    assert rampup(3, 0) == 1.0


def test_dml_loss_matches_an_explicit_loop_and_its_gradient_only_moves_each_peer():
    torch.manual_seed(0)
    k, b, c = 3, 5, 4
    z = torch.randn(k, b, c, requires_grad=True)
    y = torch.randint(0, c, (b,))
    ce, kl = dml_loss(z, y)
    assert ce.item() == pytest.approx(sum(_ce_ref(z[i], y) for i in range(k)), rel=1e-5)
    ref = sum(_soft_kl_ref(z[i], z[j], 1.0) for i in range(k) for j in range(k) if j != i) / (k - 1)
    assert kl.item() == pytest.approx(ref, rel=1e-5)
    # Others detached: d/dz_i of mean_j KL(p_j || p_i) is (p_i - mean_{j != i} p_j) / B, nothing else.
    kl.backward()
    p = z.detach().softmax(-1)
    for i in range(k):
        others = torch.stack([p[j] for j in range(k) if j != i]).mean(0)
        torch.testing.assert_close(z.grad[i], (p[i] - others) / b)


def test_dml_with_identical_peers_has_zero_mimicry():
    z = torch.randn(4, 6)
    ce, kl = dml_loss([z, z.clone(), z.clone()], torch.arange(4) % 6)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert ce.item() == pytest.approx(3 * _ce_ref(z, torch.arange(4) % 6), rel=1e-5)
    with pytest.raises(ValueError, match="2 peers"):
        dml_loss([z], torch.arange(4))


def test_okddip_attention_and_targets_are_the_explicit_weighted_sums():
    torch.manual_seed(1)
    k, b, d, c = 3, 4, 2, 5
    q, key, z = torch.randn(k, b, d), torch.randn(k, b, d), torch.randn(k, b, c)
    targets, att = okddip_targets(q, key, z)
    assert att.shape == (b, k, k) and targets.shape == (k, b, c)
    torch.testing.assert_close(att.sum(-1), torch.ones(b, k))
    for s in range(b):
        for i in range(k):
            scores = [sum(q[i, s, e].item() * key[j, s, e].item() for e in range(d)) for j in range(k)]
            alpha = _softmax(scores)
            assert att[s, i].tolist() == pytest.approx(alpha, rel=1e-5)
            for cls in range(c):
                want = sum(alpha[j] * z[j, s, cls].item() for j in range(k))
                assert targets[i, s, cls].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_okddip_targets_detach_only_the_logits():
    q = torch.randn(3, 2, 4, requires_grad=True)
    z = torch.randn(3, 2, 5, requires_grad=True)
    t, _ = okddip_targets(q, q, z, detach_logits=True)
    t.pow(2).sum().backward()
    assert z.grad is None and q.grad is not None and q.grad.abs().sum() > 0


def test_okddip_distillation_matches_an_explicit_loop():
    torch.manual_seed(2)
    peers, targets, leader = torch.randn(3, 4, 6), torch.randn(3, 4, 6), torch.randn(4, 6)
    kd_peers, kd_leader = okddip_distillation(peers, targets, leader, temperature=3.0)
    assert kd_peers.item() == pytest.approx(sum(_soft_kl_ref(peers[i], targets[i], 3.0) for i in range(3)), rel=1e-5)
    mean = [[sum(peers[i, s, c].item() for i in range(3)) / 3 for c in range(6)] for s in range(4)]
    assert kd_leader.item() == pytest.approx(_soft_kl_ref(leader, torch.tensor(mean), 3.0), rel=1e-5)
    # The official code does not detach the leader's target: its KL moves the peers too, unless asked.
    for detach, moved in ((False, True), (True, False)):
        p, lead = peers.clone().requires_grad_(), leader.clone().requires_grad_()
        okddip_distillation(p, targets, lead, 3.0, detach_targets=detach)[1].backward()
        assert (p.grad is not None and p.grad.abs().sum() > 0) == moved and lead.grad.abs().sum() > 0


def test_diversity_loss_hand_worked():
    eye = torch.eye(2)
    assert diversity_loss([eye, eye]).item() == pytest.approx(1.0)
    assert diversity_loss([eye, torch.tensor([[0.0, 3.0], [-2.0, 0.0]])]).item() == pytest.approx(0.0)
    # class 0: cos(e1, (1, 1)) = 1/sqrt(2) -> 1/2; class 1: cos(e2, 5 e2) = 1 -> 1; mean 3/4.
    w2 = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert diversity_loss([eye, w2]).item() == pytest.approx(0.75)
    # Three branches: the mean over the pairs (eye, w2) = 3/4, (eye, -eye) = 1, (w2, -eye) = 3/4.
    assert diversity_loss([eye, w2, -eye]).item() == pytest.approx((0.75 + 1 + 0.75) / 3)
    with pytest.raises(ValueError, match="2 branches"):
        diversity_loss([eye])


# -- the branch builder -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "mobilenetv2"])
def test_branches_share_the_trunk_and_own_fresh_last_stages(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = MultiBranchNet(model, num_branches=3, branch_stages=1, keep=-1).eval()
    last = model.stage_names[-1]
    assert net.trunk_names == model.stage_names[:-1] and net.branch_names[0] == last
    assert net.branches[-1] is model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the kept branch keeps its initialisation
    for other in net.branches[:-1]:
        assert other.state_dict().keys() == model.state_dict().keys()
        for stage in net.trunk_names:
            assert getattr(other, stage) is getattr(model, stage)
        for stage in (last, "fc"):
            mine = dict(getattr(other, stage).named_parameters())
            for pname, p in getattr(model, stage).named_parameters():
                assert p.shape == mine[pname].shape, (stage, pname)
                if p.dim() > 1:  # conv and linear weights are random draws (BN starts at the identity)
                    assert not torch.equal(p, mine[pname]), (stage, pname)
    assert not torch.equal(net.branches[0].fc.weight, net.branches[1].fc.weight)

    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = net(x)
        assert out.logits.shape == (3, 2, 7) and out.features.shape == (3, 2, model.num_features)
        assert all(m.shape[:2] == (2, model.num_features) for m in out.maps)
        for i, branch in enumerate(net.branches):  # a branch alone is the zoo forward on shared weights
            torch.testing.assert_close(branch(x), out.logits[i])


def test_branches_without_a_trunk_are_independent_networks_and_bad_models_are_refused():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    net = MultiBranchNet(model, num_branches=2, branch_stages=None)
    assert net.trunk_names == () and net.branches[0] is model
    shared = {id(p) for p in net.branches[0].parameters()} & {id(p) for p in net.branches[1].parameters()}
    assert not shared
    with pytest.raises(ValueError, match="branch_stages"):
        MultiBranchNet(model, 2, branch_stages=9)
    with pytest.raises(TypeError, match="stage_names"):
        MultiBranchNet(torch.nn.Linear(3, 3), 2)


# -- the methods, without data ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dml", "okddip", "mbd"])
def test_every_parameter_learns_and_the_loss_is_the_documented_sum(method):
    from mentor.methods import METHODS, BuildInfo, StepContext

    torch.manual_seed(0)
    cls = METHODS.get(method)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    m = cls(cls.Config(name=method), student, BuildInfo())
    assert m.student is student and m.deployable() is student
    ctx = StepContext(step=40, max_steps=100, steps_per_epoch=1)  # epoch 40 of an 80-epoch ramp-up
    out = m.training_step({"x": torch.randn(8, 1, 28, 28), "y": torch.arange(8)}, ctx)
    ramp = math.exp(-1.25)
    want = {"dml": lambda o: o["ce"] + o["kl"],
            "okddip": lambda o: o["ce"] + ramp * (o["kd_peers"] + o["kd_leader"]),
            "mbd": lambda o: o["ce"] + ramp * o["kd"] + o["cd"]}[method](out)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    out["loss"].backward()
    # DDP (find_unused_parameters=False) needs every trainable parameter in the graph of each step.
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    if method == "okddip":
        assert m.net.branches[-1] is student and m.query.weight.shape == (8, 64)
    else:
        assert m.net.branches[0] is student


# -- end to end on the Fashion-MNIST subset ------------------------------------------------------------

HEADS = {"dml": ["peer0", "peer1"], "okddip": ["peer0", "peer1", "peer2", "leader", "ensemble"],
         "mbd": ["branch0", "branch1", "branch2", "fused"]}
_SPLITS = {}


def _splits(cfg):
    """The run's splits with the test set cut to 500 images."""
    from mentor.engine.inputs import Splits, load_splits

    key = repr(cfg.data)
    if key not in _SPLITS:
        s = load_splits(cfg.data)
        _SPLITS[key] = Splits(s.train, s.val, s.test.subset(torch.arange(500)), s.train_index)
    return _SPLITS[key]


def _train_and_resume(method, overrides, steps, splits=None):
    """``steps`` steps, then the same recipe resumed to ``2 * steps``, logging every ``steps // 2`` steps and
    evaluating every ``steps``. Checks the run and returns (trainer, summary)."""
    from conftest import split_accuracy

    from mentor.config import load_config
    from mentor.distill import load_teacher
    from mentor.engine import Trainer

    def run(n):
        cfg = load_config(None, [*overrides, f"method.name={method}", f"trainer.max_steps={n}",
                                 f"trainer.log_every={steps // 2}", f"trainer.eval_every={steps}",
                                 f"trainer.ckpt_every={steps}"])
        trainer = Trainer(cfg, splits=splits or _splits(cfg))
        return trainer, trainer.fit()

    run(steps)
    trainer, summary = run(2 * steps)
    assert trainer.start_step == steps  # resumed from the checkpoint
    out, sp = trainer.run_dir, trainer.splits
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 4 and sum(losses[:2]) > sum(losses[2:]), losses
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [steps, 2 * steps]
    # every head is evaluated as itself: the numbers reported for it are its accuracy, computed here
    heads = trainer.method.eval_heads()
    assert sorted(heads) == sorted(HEADS[method])
    tol = {"abs": 1 / len(sp.test) + 1e-9}
    for name, net in heads.items():
        assert val[-1][f"val_acc_{name}"] == pytest.approx(split_accuracy(net, sp.val, sp.train),
                                                           abs=1 / len(sp.val) + 1e-9), name
        assert summary[f"test_acc_last_{name}"] == pytest.approx(split_accuracy(net, sp.test, sp.train), **tol), name
    shipped = trainer.method.deployable()
    assert shipped is trainer.method.student
    assert summary["test_acc_last"] == pytest.approx(split_accuracy(shipped, sp.test, sp.train), **tol)
    assert json.loads((out / "summary.json").read_text())["test_acc_last"] == summary["test_acc_last"]
    resnet8 = create_model("resnet8", 10, 1)
    assert summary["params"] == sum(p.numel() for p in resnet8.parameters())
    # The shipped branch is an ordinary resnet8: the run directory serves as a teacher.
    teacher = load_teacher(out, trainer.method.info)
    assert teacher.state_dict().keys() == resnet8.state_dict().keys()
    return trainer, summary


@pytest.mark.parametrize("method", sorted(HEADS))
def test_trains_saves_resumes_and_reports_every_peer_on_tiny_data(method, distill_overrides, fmnist_tiny):
    _train_and_resume(method, [*distill_overrides, "data.batch_size=32"], 4, fmnist_tiny)


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("method", sorted(HEADS))
def test_trains_saves_resumes_and_reports_every_peer(method, distill_overrides):
    _, summary = _train_and_resume(method, [*distill_overrides, "data.val_size=200"], 20)
    assert summary["test_acc_last"] > 0.4, summary["test_acc_last"]  # chance is 0.1
