"""The published and Taylor forms of DPM-Solver++(3M), the stochastic samplers (euler_ancestral, EDM's churn,
DPM-Solver++(2M) SDE), per-step callbacks and the cost of trajectory recording, against update rules written out
here from the papers' and reference implementations' formulas (nothing of the library is reused for them)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mentor.diffusion.amed import AMEDOutput, amed_plugin
from mentor.diffusion.denoisers import EDMPrecond, GaussianDenoiser
from mentor.diffusion.sample import parse_solver_options, sample_images, steps_for_nfe
from mentor.diffusion.samplers import (
    SAMPLERS,
    STOCHASTIC,
    dpm_solver_pp,
    dpm_solver_pp_2m_sde,
    edm_stochastic,
    euler,
    euler_ancestral,
    heun,
    nfe,
)
from mentor.diffusion.schedules import logsnr, polynomial
from mentor.errors import SampleError

F64 = torch.float64


def _gaussian(dim: int = 6, seed: int = 0) -> GaussianDenoiser:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=F64)
    cov = a @ a.T / dim + 0.05 * torch.eye(dim, dtype=F64)
    return GaussianDenoiser(0.5 * torch.randn(dim, generator=g, dtype=F64), cov)


def _start(n: int = 8, dim: int = 6, seed: int = 1) -> torch.Tensor:
    return 80.0 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


DEN = _gaussian()


# ------------------------------------------------------------------------------------------ DPM-Solver++(3M)


def _official_3m(den, x: torch.Tensor, sig: list[float], weight: float) -> list[torch.Tensor]:
    """DPM-Solver++ multistep with data prediction as in the official code (``multistep_dpm_solver_*_update``):
    ``phi_1 = expm1(-h)``, ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2``, 3M
    ``x_t = (t / s) x - phi_1 D_0 + phi_2 D1 - weight * phi_3 D2`` (``weight = 1`` there), with lower-order warm-up
    and final steps. Python floats for the sigmas; returns every point."""
    steps, lam = len(sig) - 1, [-math.log(s) for s in sig]
    outs, points = [], [x]
    for i in range(steps):
        d0 = den(x, torch.full((x.shape[0],), sig[i], dtype=F64))
        outs.insert(0, d0)
        order = min(3, i + 1, steps - i)
        h = lam[i + 1] - lam[i]
        phi_1 = math.expm1(-h)
        ratio = sig[i + 1] / sig[i]
        if order == 1:
            x = ratio * x - phi_1 * d0
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            x = ratio * x - phi_1 * d0 - 0.5 * phi_1 * (d0 - outs[1]) / r0
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (d0 - outs[1]) / r0, (outs[1] - outs[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x = ratio * x - phi_1 * d0 + phi_2 * d1 - weight * phi_3 * d2
        points.append(x)
    return points


@pytest.mark.parametrize(("form", "weight"), [("published", 1.0), ("taylor", 2.0)])
@pytest.mark.parametrize("schedule", [logsnr, polynomial])
def test_3m_forms_equal_the_written_out_update(form, weight, schedule):
    x0, sig = _start(), schedule(9)
    want = _official_3m(DEN, x0, sig.tolist(), weight)
    got = dpm_solver_pp(DEN, x0, sig, third_order=form, return_trajectory=True)
    for i, w in enumerate(want):
        torch.testing.assert_close(got.points[i], w, rtol=1e-11, atol=1e-11)
    if form == "published":  # the default
        torch.testing.assert_close(dpm_solver_pp(DEN, x0, sig), got.x, rtol=0, atol=0)
    # the two forms differ exactly where a third-order step is taken (steps 2..5 of 8)
    other = dpm_solver_pp(DEN, x0, sig, third_order="taylor" if form == "published" else "published",
                          return_trajectory=True)
    torch.testing.assert_close(other.points[:3], got.points[:3], rtol=0, atol=0)
    assert (other.points[3] - got.points[3]).abs().max() > 1e-3


# Fitted slope of log(max error) against log(steps), polynomial schedule (rho = 7), Gaussian oracle against the
# exact flow. The published weight leaves an O(h^2) local term in D'' (order 2; local slopes 1.82, 1.92, 1.96);
# the Taylor weight is order 3 (3.03, 3.01, 2.99). Documented in dpm_solver_pp's docstring.
@pytest.mark.parametrize(("form", "lo", "hi"), [("published", 1.8, 2.05), ("taylor", 2.9, 3.15)])
def test_3m_convergence_orders_on_the_gaussian_oracle(form, lo, hi):
    x0 = _start(32, seed=12)
    ref = DEN.exact(x0, 80.0, 0.002)
    steps = [81, 161, 321, 641]
    errs = [float((dpm_solver_pp(DEN, x0, polynomial(n), third_order=form) - ref).norm(dim=1).max())
            for n in steps]
    slope = -np.polyfit(np.log([n - 1 for n in steps]), np.log(errs), 1)[0]
    assert lo <= slope <= hi, (form, slope, errs)


def test_published_3m_is_more_accurate_with_few_steps():
    x0 = _start(32, seed=12)
    ref = DEN.exact(x0, 80.0, 0.002)
    err = {form: float((dpm_solver_pp(DEN, x0, polynomial(21), third_order=form) - ref).norm(dim=1).max())
           for form in ("published", "taylor")}
    assert err["published"] < 0.5 * err["taylor"], err


def test_third_order_is_checked():
    with pytest.raises(ValueError, match="third_order"):
        dpm_solver_pp(DEN, _start(), polynomial(5), third_order="paper")
    with pytest.raises(ValueError, match="third_order"):
        amed_plugin(DEN, _start(), polynomial(5), _FixedR(0.5), base="dpm_solver_pp", third_order="exact")


class _FixedR(nn.Module):
    """An AMED predictor with a fixed intermediate ratio and no scaling."""

    def __init__(self, r: float):
        super().__init__()
        self.r = r

    def forward(self, feature, t_cur, t_next):
        r = torch.full((feature.shape[0],), self.r, dtype=F64)
        return AMEDOutput(r, torch.ones_like(r), torch.ones_like(r))


@pytest.mark.parametrize("form", ["published", "taylor"])
def test_amed_dpm_solver_pp_plugin_uses_the_same_3m_form(form):
    sig, r = polynomial(6), 0.4
    mid = sig[1:] ** r * sig[:-1] ** (1 - r)
    fine = torch.cat([torch.stack([sig[:-1], mid], 1).reshape(-1), sig[-1:]])
    x0 = _start()
    kw = {} if form == "published" else {"third_order": form}  # the plugin's default is the published form
    got = amed_plugin(DEN, x0, sig, _FixedR(r), base="dpm_solver_pp", **kw)
    torch.testing.assert_close(got, dpm_solver_pp(DEN, x0, fine, third_order=form), rtol=1e-11, atol=1e-11)


# ------------------------------------------------------------------------------------------ recording costs


class _FullSizeOps(TorchFunctionMode):
    """Counts torch calls outside the denoiser whose result has the sample's full shape."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape, self.count, self.paused = shape, 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and isinstance(out, torch.Tensor) and out.shape == self.shape:
            self.count += 1
        return out


