"""Flat-minima DG methods: SWAD's dense weight average and Lookahead's slow weights. SWAD's segment and fixed-window
averages are checked against the mean of the weights recorded after each step, its loss-valley rule against a
plain-Python rewrite of the reference ``LossValley`` fed the same segments and losses (and a hand-worked sequence),
Lookahead against a hand-written lookahead loop on the same gradients, the BN recompute of both against statistics
gathered by a manual pass; then each trains a few engine steps and resumes bit for bit."""

import collections
import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg, resumes_bitwise
from _helpers import BNNet, FixedMLP, fit_until_signal
from _nosync import NoHostSync
from torch import nn

from mentor.config import ConfigError
from mentor.data import ArrayDataset
from mentor.engine import Trainer
from mentor.engine.evaluate import Evaluator
from mentor.generalize.swad import bn_batches, recompute_bn
from mentor.methods import BuildInfo, Refresh, StepContext, create_method
from mentor.models import create_model

C = 10  # classes of the digit domains


def _info(domains=2, steps=100):
    return BuildInfo(num_classes=C, in_channels=1, image_size=8, num_domains=domains,
                     domain_names=tuple(f"d{i}" for i in range(domains)), max_steps=steps)


def _method(name, net, domains=2, **hp):
    torch.manual_seed(0)
    return create_method(name, net, _info(domains), **hp)


def _batch(domains, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(domains * b, 1, 8, 8, generator=g)
    y = torch.randint(0, C, (domains * b,), generator=g)
    return {"x": x, "y": y, "domain": torch.arange(domains).repeat_interleave(b), "index": torch.arange(domains * b)}


def _refresh(n=50, seed=0):
    """A Refresh over a small uint8 training split, normalised with fixed constants."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    split = ArrayDataset(images, torch.randint(0, C, (n,), generator=g), C, "toy")
    ev = Evaluator(torch.tensor([0.3]).view(1, 1, 1, 1), torch.tensor([0.2]).view(1, 1, 1, 1), 16,
                   torch.device("cpu"))
    return Refresh(labeled=split, unlabeled=None, evaluator=ev, device=torch.device("cpu"))


def _train(m, steps, lr=0.1, tensor_step=False, first=0, max_steps=None):
    """Train ``m`` for ``steps`` steps with plain SGD, calling ``after_step`` like the engine; returns the
    student's parameters after each step."""
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
    m.train()
    seen = []
    for step in range(first, first + steps):
        ctx = StepContext(step=torch.tensor(step) if tensor_step else step, max_steps=max_steps or steps)
        opt.zero_grad()
        m.training_step(_batch(2, 4, seed=step), ctx)["loss"].backward()
        opt.step()
        m.after_step(ctx)
        seen.append([p.detach().clone() for p in m.student.parameters()])
    return seen


def _bn_inputs_mean_var(net, batches):
    """Per BN layer: the mean over batches of each batch's per-channel mean and unbiased variance of the layer's
    input, gathered by forward pre-hooks on a copy run in training mode."""
    net = copy.deepcopy(net).train()
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [[] for _ in layers]
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: stats[i].append(
        (a[0].mean((0, 2, 3)), a[0].transpose(0, 1).flatten(1).var(1, unbiased=True)))) for i, m in enumerate(layers)]
    with torch.no_grad():
        for x in batches:
            net(x)
    for h in handles:
        h.remove()
    return [(torch.stack([s[0] for s in st]).mean(0), torch.stack([s[1] for s in st]).mean(0)) for st in stats]


