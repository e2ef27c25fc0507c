"""The founding semi-supervised methods (mentor.semi: unimatch, shrinkmatch, mutexmatch, rda) and their
shared pieces (mentor.nn.distalign's DistAlignQueue and reciprocal_alignment, mentor.models.penultimate):
each loss against a per-image Python computation written from the official code's description, over
several steps of queue and moving-average state (with wrap-around), checkpoint round trips, no host
synchronisation in a step, the gradient paths of the reference code, and real runs on the UCI digits."""

import copy
import math

import pytest
import torch
import torch.multiprocessing as mp
from _helpers import BNNet, fit_until_signal, free_port, torchrun_env  # noqa: F401  (registers test_bncnn)
from _nosync import NoHostSync
from _ssl_reference import argmax, ce, col_mean, softmax
from _ssl_runs import RUN, resumes_bitwise
from torch import nn

import mentor.semi.rda as rda_module
from mentor.config import ConfigError, load_config
from mentor.engine import Trainer
from mentor.methods import METHODS, BuildInfo, StepContext
from mentor.models import FeatureTap, StageError, create_model, strip_taps
from mentor.models.penultimate import PenultimateTap
from mentor.nn.distalign import DistAlignQueue, reciprocal_alignment
from mentor.semi.mutexmatch import top_k_classes
from mentor.semi.rda import complementary_labels
from mentor.semi.shrinkmatch import shrink_loss, shrink_search

C, H, B, N, STEPS = 5, 6, 6, 12, 8
INFO = BuildInfo(num_classes=C, in_channels=1, image_size=2, unlabeled_size=40)
NAMES = ["unimatch", "shrinkmatch", "mutexmatch", "rda"]
VIEWS = ("x_weak", "u_weak", "u_strong", "u_strong_1")


