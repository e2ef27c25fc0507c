"""The entropy family of test-time adaptation: bn_ema, tent, ETA/EATA, SAR, DeYO.

Every loss, filter and statistic is checked against a computation written another way (a per-sample
loop with the reference codes' boolean indexing, an explicit optimizer), and every method runs end to end
through the adaptation runner on the digits shift."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import BNNet, FixedMLP

from mentor.adapt.deyo import deyo_selection, masked_batch_stats, occlude, patch_shuffle, pixel_shuffle
from mentor.adapt.eata import eata_filter, fisher_information
from mentor.adapt.sar import sam_perturbation
from mentor.config import ConfigError, load_config
from mentor.data import ArrayDataset, load_dataset
from mentor.data.domains import DOMAIN_SETS, DomainSet, register_domains
from mentor.engine import train
from mentor.engine.adapt import AdaptPlan, _optimizers, _step, adapt, build_adapt_config
from mentor.engine.evaluate import Evaluator
from mentor.methods import BuildInfo, Refresh, StepContext, create_method
from mentor.models import MODELS, create_model, register_model
from mentor.nn import bn_layers, norm_affine

pytest.importorskip("sklearn")

LEARNERS = ("tent", "eta", "eata", "sar", "deyo")
INFO = BuildInfo(num_classes=10, in_channels=1, image_size=8)


# ------------------------------------------------------------------------------------------ helpers
def _confident_net(seed=0, scale=4.0):
    """A BNNet whose predictions on :func:`_images` spread over the classes, from near-certain to unsure
    (entropies on both sides of E0): its read-out standardises the pooled features of a reference batch."""
    torch.manual_seed(seed)
    net = BNNet(10)
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
        net.eval()
        net.bn.train()
        net.bn.momentum = 0.0
        h = torch.relu(net.bn(net.conv(_images(seed=999, n=256)))).mean((2, 3))
        net.bn.momentum = 0.1
        net.train()
        mu, sigma = h.mean(0), h.std(0)
        w = torch.randn(10, 8) * scale / math.sqrt(8)
        net.fc.weight.copy_(w / sigma)
        net.fc.bias.copy_(-(w / sigma) @ mu)
    return net


def _images(seed=1, n=32):
    """Noise images of varied contrast and brightness: predictions from near-certain to unsure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x * (0.1 + 3 * torch.rand(n, 1, 1, 1, generator=g)) + torch.randn(n, 1, 1, 1, generator=g)


def _method(name, net, **hp):
    m = create_method(name, net, INFO, **hp)
    m.snapshot()
    m.prepare()
    return m


def _runner(name, method):
    """The adaptation runner's optimizers and one-batch step for ``method`` (its real code path)."""
    cfg = build_adapt_config([f"method.name={name}"])
    opts = _optimizers(method, cfg)

    def step(x, i=0, generator=None):
        ctx = StepContext(step=i, max_steps=0, generator=generator)
        return _step(method, opts, {"x": x}, ctx, contextlib.nullcontext, cfg)

    return step


def _entropy_loop(logits):
    """Per-sample softmax entropy with plain Python arithmetic."""
    out = []
    for row in logits.tolist():
        top = max(row)
        z = [math.exp(v - top) for v in row]
        s = sum(z)
        out.append(-sum((e / s) * math.log(e / s) for e in z if e > 0))
    return torch.tensor(out, dtype=torch.float64)


def _batch_stat_forward(net, x):
    """BNNet's forward with the BN layer normalising by the batch's own (biased) statistics, by hand."""
    h = net.conv(x)
    mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    h = (h - mu) / torch.sqrt(var + net.bn.eps) * net.bn.weight.view(1, -1, 1, 1) + net.bn.bias.view(1, -1, 1, 1)
    return net.fc(F.adaptive_avg_pool2d(torch.relu(h), 1).flatten(1))


def _bn_params(net):
    return [p.detach().clone() for p in norm_affine(net)]


