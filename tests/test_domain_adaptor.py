"""DomainAdaptor (Zhang, Qi, Shi & Gao, ICCV 2023): AdaMixBN's mixture coefficient and statistic
transformation, the GEM losses, the converted layers, the inner SGD step, episodic vs online, and a run
through the adaptation runner. Every expected value is computed here another way (loops over samples and
channels, hand-worked numbers, the network's layers called one by one)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _adapt_shift import digit_shift, train_bn_source
from _helpers import BNNet, FixedMLP
from _nosync import NoHostSync
from torch import nn

from mentor.adapt.domain_adaptor import (
    AdaMixBN,
    DomainAdaptor,
    crop_flip_views,
    gem_aug,
    gem_skd,
    gem_t,
    gem_temperature,
    mixture_coefficient,
)
from mentor.config import ConfigError
from mentor.data import load_dataset
from mentor.engine.adapt import AdaptPlan, adapt, build_adapt_config
from mentor.methods import BuildInfo, StepContext, create_method
from mentor.models import create_model

# -- independent references ----------------------------------------------------------------------------


def _lambda_loop(x, src_mean, src_var):
    """The per-sample coefficients, one sample and one channel at a time, with explicit sums."""
    n, c, h, w = x.shape
    hw = h * w
    mu_t = [x[:, k].sum().item() / (n * hw) for k in range(c)]
    var_t = [((x[:, k] - mu_t[k]) ** 2).sum().item() / (n * hw - 1) for k in range(c)]  # unbiased, as the code
    sd_t = [math.sqrt(v) for v in var_t]
    sd_s = [math.sqrt(v) for v in src_var.tolist()]
    mu_s = src_mean.tolist()
    d_st = sum((mu_t[k] - mu_s[k]) ** 2 for k in range(c)) / c + sum((sd_t[k] - sd_s[k]) ** 2 for k in range(c)) / c
    out = []
    for i in range(n):
        d_it = d_is = 0.0
        for k in range(c):
            vals = x[i, k].flatten().tolist()
            mu_i = sum(vals) / hw
            sd_i = math.sqrt(sum((v - mu_i) ** 2 for v in vals) / (hw - 1))
            d_it += ((mu_i - mu_t[k]) ** 2 + (sd_i - sd_t[k]) ** 2) / c
            d_is += ((mu_i - mu_s[k]) ** 2 + (sd_i - sd_s[k]) ** 2) / c
        out.append(min(1.0, max(0.0, 1.0 - d_st / (d_st + d_is + d_it))))
    return torch.tensor(out, dtype=torch.float64)


def _lambda_rows(h, src_mean, src_var):
    """The batch coefficient, a loop over samples (vectorised over channels), for whole-batch references."""
    n, c = h.shape[:2]
    flat = h.transpose(0, 1).reshape(c, -1)
    mu_t = flat.mean(1)
    sd_t = ((flat - mu_t[:, None]) ** 2).sum(1).div(flat.shape[1] - 1).sqrt()
    sd_s, mu_s = src_var.sqrt(), src_mean
    d_st = (mu_t - mu_s).pow(2).mean() + (sd_t - sd_s).pow(2).mean()
    lams = []
    for i in range(n):
        rows = h[i].reshape(c, -1)
        mu_i = rows.mean(1)
        sd_i = ((rows - mu_i[:, None]) ** 2).sum(1).div(rows.shape[1] - 1).sqrt()
        d_it = (mu_i - mu_t).pow(2).mean() + (sd_i - sd_t).pow(2).mean()
        d_is = (mu_i - mu_s).pow(2).mean() + (sd_i - sd_s).pow(2).mean()
        lams.append((1 - d_st / (d_st + d_is + d_it)).clamp(0, 1))
    return torch.stack(lams).mean()


def _gem_loop(logits, kind, teacher=None):
    """GEM one sample at a time: centre, T = 2 std (unbiased, detached), softmax(z / T), T^2 scaling."""
    total = 0.0
    for i in range(len(logits)):
        z = logits[i]
        c = z - z.detach().mean()
        k = len(z)
        t = 2 * math.sqrt(sum(v * v for v in c.detach().tolist()) / (k - 1))
        e = torch.exp(c / t)
        p = e / e.sum()
        if kind == "gem_t":
            q = p
        elif kind == "gem_skd":
            q = torch.exp(c.detach()) / torch.exp(c.detach()).sum()
        else:
            q = torch.exp(teacher[i]) / torch.exp(teacher[i]).sum()
        total = total - t * t * (q * torch.log(p)).sum()
    return total / len(logits)


def _bn_batch(h, gamma, beta, eps):
    mu = h.mean((0, 2, 3), keepdim=True)
    var = h.var((0, 2, 3), keepdim=True)  # unbiased, as AdaMixBN normalises
    return (h - mu) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def _manual_step(net, x, lr, kind="gem_t", views=None):
    """DomainAdaptor on BNNet written out: rectify (gamma', beta') from the first forward's batch (the views
    for GEM-Aug), one SGD step of the GEM loss on them, predict x with batch statistics."""
    bn = net.bn
    with torch.no_grad():
        h = net.conv(x)
        first = net.conv(views) if views is not None else h
    mu_s, var_s, eps = bn.running_mean, bn.running_var, bn.eps
    lam = _lambda_rows(first, mu_s, var_s)
    mu_r, var_r = first.mean((0, 2, 3)), first.var((0, 2, 3))
    gamma1 = bn.weight.detach() * torch.sqrt(var_r + eps) / torch.sqrt(lam * var_s + (1 - lam) * var_r + eps)
    beta1 = bn.bias.detach() + lam * (mu_r - mu_s) / torch.sqrt(var_r + eps) * gamma1
    g, b = gamma1.clone().requires_grad_(), beta1.clone().requires_grad_()

    def head(feat, g, b):
        return net.fc(F.adaptive_avg_pool2d(torch.relu(_bn_batch(feat, g, b, eps)), 1).flatten(1))

    teacher = None
    if views is not None:
        with torch.no_grad():
            teacher = head(first, g, b).view(len(x), -1, net.fc.out_features).mean(1)
    loss = _gem_loop(head(h, g, b), kind, teacher)
    dg, db = torch.autograd.grad(loss, [g, b])
    with torch.no_grad():
        return head(h, g - lr * dg, b - lr * db), loss.detach(), (g - lr * dg, b - lr * db), lam


def _bnnet(seed=0):
    torch.manual_seed(seed)
    net = BNNet(10, 1)
    with torch.no_grad():  # a source state unlike the test batches
        net.bn.running_mean.copy_(torch.randn(8) * 0.3)
        net.bn.running_var.copy_(torch.rand(8) + 0.5)
        net.bn.weight.copy_(torch.rand(8) + 0.5)
        net.bn.bias.copy_(torch.randn(8) * 0.2)
    return net


def _method(net, **hp):
    m = create_method("domain_adaptor", net, BuildInfo(num_classes=10), **hp)
    m.snapshot()
    m.prepare()
    return m


# -- AdaMixBN ------------------------------------------------------------------------------------------


def test_the_mixture_coefficient_matches_a_loop_over_samples_and_channels():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 6) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.randn(5, 1, 1, 1)
    src_mean, src_var = torch.tensor([0.3, -0.2, 1.0]), torch.tensor([0.8, 3.0, 0.4])
    mu_t, var_t = x.mean((0, 2, 3)), x.var((0, 2, 3))
    got = mixture_coefficient(x, src_mean, src_var, mu_t, var_t)
    expected = _lambda_loop(x.double(), src_mean.double(), src_var.double())
    assert got.shape == (5,)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    assert 0.05 < expected.min() and expected.max() < 0.95  # the case is not a clip boundary

    # the layer uses the batch mean of those coefficients
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(src_mean)
        bn.running_var.copy_(src_var)
    layer = AdaMixBN.from_bn(bn).train()
    layer(x)
    torch.testing.assert_close(layer.lam.double(), expected.mean(), atol=1e-6, rtol=1e-5)


def test_source_statistics_equal_to_the_batchs_give_lambda_one_and_distant_ones_lambda_near_zero():
    torch.manual_seed(1)
    x = torch.randn(4, 2, 5, 5)
    mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    assert torch.allclose(mixture_coefficient(x, mu, var, mu, var), torch.ones(4))  # d_st = 0
    far = mixture_coefficient(x, mu + 100.0, var, mu, var)  # d_st ~ d_is >> d_it: 1 - d_st/(2 d_st) ~ 1/2
    torch.testing.assert_close(far, torch.full((4,), 0.5), atol=1e-2, rtol=0)


@pytest.mark.parametrize("mix_lambda", [None, 0.3])
def test_the_statistic_transformation_is_exactly_the_mixed_normalisation(mix_lambda):
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) * 2 + 0.2)
        bn.weight.copy_(torch.rand(4) + 0.5)
        bn.bias.copy_(torch.randn(4))
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    x = torch.randn(6, 4, 5, 5) * 1.7 + 0.4
    layer = AdaMixBN.from_bn(bn, mix_lambda=mix_lambda).train()
    plain = AdaMixBN.from_bn(bn, transform=False, mix_lambda=mix_lambda).train()

    lam = torch.tensor(mix_lambda) if mix_lambda is not None else _lambda_rows(x, bn.running_mean, bn.running_var)
    mu_t, var_t = x.mean((0, 2, 3)), x.var((0, 2, 3))
    mu_m = lam * bn.running_mean + (1 - lam) * mu_t
    var_m = lam * bn.running_var + (1 - lam) * var_t
    mixed = (x - mu_m.view(1, -1, 1, 1)) / torch.sqrt(var_m + 1e-3).view(1, -1, 1, 1) * gamma.view(1, -1, 1, 1) \
        + beta.view(1, -1, 1, 1)

    layer.rectify_next()
    with torch.no_grad():
        out = layer(x)
        ref_plain = plain(x)
    torch.testing.assert_close(out, mixed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_plain, mixed, atol=1e-5, rtol=1e-5)
    # the layer now holds gamma', beta' and normalises with the batch's own statistics
    assert not torch.allclose(layer.weight, gamma)
    torch.testing.assert_close(layer(x).detach(), _bn_batch(x, layer.weight, layer.bias, 1e-3), atol=1e-5, rtol=1e-5)
    # written once per batch: a second forward keeps them (no second rectification)
    w = layer.weight.detach().clone()
    layer(x * 2 + 1)
    assert torch.equal(layer.weight.detach(), w)
    # the source statistics stay as they were; eval mode is the plain BN of the source
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)


def test_from_bn_copies_the_source_layer():
    bn = nn.BatchNorm2d(3, eps=1e-4, momentum=0.2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([0.5, 0.6, 0.7]))
    layer = AdaMixBN.from_bn(bn)
    assert layer.eps == 1e-4 and isinstance(layer, nn.BatchNorm2d)
    for key, value in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x))


# -- GEM -----------------------------------------------------------------------------------------------


def test_the_temperature_is_twice_the_unbiased_std_of_the_centred_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, -1.0]], requires_grad=True)
    # centred: [-2, -1, 0, 3] (squares 14) and [0, 0, 1, -1] (squares 2); normaliser K - 1 = 3
    expected = torch.tensor([2 * math.sqrt(14 / 3), 2 * math.sqrt(2 / 3)])
    t = gem_temperature(logits)
    torch.testing.assert_close(t.view(-1), expected)
    assert not t.requires_grad


@pytest.mark.parametrize("kind", ["gem_t", "gem_skd", "gem_aug"])
def test_gem_losses_and_their_gradients_match_a_per_sample_computation(kind):
    torch.manual_seed(3)
    logits = (torch.randn(6, 5) * 3).requires_grad_()
    teacher = torch.randn(6, 5)
    ref_logits = logits.detach().clone().requires_grad_()
    if kind == "gem_t":
        got = gem_t(logits)
    elif kind == "gem_skd":
        got = gem_skd(logits)
    else:
        got = gem_aug(logits, teacher)
    expected = _gem_loop(ref_logits, kind, teacher)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.backward()
    expected.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6, rtol=1e-5)


def test_gem_t_is_t_squared_times_the_entropy_at_temperature_t():
    z = torch.tensor([[0.0, 0.0, 3.0]])
    c = z - 1.0  # [-1, -1, 2]: squares 6, std sqrt(3), T = 2 sqrt(3)
    t = 2 * math.sqrt(3.0)
    p = torch.softmax(c / t, 1)
    assert gem_t(z).item() == pytest.approx(-(t * t) * (p * p.log()).sum().item(), rel=1e-6)


def test_gem_aug_teacher_views_are_crops_and_flips_of_their_own_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 6, 6).contiguous()  # image n is constant n
    views = crop_flip_views(x, 3, g)
    assert views.shape == (12, 2, 6, 6)
    torch.testing.assert_close(views, torch.arange(4.0).repeat_interleave(3).view(12, 1, 1, 1).expand_as(views))
    # a full-size crop is the image or its mirror image, each drawn
    ramp = torch.arange(5.0).view(1, 1, 1, 5).expand(8, 1, 5, 5).contiguous()
    out = crop_flip_views(ramp, 1, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    same = (out - ramp).abs().amax((1, 2, 3)) < 1e-5
    mirrored = (out - ramp.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and bool(same.any()) and bool(mirrored.any())
    # the default crops keep 80 to 100 % of the area at aspect ratios 3/4 to 4/3: a crop spans at least
    # sqrt(0.8 * 3/4) of the ramp's width, and some crops less than all of it
    crops = crop_flip_views(ramp, 4, torch.Generator().manual_seed(2))
    span = crops.amax((1, 2, 3)) - crops.amin((1, 2, 3))
    assert bool((span > 4 * math.sqrt(0.8 * 0.75) - 1e-4).all()) and bool((span < 4 + 1e-4).all())
    assert bool((span < 3.9).any())


# -- the method ----------------------------------------------------------------------------------------


def test_every_batchnorm2d_of_resnet8_becomes_adamixbn_with_the_shortcuts_as_in_the_code():
    net = create_model("resnet8", num_classes=10, in_channels=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = create_method("domain_adaptor", net, BuildInfo(num_classes=10, in_channels=3))
    names = sorted(n for n, mod in m.student.named_modules() if isinstance(mod, AdaMixBN))
    assert names == sorted(["stem.1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2",
                            "layer2.0.shortcut.1", "layer3.0.bn1", "layer3.0.bn2", "layer3.0.shortcut.1"])
    assert all(torch.equal(m.student.state_dict()[k], v) for k, v in before.items())  # state carried over
    # the trained tensors: exactly the BN affine parameters
    trained = {id(p) for p in m.student.parameters() if p.requires_grad}
    affine = {id(mod.weight) for mod in m.student.modules() if isinstance(mod, AdaMixBN)}
    affine |= {id(mod.bias) for mod in m.student.modules() if isinstance(mod, AdaMixBN)}
    assert trained == affine and m.phases() == []

    kept = create_method("domain_adaptor", create_model("resnet8", num_classes=10, in_channels=3),
                         BuildInfo(num_classes=10, in_channels=3), convert_shortcut=False)
    names = sorted(n for n, mod in kept.student.named_modules() if isinstance(mod, AdaMixBN))
    assert "layer2.0.shortcut.1" not in names and len(names) == 7


@pytest.mark.parametrize("kind", ["gem_t", "gem_skd"])
def test_one_adapt_step_is_one_sgd_step_on_the_rectified_parameters_then_a_prediction(kind):
    net = _bnnet()
    x = torch.randn(16, 1, 8, 8) * 0.8 + 0.3
    expected, loss, (g, b), lam = _manual_step(_bnnet(), x, lr=0.5, kind=kind)
    m = _method(net, lr=0.5, loss=kind)
    out = m.adapt_step({"x": x}, StepContext(step=0, max_steps=0))
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["lambda"], lam, atol=1e-6, rtol=1e-5)
    assert not out["loss"].requires_grad and out["backward_samples"].item() == 16
    torch.testing.assert_close(m.student.bn.weight.detach(), g)  # the step's update stays in the layer
    torch.testing.assert_close(m.student.bn.bias.detach(), b)
    # the update matters: lr 0 predicts differently
    still, *_ = _manual_step(_bnnet(), x, lr=0.0, kind=kind)
    assert (still - expected).abs().max() > 1e-3


def test_gem_aug_uses_the_mean_logits_of_three_augmented_views_as_the_teacher():
    x = torch.randn(10, 1, 8, 8) * 0.8 + 0.3
    views = crop_flip_views(x, 3, torch.Generator().manual_seed(5), scale=(0.8, 1.0))
    expected, loss, *_ = _manual_step(_bnnet(), x, lr=0.5, kind="gem_aug", views=views)
    m = _method(_bnnet(), lr=0.5, loss="gem_aug")
    out = m.adapt_step({"x": x}, StepContext(step=0, max_steps=0, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], loss, atol=1e-6, rtol=1e-5)


def test_two_steps_take_two_sgd_steps_without_rectifying_again():
    x = torch.randn(12, 1, 8, 8)
    m = _method(_bnnet(), lr=0.5, ft_steps=2)
    out = m.adapt_step({"x": x}, StepContext(step=0, max_steps=0))
    # by hand: rectify, step, then a second step from the updated parameters
    net = _bnnet()
    _, _, (g, b), _ = _manual_step(net, x, lr=0.5)
    g, b = g.clone().requires_grad_(), b.clone().requires_grad_()
    h = net.conv(x).detach()
    z = net.fc(F.adaptive_avg_pool2d(torch.relu(_bn_batch(h, g, b, net.bn.eps)), 1).flatten(1))
    dg, db = torch.autograd.grad(_gem_loop(z, "gem_t"), [g, b])
    with torch.no_grad():
        pred = net.fc(F.adaptive_avg_pool2d(torch.relu(_bn_batch(h, g - 0.5 * dg, b - 0.5 * db, net.bn.eps)), 1)
                      .flatten(1))
    torch.testing.assert_close(out["logits"], pred, atol=1e-5, rtol=1e-5)
    assert out["backward_samples"].item() == 24


def test_episodic_by_default_online_carries_the_state_with_momentum():
    x = torch.randn(16, 1, 8, 8)
    ctx = StepContext(step=0, max_steps=0)
    episodic = _method(_bnnet(), lr=0.5)
    assert episodic.episodic is True
    first = episodic.adapt_step({"x": x}, ctx)["logits"]
    episodic.reset()  # what the runner does before every batch of an episodic method
    episodic.prepare()
    torch.testing.assert_close(episodic.adapt_step({"x": x}, ctx)["logits"], first, atol=0, rtol=0)

    online = _method(_bnnet(), lr=0.5, online=True)
    assert online.episodic is False and online.momentum == 0.9
    a = online.adapt_step({"x": x}, ctx)["logits"]
    torch.testing.assert_close(a, first, atol=0, rtol=0)  # the first batch starts from the source
    b = online.adapt_step({"x": x}, ctx)["logits"]
    assert (a - b).abs().max() > 1e-3
    # online: the next batch rectifies the adapted parameters again, and SGD carries a momentum buffer
    w0 = online.student.bn.weight.detach().clone()
    online.reset()
    assert online._velocity is None and not torch.equal(online.student.bn.weight.detach(), w0)


@pytest.mark.parametrize("kind", ["gem_t", "gem_skd", "gem_aug"])
def test_a_step_does_not_synchronise_with_the_host(kind):
    m = _method(_bnnet(), loss=kind, online=True)
    x = torch.randn(8, 1, 8, 8)
    ctx = StepContext(step=0, max_steps=0, generator=torch.Generator().manual_seed(0))
    with NoHostSync():
        m.adapt_step({"x": x}, ctx)
        m.adapt_step({"x": x}, ctx)


def test_a_network_without_batchnorm2d_is_a_config_error():
    with pytest.raises(ConfigError, match="domain_adaptor"):
        create_method("domain_adaptor", FixedMLP(10), BuildInfo(num_classes=10))

    class Only1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc = nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.bn(self.fc1(x.flatten(1))))

    with pytest.raises(ConfigError, match="BatchNorm2d"):
        create_method("domain_adaptor", Only1d(), BuildInfo(num_classes=10))


# -- through the runner --------------------------------------------------------------------------------


_shift = digit_shift


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return train_bn_source(tmp_path_factory)


def test_a_run_through_the_runner_predicts_as_the_written_out_method(tmp_path, source_run):
    cfg = build_adapt_config(["method.name=domain_adaptor", "method.lr=1.0", f"out_dir={tmp_path / 'da'}",
                              "data.batch_size=50"])
    summary = adapt(AdaptPlan(run=str(source_run), shift="test_digit_shift", setting="reset"), cfg)
    assert summary["backward_per_sample"] == pytest.approx(1.0)
    records = {r["stream"]: r for r in map(json.loads, (tmp_path / "da" / "metrics.jsonl").read_text().splitlines())}

    net = BNNet(10, 1)
    net.load_state_dict(torch.load(source_run / "best.pt", weights_only=True)["model"])
    ds = load_dataset("digits", "test")
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    for name in ("dark", "inverted"):
        stream = _shift().domains[name]
        order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(0))  # the runner's order
        correct, losses = 0, []
        for start in range(0, len(stream), 50):
            idx = order[start:start + 50]
            x = (stream.images[idx].float() / 255 - mean) / std
            logits, loss, *_ = _manual_step(net, x, lr=1.0)  # episodic: every batch from the source
            correct += (logits.argmax(1) == stream.labels[idx]).sum().item()
            losses.append(loss.item())
        assert summary[f"acc@{name}"] == pytest.approx(correct / len(stream), abs=1e-9), name
        assert records[name]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4), name
        assert 0 < records[name]["lambda"] < 1


def test_online_and_gem_aug_runs_through_the_runner(tmp_path, source_run):
    runs = {}
    for tag, extra in {"episodic": [], "online": ["method.online=true"], "aug": ["method.loss=gem_aug"]}.items():
        cfg = build_adapt_config(["method.name=domain_adaptor", "method.lr=1.0", f"out_dir={tmp_path / tag}",
                                  "data.batch_size=50", *extra])
        runs[tag] = adapt(AdaptPlan(run=str(source_run), shift="test_digit_shift", setting="reset"), cfg)
    # an online run starts each stream from the source: its first batch is the episodic one, the rest differ
    assert runs["online"]["acc@dark"] != runs["episodic"]["acc@dark"] or \
        runs["online"]["acc@inverted"] != runs["episodic"]["acc@inverted"]
    assert runs["aug"]["backward_per_sample"] == pytest.approx(1.0)
    assert runs["aug"]["acc@inverted"] != runs["episodic"]["acc@inverted"] or \
        runs["aug"]["acc@dark"] != runs["episodic"]["acc@dark"]


def test_bad_values_are_refused():
    for bad in (["method.lr=0"], ["method.ft_steps=0"], ["method.tta_bs=0"], ["method.loss=gem-t"],
                ["method.mix_lambda=1.5"], ["method.crop_scale=0"]):
        with pytest.raises(ConfigError):
            build_adapt_config(["method.name=domain_adaptor", *bad])


def test_the_class_is_registered():
    assert create_method("domain_adaptor", _bnnet(), BuildInfo(num_classes=10)).__class__ is DomainAdaptor