# -- SWAD: the fixed window ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor_step", [False, True])
def test_swad_fixed_average_is_the_mean_of_the_weights_after_each_step_of_the_window(tensor_step):
    m = _method("swad", BNNet(C), window="fixed", start_fraction=0.25, end_fraction=0.75)
    assert m.window(8) == (2, 6)
    seen = _train(m, 8, tensor_step=tensor_step)
    for i, avg in enumerate(m.averaged.parameters()):
        mean = torch.stack([seen[s][i] for s in range(2, 6)]).mean(0)
        torch.testing.assert_close(avg, mean, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(m.averaged.fc.weight, m.student.fc.weight)  # the last two steps are not in it
    assert m.n_averaged.item() == 4


def test_swad_fixed_copy_follows_the_student_before_the_window_and_takes_its_buffers():
    m = _method("swad", BNNet(C), window="fixed", start_fraction=0.5)
    _train(m, 2, max_steps=4)
    for avg, p in zip(m.averaged.parameters(), m.student.parameters()):
        assert torch.equal(avg, p)  # before the window: a copy of the student
    assert m.n_averaged.item() == 0
    _train(m, 1, first=2, max_steps=4)  # window [2, 4): step 2 is its first
    for avg, p in zip(m.averaged.parameters(), m.student.parameters()):
        assert torch.equal(avg, p)  # the window's first step: weight 1
    for avg_b, b in zip(m.averaged.buffers(), m.student.buffers()):
        assert torch.equal(avg_b, b)
    assert m.n_averaged.item() == 1 and m.deployable() is m.averaged
    assert not any(p.requires_grad for p in m.averaged.parameters())
    assert {id(p) for p in m.phases()[0].params} == {id(p) for p in m.student.parameters()}


def test_swad_window_must_be_ordered_and_known():
    with pytest.raises(ConfigError, match="start_fraction=0.6 is not below end_fraction=0.5"):
        _method("swad", BNNet(C), window="fixed", start_fraction=0.6, end_fraction=0.5)
    assert _method("swad", BNNet(C), window="fixed", start_fraction=0.5, end_fraction=0.55).window(4) == (2, 3)
    with pytest.raises(ConfigError, match="window='valey' is not a window rule"):
        _method("swad", BNNet(C), window="valey")
    _method("swad", BNNet(C), start_fraction=0.6, end_fraction=0.5)  # the valley rule has no use for them


# -- SWAD: the loss valley -----------------------------------------------------------------------------------
class _RefSegment:
    """What the reference keeps of a segment average: its position (the code's end step) and its loss."""

    def __init__(self, index, loss):
        self.end_step = index
        self.end_loss = loss


class _RefAveraged:
    """The code's ``AveragedModel`` reduced to the segments it holds: built from a segment with a count of 0, so
    its first ``update_parameters`` overwrites that segment."""

    def __init__(self, segment):
        self.initial = segment.end_step
        self.updates = []

    def update_parameters(self, segment, **_):
        self.updates.append(segment.end_step)

    def segments(self):
        return set(self.updates) if self.updates else {self.initial}


class _RefLossValley:
    """khanrc/swad ``domainbed/swad.py`` ``LossValley``, written out again on plain Python values; ``final``
    reports the set of segments its ``get_final_model`` would average, without changing the state."""

    def __init__(self, n_converge, n_tolerance, tolerance_ratio):
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.converge_Q = collections.deque(maxlen=n_converge)
        self.smooth_Q = collections.deque(maxlen=n_tolerance)
        self.final_model = None
        self.converge_step = None
        self.dead_valley = False
        self.threshold = None
        self.full_at_convergence = False

    def get_smooth_loss(self, idx):
        return min(model.end_loss for model in list(self.smooth_Q)[idx:])

    def update_and_evaluate(self, segment):
        if self.dead_valley:
            return
        self.converge_Q.append(segment)
        self.smooth_Q.append(segment)
        if self.converge_step is None:
            if len(self.converge_Q) < self.n_converge:
                return
            losses = [model.end_loss for model in self.converge_Q]
            if losses.index(min(losses)) == 0:
                self.converge_step = self.converge_Q[0].end_step
                self.full_at_convergence = len(self.smooth_Q) == self.n_tolerance
                self.final_model = _RefAveraged(self.converge_Q[0])
                self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
                if self.n_tolerance < self.n_converge:
                    for i in range(self.n_converge - self.n_tolerance):
                        self.final_model.update_parameters(self.converge_Q[1 + i])
                elif self.n_tolerance > self.n_converge:
                    Q = list(self.smooth_Q)[: self.n_tolerance - self.n_converge + 1]
                    start_idx = 0
                    for i in reversed(range(len(Q))):
                        if Q[i].end_loss > self.threshold:
                            start_idx = i + 1
                            break
                    for model in Q[start_idx + 1:]:
                        self.final_model.update_parameters(model)
            return
        if self.smooth_Q[0].end_step < self.converge_step:
            return
        if self.get_smooth_loss(0) > self.threshold:
            self.dead_valley = True
            return
        self.final_model.update_parameters(self.smooth_Q[0])

    def final(self):
        if self.converge_step is None:
            return {self.converge_Q[-1].end_step}
        final_model, smooth_Q = copy.deepcopy(self.final_model), collections.deque(self.smooth_Q)
        if not self.dead_valley:
            smooth_Q.popleft()
            while smooth_Q:
                if min(model.end_loss for model in smooth_Q) > self.threshold:
                    break
                final_model.update_parameters(smooth_Q.popleft())
        return final_model.segments()


class _Tiny(nn.Module):
    def __init__(self, num_classes=3, in_channels=1):
        super().__init__()
        self.fc = nn.Linear(2, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :2])