def _count_ops(name: str, **kw) -> tuple[int, object]:
    x0, sig = _start(4), logsnr(7)
    mode = _FullSizeOps(x0.shape)

    def den(x, sigma, **cond):
        mode.paused = True
        try:
            return DEN(x, sigma, **cond)
        finally:
            mode.paused = False

    with mode:
        out = SAMPLERS[name](den, x0, sig, **kw)
    return mode.count, out


@pytest.mark.parametrize("name", ["dpm_solver_pp", "unipc", "dpm_solver_pp_2m_sde", "euler", "heun"])
def test_directions_are_computed_only_for_a_trajectory(name):
    """(x - D) / sigma costs two full-size operations per step, done only when a trajectory is asked for (or
    not at all by the solvers that step along the direction anyway)."""
    opts = {"generator": _gen(0)} if name in STOCHASTIC else {}
    plain, out = _count_ops(name, **opts)
    opts = {"generator": _gen(0)} if name in STOCHASTIC else {}
    recorded, traj = _count_ops(name, return_trajectory=True, **opts)
    opts = {"generator": _gen(0)} if name in STOCHASTIC else {}
    seen = []
    with_callback, out_cb = _count_ops(name, callback=seen.append, **opts)
    steps = 6
    data_prediction = name in ("dpm_solver_pp", "unipc", "dpm_solver_pp_2m_sde")
    assert recorded - plain == (2 * steps if data_prediction else 0)
    assert with_callback == plain  # the callback's denoised is already there
    # the same numbers either way
    torch.testing.assert_close(traj.x, out, rtol=0, atol=0)
    torch.testing.assert_close(out_cb, out, rtol=0, atol=0)
    assert len(seen) == steps


