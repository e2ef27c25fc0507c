"""AMED: a small learned predictor of intermediate times for few-step diffusion sampling.

Implements "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps" (Zhou, Chen et al., CVPR 2024).
Each sampling interval ``[t_cur, t_next]`` gets a learned intermediate time
``t_mid = t_next**r * t_cur**(1 - r)`` (``r`` in (0, 1)) and, optionally, a direction scale ``c`` and a time
scale ``a`` in ``[1 - s, 1 + s]``, all predicted per sample by :class:`AMEDPredictor` from the two times and
a small feature of the current evaluation.

- :func:`amed_solver` (AMED-Solver): ``x_mid = x + (t_mid - t_cur) d(x, t_cur)``, then
  ``x_next = x + c (t_next - t_cur) d_mid`` with ``d_mid = (x_mid - D(x_mid, a t_mid)) / t_mid``: a
  learned-midpoint step that approximates the mean direction over the interval (2 NFE per interval).
- :func:`amed_plugin` (AMED-Plugin): the base solver (iPNDM, DPM-Solver++ or Euler) takes two sub-steps per
  interval, ``t_cur -> t_mid`` and ``t_mid -> t_next``; the second evaluates the denoiser at ``a t_mid`` and
  its increment is multiplied by ``c``. Both evaluations enter the multistep history. As in the reference
  implementation, iPNDM keeps its *fixed-step* Adams-Bashforth coefficients although the sub-steps are
  uneven; DPM-Solver++ uses its usual variable-step multistep formulas in ``lambda = -log sigma`` with
  ``c`` scaling the data-prediction term, and the "lower order final" rule over the ``2(N-1)`` sub-steps;
  its 3M form is the published one by default, as in the reference implementation.

NFE: ``2(N - 1)`` for ``N`` timestamps, minus one with AFS (the analytic first step replaces the first
evaluation by ``d = x / sqrt(1 + t_cur**2)``).

Predictor features. In the paper the feature is the U-Net bottleneck of the evaluation at ``x_i``, averaged
over channels to ``8 x 8`` and taken by a forward hook (zeros on an AFS step, where nothing is evaluated);
:class:`FeatureHook` does that for any ``nn.Module`` denoiser by module name. Closed-form denoisers have no
hidden layer, so :class:`InputFeature` (the default) uses ``x`` itself, scaled by
``1 / sqrt(sigma**2 + sigma_data**2)`` and average-pooled to 64 numbers (channel mean and 8 x 8 adaptive
pooling for images; 1-D adaptive pooling of the flattened sample otherwise).

Training (:func:`train_amed`): the teacher runs on ``(M + 1)(N - 1) + 1`` timestamps of the same schedule
and its trajectory is sliced every ``M + 1`` points; the student is stepped one interval at a time with an
optimizer step after each (squared error summed over elements, divided by the batch size). Single-step
students (AMED-Solver, the Euler plugin) restart each interval from the teacher's point (teacher forcing);
multistep students continue from their own (detached) output and history.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor.diffusion.samplers import AB_WEIGHTS, SAMPLERS, Trajectory, phi, third_order_weight
from mentor.diffusion.schedules import get_schedule

PLUGIN_BASES = ("ipndm", "dpm_solver_pp", "euler")

# --------------------------------------------------------------------------------------------------
# Features


class InputFeature:
    """Feature of the current sample for denoisers without hidden layers (closed-form oracles).

    ``x * c_in`` with ``c_in = 1 / sqrt(sigma**2 + sigma_data**2)`` (EDM's input scaling, so the feature
    stays O(1) at every noise level), pooled to ``size * size`` numbers: images ``(B, C, H, W)`` are
    averaged over channels and adaptively average-pooled to ``size x size``; anything else is flattened and
    adaptively pooled in 1-D (which repeats entries when the sample has fewer than ``size**2`` numbers).
    """

    def __init__(self, size: int = 8, sigma_data: float = 0.5):
        self.size = size
        self.sigma_data = sigma_data

    @property
    def dim(self) -> int:
        return self.size * self.size

    def clear(self) -> None:
        """Nothing is cached (present for the feature-source interface)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        scaled = x / torch.sqrt(torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2 + self.sigma_data**2)
        return _pool(scaled, self.size)

    def describe(self) -> dict[str, Any]:
        return {"kind": "input", "size": self.size, "sigma_data": self.sigma_data}