def _feed(m, weights, steps, losses):
    """Record segments of the given flat weights, step counts and losses, as the steps and evaluations would;
    returns after each the deployed weights, the dead flag, the converged segment and the threshold."""
    deployed, end = [], 0
    for w, s, loss in zip(weights, steps, losses):
        end += s
        m.segment.copy_(w)
        m.segment_steps.fill_(s)
        m.segment_end.fill_(end)
        m.record_segment(loss)
        deployed.append((m.deployed_weights().clone(), m.dead.item(), m.converged.item(), m.threshold.item()))
    return deployed


def _step_weighted_mean(weights, steps, chosen):
    chosen = sorted(chosen)
    total = sum(steps[i] for i in chosen)
    return sum(weights[i].double() * steps[i] for i in chosen) / total


def _synthetic(n, seed, size):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(size, generator=g) for _ in range(n)]
    steps = torch.randint(1, 5, (n,), generator=g).tolist()
    return weights, steps


def test_swad_valley_converges_stays_and_dies_on_a_hand_worked_sequence():
    losses = [4.0, 3.0, 1.2, 1.3, 1.1, 1.0, 1.05, 1.2, 1.25, 1.2, 1.3, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 0.5, 0.4]
    m = _method("swad", _Tiny())
    weights, steps = _synthetic(len(losses), 0, m.segment.numel())
    deployed = [d[0] for d in _feed(m, weights, steps, losses)]
    # converged when segments 5, 6, 7 are the converge queue (1.0 first and smallest): threshold 1.3 * 3.25 / 3;
    # segments 3, 4 (and 5) join from the tolerance queue, segment 2 (its oldest) does not
    assert m.converged.item() == 5 and m.threshold.item() == pytest.approx(1.3 * 3.25 / 3)
    for i in range(7):
        torch.testing.assert_close(deployed[i], weights[i])  # before convergence: the newest segment
    torch.testing.assert_close(deployed[7], _step_weighted_mean(weights, steps, {3, 4, 5, 6, 7}).float())
    # segment 11 (loss 1.6) is the first whose six losses from it on are all above the threshold: the valley dies
    # when segment 16 closes them; the segments after it are not recorded
    assert m.dead.item() and m.joined.item() == 10
    valley = _step_weighted_mean(weights, steps, range(3, 11)).float()
    torch.testing.assert_close(m.valley, valley)
    assert m.n_averaged.item() == sum(steps[3:11])
    assert m.valley_start.item() == sum(steps[:3]) and m.valley_end.item() == sum(steps[:11])
    for i in (16, 17, 18):  # the dead valley takes nothing more, low losses or not
        torch.testing.assert_close(deployed[i], valley)
    assert m.segments.item() == 17
    ref = _RefLossValley(3, 6, 0.3)
    for i, loss in enumerate(losses):
        ref.update_and_evaluate(_RefSegment(i, loss))
    assert ref.dead_valley and ref.final() == set(range(3, 11))


@pytest.mark.parametrize("n_converge,n_tolerance,ratio", [(3, 6, 0.3), (3, 6, 0.1), (3, 3, 0.3), (4, 2, 0.2),
                                                          (2, 1, 0.05), (1, 1, 0.3), (2, 5, 0.3)])