class TapNet(nn.Module):
    """``fc(tanh(layer1(x)))`` without BatchNorm: its features and logits are easy to recompute."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Linear(4, H)
        self.fc = nn.Linear(H, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.layer1(x.flatten(1))))


def make(name, **hp):
    torch.manual_seed(0)
    net = TapNet()
    with torch.no_grad():
        net.layer1.weight.mul_(3.0)
        net.fc.weight.mul_(4.0)  # confident enough that the masks keep some images and drop others
    cls = METHODS.get(name)
    return cls(cls.Config(name=name, **hp), net, INFO)


def batch_at(step):
    g = torch.Generator().manual_seed(50 + step)
    b = {k: torch.randn(B if k == "x_weak" else N, 1, 2, 2, generator=g) for k in VIEWS}
    b.update(x=b["x_weak"], u=b["u_weak"], y=torch.randint(0, C, (B,), generator=g),
             u_index=torch.randint(0, 40, (N,), generator=g), index=torch.arange(B))
    return b


def seen(method, batch):
    """Features and logits of every view, as lists (the network's own forward, no loss code)."""
    net = method.student
    with torch.no_grad():
        h = {k: torch.tanh(net.layer1(batch[k].flatten(1))) for k in VIEWS}
        return {k: v.tolist() for k, v in h.items()}, {k: net.fc(v).tolist() for k, v in h.items()}, h


def linear(layer, h):
    w, b = layer.weight.tolist(), layer.bias.tolist()
    return [sum(wi * hi for wi, hi in zip(row, h)) + bi for row, bi in zip(w, b)]


def mean(values):
    return sum(values) / len(values)


def log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


# -- references, one image at a time ---------------------------------------------------------------------


class QueueRef:
    """A list of ``length`` rows (all ``init``), the pointer wrapping around."""

    def __init__(self, length, init):
        self.rows, self.ptr = [[init] * C for _ in range(length)], 0

    def push(self, probs):
        self.rows[self.ptr] = col_mean(probs)
        self.ptr = (self.ptr + 1) % len(self.rows)

    def mean(self):
        return col_mean(self.rows)


def shrink_ref(probs, aux_logits, tau):
    """ShrinkMatch's ``shrink_loss`` as the official code writes it: for each uncertain image, walk c = 2 ..
    C-1 and stop at the first c whose shrunk confidence passes (or at the last); per-image losses."""
    out = []
    for p, a in zip(probs, aux_logits):
        order = sorted(range(len(p)), key=lambda j: -p[j])
        s, z = [p[j] for j in order], [a[j] for j in order]
        loss = 0.0
        if max(p) < tau:
            for c in range(2, len(p)):
                sub = s[0] / (s[0] + sum(s[c:]))
                if sub >= tau or c == len(p) - 1:
                    loss = ce([z[0]] + z[c:], 0) * max(p) * (1.0 if sub >= tau else 0.0)
                    break
        out.append(loss)
    return out


def tnc_ref(q, z, k):
    """MutexMatch's TNC consistency per image: entries below the k-th largest of q set to 0 in q and z."""
    if k is not None:
        kth = sorted(q, reverse=True)[k - 1]
        keep = [v >= kth for v in q]
        q, z = [v if kv else 0.0 for v, kv in zip(q, keep)], [v if kv else 0.0 for v, kv in zip(z, keep)]
    return -sum(qv * lv for qv, lv in zip(q, log_softmax(z)))


def reciprocal_ref(p, q, dist_p, dist_q, normalize="batch"):
    """RDA's alignment as its official code computes it: Normalize over every entry of the tensor."""
    def normalize_all(rows):
        total = sum(sum(r) for r in rows)
        return [[v / total for v in r] for r in rows]

    comp_q = normalize_all([[1 - v for v in r] for r in dist_q])
    comp_p = normalize_all([[1 - v for v in r] for r in dist_p])
    ratio_p = [a / b for a, b in zip(col_mean(comp_q), col_mean(dist_p))]
    ratio_q = [a / b for a, b in zip(col_mean(comp_p), col_mean(dist_q))]
    p2 = [[v * r for v, r in zip(row, ratio_p)] for row in p]
    q2 = [[v * r for v, r in zip(row, ratio_q)] for row in q]
    if normalize == "row":
        return [[v / sum(r) for v in r] for r in p2], [[v / sum(r) for v in r] for r in q2]
    return normalize_all(p2), normalize_all(q2)


class Ref:
    """One method's step, per image, with the state its queues and averages carry between steps."""

    def __init__(self, method):
        self.m, self.c = method, method.cfg
        if self.m.method_name == "shrinkmatch":
            self.queue, self.ratio = QueueRef(self.c.da_len, 0.0), None
        if self.m.method_name == "rda":
            self.dp, self.dq = QueueRef(self.c.queue_len, 1.0), QueueRef(self.c.queue_len, 1.0)

    def step(self, batch, step, spy):
        c, m = self.c, self.m
        hs, L, h_t = seen(m, batch)
        y = batch["y"].tolist()
        sup = mean([ce(z, t) for z, t in zip(L["x_weak"], y)])
        probs = [softmax(z) for z in L["u_weak"]]
        out, name = {"sup": sup}, m.method_name
        if name == "unimatch":
            mask = [1.0 if max(p) >= c.p_cutoff else 0.0 for p in probs]
            t = [argmax(p) for p in probs]
            fp = [linear(m.student.fc, h) for h in spy["perturbed"]]
            out["unsup"] = sum(w * ce(z, k) for w, z, k in zip(mask, L["u_strong"], t)) / N
            out["unsup_s2"] = sum(w * ce(z, k) for w, z, k in zip(mask, L["u_strong_1"], t)) / N
            out["fp"] = sum(w * ce(z, k) for w, z, k in zip(mask, fp, t)) / N
            loss = sup + c.lambda_u * (c.s1_weight * out["unsup"] + c.s2_weight * out["unsup_s2"]
                                       + c.fp_weight * out["fp"])
            out["loss"] = c.loss_scale * loss
        elif name == "shrinkmatch":
            self.queue.push(probs)
            qm = self.queue.mean()
            probs = [[v / d for v, d in zip(p, qm)] for p in probs]
            probs = [[v / sum(p) for v in p] for p in probs]
            mask = [1.0 if max(p) >= c.p_cutoff else 0.0 for p in probs]
            ratio = mean(mask)
            fresh = self.ratio is None or (c.ratio_reset_every and step % c.ratio_reset_every == 0)
            self.ratio = ratio if fresh else self.ratio * c.ratio_momentum + ratio * (1 - c.ratio_momentum)
            with torch.no_grad():
                aux = copy.deepcopy(m.aux_head)(h_t["u_strong"]).tolist()  # the head itself: BN on this batch
            shrink = shrink_ref(probs, aux, c.p_cutoff)
            out["unsup"] = sum(w * ce(z, p) for w, z, p in zip(mask, L["u_strong"], probs)) / N
            out["shrink"] = sum(shrink) / N
            out["loss"] = sup + c.lambda_u * (out["unsup"] + self.ratio * out["shrink"])
            spy["ratio"], spy["shrunk"] = self.ratio, [v > 0 for v in shrink]
        elif name == "mutexmatch":
            mask = [1.0 if max(p) >= c.p_cutoff else 0.0 for p in probs]
            everything = [*zip(hs["x_weak"], L["x_weak"]), *zip(hs["u_weak"], L["u_weak"]),
                          *zip(hs["u_strong"], L["u_strong"])]
            reverse = mean([ce(linear(m.tnc, h), min(range(C), key=lambda j: z[j])) for h, z in everything])
            k = top_k_classes(c.k, C)
            tnc = sum((1 - w) * tnc_ref(softmax(linear(m.tnc, hw)), linear(m.tnc, hs_), k)
                      for w, hw, hs_ in zip(mask, hs["u_weak"], hs["u_strong"])) / N
            out["unsup"] = sum(w * ce(z, argmax(p)) for w, z, p in zip(mask, L["u_strong"], probs)) / N
            out.update(reverse=reverse, unsup_tnc=tnc)
            out["loss"] = sup + c.lambda_u * out["unsup"] + reverse + c.lambda_u * tnc
        else:  # rda
            q = [softmax(linear(m.comp, h)) for h in hs["u_weak"]]
            self.dp.push(probs)
            self.dq.push(q)
            p2, q2 = reciprocal_ref(probs, q, self.dp.rows, self.dq.rows, c.normalize)
            mask = [1.0] * N
            y_bar = spy["y_bar"]
            assert all(a != b for a, b in zip(y_bar, y))
            out["comp"] = mean([ce(linear(m.comp, h), t) for h, t in zip(hs["x_weak"], y_bar)])
            out["unsup"] = mean([ce(z, argmax(p)) for z, p in zip(L["u_strong"], p2)])
            out["unsup_ca"] = mean([-sum(a * b for a, b in zip(t, log_softmax(linear(m.comp, h))))
                                    for t, h in zip(q2, hs["u_strong"])])
            out["loss"] = sup + out["comp"] + c.lambda_u * (out["unsup"] + out["unsup_ca"])
        return out, mask


CASES = [
    ("unimatch", {"p_cutoff": 0.8}),
    ("unimatch", {"p_cutoff": 0.8, "fp_dropout": 0.0, "loss_scale": 0.5, "lambda_u": 2.0}),
    ("shrinkmatch", {"p_cutoff": 0.8, "da_len": 3, "ratio_momentum": 0.5}),
    ("shrinkmatch", {"p_cutoff": 0.8, "da_len": 3, "ratio_momentum": 0.5, "ratio_reset_every": 3}),
    ("mutexmatch", {"p_cutoff": 0.8}),
    ("mutexmatch", {"p_cutoff": 0.8, "k": 0.6}),
    ("mutexmatch", {"p_cutoff": 0.8, "k": 2}),
    ("rda", {"queue_len": 3}),
    ("rda", {"queue_len": 3, "normalize": "row", "lambda_u": 0.5}),
]


def attach_spy(method, monkeypatch):
    spy = {}
    if method.method_name == "unimatch":
        original = method.perturb

        def perturb(features, ctx):
            out = original(features, ctx)
            spy["perturbed"] = out.detach().tolist()
            return out

        method.perturb = perturb
    if method.method_name == "rda":
        def draw(y, num_classes, generator=None):
            out = complementary_labels(y, num_classes, generator)
            spy["y_bar"] = out.tolist()
            return out

        monkeypatch.setattr(rda_module, "complementary_labels", draw)
    return spy


@pytest.mark.parametrize("name, hp", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_step_loss_equals_a_per_image_computation(name, hp, monkeypatch):
    method = make(name, **hp)
    ref, spy = Ref(method), attach_spy(method, monkeypatch)
    masks, ratios, shrunk = [], [], []
    for step in range(STEPS):
        batch = batch_at(step)
        ctx = StepContext(step=step, max_steps=STEPS)
        out = method.training_step(batch, ctx)  # runs first: the spies record this step's random draws
        expected, mask = ref.step(batch, step, spy)
        for key, value in expected.items():
            assert float(out[key].detach()) == pytest.approx(value, rel=2e-5, abs=1e-6), (key, step)
        assert float(ctx.diagnostics["mask_rate"]) == pytest.approx(mean(mask), abs=1e-6), step
        masks += mask
        if name == "shrinkmatch":
            assert float(ctx.diagnostics["certain_ratio_ema"]) == pytest.approx(spy["ratio"], abs=1e-6)
            ratios.append(spy["ratio"])
            shrunk += spy["shrunk"]
    if name != "rda":
        assert 0 < sum(masks) < len(masks)  # the masks kept some images and dropped others
    if name == "shrinkmatch":
        assert any(shrunk) and max(ratios) > 0  # some uncertain images were shrunk, with a weight
    if name == "rda":
        assert method.queue_main.ptr.item() == STEPS % 3  # wrapped around


def test_shrink_search_and_loss_equal_the_reference_double_loop():
    g = torch.Generator().manual_seed(3)
    found_any = not_found_any = False
    for num_classes, tau in ((10, 0.95), (10, 0.6), (4, 0.8), (3, 0.9)):
        probs = (torch.randn(64, num_classes, generator=g, dtype=torch.float64) * 2).softmax(1)
        aux = torch.randn(64, num_classes, generator=g, dtype=torch.float64)
        got = shrink_loss(probs, aux, tau)
        expected = shrink_ref(probs.tolist(), aux.tolist(), tau)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
        c, found = shrink_search(probs, tau)
        uncertain = probs.max(1).values < tau
        assert (got[~uncertain] == 0).all() and ((c >= 2) & (c <= num_classes - 1)).all()
        found_any, not_found_any = found_any or found[uncertain].any(), not_found_any or (~found[uncertain]).any()
    assert found_any and not_found_any  # both branches of the search were taken
    # by hand: p = (0.5, 0.3, 0.15, 0.05), tau 0.8: c = 2 gives 0.5 / 0.7 < 0.8; c = 3 gives 0.5 / 0.55 >= 0.8
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    z = torch.tensor([[1.0, 2.0, 3.0, 0.5]], dtype=torch.float64)
    c, found = shrink_search(p, 0.8)
    assert c.tolist() == [3] and found.tolist() == [True]
    expected = 0.5 * (math.log(math.exp(1.0) + math.exp(0.5)) - 1.0)
    assert shrink_loss(p, z, 0.8).item() == pytest.approx(expected)
    two = torch.tensor([[0.6, 0.4]])
    assert shrink_loss(two, torch.zeros(1, 2), 0.95).tolist() == [0.0]  # nothing to drop with 2 classes


def test_tnc_top_k_by_hand_and_its_configuration():
    from mentor.semi.mutexmatch import tnc_consistency

    q = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    kept = torch.tensor([[1.0, 2.0, 3.0, 0.0]])  # top 2 with the tie at the 2nd value: 3 classes kept
    expected = -(torch.tensor([[0.5, 0.2, 0.2, 0.0]]) * kept.log_softmax(1)).sum()
    assert tnc_consistency(q, z, 2).item() == pytest.approx(expected.item())
    assert tnc_consistency(q, z, None).item() == pytest.approx(-(q * z.log_softmax(1)).sum().item())
    assert [top_k_classes(k, 10) for k in (0, 10, 0.6, 6, 1, 0.01)] == [None, None, 6, 6, 1, 1]
    assert top_k_classes(0.6, 100) == 60
    with pytest.raises(ConfigError, match="k=11"):
        top_k_classes(11, 10)


def test_complementary_labels_are_the_other_classes_uniformly():
    y = torch.arange(5).repeat(4000)
    y_bar = complementary_labels(y, 5, torch.Generator().manual_seed(0))
    assert (y_bar != y).all() and y_bar.min() >= 0 and y_bar.max() < 5
    for label in range(5):
        counts = torch.bincount(y_bar[y == label], minlength=5).float() / 4000
        others = counts[torch.arange(5) != label]
        assert counts[label] == 0 and (others - 0.25).abs().max() < 0.04  # binomial std 0.007
    again = complementary_labels(y, 5, torch.Generator().manual_seed(0))
    assert torch.equal(y_bar, again)


def test_unimatch_dropout_keeps_or_doubles_each_feature_and_follows_the_step():
    method = make("unimatch")
    h = torch.rand(200, 64) + 0.5
    a = method.perturb(h, StepContext(step=4, max_steps=10))
    assert torch.all((a == 0) | torch.isclose(a, 2 * h))
    assert abs((a == 0).float().mean().item() - 0.5) < 0.03
    assert torch.equal(a, method.perturb(h, StepContext(step=4, max_steps=10)))  # a resumed step repeats it
    assert not torch.equal(a, method.perturb(h, StepContext(step=5, max_steps=10)))
    assert torch.equal(make("unimatch", fp_dropout=0.0).perturb(h, StepContext(step=4, max_steps=10)), h)


# -- the shared pieces: queue, reciprocal alignment, penultimate features -----------------------------------


@pytest.mark.parametrize("init", [0.0, 1.0])
def test_queue_alignment_follows_a_python_queue_with_wrap_around(init):
    da, ref = DistAlignQueue(C, 3, init=init).double(), QueueRef(3, init)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        probs = (torch.randn(8, C, generator=g, dtype=torch.float64) * 2).softmax(1)
        got = da(probs)
        ref.push(probs.tolist())
        expected = [[v / d for v, d in zip(p, ref.mean())] for p in probs.tolist()]
        expected = [[v / sum(r) for v in r] for r in expected]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(da.queue, torch.tensor(ref.rows, dtype=torch.float64))
        assert da.ptr.item() == ref.ptr
    assert ref.ptr == 1  # 7 pushes into 3 slots


@pytest.mark.parametrize("normalize", ["batch", "row"])
def test_reciprocal_alignment_equals_the_reference_formula(normalize):
    g = torch.Generator().manual_seed(2)
    p = (torch.randn(6, C, generator=g, dtype=torch.float64) * 2).softmax(1)
    q = (torch.randn(6, C, generator=g, dtype=torch.float64) * 2).softmax(1)
    dp = torch.rand(4, C, generator=g, dtype=torch.float64).softmax(1)
    dq = torch.cat([torch.ones(2, C, dtype=torch.float64), torch.rand(2, C, generator=g, dtype=torch.float64)])
    got_p, got_q = reciprocal_alignment(p, q, dp, dq, normalize)
    exp_p, exp_q = reciprocal_ref(p.tolist(), q.tolist(), dp.tolist(), dq.tolist(), normalize)
    torch.testing.assert_close(got_p, torch.tensor(exp_p, dtype=torch.float64))
    torch.testing.assert_close(got_q, torch.tensor(exp_q, dtype=torch.float64))
    total = got_p.sum().item() if normalize == "batch" else got_p.sum(1).tolist()
    assert total == pytest.approx(1.0 if normalize == "batch" else [1.0] * 6)


def test_queue_state_round_trips_and_no_host_sync():
    a, b = DistAlignQueue(C, 4), DistAlignQueue(C, 4)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, C, generator=g) * 2).softmax(1) for _ in range(8)]
    for probs in data[:5]:
        a(probs)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    assert set(a.state_dict()) == {"queue", "ptr"}
    with NoHostSync():
        for probs in data[5:]:
            assert torch.equal(a(probs), b(probs))
            reciprocal_alignment(probs, probs.flip(1), a.queue, b.queue)
    assert torch.equal(a.queue, b.queue) and torch.equal(a.ptr, b.ptr)


