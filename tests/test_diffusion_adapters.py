"""Adapters of VP networks (ε-, v- and x0-prediction, continuous and discrete schedules, diffusers U-Nets) to
the denoiser protocol, and classifier-free guidance; checked against the exact posterior of Gaussian data
written in VP variables, hand-computed tables and a DDIM loop in VP variables."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import mentor.diffusion  # noqa: F401  (registers edm_unet and the edm method)
from mentor.cli import main
from mentor.diffusion import (
    CFGDenoiser,
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    EDMPrecond,
    GaussianDenoiser,
    VPDenoiser,
    cfg_denoiser,
    diffusers_denoiser,
    diffusers_schedule,
    euler,
    heun,
    ipndm,
    load_diffusers,
    polynomial,
)
from mentor.diffusion.sample import sample_images
from mentor.diffusion.unet import EDMUNet
from mentor.errors import MentorError, SampleError

F64 = torch.float64
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _gaussian(shape=(6,), seed: int = 0):
    """Gaussian data with a random full-rank covariance over the flattened features: (mean, cov)."""
    g = torch.Generator().manual_seed(seed)
    dim = math.prod(shape)
    a = torch.randn(dim, dim, generator=g, dtype=F64)
    cov = a @ a.T / dim + 0.05 * torch.eye(dim, dtype=F64)
    return 0.5 * torch.randn(shape, generator=g, dtype=F64), cov


# ------------------------------------------------------------------------------------------------ reference nets
# abar(t) written out independently of the module


def _abar_linear(t):
    return torch.exp(-0.5 * (20.0 - 0.1) * t * t - 0.1 * t)


def _abar_cosine(t):
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(torch.zeros_like(t))


def _table(kind: str, n: int = 1000):
    """abar_0..abar_{n-1} by a python loop over the betas."""
    if kind == "linear":
        betas = [1e-4 + (0.02 - 1e-4) * i / (n - 1) for i in range(n)]
    else:
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)]
    out, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        out.append(prod)
    return torch.tensor(out, dtype=F64)


class OptimalVPNet:
    """The exact ε- (or v-, or x0-) predictor of ``x_t = sqrt(abar) y + sqrt(1 - abar) eps``, ``y ~ N(mean, cov)``.

    Gaussian conditioning in VP variables: ``K = abar cov + (1 - abar) I``,
    ``E[eps | x_t] = sqrt(1 - abar) K^-1 (x_t - sqrt(abar) mean)``,
    ``E[y | x_t] = mean + sqrt(abar) cov K^-1 (x_t - sqrt(abar) mean)``, ``v = sqrt(abar) eps - sqrt(1 - abar) y``.
    ``abar_of`` maps the network time to abar (a function, or a table indexed by integer timesteps).
    ``means`` (``(K, *shape)``) makes it class-conditional (label -1: ``mean``).
    """

    def __init__(self, mean, cov, abar_of, prediction="epsilon", means=None, diffusers_output=False):
        self.mean, self.cov, self.abar_of, self.prediction = mean, cov, abar_of, prediction
        self.means, self.diffusers_output = means, diffusers_output
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _abar(self, t):
        if isinstance(self.abar_of, torch.Tensor):
            assert torch.equal(t, t.round()), f"table time is not an integer: {t}"
            return self.abar_of[t.round().long()]
        return self.abar_of(t.to(F64))

    def __call__(self, x_t, t, class_labels=None):
        self.calls.append((x_t, t))
        b, dim = x_t.shape[0], self.mean.numel()
        ab = self._abar(t.reshape(-1).expand(b)).reshape(b, 1)
        mean = self.mean.reshape(1, dim).expand(b, dim)
        if class_labels is not None:
            table = torch.cat([self.mean.reshape(1, dim), self.means.reshape(-1, dim)])
            mean = table[class_labels.reshape(-1).long() + 1]
        xf = x_t.reshape(b, dim).to(F64)
        k = ab[:, :, None] * self.cov + (1 - ab)[:, :, None] * torch.eye(dim, dtype=F64)
        r = torch.linalg.solve(k, (xf - ab.sqrt() * mean).unsqueeze(-1)).squeeze(-1)
        eps = (1 - ab).sqrt() * r
        y = mean + ab.sqrt() * (r @ self.cov)
        out = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * y, "sample": y}[self.prediction]
        out = out.reshape(x_t.shape).to(x_t.dtype)
        return UNetOutput(out) if self.diffusers_output else out


@dataclass
class UNetOutput:
    """What diffusers' ``UNet2DModel`` returns: an object with ``.sample``."""

    sample: torch.Tensor