def test_swad_valley_picks_the_segments_of_the_reference_loss_valley(n_converge, n_tolerance, ratio):
    """Random loss curves (falling, then noisy, then rising); at every evaluation the deployed weights are the
    step-weighted mean of the set of segments the reference would average, with the converged segment itself
    (which the reference drops when ``n_tolerance <= n_converge``: its average starts from that segment with a
    count of 0). Compared wherever the two agree by design: the reference converged with a full tolerance queue,
    and its queue's head is no older than the converged segment (see the class docstring)."""
    m0 = _method("swad", _Tiny(), n_converge=n_converge, n_tolerance=n_tolerance, tolerance_ratio=ratio)
    state = copy.deepcopy(m0.state_dict())
    seen = collections.Counter()
    for seed in range(24):
        g = torch.Generator().manual_seed(1000 + seed)
        n = 26
        t = torch.arange(n, dtype=torch.float64)
        curve = 2.0 * torch.exp(-t / 3) + 0.5 + 0.08 * (t - 10).clamp(min=0) * torch.rand((), generator=g,
                                                                                             dtype=torch.float64)
        losses = (curve + 0.15 * torch.rand(n, generator=g, dtype=torch.float64)).tolist()
        m0.load_state_dict(state)
        weights, steps = _synthetic(n, seed, m0.segment.numel())
        deployed = _feed(m0, weights, steps, losses)
        ref = _RefLossValley(n_converge, n_tolerance, ratio)
        for i, loss in enumerate(losses):
            ref.update_and_evaluate(_RefSegment(i, loss))
            if ref.converge_step is None:
                seen["before"] += 1
            elif not ref.full_at_convergence:
                seen["early"] += 1
                continue
            elif not ref.dead_valley and ref.smooth_Q[0].end_step < ref.converge_step:
                seen["recent"] += 1
                continue
            else:
                seen["dead" if ref.dead_valley else "valley"] += 1
            got, dead, converged, threshold = deployed[i]
            chosen = ref.final() | ({ref.converge_step} if ref.converge_step is not None else set())
            torch.testing.assert_close(got, _step_weighted_mean(weights, steps, chosen).float(),
                                       msg=lambda s, i=i, seed=seed: f"seed {seed}, segment {i}: {s}")
            assert dead == ref.dead_valley
            if ref.converge_step is not None:
                assert converged == ref.converge_step and threshold == ref.threshold
    assert seen["valley"] and (n_converge == 1 or (seen["before"] and seen["dead"])), seen


def test_swad_valley_converging_before_the_tolerance_queue_fills():
    """Convergence at the third segment (the tolerance queue holds three of six): the valley starts at segment 0
    and later segments join only by the tolerance rule (the code's queue search would take segments 1 and 2 at
    once and drop segment 0 until it reaches the queue's head)."""
    losses = [1.0, 5.0, 1.2, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]
    m = _method("swad", _Tiny())
    weights, steps = _synthetic(len(losses), 3, m.segment.numel())
    deployed = [d[0] for d in _feed(m, weights, steps, losses)]
    assert m.converged.item() == 0 and m.threshold.item() == pytest.approx(1.3 * 7.2 / 3)
    # at segment 2: the valley holds segment 0; segments 1 and 2 follow since each one's smallest loss from it on
    # (1.2) is within the threshold (the code's final step)
    torch.testing.assert_close(deployed[2], _step_weighted_mean(weights, steps, {0, 1, 2}).float())
    # segment 3 (9.0) never joins: its six losses are all above the threshold, so the valley dies at segment 8
    torch.testing.assert_close(deployed[3], _step_weighted_mean(weights, steps, {0, 1, 2}).float())
    assert m.dead.item() and m.joined.item() == 2 and m.segments.item() == 9
    torch.testing.assert_close(deployed[-1], _step_weighted_mean(weights, steps, {0, 1, 2}).float())