def test_penultimate_tap_reads_the_input_of_the_classifier_of_any_network():
    net = create_model("resnet8", num_classes=10, in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    tap = PenultimateTap(net)
    with torch.no_grad(), FeatureTap(net, "pool") as pooled:
        h, logits = tap(x)
        assert torch.equal(h, pooled["pool"]) and torch.equal(logits, net(x))
    assert tap.num_features == 64 and tap.path == "fc" and tap.head is net.fc
    net(x)
    assert tap._features is None  # nothing recorded outside the tap's own forward

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = BNNet(4)

        def forward(self, x):
            return self.net(x)

    wrapped = Wrapped().eval()
    wtap = PenultimateTap(wrapped)
    h, logits = wtap(x)
    assert wtap.path == "net.fc" and h.shape == (3, 8) and torch.allclose(wrapped.net.fc(h), logits)

    copy_ = strip_taps(copy.deepcopy(net))  # an EMA copy: its forwards leave the original tap alone
    tap._armed = True
    copy_(x)
    assert tap._features is None
    with pytest.raises(StageError, match="fc"):
        PenultimateTap(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))


# -- the methods' state, host synchronisation, gradient paths, configuration ----------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_a_checkpoint_and_resumes_exactly(name):
    hp = {"p_cutoff": 0.8} if name != "rda" else {"queue_len": 3}
    if name == "shrinkmatch":
        hp.update(da_len=3, ratio_momentum=0.5)
    a, b = make(name, **hp), make(name, **hp)
    for step in range(3):
        a.training_step(batch_at(step), StepContext(step=step, max_steps=STEPS))
    state = a.state_dict()
    extra = {k for k in state if not k.startswith("student.")}
    assert extra or name == "unimatch"  # heads, queues and averages are checkpointed
    b.load_state_dict({k: v.clone() for k, v in state.items()})
    for step in range(3, 6):
        out_a = a.training_step(batch_at(step), StepContext(step=step, max_steps=STEPS))
        out_b = b.training_step(batch_at(step), StepContext(step=step, max_steps=STEPS))
        for k in out_a:
            assert torch.equal(out_a[k], out_b[k]), (name, k, step)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_a_step_reads_nothing_back_to_the_host(name):
    method = make(name, **({"ratio_reset_every": 2} if name == "shrinkmatch" else {}))
    for step in range(3):
        ctx = StepContext(step=torch.tensor(step), max_steps=STEPS, unlabeled_targets=torch.zeros(N, dtype=int))
        with NoHostSync():
            out = method.training_step(batch_at(step), ctx)
            out["loss"].backward()
        assert torch.isfinite(out["loss"])