# ------------------------------------------------------------------------------------------------ the maps


def test_vp_maps_by_hand():
    """At sigma = 1: x_t = x / sqrt(2); eps: D = x - out; v: D = x / 2 - out / sqrt(2); x0: D = out."""
    seen = []

    def const(x_t, t):
        seen.append((x_t, t))
        return torch.full_like(x_t, 0.25)

    sched = ContinuousVPSchedule.linear()
    x = torch.tensor([[2.0, -4.0]], dtype=F64)
    for pred, want in [("epsilon", x - 0.25), ("v", x / 2 - 0.25 / math.sqrt(2)), ("x0", torch.full_like(x, 0.25))]:
        torch.testing.assert_close(VPDenoiser(const, sched, pred)(x, 1.0), want, rtol=0, atol=1e-15)
        torch.testing.assert_close(seen[-1][0], x / math.sqrt(2), rtol=0, atol=1e-15)
        # abar(t) = 1 / (1 + sigma^2) = 1/2 at the time the network got
        torch.testing.assert_close(_abar_linear(seen[-1][1]), torch.tensor([0.5], dtype=F64))
    with pytest.raises(SampleError, match="prediction type 'score'"):
        VPDenoiser(const, sched, "score")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_continuous_schedule_time_inverts_abar(kind):
    sched = getattr(ContinuousVPSchedule, kind)()
    abar = {"linear": _abar_linear, "cosine": _abar_cosine}[kind]
    sigma = torch.logspace(-2, 2, 9, dtype=F64)
    torch.testing.assert_close(abar(sched.time(sigma)), 1 / (1 + sigma**2), rtol=1e-12, atol=0)
    # the range is that of [t_min, t_max]
    t_range = torch.tensor([sched.t_min, sched.t_max], dtype=F64)
    want = ((1 - abar(t_range)) / abar(t_range)).sqrt()
    assert (sched.sigma_min, sched.sigma_max) == pytest.approx(want.tolist(), rel=1e-12)
    # without the closed-form inverse, bisection finds the same times
    generic = ContinuousVPSchedule(abar, sched.t_min, sched.t_max)
    torch.testing.assert_close(generic.time(sigma), sched.time(sigma), rtol=1e-12, atol=1e-13)
    assert len(polynomial(10, sched.sigma_min, sched.sigma_max)) == 10


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_discrete_table_and_time(kind):
    sched = getattr(DiscreteVPSchedule, kind)()
    ab = _table(kind)
    torch.testing.assert_close(sched.alphas_cumprod, ab, rtol=1e-13, atol=0)
    sig = ((1 - ab) / ab).sqrt()
    assert (sched.sigma_min, sched.sigma_max) == pytest.approx([float(sig[0]), float(sig[-1])], rel=1e-12)
    if kind == "linear":  # abar_0 = 1 - beta_0
        assert sched.sigma_min == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-12)
    idx = torch.tensor([0, 1, 10, 250, 998, 999])
    assert torch.equal(sched.time(sched.sigmas[idx]), idx.to(F64))  # exactly on the table
    # between entries: linear in log sigma; outside the range: clamped
    mid = (sched.sigmas[10] * sched.sigmas[11]).sqrt()
    torch.testing.assert_close(sched.time(mid.reshape(1)), torch.tensor([10.5], dtype=F64))
    quarter = (0.75 * sched.log_sigmas[40] + 0.25 * sched.log_sigmas[41]).exp()
    torch.testing.assert_close(sched.time(quarter.reshape(1)), torch.tensor([40.25], dtype=F64))
    edges = torch.tensor([sched.sigma_min / 2, sched.sigma_max * 2], dtype=F64)
    assert sched.time(edges).tolist() == [0.0, 999.0]
    near = DiscreteVPSchedule(ab, quantize=True).time(torch.stack([quarter, mid * 1.0001]))
    assert near.dtype == torch.int64 and near.tolist() == [40, 11]
    steps = sched.timestep_sigmas(5)
    torch.testing.assert_close(steps, sig[[999, 749, 500, 250, 0]], rtol=1e-13, atol=0)  # round(749.25)=749
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVPSchedule(torch.tensor([0.9, 0.5, 0.0]))