# ------------------------------------------------------------------------------------ BN configuration
@pytest.mark.parametrize("name", LEARNERS)
def test_only_bn_affine_parameters_train_and_batches_use_their_own_statistics(name):
    net = create_model("resnet8", num_classes=10, in_channels=1)
    m = _method(name, net)
    trained = [p for p in net.parameters() if p.requires_grad]
    affine = norm_affine(net)
    assert len(trained) == len(affine) and all(a is b for a, b in zip(trained, affine))
    assert [p for ph in m.phases() for p in ph.params] == trained
    assert all(layer.training for layer in bn_layers(net))
    assert not any(mod.training for mod in net.modules() if not isinstance(mod, torch.nn.BatchNorm2d))
    optim = m.phases()[0].optim
    if name == "sar":
        assert optim == {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    else:
        assert optim == {"name": "adamw", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}
    assert create_method(name, create_model("resnet8", num_classes=10, in_channels=1), INFO,
                         lr=None).phases()[0].optim == {}  # lr: null trains with the run's optim section

    small = _confident_net()
    sm = _method(name, small)
    x = _images()
    with torch.no_grad():
        expected = _batch_stat_forward(small, x)
    out = _runner(name, sm)(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-5)  # before the update


@pytest.mark.parametrize("name", (*LEARNERS, "bn_ema"))
def test_a_bn_method_on_a_network_without_bn_stops_naming_the_method(name):
    with pytest.raises(ConfigError, match=rf"method {name} adapts BatchNorm .* FixedMLP has none"):
        create_method(name, FixedMLP(10), INFO)


def test_skipped_layers_keep_their_affine_parameters_but_normalise_with_batch_statistics():
    net = create_model("resnet8", num_classes=10, in_channels=1)
    m = _method("sar", net, skip=("layer3",))
    trained = {id(p) for p in net.parameters() if p.requires_grad}
    for name, layer in net.named_modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            inside = name.startswith("layer3.")
            assert (id(layer.weight) in trained) is not inside and (id(layer.bias) in trained) is not inside, name
            assert layer.training
    assert {id(p) for p in m.phases()[0].params} == trained
    with pytest.raises(ConfigError, match="method deyo trains the affine parameters .* none to train"):
        create_method("deyo", BNNet(10), INFO, skip=("bn",))


# ---------------------------------------------------------------------------------------------- bn_ema
def test_bn_ema_moves_the_running_statistics_then_predicts_with_them():
    net = _confident_net()
    net.bn.momentum = 0.3  # the layer's own momentum is not the one the method updates with
    m = _method("bn_ema", net, momentum=0.25)
    rm, rv = net.bn.running_mean.clone(), net.bn.running_var.clone()
    for i in range(2):
        x = _images(seed=i)
        out = _runner("bn_ema", m)(x, i)
        with torch.no_grad():
            h = net.conv(x).double()
            n = h.numel() // h.shape[1]
            mean = h.mean((0, 2, 3))
            unbiased = ((h - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) / (n - 1)
            rm = 0.75 * rm.double() + 0.25 * mean
            rv = 0.75 * rv.double() + 0.25 * unbiased
            y = (h - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + net.bn.eps)
            y = y * net.bn.weight.double().view(1, -1, 1, 1) + net.bn.bias.double().view(1, -1, 1, 1)
            pooled = F.adaptive_avg_pool2d(torch.relu(y), 1).flatten(1)
            logits = F.linear(pooled, net.fc.weight.double(), net.fc.bias.double()).float()
        torch.testing.assert_close(net.bn.running_mean, rm.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net.bn.running_var, rv.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["logits"], logits, rtol=1e-4, atol=1e-4)
        assert out["backward_samples"] == 0 and not net.training and net.bn.momentum == 0.3


# ------------------------------------------------------------------------------------------------ tent
def test_tent_minimises_the_mean_entropy_with_one_adam_step_after_predicting():
    net = _confident_net()
    ref = copy.deepcopy(net)
    source = _bn_params(net)
    m = _method("tent", net)
    step = _runner("tent", m)
    ref.eval()
    ref.bn.train()
    ref.requires_grad_(False)
    params = [ref.bn.weight, ref.bn.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    for i in range(3):
        x = _images(seed=10 + i)
        out = step(x, i)
        logits = ref(x)
        expected = _entropy_loop(logits.detach()).mean()
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(out["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
        opt.zero_grad()
        (-(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()).backward()
        opt.step()
        for a, b in zip(_bn_params(net), params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert (net.bn.weight - source[0]).abs().max() > 1e-3  # three steps of about lr each
    assert all(not p.requires_grad for n, p in net.named_parameters() if not n.startswith("bn."))


# ------------------------------------------------------------------------------------------- ETA / EATA
def _eata_loop(logits, probs, started, e0, d):
    """The reference's two filters with boolean indexing, one sample at a time."""
    h = _entropy_loop(logits).tolist()
    p = logits.double().softmax(1)
    reliable = [i for i in range(len(h)) if h[i] < e0]
    kept = []
    for i in reliable:
        if not started:
            kept.append(i)
            continue
        cos = (probs.double() @ p[i]) / (probs.double().norm() * p[i].norm())
        if abs(cos) < d:
            kept.append(i)
    if kept:
        mean = p[kept].mean(0)
        new = 0.9 * probs.double() + 0.1 * mean if started else mean
    else:
        new = probs.double()
    terms = [h[i] / math.exp(h[i] - e0) for i in kept]
    loss = sum(terms) / len(terms) if terms else 0.0
    return reliable, kept, new, loss


@pytest.mark.parametrize("started", [False, True])
def test_eata_filters_and_weights_match_a_per_sample_loop(started):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 10, generator=g) * torch.linspace(0.5, 6, 64).unsqueeze(1)
    probs = torch.softmax(2 * torch.randn(10, generator=g), 0)
    e0 = 0.4 * math.log(10)
    p = logits.softmax(1)
    cos = (p @ probs) / (p.norm(dim=1) * probs.norm())
    reliable = _entropy_loop(logits) < e0
    d = cos[reliable].abs().median().item()  # about half of the reliable ones are redundant
    sel = eata_filter(logits, probs, torch.tensor(started), e0, d)
    idx_r, idx_k, new, loss = _eata_loop(logits, probs, started, e0, d)
    assert sel.reliable.nonzero().flatten().tolist() == idx_r
    assert sel.kept.nonzero().flatten().tolist() == idx_k
    assert 0 < len(idx_k) < len(idx_r) if started else len(idx_k) == len(idx_r) > 0
    torch.testing.assert_close(sel.probs.double(), new, rtol=1e-5, atol=1e-6)
    assert sel.loss().item() == pytest.approx(loss, rel=1e-5)
    h = _entropy_loop(logits).tolist()
    for i in range(64):
        expected = 1 / math.exp(h[i] - e0) if i in idx_k else 0.0
        assert sel.weights[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert bool(sel.started)
    # a batch that keeps nothing leaves the average and its state as they were
    none = eata_filter(logits, probs, torch.tensor(started), 1e-6, d)
    assert none.count == 0 and torch.equal(none.probs, probs) and bool(none.started) == started
    assert none.loss().item() == 0.0


def test_eta_steps_on_the_kept_samples_and_counts_them():
    net = _confident_net()
    m = _method("eta", net, d_margin=0.5)
    step = _runner("eta", m)
    probs, started = torch.zeros(10, dtype=torch.float64), False
    for i in range(3):
        x = _images(seed=20 + i)
        with torch.no_grad():
            logits = _batch_stat_forward(net, x)
        _, kept, probs, loss = _eata_loop(logits, probs, started, m.e0, 0.5)
        started = started or bool(kept)
        out = step(x, i)
        assert out["backward_samples"].item() == len(kept) > 0
        assert out["loss"].item() == pytest.approx(loss, rel=1e-4)
        torch.testing.assert_close(m.probs.double(), probs, rtol=1e-5, atol=1e-6)


def test_a_batch_that_keeps_no_sample_leaves_the_parameters_as_they_were():
    for name in ("eta", "eata", "deyo"):
        net = _confident_net()
        m = _method(name, net, **({"plpd_threshold": -1.0} if name == "deyo" else {}))
        step = _runner(name, m)
        source = _bn_params(net)
        assert step(_images(seed=30), 0, torch.Generator().manual_seed(0))["backward_samples"] > 0
        moved = _bn_params(net)
        assert not all(torch.equal(a, b) for a, b in zip(source, moved)), name
        # Now nothing passes the filters: Adam's moments alone would still move the parameters.
        if name == "deyo":
            m.cfg.plpd_threshold = 2.0
        else:
            m.e0 = 1e-6
        for i in (1, 2):
            assert step(_images(seed=30 + i), i, torch.Generator().manual_seed(i))["backward_samples"] == 0
        assert all(torch.equal(a, b) for a, b in zip(moved, _bn_params(net))), name


def _per_sample_fisher(net, images):
    """mean_i (d CE(f(x_i), argmax f(x_i)) / d theta)^2 over the BN affine parameters, one image at a
    time, each image normalised by its own statistics (a batch of one in batch-statistics mode)."""
    ref = copy.deepcopy(net)
    ref.eval()
    ref.bn.train()
    ref.bn.momentum = 0.0
    total = [torch.zeros_like(ref.bn.weight), torch.zeros_like(ref.bn.bias)]
    for x in images:
        ref.zero_grad()
        logits = ref(x.unsqueeze(0))
        F.cross_entropy(logits, logits.argmax(1)).backward()
        total[0] += ref.bn.weight.grad ** 2
        total[1] += ref.bn.bias.grad ** 2
    return [t / len(images) for t in total]


def test_fisher_information_is_the_mean_squared_gradient_of_each_batch():
    net = _confident_net().eval()
    params = norm_affine(net)
    x = _images(seed=5, n=12)
    running = net.bn.running_mean.clone(), net.bn.running_var.clone()
    fisher = fisher_information(net, params, [xi.unsqueeze(0) for xi in x])
    for a, b in zip(fisher, _per_sample_fisher(net, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # batches of 4: the squared gradient of each batch-mean loss, averaged over the 3 batches
    ref = copy.deepcopy(net)
    ref.eval()
    ref.bn.train()
    expected = [torch.zeros_like(p) for p in params]
    for chunk in x.split(4):
        ref.zero_grad()
        logits = ref(chunk)
        F.cross_entropy(logits, logits.argmax(1)).backward()
        expected[0] += ref.bn.weight.grad ** 2 / 3
        expected[1] += ref.bn.bias.grad ** 2 / 3
    for a, b in zip(fisher_information(net, params, x.split(4)), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert torch.equal(net.bn.running_mean, running[0]) and torch.equal(net.bn.running_var, running[1])
    assert not net.training and not net.bn.training  # the modules' modes are restored


def test_eata_computes_its_fisher_on_source_and_penalises_the_distance_to_the_source():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    split = ArrayDataset(images, torch.zeros(40, dtype=torch.long), 10, "toy", mean=(0.5,), std=(0.25,))
    ev = Evaluator(torch.tensor(0.5).view(1, 1, 1, 1), torch.tensor(0.25).view(1, 1, 1, 1), 1000, torch.device("cpu"))
    net = _confident_net()
    m = create_method("eata", net, INFO, fisher_samples=16, fisher_batch_size=1, fisher_alpha=3.0)
    m.on_source(Refresh(labeled=split, unlabeled=None, evaluator=ev, device=torch.device("cpu")))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:16]
    x = (images[order].float() / 255 - 0.5) / 0.25
    for a, b in zip(m.fisher(), _per_sample_fisher(net, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert all(f.abs().sum() > 0 for f in m.fisher())
    source = _bn_params(net)
    with torch.no_grad():
        net.bn.weight.add_(0.1 * torch.randn(8, generator=g))
        net.bn.bias.add_(0.1 * torch.randn(8, generator=g))
    fisher = [f.clone() for f in m.fisher()]
    expected = 0.0
    for f, p, s in zip(fisher, norm_affine(net), source):
        for j in range(p.numel()):
            expected += 3.0 * f[j].item() * (p[j].item() - s[j].item()) ** 2
    assert m.regulariser().item() == pytest.approx(expected, rel=1e-5)
    # the loss of a step is ETA's plus the penalty
    m.snapshot()
    m.prepare()
    xb = _images(seed=7)
    out = m.adapt_step({"x": xb}, StepContext(step=0, max_steps=0))
    with torch.no_grad():
        logits = _batch_stat_forward(net, xb)
    _, kept, _, loss = _eata_loop(logits, torch.zeros(10), False, m.e0, m.cfg.d_margin)
    assert kept
    assert out["loss"].item() == pytest.approx(loss + expected, rel=1e-4)
    assert out["ewc"].item() == pytest.approx(expected, rel=1e-5)


def test_eata_without_the_source_split_is_a_clear_error():
    m = create_method("eata", BNNet(10), INFO)
    with pytest.raises(ConfigError, match="method eata computes its Fisher .* method.name=eta"):
        m.on_source(Refresh(labeled=None, unlabeled=None, evaluator=None, device=torch.device("cpu")))
    create_method("eata", BNNet(10), INFO, fisher_alpha=0.0).on_source(
        Refresh(labeled=None, unlabeled=None, evaluator=None, device=torch.device("cpu")))  # ETA: nothing to do


# -------------------------------------------------------------------------------------------------- SAR
def _sam_reference(net, lr, rho, e0, momentum=0.9):
    """An explicit SAM step over the BN affine parameters, as the reference codes write it: boolean
    indexing, backward, ``first_step`` (climb), second forward and filter, backward, ``second_step``
    (restore, then SGD)."""
    ref = copy.deepcopy(net)
    ref.eval()
    ref.bn.train()
    ref.requires_grad_(False)
    params = [ref.bn.weight, ref.bn.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)

    def ent(z):
        return -(z.softmax(1) * z.log_softmax(1)).sum(1)

    def step(x):
        opt.zero_grad()
        logits = ref(x)
        h = ent(logits)
        ids = torch.where(h < e0)
        h[ids].mean(0).backward()
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
        old = [p.data.clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad * (rho / (norm + 1e-12)))
        opt.zero_grad()
        h2 = ent(ref(x))[ids]
        ids2 = torch.where(h2 < e0)
        loss = h2[ids2].mean(0)
        loss.backward()
        for p, o in zip(params, old):
            p.data = o
        opt.step()
        return logits.detach(), loss.detach(), len(ids[0]) + len(ids2[0])

    return ref, step


def test_sar_equals_an_explicit_sharpness_aware_step():
    net = _confident_net()
    e0 = 0.4 * math.log(10)
    ref, ref_step = _sam_reference(net, lr=0.05, rho=0.5, e0=e0)
    m = _method("sar", net, lr=0.05, rho=0.5, reset_constant=0.0)
    step = _runner("sar", m)
    plain = _method("sar", copy.deepcopy(net), lr=0.05, rho=0.0, reset_constant=0.0)
    plain_step = _runner("sar", plain)
    for i in range(3):
        x = _images(seed=40 + i)
        out = step(x, i)
        plain_step(x, i)
        logits, loss, count = ref_step(x)
        torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
        assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        assert out["backward_samples"].item() == count
        assert 0 < out["kept"].item() * 32 < 32
        torch.testing.assert_close(net.bn.weight, ref.bn.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net.bn.bias, ref.bn.bias.detach(), rtol=1e-5, atol=1e-6)
    # without the ascent (rho 0) the update is another one: the perturbation matters
    assert (plain.student.bn.weight - net.bn.weight).abs().max() > 1e-4


def test_sam_perturbation_is_rho_along_the_normalised_gradient():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    p = [torch.tensor([1.0, 2.0]), torch.tensor([-2.0])]
    e = sam_perturbation(g, p, rho=0.5)
    torch.testing.assert_close(e[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([0.4]))
    # ASAM: e = rho p^2 g / || |p| g ||; || (3, 0, 8) || = sqrt(73)
    a = sam_perturbation(g, p, rho=0.5, adaptive=True)
    torch.testing.assert_close(a[0], torch.tensor([1.5, 0.0]) / math.sqrt(73))
    torch.testing.assert_close(a[1], torch.tensor([8.0]) / math.sqrt(73))


def test_sar_recovers_the_source_when_the_loss_average_falls_below_the_constant():
    xs = [_images(seed=50 + i) for i in range(3)]
    net = _confident_net()
    m = _method("sar", net, lr=0.05, reset_constant=0.0)
    step = _runner("sar", m)
    losses, emas = [], []
    for i, x in enumerate(xs):
        out = step(x, i)
        losses.append(out["loss"].item())
        emas.append(out["loss_ema"].item())
        assert out["recovered"].item() == 0
    assert emas[0] == pytest.approx(losses[0])  # the average starts at the first value
    assert emas[1] == pytest.approx(0.9 * losses[0] + 0.1 * losses[1], rel=1e-6)
    assert emas[2] == pytest.approx(0.9 * emas[1] + 0.1 * losses[2], rel=1e-6)
    assert emas[1] < emas[0] - 2e-4  # entropy minimisation lowers the average
    source = _bn_params(_confident_net())
    for constant, recovers in ((emas[1] + 1e-4, True), (emas[1] - 1e-4, False)):
        net = _confident_net()
        m = _method("sar", net, lr=0.05, reset_constant=constant)
        step = _runner("sar", m)
        assert step(xs[0], 0)["recovered"].item() == 0
        out = step(xs[1], 1)
        assert out["recovered"].item() == float(recovers)
        back = all(torch.equal(a, b) for a, b in zip(_bn_params(net), source))
        assert back is recovers and bool(m.ema_started) is not recovers


# ------------------------------------------------------------------------------------------------- DeYO
def test_patch_shuffle_permutes_each_images_patches():
    x = torch.arange(3 * 2 * 8 * 8, dtype=torch.float32).view(3, 2, 8, 8)
    y = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    moved = False
    for b in range(3):
        corners = [(i, j) for i in range(0, 8, 2) for j in range(0, 8, 2)]
        src = {tuple(x[b, :, i:i + 2, j:j + 2].flatten().tolist()): (i, j) for i, j in corners}
        seen = set()
        for i in range(0, 8, 2):
            for j in range(0, 8, 2):
                key = tuple(y[b, :, i:i + 2, j:j + 2].flatten().tolist())
                assert key in src  # every patch of the output is one of this image's patches
                seen.add(key)
                moved |= src[key] != (i, j)
        assert len(seen) == 16
    assert moved
    assert torch.equal(y, patch_shuffle(x, 4, torch.Generator().manual_seed(0)))
    assert patch_shuffle(torch.rand(2, 1, 10, 10), 4).shape == (2, 1, 10, 10)  # resized to 8 and back
    z = pixel_shuffle(x, torch.Generator().manual_seed(1))
    order = z[0, 0].flatten().long()  # the source position of every output pixel
    assert sorted(order.tolist()) == list(range(64))
    assert torch.equal(z, x.flatten(2)[:, :, order].view_as(x))  # one permutation for every image, channel
    o = occlude(x, 3, 2, 6)
    assert torch.equal(o[:, :, 2:5, 6:8], x.mean((2, 3), keepdim=True).expand(3, 2, 3, 2))
    assert torch.equal(o[:, :, :2], x[:, :, :2]) and torch.equal(o[:, :, :, :6], x[:, :, :, :6])


def test_masked_batch_statistics_equal_a_forward_of_the_selected_samples():
    net = _confident_net()
    net.eval()
    net.bn.train()
    x = _images(seed=8)
    mask = torch.rand(32, generator=torch.Generator().manual_seed(2)) < 0.4
    running = net.bn.running_mean.clone(), net.bn.running_var.clone()
    with torch.no_grad(), masked_batch_stats(net, mask):
        out = net(x)
        full = masked_batch_stats(net, torch.ones(32, dtype=torch.bool))
        with full:
            everything = net(x)
    assert torch.equal(net.bn.running_mean, running[0]) and torch.equal(net.bn.running_var, running[1])
    assert net.bn.momentum == 0.1 and not net.bn._forward_hooks  # the layer is as it was
    with torch.no_grad():
        sub = net(x[mask])
    assert 0 < mask.sum() < 32
    torch.testing.assert_close(out[mask], sub, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(everything, _batch_stat_forward(net, x), rtol=1e-5, atol=1e-5)


def _deyo_loop(net, x, shuffled_all, margin, threshold, e0):
    """The reference's DeYO loss: boolean indexing, the shuffled sub-batch forwarded on its own."""
    with torch.no_grad():
        logits = _batch_stat_forward(net, x)
    h = _entropy_loop(logits)
    ids = [i for i in range(len(h)) if h[i] < margin]
    with torch.no_grad():
        prime = _batch_stat_forward(net, shuffled_all[ids])
    h = h.tolist()
    p, q = logits.double().softmax(1), prime.double().softmax(1)
    plpd = {}
    for k, i in enumerate(ids):
        c = int(p[i].argmax())
        plpd[i] = (p[i, c] - q[k, c]).item()
    kept = [i for i in ids if plpd[i] > threshold]
    terms = [h[i] * (math.exp(e0 - h[i]) + math.exp(plpd[i])) for i in kept]
    return ids, plpd, kept, (sum(terms) / len(terms) if terms else 0.0)


def test_deyo_selection_and_loss_match_the_reference_form():
    net = _confident_net()
    x = _images(seed=9)
    margin, e0 = 0.5 * math.log(10), 0.4 * math.log(10)
    shuffled = patch_shuffle(x, 4, torch.Generator().manual_seed(11))
    ids, plpd, _, _ = _deyo_loop(net, x, shuffled, margin, 0.0, e0)
    values = sorted(plpd.values())
    threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2  # about half of them pass
    ids, plpd, kept, loss = _deyo_loop(net, x, shuffled, margin, threshold, e0)
    assert 0 < len(kept) < len(ids) < 32
    # the selection alone, from the logits of both forwards
    reliable = torch.zeros(32, dtype=torch.bool)
    reliable[ids] = True
    with torch.no_grad():
        logits = _batch_stat_forward(net, x)
        net.eval()
        net.bn.train()
        with masked_batch_stats(net, reliable):
            prime = net(shuffled)
    sel = deyo_selection(logits, prime, reliable, threshold, e0)
    assert sel.kept.nonzero().flatten().tolist() == kept
    for i in ids:
        assert sel.plpd[i].item() == pytest.approx(plpd[i], abs=1e-5)
    assert sel.loss().item() == pytest.approx(loss, rel=1e-4)
    only_ent = deyo_selection(logits, prime, reliable, threshold, e0, reweight_plpd=False)
    h = _entropy_loop(logits).tolist()
    assert only_ent.loss().item() == pytest.approx(sum(h[i] * math.exp(e0 - h[i]) for i in kept) / len(kept),
                                                   rel=1e-4)
    # the method's step draws the same shuffle from the same generator
    m = _method("deyo", net, plpd_threshold=threshold)
    out = _runner("deyo", m)(x, 0, torch.Generator().manual_seed(11))
    assert out["backward_samples"].item() == len(kept)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-4)
    assert out["reliable"].item() * 32 == len(ids)


# --------------------------------------------------------------------------------------- end to end
class DigitNet(torch.nn.Module):
    """Two conv-BN-ReLU layers and a linear read-out of the whole map: about 90% on clean 8x8 digits after
    60 steps, so the shifts have something to lose."""

    def __init__(self, num_classes, in_channels=1):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(in_channels, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.conv2, self.bn2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32)
        self.fc = torch.nn.Linear(32 * 16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.flatten(1))


if "test_entropy_digitnet" not in MODELS:
    register_model("test_entropy_digitnet")(lambda num_classes, in_channels=1, **kw: DigitNet(num_classes, in_channels))


def _shift(only=None):
    ds = load_dataset("digits", "test")

    def part(images):
        return ArrayDataset(images.contiguous(), ds.labels, 10, "digits", ds.classes, ds.mean, ds.std)

    domains = {"clean": part(ds.images), "dark": part(ds.images // 2), "inverted": part(255 - ds.images)}
    name = "test_entropy_digits" if only is None else f"test_entropy_{only}"
    return DomainSet(name, domains if only is None else {only: domains[only]})


if "test_entropy_digits" not in DOMAIN_SETS:
    register_domains("test_entropy_digits")(lambda root=None, **kw: _shift())
if "test_entropy_inverted" not in DOMAIN_SETS:
    register_domains("test_entropy_inverted")(lambda root=None, **kw: _shift(only="inverted"))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "run"
    train(load_config(None, [f"out_dir={out}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
                             "data.padding=1", "data.flip=false", "model.name=test_entropy_digitnet",
                             "trainer.max_steps=60", "trainer.eval_every=60", "trainer.ckpt_every=60",
                             "trainer.progress=false", "optim.lr=0.05"]))
    return out


def _run(tmp_path, source_run, method, setting="reset", shift="test_entropy_digits", *extra):
    # A rate ten times the papers' so that the eight batches of a stream move the accuracy.
    lr = [] if method in ("source", "norm", "bn_ema") else ["method.lr=0.01"]
    tag = "-".join(e.replace("method.", "").replace("=", "") for e in extra)
    cfg = build_adapt_config([f"method.name={method}", f"out_dir={tmp_path / method / setting / shift / tag}",
                              "data.batch_size=50", *lr, *extra])
    return adapt(AdaptPlan(run=str(source_run), shift=shift, setting=setting), cfg)


def _accs(summary):
    return [summary[f"acc@{n}"] for n in ("clean", "dark", "inverted")]


@pytest.mark.parametrize("name", ("bn_ema", *LEARNERS))
def test_end_to_end_reset_restores_the_source_and_continual_carries_the_state(tmp_path, source_run, name):
    reset = _run(tmp_path, source_run, name, "reset")
    continual = _run(tmp_path, source_run, name, "continual")
    alone = _run(tmp_path, source_run, name, "reset", "test_entropy_inverted")
    assert reset["acc@clean"] == continual["acc@clean"]  # both start from the source
    assert alone["acc@inverted"] == reset["acc@inverted"]  # reset: as if the stream came first
    assert _accs(continual)[1:] != _accs(reset)[1:]  # continual: the adapted state carries over
    norm = _run(tmp_path, source_run, "norm", "reset")
    assert _accs(reset) != _accs(norm)
    if name == "tent":
        assert reset["backward_per_sample"] == 1.0
    elif name == "sar":
        assert 1.0 < reset["backward_per_sample"] < 2.0  # two filtered backward passes
    elif name != "bn_ema":
        assert 0 < reset["backward_per_sample"] < 1.0  # the filters drop samples


def test_end_to_end_eata_reads_the_source_split_for_its_fisher_penalty(tmp_path, source_run):
    eta = _run(tmp_path, source_run, "eta", "continual")
    eata = _run(tmp_path, source_run, "eata", "continual")
    assert _accs(eata) != _accs(eta)
    off = _run(tmp_path, source_run, "eata", "continual", "test_entropy_digits", "method.fisher_alpha=0")
    assert _accs(off) == _accs(eta)  # fisher_alpha 0 is ETA