def grads(term, module):
    got = torch.autograd.grad(term, list(module.parameters()), retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("name, term, head, encoder", [
    ("unimatch", "fp", "student.fc", True),
    ("shrinkmatch", "shrink", "aux_head", True),
    ("mutexmatch", "reverse", "tnc", False),  # L_n trains the TNC alone: its features are detached
    ("mutexmatch", "unsup_tnc", "tnc", True),
    ("rda", "comp", "comp", True),
    ("rda", "unsup_ca", "comp", True),
])
def test_each_term_trains_what_the_reference_trains(name, term, head, encoder):
    method = make(name, **({"p_cutoff": 0.8} if name != "rda" else {}))
    batch, ctx = batch_at(1), StepContext(step=1, max_steps=STEPS)
    z = method.forward_views(batch)
    probs = method.align(z["u_weak"].detach().float().softmax(1), z, ctx)
    mask = method.mask(probs, z, batch, ctx) if name != "shrinkmatch" else torch.zeros(N)  # all uncertain
    value = method.extra_terms(z, mask, batch, ctx)[term][1]
    assert grads(value, method.get_submodule(head))
    assert grads(value, method.student.layer1) == encoder


def test_paper_defaults_and_their_ranges():
    cfg = {n: METHODS.get(n).Config(name=n) for n in NAMES}
    u, s, m, r = (cfg[n] for n in NAMES)
    assert (u.p_cutoff, u.s1_weight, u.s2_weight, u.fp_weight, u.fp_dropout, u.loss_scale, u.hard_label) == (
        0.95, 0.25, 0.25, 0.5, 0.5, 1.0, True)
    assert (s.p_cutoff, s.da_len, s.ratio_momentum, s.ratio_reset_every, s.lambda_u) == (0.95, 32, 0.999, 0, 1.0)
    assert (m.p_cutoff, m.k, m.lambda_u, m.hard_label) == (0.95, 0.0, 1.0, True)
    assert (r.queue_len, r.normalize, r.lambda_u) == (128, "batch", 1.0)
    assert not hasattr(r, "p_cutoff") and not hasattr(s, "T")  # no field that would do nothing
    assert METHODS.get("unimatch").inputs.unlabeled == ("weak", "strong", "strong")
    for name, override in [("unimatch", "fp_dropout=1"), ("unimatch", "loss_scale=0"), ("shrinkmatch", "da_len=0"),
                           ("shrinkmatch", "ratio_momentum=1"), ("mutexmatch", "k=1.5"), ("mutexmatch", "k=-1"),
                           ("rda", "queue_len=0"), ("rda", "normalize=sum")]:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"method\.{key}"):
            load_config(None, [f"method.name={name}", f"method.{override}"])