@pytest.mark.parametrize("tensor_step", [False, True])
def test_swad_segment_is_the_mean_of_the_weights_after_each_step_since_the_last_evaluation(tensor_step):
    m = _method("swad", BNNet(C))
    seen = _train(m, 3, tensor_step=tensor_step)
    flat = [torch.cat([p.flatten() for p in s]) for s in seen]
    torch.testing.assert_close(m.segment, torch.stack(flat).mean(0), rtol=1e-6, atol=1e-7)
    assert m.segment_steps.item() == 3 and m.segment_end.item() == 3
    m.record_segment(1.0)
    assert m.segment_steps.item() == 0 and m.segments.item() == 1
    torch.testing.assert_close(m.recent[0], torch.stack(flat).mean(0), rtol=1e-6, atol=1e-7)
    assert m.recent_steps[0].item() == 3 and m.recent_end[0].item() == 3
    seen = _train(m, 2, tensor_step=tensor_step, first=3)  # a new segment: steps 3 and 4 only
    flat = [torch.cat([p.flatten() for p in s]) for s in seen]
    torch.testing.assert_close(m.segment, torch.stack(flat).mean(0), rtol=1e-6, atol=1e-7)
    assert m.segment_end.item() == 5
    m.record_segment(1.0)  # no evaluation finds an empty segment, but one would record nothing
    m.record_segment(1.0)
    assert m.segments.item() == 2


def _valley_refresh(n_val=30):
    g = torch.Generator().manual_seed(7)
    val = ArrayDataset(torch.randint(0, 256, (n_val, 1, 8, 8), generator=g, dtype=torch.uint8),
                       torch.randint(0, C, (n_val,), generator=g), C, "val")
    return dataclasses.replace(_refresh(n=50), val=val)


def test_swad_before_eval_records_the_students_validation_loss_and_deploys_with_bn_recomputed():
    m = _method("swad", BNNet(C), bn_images=40, bn_batch_size=16)
    _train(m, 4)
    refresh = _valley_refresh()
    x = (refresh.val.images.float() / 255 - 0.3) / 0.2
    student = copy.deepcopy(m.student).eval()
    expected = F.cross_entropy(student(x).double(), refresh.val.labels).item()
    segment = m.segment.clone()
    m.before_eval(refresh)
    assert m.recent_loss[0].item() == pytest.approx(expected, rel=1e-6)
    assert m.student.training  # the student's mode is restored
    flat = torch.cat([p.flatten() for p in m.averaged.parameters()])
    assert torch.equal(flat, segment)  # before convergence: the newest segment's average
    ref = _bn_inputs_mean_var(m.averaged, bn_batches(refresh, 40, 16))
    torch.testing.assert_close(m.averaged.bn.running_mean, ref[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.averaged.bn.running_var, ref[0][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no validation images.*method.window=fixed"):
        _train(m, 1, first=4)
        m.before_eval(_refresh())


# -- SWAD: engine runs ---------------------------------------------------------------------------------------
def test_swad_valley_trains_in_the_engine_and_deploys_the_valley_average(tmp_path):
    t = Trainer(dg_cfg(tmp_path, "run", "swad", "method.bn_images=64", "method.n_converge=1",
                       "method.n_tolerance=2", "method.tolerance_ratio=100", "trainer.eval_every=1"))
    summary = t.fit()
    assert 0 <= summary["test_acc_last@rolled"] <= 1 and 0 <= summary["test_acc_last_online"] <= 1
    m = t.method
    # four segments of one step: converged at the first; 0..2 joined, the newest follows by the final rule
    assert m.segments.item() == 4 and m.converged.item() == 0 and m.joined.item() == 2 and not m.dead.item()
    assert m.n_averaged.item() == 3 and m.valley_start.item() == 0 and m.valley_end.item() == 3
    student = torch.cat([p.flatten() for p in m.student.parameters()])
    assert torch.equal(m.recent[1], student)  # the ring of two: segment 3 is the last step alone
    flat = torch.cat([p.flatten() for p in m.averaged.parameters()])
    torch.testing.assert_close(flat, (3 * m.valley + student) / 4)
    assert not torch.allclose(flat, student)


def test_swad_valley_resumes_bitwise_across_evaluations(tmp_path):
    def cfg(run):  # evaluations after steps 2, 4, 6; the stop after step 3 falls inside the second segment
        return dg_cfg(tmp_path, run, "swad", "model.name=resnet8", "trainer.max_steps=6", "trainer.eval_every=2",
                      "trainer.ckpt_every=3", "method.bn_images=48", "method.bn_batch_size=16",
                      "method.n_converge=1", "method.n_tolerance=2", "method.tolerance_ratio=100")

    _, ref = resumes_bitwise(cfg, stop_after=2)
    assert ref["segments"].item() == 3 and ref["n_averaged"].item() == 4  # segments 0 and 1 joined


# -- BN recompute --------------------------------------------------------------------------------------------
def test_bn_recompute_equals_the_statistics_of_a_manual_pass():
    torch.manual_seed(1)
    net = create_model("resnet8", num_classes=C, in_channels=1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.momentum = 0.3
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)] + [torch.randn(7, 1, 8, 8)]
    ref = _bn_inputs_mean_var(net, batches)
    net.eval()
    recompute_bn(net, iter(batches))
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) == len(ref) == 9
    for layer, (mean, var) in zip(layers, ref):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
        assert layer.momentum == 0.3 and layer.num_batches_tracked.item() == 4
    assert not net.training


def test_bn_batches_read_a_fixed_seeded_share_of_the_training_split_normalised():
    refresh = _refresh(n=50)
    first = list(bn_batches(refresh, 40, 16))
    assert [len(x) for x in first] == [16, 16, 8]
    again = list(bn_batches(refresh, 40, 16))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:40]
    expected = (refresh.labeled.images[order].float() / 255 - 0.3) / 0.2
    torch.testing.assert_close(torch.cat(first), expected)
    assert sum(len(x) for x in bn_batches(refresh, 1000, 16)) == 50


