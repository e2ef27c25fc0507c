"""Sharpening, MixMatch's MixUp and VAT's adversarial direction, each against an independent computation
(a hand-worked example, a closed-form distribution, a per-sample loop, the Hessian's eigenvectors)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mentor.nn import mixup, sharpen, step_generator, vat_perturbation
from mentor.nn.mixing import sample_beta, unit_rows


def test_sharpen_matches_a_hand_worked_example():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.5, 0.0]])
    # T = 0.5 squares: 0.36, 0.09, 0.01 over 0.46; the second row keeps its zero.
    expected = torch.tensor([[0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(sharpen(p, 0.5), expected)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    # T = 1/3 cubes: 0.216, 0.027, 0.001 over 0.244.
    torch.testing.assert_close(sharpen(p[:1], 1 / 3), torch.tensor([[0.216, 0.027, 0.001]]) / 0.244)
    # A tiny temperature gives the arg-max, not 0/0.
    for tiny in (1e-3, 1e-300):
        torch.testing.assert_close(sharpen(p[:1], tiny), torch.tensor([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0.0)


def _folded_beta_cdf(t, cdf):
    """CDF of lam' = max(lam, 1 - lam) for lam with the symmetric CDF ``cdf``: P(1 - t <= lam <= t)."""
    return cdf(t) - cdf(1 - t)


@pytest.mark.parametrize("alpha,cdf", [
    (0.5, lambda t: 2 / math.pi * torch.asin(torch.sqrt(t))),  # Beta(1/2, 1/2): the arcsine law
    (2.0, lambda t: 3 * t**2 - 2 * t**3),  # Beta(2, 2)
])
def test_mixup_weights_follow_the_folded_beta_law(alpha, cdf):
    n = 20000
    g = torch.Generator().manual_seed(0)
    mixed = mixup(torch.zeros(n, 1), torch.zeros(n, 2), alpha, g, per_sample=True)
    lam = mixed.lam.double().sort().values
    assert lam.shape == (n,) and bool((lam >= 0.5).all()) and bool((lam <= 1).all())
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (empirical - _folded_beta_cdf(lam, cdf)).abs().max().item()
    assert ks < 1.95 / math.sqrt(n), ks  # Kolmogorov-Smirnov at the 0.1 % level
    # One weight per batch by default (USB's form).
    assert mixup(torch.zeros(5, 1), torch.zeros(5, 2), alpha, g).lam.shape == (1,)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_equals_a_per_sample_loop(per_sample):
    torch.manual_seed(0)
    x = torch.randn(12, 2, 3, 3)
    y = torch.rand(12, 4).softmax(1)
    mixed = mixup(x, y, 0.75, torch.Generator().manual_seed(3), per_sample=per_sample)
    assert sorted(mixed.index.tolist()) == list(range(12))
    assert not torch.equal(mixed.index, torch.arange(12))
    for i in range(12):
        lam = float(mixed.lam[i if per_sample else 0])
        j = int(mixed.index[i])
        assert 0.5 <= lam <= 1.0
        torch.testing.assert_close(mixed.x[i], lam * x[i] + (1 - lam) * x[j])
        torch.testing.assert_close(mixed.y[i], lam * y[i] + (1 - lam) * y[j])
    torch.testing.assert_close(mixed.y.sum(1), torch.ones(12))  # still distributions
    again = mixup(x, y, 0.75, torch.Generator().manual_seed(3), per_sample=per_sample)
    assert torch.equal(again.x, mixed.x) and torch.equal(again.index, mixed.index)


def test_sample_beta_survives_a_tiny_alpha():
    lam = sample_beta(1e-3, 1000, torch.Generator().manual_seed(0), "cpu")
    assert torch.isfinite(lam).all() and bool(((lam >= 0) & (lam <= 1)).all())


def test_step_generator_is_a_function_of_seed_and_step():
    def draw(step, seed=5, salt=0):
        return torch.randn(4, generator=step_generator(step, seed, "cpu", salt))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert not torch.equal(draw(3), draw(3, seed=6))
    assert not torch.equal(draw(3), draw(3, salt=1))
    assert step_generator(torch.tensor(3), 5, "cpu") is None  # a captured step: the device's generator


# ------------------------------------------------------------------------------------------------ VAT


def _linear_softmax(d_in=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(d_in, classes).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(classes, d_in, generator=g, dtype=torch.float64))
        net.bias.copy_(torch.randn(classes, generator=g, dtype=torch.float64))
    return net


def _kl_hessians(net, x):
    """Per-sample Hessian of KL(p(x) || p(x + r)) in r at r = 0 for z = W x + b: W^T (diag p - p p^T) W."""
    w = net.weight.detach()
    p = net(x).softmax(1).detach()
    return torch.stack([w.T @ (torch.diag(pi) - torch.outer(pi, pi)) @ w for pi in p])


def test_vat_direction_is_the_leading_eigenvector_of_the_kl_hessian():
    net = _linear_softmax()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    r = vat_perturbation(net, x, logits, xi=1e-6, eps=2.5, iterations=60, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(r.norm(dim=1), torch.full((5,), 2.5, dtype=torch.float64))
    for i, h in enumerate(_kl_hessians(net, x)):
        values, vectors = torch.linalg.eigh(h)
        assert values[-1] > 1.5 * values[-2]  # a clear leading direction
        cos = torch.dot(r[i], vectors[:, -1]).abs() / 2.5
        assert cos > 1 - 1e-6, (i, cos)


def test_one_vat_iteration_is_one_power_step_from_the_gaussian_start():
    net = _linear_softmax(seed=3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)
    r = vat_perturbation(net, x, logits, xi=1e-6, eps=1.0, iterations=1, generator=torch.Generator().manual_seed(9))
    d0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).double()  # the same start
    expected = unit_rows(torch.einsum("bij,bj->bi", _kl_hessians(net, x), unit_rows(d0)))
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=0)


def test_vat_direction_beats_random_directions_on_a_small_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.randn(8, 10, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x)

    def kl(r):
        with torch.no_grad():
            return F.kl_div(net(x + r).log_softmax(1), logits.log_softmax(1), reduction="none", log_target=True).sum(1)

    eps = 0.05
    r = vat_perturbation(net, x, logits, xi=1e-6, eps=eps, iterations=5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    best_random = torch.stack([kl(eps * unit_rows(torch.randn(x.shape, generator=g, dtype=torch.float64)))
                               for _ in range(300)]).max(0).values
    assert bool((kl(r) >= best_random).all()), (kl(r), best_random)


def test_vat_leaves_bn_statistics_and_parameter_gradients_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 16, 3)).train()
    x = torch.randn(6, 1, 4, 4)
    logits = net(x).detach()
    before = copy.deepcopy(net.state_dict())
    r = vat_perturbation(net, x, logits, xi=1e-3, eps=1.0, generator=torch.Generator().manual_seed(0))
    for k, v in net.state_dict().items():
        if not k.endswith("num_batches_tracked"):  # counted by frozen_bn_stats, unused with a momentum
            assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert net[1].momentum == 0.1  # restored
    # Autocast outside does not reach the probe forwards (a bf16 forward would round the probe away).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_bf16 = vat_perturbation(net, x, logits, xi=1e-3, eps=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r_bf16, r)