def test_recipes_load_and_name_their_method():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes" / "semi"
    for name in NAMES:
        path = root / f"fmnist_{name}.yaml"
        assert path.read_text().startswith("#")
        assert load_config(path, []).method.name == name


# -- DDP: the queue and the alignment of two ranks equal one process with the global batch --------------------


def _ddp_queue_worker(rank, world, port, path):
    import torch.distributed as dist

    torchrun_env(rank, world, port)
    dist.init_process_group("gloo")
    qp, qq = DistAlignQueue(C, 3, init=1.0), DistAlignQueue(C, 3, init=1.0)
    outs = []
    for p, q in _ddp_data():
        rows = slice(4 * rank, 4 * rank + 4)
        qp.push(p[rows])
        qq.push(q[rows])
        outs.append(reciprocal_alignment(p[rows], q[rows], qp.queue, qq.queue))
    torch.save({"outs": outs, "queue": qp.queue}, f"{path}.{rank}")
    dist.destroy_process_group()


def _ddp_data():
    g = torch.Generator().manual_seed(9)
    return [((torch.randn(8, C, generator=g) * 2).softmax(1), (torch.randn(8, C, generator=g) * 2).softmax(1))
            for _ in range(4)]


@pytest.mark.slow  # two spawned processes: about 10-25 s on 2 cores
def test_ddp_ranks_align_as_one_process_with_the_global_batch(tmp_path):
    mp.spawn(_ddp_queue_worker, args=(2, free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in range(2)]
    qp, qq = DistAlignQueue(C, 3, init=1.0), DistAlignQueue(C, 3, init=1.0)
    for t, (p, q) in enumerate(_ddp_data()):
        qp.push(p)
        qq.push(q)
        whole = reciprocal_alignment(p, q, qp.queue, qq.queue)
        for i in range(2):
            got = torch.cat([ranks[r]["outs"][t][i] for r in range(2)])
            torch.testing.assert_close(got, whole[i], rtol=1e-5, atol=1e-7)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["queue"], qp.queue)