class FeatureHook:
    """The output of one named sub-module of a denoiser network, channel-averaged and pooled.

    Registers a forward hook on ``dict(net.named_modules())[name]`` (e.g. the 8x8 bottleneck block of an
    EDM U-Net); after each denoiser call, ``hook(x, sigma)`` returns the (detached) output of the last call,
    averaged over channels and pooled to ``size * size`` numbers as :class:`InputFeature` does. Before a
    step the sampler calls :meth:`clear`; if no evaluation happened since (an AFS step), zeros are
    returned, as in the paper. Call :meth:`remove` (or use it as a context manager) when done.
    """

    def __init__(self, net: nn.Module, name: str, size: int = 8):
        modules = dict(net.named_modules())
        if name not in modules:
            known = [n for n in modules if n][:20]
            raise KeyError(f"FeatureHook: {type(net).__name__} has no sub-module {name!r}; some names: {known}")
        self.name = name
        self.size = size
        self.output: Tensor | None = None
        self._handle = modules[name].register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        self.output = (output[0] if isinstance(output, (tuple, list)) else output).detach()

    @property
    def dim(self) -> int:
        return self.size * self.size

    def clear(self) -> None:
        self.output = None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.output is None:
            return x.new_zeros(x.shape[0], self.dim)
        return _pool(self.output.to(x.dtype), self.size)

    def remove(self) -> None:
        self._handle.remove()
        self.output = None

    def __enter__(self) -> FeatureHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def describe(self) -> dict[str, Any]:
        return {"kind": "hook", "module": self.name, "size": self.size}


def _pool(t: Tensor, size: int) -> Tensor:
    if t.ndim == 4:
        return F.adaptive_avg_pool2d(t.mean(dim=1, keepdim=True), size).flatten(1)
    flat = t.reshape(t.shape[0], 1, -1)
    return F.adaptive_avg_pool1d(flat, size * size).flatten(1)


def feature_from_config(desc: dict[str, Any] | None, denoiser: Any = None) -> InputFeature | FeatureHook:
    """Rebuild the feature source a predictor was trained with from its description."""
    desc = desc or {"kind": "input"}
    if desc["kind"] == "input":
        return InputFeature(desc.get("size", 8), desc.get("sigma_data", 0.5))
    if desc["kind"] == "hook":
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"the predictor reads module {desc['module']!r} of the denoiser; pass an nn.Module")
        return FeatureHook(denoiser, desc["module"], desc.get("size", 8))
    raise ValueError(f"unknown AMED feature kind {desc['kind']!r}")


# --------------------------------------------------------------------------------------------------
# Predictor