# ------------------------------------------------------------------------------------------------ exact networks


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_continuous_adapter_of_the_optimal_network_is_the_gaussian_denoiser(kind, prediction):
    mean, cov = _gaussian(seed=1)
    abar = {"linear": _abar_linear, "cosine": _abar_cosine}[kind]
    den = VPDenoiser(OptimalVPNet(mean, cov, abar, prediction), getattr(ContinuousVPSchedule, kind)(), prediction)
    ref = GaussianDenoiser(mean, cov)
    g = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.01, 0.05, 0.3, 1.0, 3.0, 20.0, 100.0], dtype=F64)
    x = mean + sigma[:, None] * torch.randn(7, 6, generator=g, dtype=F64) + torch.randn(7, 6, generator=g, dtype=F64)
    torch.testing.assert_close(den(x, sigma), ref(x, sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(den(x, 0.7), ref(x, 0.7), rtol=1e-9, atol=1e-9)  # one sigma for the batch


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_discrete_adapter_of_the_optimal_network_on_table_sigmas(kind, prediction):
    mean, cov = _gaussian(seed=3)
    sched = getattr(DiscreteVPSchedule, kind)()
    net = OptimalVPNet(mean, cov, _table(kind), prediction)
    den, ref = VPDenoiser(net, sched, prediction), GaussianDenoiser(mean, cov)
    idx = torch.tensor([0, 3, 50, 400, 800, 990])
    sigma = sched.sigmas[idx]
    g = torch.Generator().manual_seed(4)
    x = mean + sigma[:, None] * torch.randn(6, 6, generator=g, dtype=F64)
    torch.testing.assert_close(den(x, sigma), ref(x, sigma), rtol=1e-9, atol=1e-9)
    assert torch.equal(net.calls[-1][1], idx.to(F64))  # the network saw exactly the table's timesteps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sampling_through_the_adapter_follows_the_exact_flow(prediction):
    mean, cov = _gaussian(seed=5)
    ref = GaussianDenoiser(mean, cov)
    g = torch.Generator().manual_seed(6)
    # continuous linear VP schedule, EDM's polynomial schedule over its sigma range
    sched = ContinuousVPSchedule.linear()
    den = VPDenoiser(OptimalVPNet(mean, cov, _abar_linear, prediction), sched, prediction)
    sigmas = polynomial(161, den.sigma_min, den.sigma_max)  # sigma from 152 to 0.0105
    x0 = torch.randn(8, 6, generator=g, dtype=F64) * sigmas[0]
    got = heun(den, x0, sigmas)
    torch.testing.assert_close(got, heun(ref, x0, sigmas), rtol=1e-8, atol=1e-8)
    exact = ref.exact(x0, sigmas[0], sigmas[-1])
    assert (got - exact).abs().max() < 4e-3  # Heun's O(h^2) error: 1.3e-3 here, 1.6e-2 with 40 steps
    # discrete cosine table, sampled on its own timesteps with quantized times
    table = DiscreteVPSchedule.cosine(quantize=True)
    den = VPDenoiser(OptimalVPNet(mean, cov, _table("cosine"), prediction), table, prediction)
    sigmas = table.timestep_sigmas(250)[5:]  # from sigma = 32 down to the table's smallest, 0.0064
    x0 = torch.randn(8, 6, generator=g, dtype=F64) * sigmas[0]
    got = ipndm(den, x0, sigmas)
    torch.testing.assert_close(got, ipndm(ref, x0, sigmas), rtol=1e-8, atol=1e-8)
    assert (got - ref.exact(x0, sigmas[0], sigmas[-1])).abs().max() < 5e-4


# ------------------------------------------------------------------------------------------------ diffusers


CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "prediction_type": "epsilon", "_class_name": "DDPMScheduler"}


class StandInUNet(nn.Module):
    """Mimics ``UNet2DModel.forward(sample, timestep, class_labels=None, return_dict=True)``."""

    def __init__(self, inner, variance_channels: bool = False):
        super().__init__()
        self.inner, self.variance_channels = inner, variance_channels

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        out = self.inner(sample, timestep, class_labels=class_labels)
        if self.variance_channels:
            out = torch.cat([out, torch.full_like(out, 7.0)], dim=1)
        return UNetOutput(out) if return_dict else (out,)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffusers_denoiser_of_a_stand_in_unet(prediction):
    mean, cov = _gaussian(shape=(1, 2, 3), seed=7)
    ref = GaussianDenoiser(mean, cov)
    unet = StandInUNet(OptimalVPNet(mean, cov, _table("linear"), prediction))
    den = diffusers_denoiser(unet, {**CONFIG, "prediction_type": prediction})
    sched = diffusers_schedule(CONFIG)
    sigma = sched.sigmas[torch.tensor([0, 99, 500, 999])]
    g = torch.Generator().manual_seed(8)
    x = mean + sigma.reshape(-1, 1, 1, 1) * torch.randn(4, 1, 2, 3, generator=g, dtype=F64)
    torch.testing.assert_close(den(x, sigma), ref(x, sigma), rtol=1e-9, atol=1e-9)
    # a scheduler object (anything with .config) and learned-variance outputs (twice the channels)
    scheduler = type("Scheduler", (), {"config": {**CONFIG, "prediction_type": prediction,
                                                  "variance_type": "learned_range"}})()
    wide = diffusers_denoiser(StandInUNet(unet.inner, variance_channels=True), scheduler)
    torch.testing.assert_close(wide(x, sigma), ref(x, sigma), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="learned variance"):
        diffusers_denoiser(StandInUNet(unet.inner, variance_channels=True), CONFIG)(x, sigma)


def test_diffusers_schedules_and_config_errors():
    n = 50
    scaled = diffusers_schedule({"num_train_timesteps": n, "beta_schedule": "scaled_linear",
                                 "beta_start": 0.00085, "beta_end": 0.012})
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (n - 1)) ** 2 for i in range(n)]
    torch.testing.assert_close(scaled.alphas_cumprod, torch.tensor(betas, dtype=F64).neg().add(1).cumprod(0))
    cos = diffusers_schedule({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    torch.testing.assert_close(cos.alphas_cumprod, _table("cosine"), rtol=1e-13, atol=0)
    trained = diffusers_schedule({"trained_betas": [0.1, 0.2, 0.3]})
    torch.testing.assert_close(trained.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=F64))
    with pytest.raises(SampleError, match="beta_schedule 'sigmoid'"):
        diffusers_schedule({"beta_schedule": "sigmoid"})
    with pytest.raises(SampleError, match="rescale_betas_zero_snr"):
        diffusers_schedule({**CONFIG, "rescale_betas_zero_snr": True})
    with pytest.raises(SampleError, match="prediction type 'flow'"):
        diffusers_denoiser(StandInUNet(lambda x, t, class_labels=None: x), {**CONFIG, "prediction_type": "flow"})


class TinyConvUNet(nn.Module):
    """A small randomly initialised conv net with UNet2DModel's call signature."""

    def __init__(self, channels: int = 1, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(2, width)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1).expand(sample.shape[0]) / 1000
        emb = self.time(torch.stack([torch.sin(3 * t), torch.cos(3 * t)], 1))[:, :, None, None]
        out = self.conv2(torch.tanh(self.conv1(sample) + emb))
        return UNetOutput(out) if return_dict else (out,)


def test_tiny_random_unet_sampled_end_to_end_equals_a_vp_ddim_loop():
    """Euler on the adapter (VE form) is DDIM in VP variables: x_prev = sqrt(abar') x0 + sqrt(1 - abar') eps."""
    torch.manual_seed(0)
    unet = TinyConvUNet().double()
    den = diffusers_denoiser(unet, CONFIG, quantize=True)
    sched = diffusers_schedule(CONFIG)
    sigmas = sched.timestep_sigmas(11)
    z = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        got = euler(den, z * sigmas[0], sigmas)
        ab = _table("linear")
        steps = torch.linspace(999, 0, 11, dtype=F64).round().long().tolist()
        x = z * sigmas[0] * ab[steps[0]].sqrt()  # the VP state at the first timestep
        for t, t_prev in zip(steps[:-1], steps[1:]):
            eps = unet(x, torch.tensor(t)).sample
            x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
            x = ab[t_prev].sqrt() * x0 + (1 - ab[t_prev]).sqrt() * eps
    torch.testing.assert_close(got * ab[0].sqrt(), x, rtol=1e-10, atol=1e-10)
    assert got.shape == z.shape and torch.isfinite(got).all() and got.std() > 0.1
    # float32 end to end as a user would run it, with interpolated (fractional) timesteps
    unet32 = TinyConvUNet()
    den32 = diffusers_denoiser(unet32, CONFIG)
    with torch.no_grad():
        out = ipndm(den32, z.float() * den32.sigma_max, polynomial(8, den32.sigma_min, den32.sigma_max))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.skipif(HAVE_DIFFUSERS, reason="diffusers is installed: the missing-package message cannot show")
def test_load_diffusers_without_the_package_names_the_extra(tmp_path):
    with pytest.raises(SampleError, match="not a saved diffusers pipeline"):
        load_diffusers(tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(MentorError, match=r"pip install 'mentor\[diffusers\]'"):
        load_diffusers(tmp_path)


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed (pip install 'mentor[diffusers]')")
def test_real_unet2dmodel_saved_and_sampled_offline(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "scheduler")
    den = load_diffusers(tmp_path)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 3.0])
    with torch.no_grad():
        t = den.schedule.time(sigma).float()
        eps = unet.eval()(x / (1 + sigma**2).sqrt().reshape(-1, 1, 1, 1), t).sample
        torch.testing.assert_close(den(x, sigma), x - sigma.reshape(-1, 1, 1, 1) * eps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(den(x, sigma), diffusers_denoiser(unet, scheduler)(x, sigma))
        out = ipndm(den, x * den.sigma_max, polynomial(6, den.sigma_min, den.sigma_max))
    assert out.shape == x.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ guidance


class CountingDenoiser:
    """A class-conditional denoiser with a closed form, recording each call's batch: Gaussian data with identity
    covariance and mean ``means[label]`` (label -1: zero mean, the unconditional one)."""

    def __init__(self, means):
        self.means = means
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma, class_labels):
        self.calls.append((x.shape[0], sigma.clone(), class_labels.clone()))
        s2 = sigma.reshape(-1, 1) ** 2
        table = torch.cat([torch.zeros(1, self.means.shape[1], dtype=F64), self.means])
        return (x + s2 * table[class_labels + 1]) / (1 + s2)