@pytest.mark.parametrize("name,copy_name,hp", [("swad", "averaged", {"window": "fixed"}),
                                               ("lookahead_dg", "slow", {"k": 2})])
def test_before_eval_recomputes_the_deployed_copys_bn_statistics(name, copy_name, hp):
    m = _method(name, BNNet(C), bn_images=40, bn_batch_size=16, **hp)
    _train(m, 5)
    refresh = _refresh(n=50)
    net = getattr(m, copy_name)
    ref = _bn_inputs_mean_var(net, bn_batches(refresh, 40, 16))
    m.eval()
    m.before_eval(refresh)
    torch.testing.assert_close(net.bn.running_mean, ref[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn.running_var, ref[0][1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(net.bn.running_mean, m.student.bn.running_mean)
    assert m.deployable() is net and not net.training


# -- Lookahead -----------------------------------------------------------------------------------------------
def _hand_lookahead(net, steps, k, alpha, lr, average, reg):
    """The reference loop (koncle/Lookahead-Large-LR ``lookahead_train``) on plain tensors: SGD on the fast
    weights, the running mean of the fast weights within the outer step, interpolation into the slow weights
    and restart at each outer step's end."""
    names = [n for n, _ in net.named_parameters()]
    fast = [p.detach().clone() for p in net.parameters()]
    slow = [p.clone() for p in fast]
    mean = [p.clone() for p in fast]
    for step in range(steps):
        j = step % k
        batch = _batch(2, 4, seed=step)
        theta = [p.clone().requires_grad_(True) for p in fast]
        logits = torch.func.functional_call(net, dict(zip(names, theta)), (batch["x"],))
        loss = F.cross_entropy(logits, batch["y"])
        if reg:
            flat = torch.cat([t.flatten() for t in theta])
            loss = loss + reg * ((flat - torch.cat([m.flatten() for m in mean])) ** 2).mean()
        grads = torch.autograd.grad(loss, theta)
        fast = [p - lr * g for p, g in zip(fast, grads)]
        mean = [(m * j + p) / (j + 1) for m, p in zip(mean, fast)]
        if j == k - 1:
            final = mean if average else fast
            slow = [s * (1 - alpha) + f * alpha for s, f in zip(slow, final)]
            fast = [s.clone() for s in slow]
            mean = [s.clone() for s in slow]
    return slow, fast


@pytest.mark.parametrize("average,regularize", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("tensor_step", [False, True])
def test_lookahead_slow_weights_follow_a_hand_written_lookahead(average, regularize, tensor_step):
    k, alpha, lr, steps = 3, 0.3, 0.2, 8  # outer steps end after steps 2 and 5; 6, 7 are inside the third
    net = FixedMLP(C)
    reference = copy.deepcopy(net)
    m = _method("lookahead_dg", net, k=k, alpha=alpha, average=average, regularize=regularize, reg=0.5)
    _train(m, steps, lr=lr, tensor_step=tensor_step)
    slow, fast = _hand_lookahead(reference, steps, k, alpha, lr, average, 0.5 if regularize else 0.0)
    for got, want in zip(m.slow.parameters(), slow):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(m.student.parameters(), fast):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    init = list(reference.parameters())
    assert not torch.allclose(next(m.slow.parameters()), init[0])


def test_lookahead_regulariser_is_the_mean_squared_pull_toward_the_running_mean():
    m = _method("lookahead_dg", FixedMLP(C), k=4, regularize=True, reg=0.01)
    _train(m, 2)  # inside an outer step: theta_bar is the mean of two fast weights, theta the second
    out = m.training_step(_batch(2, 4, seed=9), StepContext(step=2, max_steps=10))
    flat = torch.cat([p.detach().flatten() for p in m.student.parameters()])
    bar = torch.cat([t.flatten() for t in m.fast_mean.tensors()])
    assert out["reg"].item() == pytest.approx(0.01 * ((flat - bar) ** 2).mean().item(), rel=1e-6)
    assert out["reg"].item() > 0
    assert out["loss"].item() == pytest.approx(F.cross_entropy(m.student(_batch(2, 4, seed=9)["x"]),
                                                               _batch(2, 4, seed=9)["y"]).item() + out["reg"].item(),
                                               rel=1e-6)


@pytest.mark.parametrize("name,hp", [("swad", {}), ("swad", {"window": "fixed"}),
                                     ("lookahead_dg", {"regularize": True, "k": 3})])
def test_after_step_reads_nothing_back_to_the_host(name, hp):
    m = _method(name, BNNet(C), **hp).train()
    batch = _batch(2, 4)
    with NoHostSync():
        for step in (torch.tensor(0), torch.tensor(2), torch.tensor(60), 99):
            ctx = StepContext(step=step, max_steps=100)
            m.training_step(batch, ctx)["loss"].backward()
            m.after_step(ctx)


# -- engine runs and resume ----------------------------------------------------------------------------------
ENGINE = {"swad": ["method.bn_images=64"], "lookahead_dg": ["method.bn_images=64", "method.k=2"]}
HEADS = {"swad": "online", "lookahead_dg": "fast"}


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_each_method_trains_in_the_engine(tmp_path, name):
    summary = Trainer(dg_cfg(tmp_path, "run", name, *ENGINE[name])).fit()
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last@rolled"] <= 1
    assert 0 <= summary[f"test_acc_last_{HEADS[name]}"] <= 1
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(e["loss"]) for e in train)
    assert any(f"val_acc_{HEADS[name]}" in e for e in events)


@pytest.mark.parametrize("name,extra", [("swad", ["method.window=fixed", "method.start_fraction=0.3"]),
                                        ("lookahead_dg", ["method.k=2", "method.regularize=true"])])
def test_a_resumed_run_ends_with_the_straight_runs_state(tmp_path, name, extra):
    def cfg(run):
        return dg_cfg(tmp_path, run, name, "model.name=resnet8", "trainer.max_steps=6", "trainer.eval_every=3",
                      "trainer.ckpt_every=3", "method.bn_images=48", "method.bn_batch_size=16", *extra)

    straight = Trainer(cfg("a"))
    start = {k: v.clone() for k, v in straight.method.state_dict().items()}
    straight.fit()
    ref = straight.method.state_dict()
    moved = "averaged.fc.weight" if name == "swad" else "slow.fc.weight"
    assert not torch.equal(ref[moved], start[moved])
    fit_until_signal(Trainer(cfg("b")), after_step=2)
    resumed = Trainer(cfg("b"))
    resumed.fit()
    assert resumed.start_step == 3
    got = resumed.method.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def test_recipes_load():
    from pathlib import Path

    from mentor.config import load_config

    root = Path(__file__).resolve().parents[1]
    for name in ("swad", "lookahead_dg"):
        cfg = load_config(str(root / "recipes" / "generalize" / f"rotated_fmnist_{name}.yaml"), [])
        assert cfg.method.name == name and cfg.model.name == "resnet8"
        create_method(name, create_model(cfg.model.name, 10, 1), BuildInfo(num_classes=10, image_size=28,
                                                                           num_domains=5, domain_names=tuple("abcde")))