# -- real runs through the engine ---------------------------------------------------------------------------

# Thresholds the untrained test_bncnn's predictions reach in a few steps (ShrinkMatch's aligned ones stay
# close to uniform over the 10 classes), so that every term carries weight.
RUN_HP = {"unimatch": ["method.p_cutoff=0.3"],
          "shrinkmatch": ["method.p_cutoff=0.11", "method.da_len=4", "method.ratio_momentum=0.5"],
          "mutexmatch": ["method.p_cutoff=0.3", "method.k=0.6"], "rda": ["method.queue_len=4"]}


@pytest.mark.parametrize("name", NAMES)
def test_trains_saves_and_resumes_bitwise_on_digits(tmp_path, name):
    def cfg(run):
        return load_config(None, [f"out_dir={tmp_path / run}", f"method.name={name}", *RUN, *RUN_HP[name]])

    straight, start, ref, train, saved = resumes_bitwise(cfg, tmp_path)
    assert all("mask_rate" in e for e in train)
    state_keys = [k for k in ref if not k.startswith("student.")]
    assert (state_keys or name == "unimatch") and all(k in saved for k in state_keys)
    assert all(not torch.equal(ref[k], start[k]) for k in state_keys if k.endswith(("queue", "ptr", "weight")))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_learns_the_digits_from_four_labels_per_class(tmp_path, name):
    # 200 steps of resnet8 on 40 labels and the rest of the digits unlabelled, as the threshold family's test.
    summary = Trainer(load_config(None, [
        f"out_dir={tmp_path / name}", f"method.name={name}", "data.name=digits", "data.val_size=200",
        "data.padding=1", "data.flip=false", "model.name=resnet8", "data.labels_per_class=4", "data.batch_size=16",
        "data.unlabeled_ratio=2", "optim.lr=0.05", "trainer.max_steps=200", "trainer.eval_every=200",
        "trainer.ckpt_every=200", "trainer.log_every=50", "trainer.progress=false"])).fit()
    assert summary["test_acc_last"] > 0.6