# ------------------------------------------------------------------------------------------ callbacks


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("afs", [False, True])
def test_callback_once_per_step_with_k_diffusion_keys(name, afs):
    x0, sig = _start(3), polynomial(6)
    churn = {"s_churn": 2.0} if name == "edm_stochastic" else {}
    noise = (lambda: {"generator": _gen(5)}) if name in STOCHASTIC else dict
    seen = []
    traj = SAMPLERS[name](DEN, x0, sig, afs=afs, return_trajectory=True, callback=seen.append, **churn, **noise())
    plain = SAMPLERS[name](DEN, x0, sig, afs=afs, **churn, **noise())
    torch.testing.assert_close(traj.x, plain, rtol=0, atol=0)
    assert [info["i"] for info in seen] == list(range(5))
    for i, info in enumerate(seen):
        assert set(info) == {"i", "x", "sigma", "sigma_next", "sigma_hat", "denoised"}
        assert info["sigma"].ndim == 0 and float(info["sigma"]) == pytest.approx(float(sig[i]), rel=1e-15)
        assert float(info["sigma_next"]) == pytest.approx(float(sig[i + 1]), rel=1e-15)
        s_hat = float(info["sigma_hat"])
        if name == "edm_stochastic":  # churn raises the level by gamma = min(2 / 5, sqrt(2) - 1)
            assert s_hat == pytest.approx(float(sig[i]) * 1.4, rel=1e-14)
        else:
            assert s_hat == float(info["sigma"])
            torch.testing.assert_close(info["x"], traj.points[i], rtol=0, atol=0)
        if afs and i == 0:
            want = info["x"] - s_hat * info["x"] / math.sqrt(1 + s_hat**2)
        elif name == "unipc" and i > 0:  # UniPC reuses the output at the predictor's point
            continue
        else:
            want = DEN(info["x"], torch.full((3,), s_hat, dtype=F64))
        torch.testing.assert_close(info["denoised"], want, rtol=1e-12, atol=1e-12)


def test_callback_levels_per_sample():
    sig = torch.stack([polynomial(4), polynomial(4, sigma_max=40.0)], dim=1)
    seen = []
    euler(DEN, _start(2) * sig[0, :, None] / 80.0, sig, callback=seen.append)
    assert seen[1]["sigma"].shape == (2,)
    torch.testing.assert_close(seen[1]["sigma"], sig[1], rtol=0, atol=0)
    torch.testing.assert_close(seen[1]["sigma_next"], sig[2], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ stochastic samplers


def _kd_euler_ancestral(den, x, sig, eta, s_noise, g):
    """k-diffusion's ``sample_euler_ancestral`` written out (noise drawn in step order from ``g``)."""
    for i in range(len(sig) - 1):
        s, t = sig[i], sig[i + 1]
        d = (x - den(x, torch.full((x.shape[0],), s, dtype=F64))) / s
        s_up = min(t, eta * (t**2 * (s**2 - t**2) / s**2) ** 0.5)
        s_down = (t**2 - s_up**2) ** 0.5
        x = x + d * (s_down - s)
        x = x + torch.randn(x.shape, generator=g, dtype=F64) * s_noise * s_up
    return x


def _edm_algorithm_2(den, x, sig, s_churn, s_tmin, s_tmax, s_noise, g):
    """Karras et al. (2022), Algorithm 2, with the Heun correction on every step (the last sigma is > 0)."""
    steps = len(sig) - 1
    for i in range(steps):
        t = sig[i]
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t**2) * s_noise * torch.randn(x.shape, generator=g, dtype=F64)
        d = (x - den(x, torch.full((x.shape[0],), t_hat, dtype=F64))) / t_hat
        x_next = x + (sig[i + 1] - t_hat) * d
        d2 = (x_next - den(x_next, torch.full((x.shape[0],), sig[i + 1], dtype=F64))) / sig[i + 1]
        x = x + (sig[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return x


def _kd_dpmpp_2m_sde(den, x, sig, eta, s_noise, solver_type, g):
    """k-diffusion's ``sample_dpmpp_2m_sde`` written out, independent normal noise from ``g``."""
    old, h_last = None, None
    for i in range(len(sig) - 1):
        denoised = den(x, torch.full((x.shape[0],), sig[i], dtype=F64))
        t, s = -math.log(sig[i]), -math.log(sig[i + 1])
        h = s - t
        eta_h = eta * h
        x = sig[i + 1] / sig[i] * math.exp(-eta_h) * x + -math.expm1(-h - eta_h) * denoised
        if old is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
            else:
                x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (denoised - old)
        if eta:
            x = x + torch.randn(x.shape, generator=g, dtype=F64) * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) \
                * s_noise
        old, h_last = denoised, h
    return x


@pytest.mark.parametrize(("eta", "s_noise"), [(1.0, 1.0), (0.5, 1.02)])
def test_euler_ancestral_equals_the_written_out_update(eta, s_noise):
    x0, sig = _start(), polynomial(9)
    got = euler_ancestral(DEN, x0, sig, eta=eta, s_noise=s_noise, generator=_gen(3))
    want = _kd_euler_ancestral(DEN, x0, sig.tolist(), eta, s_noise, _gen(3))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("s_churn", "s_tmin", "s_tmax", "s_noise"),
                         [(40.0, 0.05, 50.0, 1.003), (2.0, 0.0, float("inf"), 1.0)])