def test_cfg_scales_and_one_batched_call():
    g = torch.Generator().manual_seed(9)
    means = torch.randn(3, 4, generator=g, dtype=F64)
    base = CountingDenoiser(means)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 9.0], dtype=F64)
    labels = torch.tensor([0, 1, 2, 1, 0])
    cond = base(x, sigma, labels)
    uncond = base(x, sigma, torch.full((5,), -1))
    base.calls.clear()
    assert torch.equal(cfg_denoiser(base, 0.0, {"class_labels": labels}, {"class_labels": -1})(x, sigma), uncond)
    assert torch.equal(cfg_denoiser(base, 1.0, {"class_labels": labels}, {"class_labels": -1})(x, sigma), cond)
    guided = cfg_denoiser(base, 2.5, {"class_labels": labels}, {"class_labels": -1})(x, sigma)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=1e-14, atol=1e-14)
    # each evaluation is ONE call on the doubled batch: conditional half first, the sigmas repeated
    assert [c[0] for c in base.calls] == [10, 10, 10]
    assert torch.equal(base.calls[-1][1], torch.cat([sigma, sigma]))
    assert base.calls[-1][2].tolist() == labels.tolist() + [-1] * 5
    # a sampler's cond= reaches it at call time; a scalar sigma is broadcast
    wrapper = CFGDenoiser(base, 2.5, uncond={"class_labels": torch.tensor([-1])})
    torch.testing.assert_close(wrapper(x, sigma, class_labels=labels), guided, rtol=0, atol=0)
    torch.testing.assert_close(wrapper(x, 0.5, class_labels=labels),
                               cfg_denoiser(base, 2.5, {"class_labels": labels}, {"class_labels": -1})(
                                   x, torch.full((5,), 0.5, dtype=F64)))
    with pytest.raises(ValueError, match="only one branch"):
        CFGDenoiser(base, 2.0, uncond={})(x, sigma, class_labels=labels)
    with pytest.raises(ValueError, match="3 rows for a batch of 5"):
        CFGDenoiser(base, 2.0, uncond={"class_labels": torch.tensor([-1, -1, -1])})(x, sigma, class_labels=labels)