def positional_embedding(t: Tensor, channels: int = 8, max_positions: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` (any shape -> ``(numel, channels)``), sine half first.

    Frequencies ``(1 / max_positions) ** (k / (channels/2 - 1))`` for ``k = 0 .. channels/2 - 1`` (the
    "endpoint" spacing, so the lowest frequency is exactly ``1 / max_positions``).
    """
    half = channels // 2
    k = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = (1.0 / max_positions) ** (k / max(half - 1, 1))
    arg = t.reshape(-1, 1) * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=1)


# The functional form keeps the field types as objects (this module's annotations are strings), so
# documentation tools resolve them.
AMEDOutput = NamedTuple("AMEDOutput", [("r", Tensor), ("scale_dir", Tensor), ("scale_time", Tensor)])  # noqa: UP014
AMEDOutput.__doc__ = "Per-sample predictions, each of shape ``(B,)``: ``r`` in (0, 1) and the two scales (1 when off)."


class AMEDPredictor(nn.Module):
    """The AMED predictor: times and a pooled feature -> ``r`` (and optional scales), about 9 k parameters.

    Both times are embedded (:func:`positional_embedding`, 8 channels) and passed through one shared
    ``Linear(8, 8)`` + SiLU; the feature (``feature_dim`` numbers, 64 = 8 x 8 by default) goes through
    ``Linear(feature_dim, hidden)`` + SiLU + ``Linear(hidden, 4)``; the concatenation (20 numbers) feeds
    ``fc_r`` (sigmoid -> ``r``) and, when ``scale_dir > 0`` / ``scale_time > 0``, heads mapped to
    ``[1 - s, 1 + s]`` by ``sigmoid * 2s + 1 - s``. Defaults follow the paper (scale_dir 0.01, no time
    scale). Linear weights are normal with std ``1/sqrt(fan_in)``, the shared time layer Xavier-uniform, biases zero.
    """

    def __init__(self, feature_dim: int = 64, hidden: int = 128, bottleneck: int = 4, embed_dim: int = 8,
                 scale_dir: float = 0.01, scale_time: float = 0.0):
        super().__init__()
        self.feature_dim, self.hidden, self.bottleneck, self.embed_dim = feature_dim, hidden, bottleneck, embed_dim
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        self.map_time = nn.Linear(embed_dim, embed_dim)
        self.enc0 = nn.Linear(feature_dim, hidden)
        self.enc1 = nn.Linear(hidden, bottleneck)
        width = 2 * embed_dim + bottleneck
        self.fc_r = nn.Linear(width, 1)
        self.fc_scale_dir = nn.Linear(width, 1) if self.scale_dir > 0 else None
        self.fc_scale_time = nn.Linear(width, 1) if self.scale_time > 0 else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if m is self.map_time:
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values), stored with the weights."""
        return dict(feature_dim=self.feature_dim, hidden=self.hidden, bottleneck=self.bottleneck,
                    embed_dim=self.embed_dim, scale_dir=self.scale_dir, scale_time=self.scale_time)

    def _embed(self, t: Tensor, batch: int) -> Tensor:
        e = positional_embedding(t.reshape(-1).to(self.fc_r.weight.dtype), self.embed_dim)
        e = F.silu(self.map_time(e))
        return e.expand(batch, -1) if e.shape[0] == 1 else e

    def forward(self, feature: Tensor, t_cur: Tensor | float, t_next: Tensor | float) -> AMEDOutput:
        dtype = self.fc_r.weight.dtype
        feature = feature.to(dtype).reshape(feature.shape[0], -1)
        b = feature.shape[0]
        t_cur = torch.as_tensor(t_cur, dtype=dtype, device=feature.device)
        t_next = torch.as_tensor(t_next, dtype=dtype, device=feature.device)
        h = self.enc1(F.silu(self.enc0(feature)))
        z = torch.cat([h, self._embed(t_cur, b), self._embed(t_next, b)], dim=1)
        r = torch.sigmoid(self.fc_r(z)).squeeze(1)
        one = torch.ones_like(r)
        c = one if self.fc_scale_dir is None else self._scaled(self.fc_scale_dir(z), self.scale_dir)
        a = one if self.fc_scale_time is None else self._scaled(self.fc_scale_time(z), self.scale_time)
        return AMEDOutput(r, c, a)

    @staticmethod
    def _scaled(logit: Tensor, s: float) -> Tensor:
        return (torch.sigmoid(logit) * (2 * s) + (1 - s)).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Stepping


def _bc(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample ``(B,)`` (or scalar) -> broadcastable against ``x``."""
    v = v.to(x.dtype)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim > 0 else v


def _threshold(x0: Tensor, quantile: float = 0.995) -> Tensor:
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), quantile, dim=1).clamp_min(1.0)
    s = _bc(s, x0)
    return x0.clamp(-s, s) / s


def _dpmpp_update(x: Tensor, dens: list[Tensor], ts: list[Tensor], t: Tensor, order: int,
                  scale: Tensor | float = 1.0, w3: float = 1.0) -> Tensor:
    """Multistep DPM-Solver++ (data prediction) from ``ts[-1]`` to ``t`` on per-sample sigmas.

    ``x_t = (t / s) x + scale * [h phi_1(-h) D_0 + h phi_2(-h) D1 + w3 h phi_3(-h) D2]`` with the divided
    differences of :func:`mentor.diffusion.samplers.dpm_solver_pp`; ``w3`` is 1 for the published 3M form,
    2 for the Taylor weight (:data:`mentor.diffusion.samplers.THIRD_ORDER_WEIGHTS`); ``scale`` is AMED's
    direction scale.
    """
    lam = [-torch.log(_bc(s, x)) for s in ts]
    t_b = _bc(t, x)
    h = -torch.log(t_b) - lam[-1]
    inc = -torch.expm1(-h) * dens[-1]
    if order == 2:
        r0 = (lam[-1] - lam[-2]) / h
        inc = inc - torch.expm1(-h) * (dens[-1] - dens[-2]) / (2 * r0)
    elif order >= 3:
        r0, r1 = (lam[-1] - lam[-2]) / h, (lam[-2] - lam[-3]) / h
        d10, d11 = (dens[-1] - dens[-2]) / r0, (dens[-2] - dens[-3]) / r1
        d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
        d2 = (d10 - d11) / (r0 + r1)
        inc = inc + h * phi(2, -h) * d1 + w3 * h * phi(3, -h) * d2
    return (t_b / _bc(ts[-1], x)) * x + (_bc(scale, x) if isinstance(scale, Tensor) else scale) * inc


class _AMEDStepper:
    """One interval of AMED-Solver or AMED-Plugin at a time, carrying the multistep history."""

    def __init__(self, denoiser: Callable, predictor: AMEDPredictor, num_intervals: int, *, kind: str,
                 max_order: int, afs: bool, feature: InputFeature | FeatureHook, cond: dict | None,
                 thresholding: bool = False, lower_order_final: bool = True, third_order: str = "published"):
        if kind not in ("solver", *PLUGIN_BASES):
            raise ValueError(f"AMED kind must be 'solver' or one of {PLUGIN_BASES}, got {kind!r}")
        self.denoiser, self.predictor, self.kind = denoiser, predictor, kind
        self.num_intervals, self.afs, self.feature, self.cond = num_intervals, afs, feature, cond or {}
        self.max_order = 1 if kind == "euler" else max_order
        self.thresholding, self.lower_order_final = thresholding, lower_order_final
        self.w3 = third_order_weight(third_order, "amed_plugin")
        self.history: list[Tensor] = []  # directions (iPNDM/Euler) or denoised outputs (DPM-Solver++)
        self.times: list[Tensor] = []  # DPM-Solver++ only
        self.substeps = 0
        self.nfe = 0
        self.last: AMEDOutput | None = None

    @property
    def single_step(self) -> bool:
        return self.kind in ("solver", "euler")

    def _D(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, **self.cond)

    def detach(self) -> None:
        self.history = [h.detach() for h in self.history]
        self.times = [t.detach() for t in self.times]

    def _ab(self, d: Tensor) -> Tensor:
        coeffs = AB_WEIGHTS[min(self.max_order, len(self.history) + 1)]
        inc = coeffs[0] * d
        for c, old in zip(coeffs[1:], reversed(self.history)):
            inc = inc + c * old
        return inc

    def _push(self, v: Tensor, t: Tensor | None = None) -> None:
        self.history.append(v)
        if t is not None:
            self.times.append(t)
        keep = max(self.max_order - 1, 1) if self.kind != "dpm_solver_pp" else self.max_order
        del self.history[:-keep]
        del self.times[:-keep]

    def _order(self) -> int:
        """DPM-Solver++ order for the current sub-step (1-based count ``substeps`` of ``2(N-1)``)."""
        step, total = self.substeps, 2 * self.num_intervals + 1
        if not self.lower_order_final:
            return min(self.max_order, step)
        return step if step < self.max_order else min(self.max_order, total - step)

    def step(self, x: Tensor, i: int, t_cur: Tensor, t_next: Tensor) -> Tensor:
        """Advance ``x`` from ``t_cur`` to ``t_next`` (interval index ``i``)."""
        use_afs = self.afs and i == 0
        self.feature.clear()
        if use_afs:
            d_cur = x / torch.sqrt(1 + t_cur**2)
            den = x - t_cur * d_cur
        else:
            den = self._D(x, t_cur)
            d_cur = (x - den) / t_cur
        out = self.predictor(self.feature(x, t_cur), t_cur, t_next)
        self.last = out
        r, c, a = _bc(out.r, x), _bc(out.scale_dir, x), out.scale_time.to(x.dtype)
        t_mid = t_next ** r * t_cur ** (1 - r)  # broadcast shape (B, 1, ...)
        t_mid_s = t_mid.reshape(-1)  # per-sample sigma for the denoiser
        if self.kind == "solver":
            x_mid = x + (t_mid - t_cur) * d_cur
            d_mid = (x_mid - self._D(x_mid, a * t_mid_s)) / t_mid
            return x + c * (t_next - t_cur) * d_mid
        if self.kind in ("ipndm", "euler"):
            x_mid = x + (t_mid - t_cur) * self._ab(d_cur)
            self._push(d_cur)
            d_mid = (x_mid - self._D(x_mid, a * t_mid_s)) / t_mid
            x_next = x_mid + c * (t_next - t_mid) * self._ab(d_mid)
            self._push(d_mid)
            return x_next
        # DPM-Solver++ plugin
        if self.thresholding:
            den = _threshold(den)
        batch_t = t_cur.expand(x.shape[0]) if t_cur.ndim == 0 else t_cur
        self._push(den, batch_t)
        self.substeps += 1
        x_mid = _dpmpp_update(x, self.history, self.times, t_mid_s, self._order(), w3=self.w3)
        den_mid = self._D(x_mid, a * t_mid_s)
        if self.thresholding:
            den_mid = _threshold(den_mid)
        self._push(den_mid, t_mid_s)
        self.substeps += 1
        return _dpmpp_update(x_mid, self.history, self.times, t_next, self._order(), scale=out.scale_dir,
                             w3=self.w3)


def _run(stepper: _AMEDStepper, x: Tensor, sigmas: Tensor, return_trajectory: bool) -> Tensor | Trajectory:
    sig = sigmas.to(dtype=x.dtype, device=x.device)
    points = [x]
    for i in range(len(sig) - 1):
        x = stepper.step(x, i, sig[i], sig[i + 1])
        if return_trajectory:
            points.append(x)
    if return_trajectory:
        return Trajectory(x=x, points=torch.stack(points), nfe=stepper.nfe)
    return x


def amed_solver(denoiser: Callable, x: Tensor, sigmas: Tensor, predictor: AMEDPredictor, *, afs: bool = False,
                feature: InputFeature | FeatureHook | None = None, cond: dict | None = None,
                return_trajectory: bool = False) -> Tensor | Trajectory:
    """AMED-Solver from ``x`` (already scaled by ``sigmas[0]``) over ``sigmas``; 2 NFE per interval.

    ``feature`` is the predictor's feature source (default :class:`InputFeature`); ``cond`` goes to the
    denoiser. Returns the final sample, or a :class:`Trajectory` with ``return_trajectory=True``.
    """
    stepper = _AMEDStepper(denoiser, predictor, len(sigmas) - 1, kind="solver", max_order=1, afs=afs,
                           feature=feature or InputFeature(), cond=cond)
    return _run(stepper, x, sigmas, return_trajectory)


def amed_plugin(denoiser: Callable, x: Tensor, sigmas: Tensor, predictor: AMEDPredictor, *, base: str = "ipndm",
                max_order: int | None = None, afs: bool = False, feature: InputFeature | FeatureHook | None = None,
                cond: dict | None = None, thresholding: bool = False, lower_order_final: bool = True,
                third_order: str = "published", return_trajectory: bool = False) -> Tensor | Trajectory:
    """AMED-Plugin on ``base`` (``"ipndm"``, ``"dpm_solver_pp"`` or ``"euler"``); 2 NFE per interval.

    ``max_order`` defaults to 4 for iPNDM and 3 for DPM-Solver++; ``thresholding`` (dynamic thresholding of
    the denoised outputs), ``lower_order_final`` and ``third_order`` (the 3M form, ``"published"`` or
    ``"taylor"``, as in :func:`~mentor.diffusion.samplers.dpm_solver_pp`) apply to DPM-Solver++ only.
    """
    if base not in PLUGIN_BASES:
        raise ValueError(f"AMED-Plugin base must be one of {PLUGIN_BASES}, got {base!r}")
    order = max_order or (3 if base == "dpm_solver_pp" else 4)
    stepper = _AMEDStepper(denoiser, predictor, len(sigmas) - 1, kind=base, max_order=order, afs=afs,
                           feature=feature or InputFeature(), cond=cond, thresholding=thresholding,
                           lower_order_final=lower_order_final, third_order=third_order)
    return _run(stepper, x, sigmas, return_trajectory)


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class AMEDTrainResult:
    """Losses per iteration (summed over the intervals) and the sampling configuration to store."""

    losses: list[float]
    config: dict[str, Any] = field(default_factory=dict)


def draw_noise(noise: Callable[..., Tensor] | Sequence[int] | Tensor, batch: int, generator: torch.Generator | None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Unscaled Gaussian latents: ``noise(batch, generator)``, a per-sample shape, or a fixed tensor."""
    if isinstance(noise, Tensor):
        return noise
    if callable(noise):
        return noise(batch, generator)
    return torch.randn((batch, *tuple(int(s) for s in noise)), generator=generator, dtype=dtype, device=device)


def sampling_config(*, solver: str, num_steps: int, schedule: str, schedule_kw: dict | None, afs: bool,
                    **extra: Any) -> dict[str, Any]:
    """The plain-dict sampling configuration stored beside trained weights (AMED and SFD)."""
    return dict(solver=solver, num_steps=int(num_steps), schedule=schedule, schedule_kw=dict(schedule_kw or {}),
                afs=bool(afs), **extra)


def train_amed(
    denoiser: Callable,
    predictor: AMEDPredictor,
    noise: Callable[..., Tensor] | Sequence[int],
    *,
    num_steps: int = 4,
    M: int = 1,
    solver: str = "amed",
    max_order: int | None = None,
    teacher: str = "heun",
    teacher_opts: dict | None = None,
    schedule: str = "time_uniform",
    schedule_kw: dict | None = None,
    afs: bool = True,
    iterations: int = 100,
    batch: int = 64,
    lr: float = 5e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    feature: InputFeature | FeatureHook | None = None,
    cond: Callable[[int, torch.Generator | None], dict] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> AMEDTrainResult:
    """Train ``predictor`` in place for AMED-Solver (``solver="amed"``) or AMED-Plugin (``solver`` = base).

    ``noise`` gives unscaled latents: a callable ``(batch, generator) -> Tensor`` or a per-sample shape
    (drawn in ``dtype`` on ``device``). Each iteration draws a batch, runs ``teacher`` (no AFS) on
    ``(M+1)(num_steps-1)+1`` timestamps of ``schedule`` and trains interval by interval with Adam
    (``lr`` 5e-3, the paper's). ``cond(batch, generator)`` may return denoiser conditioning (e.g. labels).
    Defaults are the paper's AMED-Solver setting (N = 4, M = 1, Heun teacher, time-uniform schedule, AFS:
    NFE 5). Returns the per-iteration losses and the sampling config for :func:`save_predictor`.
    """
    kind = "solver" if solver == "amed" else solver
    if kind != "solver" and kind not in PLUGIN_BASES:
        raise ValueError(f"solver must be 'amed' or one of {PLUGIN_BASES}, got {solver!r}")
    order = max_order or (3 if kind == "dpm_solver_pp" else 4)
    schedule_kw = dict(schedule_kw or {})
    student_sigmas = get_schedule(schedule, num_steps, **schedule_kw)
    teacher_sigmas = get_schedule(schedule, (M + 1) * (num_steps - 1) + 1, **schedule_kw)
    feature = feature or InputFeature()
    params = [p for p in predictor.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8)
    predictor.train()
    losses: list[float] = []
    for it in range(iterations):
        z = draw_noise(noise, batch, generator, dtype, device)
        c = cond(z.shape[0], generator) if cond is not None else {}
        x0 = z * teacher_sigmas[0].to(z)
        with torch.no_grad():
            traj = SAMPLERS[teacher](denoiser, x0, teacher_sigmas, afs=False, return_trajectory=True, cond=c,
                                     **(teacher_opts or {}))
        targets = traj.points[:: M + 1]
        sig = student_sigmas.to(z)
        stepper = _AMEDStepper(denoiser, predictor, num_steps - 1, kind=kind, max_order=order, afs=afs,
                               feature=feature, cond=c)
        x, total = targets[0], 0.0
        for i in range(num_steps - 1):
            out = stepper.step(x, i, sig[i], sig[i + 1])
            loss = (out - targets[i + 1]).square().sum() / z.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
            opt.step()
            stepper.detach()
            total += float(loss.detach())
            x = targets[i + 1] if stepper.single_step else out.detach()
        losses.append(total)
        if callback is not None:
            callback(it, total)
    predictor.eval()
    config = sampling_config(
        solver="amed_solver" if kind == "solver" else "amed_plugin", num_steps=num_steps, schedule=schedule,
        schedule_kw=schedule_kw, afs=afs, base=None if kind == "solver" else kind, M=M, teacher=teacher,
        max_order=None if kind == "solver" else order, scale_dir=predictor.scale_dir,
        scale_time=predictor.scale_time, feature=feature.describe())
    return AMEDTrainResult(losses=losses, config=config)


def amed_sample(denoiser: Callable, noise: Tensor, predictor: AMEDPredictor, config: dict[str, Any], *,
                feature: InputFeature | FeatureHook | None = None, cond: dict | None = None,
                return_trajectory: bool = False) -> Tensor | Trajectory:
    """Sample with a trained predictor and its stored ``config`` from unscaled latents ``noise``."""
    sigmas = get_schedule(config["schedule"], config["num_steps"], **config.get("schedule_kw", {}))
    x = noise * sigmas[0].to(noise)
    own = feature is None
    feature = feature or feature_from_config(config.get("feature"), denoiser)
    try:
        with torch.no_grad():
            if config["solver"] == "amed_solver":
                return amed_solver(denoiser, x, sigmas, predictor, afs=config["afs"], feature=feature, cond=cond,
                                   return_trajectory=return_trajectory)
            return amed_plugin(denoiser, x, sigmas, predictor, base=config["base"], max_order=config.get("max_order"),
                               afs=config["afs"], feature=feature, cond=cond, return_trajectory=return_trajectory)
    finally:
        if own and isinstance(feature, FeatureHook):
            feature.remove()


# --------------------------------------------------------------------------------------------------
# Artifacts


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (nothing half-written is left)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_predictor(path: str | os.PathLike, predictor: AMEDPredictor, sampling_config: dict[str, Any]) -> None:
    """Write a self-describing predictor file: weights, constructor arguments and the sampling config.

    Only plain dicts, lists, numbers, strings and tensors are stored, so ``torch.load(weights_only=True)``
    reads it.
    """
    state = {k: v.detach().cpu() for k, v in predictor.state_dict().items()}
    atomic_save({"format": "mentor.amed/1", "predictor": predictor.config(), "state_dict": state,
                 "sampling": dict(sampling_config)}, path)


def load_predictor(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                   ) -> tuple[AMEDPredictor, dict[str, Any]]:
    """Read a file written by :func:`save_predictor`; returns ``(predictor, sampling_config)``."""
    blob = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "mentor.amed/1":
        raise ValueError(f"{path}: not an AMED predictor file (expected format 'mentor.amed/1')")
    predictor = AMEDPredictor(**blob["predictor"])
    dtype = next(iter(blob["state_dict"].values())).dtype
    predictor.to(dtype).load_state_dict(blob["state_dict"])
    predictor.eval()
    return predictor, blob["sampling"]