def test_edm_stochastic_equals_algorithm_2(s_churn, s_tmin, s_tmax, s_noise):
    x0, sig = _start(), polynomial(11)
    got = edm_stochastic(DEN, x0, sig, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                         generator=_gen(4))
    want = _edm_algorithm_2(DEN, x0, sig.tolist(), s_churn, s_tmin, s_tmax, s_noise, _gen(4))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - heun(DEN, x0, sig)).abs().max() > 1e-3  # the churn did something


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize(("eta", "s_noise"), [(1.0, 1.0), (0.4, 0.9)])
def test_dpm_solver_pp_2m_sde_equals_the_written_out_update(solver_type, eta, s_noise):
    x0, sig = _start(), logsnr(9)
    got = dpm_solver_pp_2m_sde(DEN, x0, sig, eta=eta, s_noise=s_noise, solver_type=solver_type, generator=_gen(5))
    want = _kd_dpmpp_2m_sde(DEN, x0, sig.tolist(), eta, s_noise, solver_type, _gen(5))
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def _no_noise(sigma, sigma_next):
    raise AssertionError("no noise may be drawn")


def test_without_noise_the_stochastic_samplers_are_their_ode_counterparts():
    x0 = _start()
    for sig in (polynomial(8), logsnr(6)):
        for afs in (False, True):
            same = [
                (euler_ancestral(DEN, x0, sig, afs=afs, eta=0.0, noise_sampler=_no_noise),
                 euler(DEN, x0, sig, afs=afs)),
                (edm_stochastic(DEN, x0, sig, afs=afs, noise_sampler=_no_noise), heun(DEN, x0, sig, afs=afs)),
                (edm_stochastic(DEN, x0, sig, afs=afs, s_churn=30.0, s_tmin=100.0, noise_sampler=_no_noise),
                 heun(DEN, x0, sig, afs=afs)),
                (dpm_solver_pp_2m_sde(DEN, x0, sig, afs=afs, eta=0.0, noise_sampler=_no_noise),
                 dpm_solver_pp(DEN, x0, sig, afs=afs, max_order=2, lower_order_final=False)),
                (dpm_solver_pp_2m_sde(DEN, x0, sig, afs=afs, eta=0.0, lower_order_final=True, noise_sampler=_no_noise),
                 dpm_solver_pp(DEN, x0, sig, afs=afs, max_order=2)),
            ]
            for got, want in same:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the "heun" correction at eta = 0 is the second-order weight h phi_2(-h) / r of the deterministic 2M
    sig = logsnr(6)
    a = dpm_solver_pp_2m_sde(DEN, x0, sig, eta=0.0, solver_type="heun")
    b = dpm_solver_pp_2m_sde(DEN, x0, sig, eta=0.0, solver_type="midpoint")
    assert 1e-8 < float((a - b).abs().max()) < 1.0


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_same_seed_same_sample(name):
    x0, sig = _start(), polynomial(8)
    opts = {"s_churn": 10.0} if name == "edm_stochastic" else {}
    a = SAMPLERS[name](DEN, x0, sig, generator=_gen(7), **opts)
    b = SAMPLERS[name](DEN, x0, sig, generator=_gen(7), **opts)
    c = SAMPLERS[name](DEN, x0, sig, generator=_gen(8), **opts)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    # torch's global generator when none is given
    torch.manual_seed(11)
    d = SAMPLERS[name](DEN, x0, sig, **opts)
    torch.manual_seed(11)
    torch.testing.assert_close(SAMPLERS[name](DEN, x0, sig, **opts), d, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_noise_sampler_is_called_with_the_step_levels(name):
    x0, sig = _start(), polynomial(6)
    calls = []

    def noise(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return torch.ones_like(x0)

    opts = {"s_churn": 2.0} if name == "edm_stochastic" else {}
    SAMPLERS[name](DEN, x0, sig, noise_sampler=noise, **opts)
    s = sig.tolist()
    if name == "edm_stochastic":  # from sigma_i up to sigma_hat = (1 + gamma) sigma_i
        want = [(v, v * 1.4) for v in s[:-1]]
    else:
        want = list(zip(s[:-1], s[1:]))
    assert np.allclose(calls, want, rtol=1e-14, atol=0) and len(calls) == len(want)
    with pytest.raises(ValueError, match="not both"):
        SAMPLERS[name](DEN, x0, sig, noise_sampler=noise, generator=_gen(0), **opts)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_per_sample_schedules_match_each_sample_alone(name):
    """A batch with one schedule per sample equals each sample run alone, given the same noise."""
    sig = torch.stack([polynomial(6, sigma_min=0.002 * (k + 1), sigma_max=80.0 - 10 * k) for k in range(3)], dim=1)
    x0 = _start(3) * sig[0, :, None] / 80.0
    table = torch.randn(5, 3, 6, generator=_gen(9), dtype=F64)
    opts = {"s_churn": 3.0} if name == "edm_stochastic" else {}

    def sampler_for(rows):
        calls = [0]

        def draw(sigma, sigma_next):
            calls[0] += 1
            return table[calls[0] - 1, rows]
        return draw

    out = SAMPLERS[name](DEN, x0, sig, noise_sampler=sampler_for(slice(None)), **opts)
    for k in range(3):
        alone = SAMPLERS[name](DEN, x0[k:k + 1], sig[:, k], noise_sampler=sampler_for(slice(k, k + 1)), **opts)
        torch.testing.assert_close(out[k:k + 1], alone, rtol=1e-12, atol=1e-12)


# Euler ancestral is first order in distribution (covariance off by 0.23, 0.056, 0.013 at 41, 161, 641 timestamps
# on this Gaussian), so it gets more steps than the second-order samplers (0.03 to 0.05 off at 41).
@pytest.mark.parametrize(("name", "opts", "steps"), [
    ("euler_ancestral", {}, 641),
    ("edm_stochastic", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}, 161),
    ("dpm_solver_pp_2m_sde", {}, 161),
    ("dpm_solver_pp_2m_sde", {"solver_type": "heun", "eta": 0.5}, 161),
])
def test_stochastic_samples_have_the_data_distribution(name, opts, steps):
    """8000 samples of a 2-d Gaussian: mean and covariance of the data (plus sigma_min^2) within sampling error
    (standard deviation about 0.016 for the variances)."""
    mean = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    den = GaussianDenoiser(mean, cov)
    x0 = 80.0 * torch.randn(8000, 2, generator=_gen(12), dtype=F64)
    out = SAMPLERS[name](den, x0, polynomial(steps), generator=_gen(13), **opts)
    torch.testing.assert_close(out.mean(0), mean, rtol=0, atol=0.04)
    torch.testing.assert_close(torch.cov(out.T), cov, rtol=0, atol=0.05)


def test_stochastic_argument_errors():
    x0, sig = _start(), polynomial(5)
    with pytest.raises(ValueError, match="eta"):
        euler_ancestral(DEN, x0, sig, eta=-0.1)
    with pytest.raises(ValueError, match="s_churn"):
        edm_stochastic(DEN, x0, sig, s_churn=-1.0)
    with pytest.raises(ValueError, match="solver_type"):
        dpm_solver_pp_2m_sde(DEN, x0, sig, solver_type="rk4")
    with pytest.raises(ValueError, match="decrease"):
        euler_ancestral(DEN, x0, torch.tensor([1.0, 2.0, 0.5], dtype=F64))


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
@pytest.mark.parametrize("afs", [False, True])
def test_nfe_of_the_stochastic_samplers(name, afs):
    for n in (2, 3, 6):
        calls = []

        def counted(x, sigma, calls=calls, **cond):
            calls.append(1)
            return DEN(x, sigma, **cond)

        traj = SAMPLERS[name](counted, _start(2), polynomial(n), afs=afs, return_trajectory=True, generator=_gen(0))
        assert len(calls) == traj.nfe == nfe(name, n, afs=afs)
        assert traj.points.shape == (n, 2, 6) and traj.directions.shape == (n - 1, 2, 6)
    per_step = 2 if name == "edm_stochastic" else 1
    assert nfe(name, 11) == 10 * per_step
    assert steps_for_nfe(name, 6) == 6 // per_step + 1


# ------------------------------------------------------------------------------------------ mentor sample


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        c = c_noise.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.tanh(self.conv(torch.cat([x, c], 1)))


def _tiny_model():
    torch.manual_seed(0)
    info = {"image_shape": (1, 8, 8), "sigma_min": 0.002, "sigma_max": 80.0, "conditional": False,
            "num_classes": 0, "label_dropout": 0.0, "checkpoint": "tiny.pt", "ema": True}
    return EDMPrecond(_TinyNet()).eval().requires_grad_(False), info


def test_sample_images_with_a_stochastic_solver_is_seeded_and_batch_independent():
    den, info = _tiny_model()
    kw = {"solver": "euler_ancestral", "nfe": 5, "n": 6}
    a = sample_images(den, info, seed=3, batch_size=6, **kw)
    torch.testing.assert_close(sample_images(den, info, seed=3, batch_size=4, **kw), a, rtol=0, atol=0)
    assert (sample_images(den, info, seed=4, batch_size=6, **kw) - a).abs().max() > 1e-3
    # eta = 0 is Euler
    torch.testing.assert_close(sample_images(den, info, seed=3, solver_opts={"eta": 0.0}, **kw),
                               sample_images(den, info, seed=3, solver="euler", nfe=5, n=6), rtol=0, atol=0)
    churn = sample_images(den, info, solver="edm_stochastic", nfe=6, n=4, seed=0, solver_opts={"s_churn": 40})
    assert (churn - sample_images(den, info, solver="heun", nfe=6, n=4, seed=0)).abs().max() > 1e-4
    with pytest.raises(SampleError, match="no option 'churn'"):
        sample_images(den, info, seed=3, solver_opts={"churn": 1.0}, **kw)
    with pytest.raises(SampleError, match="eta"):
        sample_images(den, info, seed=3, solver_opts={"eta": -1.0}, **kw)


def test_parse_solver_options():
    got = parse_solver_options(["eta=0.5", "solver_type=heun", "lower_order_final=true", "s_tmax=inf",
                                "max_order=2"])
    assert got == {"eta": 0.5, "solver_type": "heun", "lower_order_final": True, "s_tmax": float("inf"),
                   "max_order": 2}
    assert isinstance(got["max_order"], int)
    for bad in ("eta", "=1", "eta="):
        with pytest.raises(SampleError, match="KEY=VALUE"):
            parse_solver_options([bad])


def test_mentor_sample_solver_options(tmp_path, capsys, monkeypatch):
    import mentor.diffusion.edm as edm
    from mentor.cli import main

    monkeypatch.setattr(edm, "load_edm", lambda run_dir, ema=True, device="auto": _tiny_model())
    png = tmp_path / "grid.png"
    argv = ["sample", str(tmp_path), "--solver", "dpm_solver_pp_2m_sde", "--nfe", "5", "--n", "4", "--out", str(png),
            "--device", "cpu", "--solver-opt", "eta=0.5", "--solver-opt", "solver_type=heun"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["solver"] == "dpm_solver_pp_2m_sde" and result["nfe"] == 5
    assert result["solver_opts"] == {"eta": 0.5, "solver_type": "heun"}
    first = png.read_bytes()
    assert main(argv) == 0  # the same seed, the same file
    assert png.read_bytes() == first
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    assert main(["sample", str(tmp_path), "--solver", "euler_ancestral", "--out", str(bad), "--solver-opt",
                 "s_churn=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mentor: error:") and "euler_ancestral has no option 's_churn'" in err
    assert not bad.exists()