def test_cfg_on_a_conditional_edm_unet_equals_two_separate_calls():
    torch.manual_seed(0)
    net = EDMUNet(num_classes=4, in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_blocks=1,
                  attention=False, conditional=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    den = EDMPrecond(net).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=F64)
    sigma = torch.tensor([0.2, 1.0, 5.0], dtype=F64)
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        cond, uncond = den(x, sigma, class_labels=labels), den(x, sigma, class_labels=None)
        guided = cfg_denoiser(den, 3.0, {"class_labels": labels}, {"class_labels": -1})(x, sigma)
        zero = cfg_denoiser(den, 0.0, {"class_labels": labels}, {"class_labels": -1})(x, sigma)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(zero, uncond, rtol=1e-12, atol=1e-12)  # label -1 is "no label"


def test_guided_sampling_through_an_adapter_follows_the_guided_gaussian_flow():
    """With class means m_k and a shared covariance, D_u + w (D_c - D_u) is the denoiser of the Gaussian of mean
    (1 - w) m_u + w m_c: guided sampling through the VP adapter must follow that Gaussian's exact flow."""
    mean, cov = _gaussian(shape=(1, 2, 2), seed=10)
    means = torch.stack([mean + 1.0, mean - 2.0])
    unet = StandInUNet(OptimalVPNet(mean, cov, _table("linear"), "v_prediction", means=means))
    den = diffusers_denoiser(unet, {**CONFIG, "prediction_type": "v_prediction"})
    w, labels = 2.0, torch.tensor([0, 1, 1])
    guided = CFGDenoiser(den, w, uncond={"class_labels": -1})
    sigmas = diffusers_schedule(CONFIG).timestep_sigmas(200)  # on the table: the stand-in needs integer times
    x0 = sigmas[0] * torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    got = heun(guided, x0, sigmas, cond={"class_labels": labels})
    assert all(n == 6 for n in (len(c[0]) for c in unet.inner.calls))  # every evaluation batched
    for i, k in enumerate(labels.tolist()):
        target = GaussianDenoiser((1 - w) * mean + w * means[k], cov)
        exact = target.exact(x0[i:i + 1], sigmas[0], sigmas[-1])
        assert (got[i:i + 1] - exact).abs().max() < 2e-3, (i, (got[i:i + 1] - exact).abs().max())
        torch.testing.assert_close(got[i:i + 1], heun(target, x0[i:i + 1], sigmas), rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------------------------------------ mentor sample


def _edm_denoiser():
    torch.manual_seed(0)
    net = EDMUNet(num_classes=3, in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_blocks=1,
                  attention=False, conditional=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    info = {"image_shape": (1, 8, 8), "num_classes": 3, "conditional": True, "label_dropout": 0.1,
            "sigma_min": 0.002, "sigma_max": 80.0}
    return EDMPrecond(net).eval().requires_grad_(False), info


def test_sample_images_with_guidance():
    den, info = _edm_denoiser()
    kw = {"solver": "euler", "nfe": 4, "n": 6, "seed": 3, "class_label": 2}
    plain = sample_images(den, info, **kw)
    one = sample_images(den, info, guidance=1.0, **kw)
    two = sample_images(den, info, guidance=2.0, **kw)
    torch.testing.assert_close(one, plain, rtol=1e-4, atol=1e-4)  # scale 1 is the conditional model
    assert (two - plain).abs().max() > 1e-3
    # guided by hand: Euler with D_u + 2 (D_c - D_u), D_u the label -1 ("no label") model
    from mentor.diffusion.sample import initial_noise, steps_for_nfe
    from mentor.diffusion.schedules import polynomial as poly

    sigmas = poly(steps_for_nfe("euler", 4), 0.002, 80.0)
    x = initial_noise(6, (1, 8, 8), 3) * sigmas[0].float()
    for s, s_next in zip(sigmas[:-1].float(), sigmas[1:].float()):
        d_c = den(x, s, class_labels=torch.full((6,), 2))
        d_u = den(x, s, class_labels=torch.full((6,), -1))
        x = x + (s_next - s) * (x - (d_u + 2 * (d_c - d_u))) / s
    torch.testing.assert_close(two, x, rtol=1e-4, atol=1e-4)
    with pytest.raises(SampleError, match="--guidance needs --class-label"):
        sample_images(den, info, solver="euler", nfe=2, n=2, guidance=2.0)
    with pytest.raises(SampleError, match="label dropout"):
        sample_images(den, {**info, "label_dropout": 0.0}, solver="euler", nfe=2, n=2, class_label=1, guidance=2.0)
    with pytest.raises(SampleError, match="--predictor"):
        sample_images(den, info, n=2, class_label=1, guidance=2.0, predictor="amed.pt")


def test_mentor_sample_guidance_cli(tmp_path, capsys):
    """A tiny conditional run trained with label dropout, sampled with --guidance by the command line."""
    pytest.importorskip("sklearn")
    from pathlib import Path

    from mentor.config import load_config
    from mentor.engine import train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "diffusion" / "digits_edm.yaml"
    out = tmp_path / "run"
    cfg = load_config(recipe, [
        f"out_dir={out}", "data.name=digits", "data.val_size=64", "data.batch_size=32", "data.eval_batch_size=64",
        "data.augment=none", "trainer.progress=false", "trainer.threads=1", "model.name=edm_unet",
        "model.kwargs={channels: 8, channel_mult: [1, 2], num_blocks: 1, attention: false, conditional: true}",
        "method.conditional=true", "method.label_dropout=0.2", "method.eval_sigmas=2", "method.eval_images=32",
        "trainer.max_steps=4", "trainer.eval_every=4", "trainer.ckpt_every=4", "trainer.log_every=4",
        "schedule.warmup_steps=1"])
    train(cfg)
    png = tmp_path / "guided.png"
    assert main(["sample", str(out), "--solver", "euler", "--nfe", "3", "--n", "4", "--class-label", "7",
                 "--guidance", "3", "--out", str(png), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["guidance"] == 3.0 and result["nfe"] == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", str(out), "--guidance", "3", "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    assert "--guidance needs --class-label" in capsys.readouterr().err
