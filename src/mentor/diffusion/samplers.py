"""Probability-flow ODE solvers and stochastic samplers for denoisers in the EDM / VE form.

Every sampler is a pure function ``name(denoiser, x, sigmas, *, afs=False, return_trajectory=False,
cond=None, callback=None, **opts)``. ``x`` is the starting point already scaled (``noise * sigmas[0]``); ``sigmas`` are
``N`` positive decreasing noise levels (``(N,)``, or ``(N, B)`` for one schedule per sample), giving
``N - 1`` steps; the result is the sample at ``sigmas[-1]``, or a :class:`Trajectory`. The ODE is
``dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma`` (Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", 2022). Computation runs in ``x``'s dtype; ``sigmas`` are cast to it.

``afs=True`` replaces the first denoiser call by the analytic first step ``d = x / sqrt(1 + sigma_0^2)``
(the direction for unit-variance data at large sigma; Zhou et al., "Fast ODE-based Sampling for Diffusion
Models in Around 5 Steps", 2024), saving one evaluation; the data-prediction solvers use the implied
``D = x - sigma_0 d``. :func:`nfe` gives the number of denoiser calls without running anything.

Single-step: :func:`euler` (DDIM), :func:`heun` (EDM's second-order Heun, on every step), :func:`dpm_solver_2`.
Multistep (one call per step, a bounded history): :func:`ipndm`, :func:`ipndm_v`, :func:`deis`,
:func:`dpm_solver_pp`, :func:`unipc`. Stochastic (:data:`STOCHASTIC`; noise from ``generator=`` or
``noise_sampler=``, so a seed fixes the sample): :func:`euler_ancestral`, :func:`edm_stochastic` (EDM's churn),
:func:`dpm_solver_pp_2m_sde`.

``callback`` is called once per step with k-diffusion's dict (:data:`Callback`). The trajectory record (points and
directions) is kept only with ``return_trajectory=True``: without it no direction is computed that the update
does not need.

Per-step intermediate points (AMED, :mod:`mentor.diffusion.amed`): :func:`euler`, :func:`ipndm`,
:func:`dpm_solver_pp` and :func:`dpm_solver_2` take ``intermediate=``, a function called at the start of every step
that returns an :class:`Intermediate` (where the step puts an extra evaluation and how it scales it); the
multistep :func:`ipndm` and :func:`dpm_solver_pp` also take ``history=`` (a :class:`History`), so that a run can be
taken one step per call with its multistep history carried from call to call.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .schedules import vp_constants, vp_time


@dataclass
class Trajectory:
    """A sampler run: the final ``x``, the ``N`` ``points`` ``(N, B, ...)`` including the start, the number of
    denoiser calls ``nfe``, and ``directions`` ``(N - 1, B, ...)``: the direction ``(x_i - D_i) / sigma_i`` each
    step started from (analytic with AFS; for UniPC ``D_i`` is the output at the predictor's point that the
    solver reuses, so it is not re-evaluated at the corrected point)."""

    x: Tensor
    points: Tensor
    nfe: int
    directions: Tensor | None = None


# --------------------------------------------------------------------------------------------------------------
# shared machinery


#: A per-step callback receives one dict (k-diffusion's convention): ``i`` (the step), ``x`` (the point the step
#: starts from, after any added noise), ``sigma`` and ``sigma_next`` (the step's noise levels), ``sigma_hat`` (the
#: level ``x`` is at: ``sigma`` except after EDM's churn) and ``denoised`` (the denoiser output the step starts
#: from). Levels are 0-dim tensors for one schedule, ``(B,)`` for one schedule per sample.
Callback = Callable[[dict], None]

#: A noise source for the stochastic samplers: ``noise_sampler(sigma, sigma_next) -> Tensor`` shaped like ``x``
#: (k-diffusion's convention; levels as in :data:`Callback`).
NoiseSampler = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Intermediate:
    """Where a step ``sigma_i -> sigma_{i+1}`` puts an extra evaluation, and how it uses it (AMED's per-step data).

    The step becomes two sub-steps of its solver, ``sigma_i -> sigma`` and ``sigma -> sigma_{i+1}``; the denoiser
    is evaluated at ``x_mid`` for the level ``scale_time * sigma`` (the direction still divides by ``sigma``), and
    the increment of the second sub-step is multiplied by ``scale_dir``. ``sigma`` is 0-d or one level per sample
    ``(B,)``, between the step's levels; the scales are numbers, 0-d or ``(B,)``.
    """

    sigma: Tensor
    scale_dir: Tensor | float = 1.0
    scale_time: Tensor | float = 1.0


#: ``intermediate(info) -> Intermediate``, called at the start of every step, after the step's first evaluation,
#: with ``info`` holding ``i``, ``x``, ``sigma`` and ``sigma_next`` as a :data:`Callback` receives them.
IntermediateFn = Callable[[dict], Intermediate]


@dataclass
class History:
    """The multistep history :func:`ipndm` and :func:`dpm_solver_pp` carry from one call to the next, so that a run
    can be taken one step per call (AMED's training steps its student one interval at a time, with an optimizer
    step in between). A call starts from it and leaves its own history in it.

    ``values``: the directions (iPNDM) or denoiser outputs (DPM-Solver++) of the latest (sub-)steps, newest first;
    ``lams``: their ``-log sigma`` (DPM-Solver++ only), shaped ``(1 or B, 1, ..., 1)``; ``done``: the (sub-)steps
    taken before the call; ``total``: the run's number of (sub-)steps, for DPM-Solver++'s lower-order-final rule
    (``None``: the call ends the run). With ``intermediate`` every step counts two sub-steps.
    """

    values: list[Tensor] = field(default_factory=list)
    lams: list[Tensor] = field(default_factory=list)
    done: int = 0
    total: int | None = None


class _Mid:
    """An :class:`Intermediate` as the solvers use it: ``sigma`` and the evaluation level ``at`` shaped
    ``(1 or B, 1, ..., 1)``, and ``scale`` (the direction scale, the same shape, or a number)."""

    def __init__(self, mid: Intermediate, x: Tensor):
        shape = (-1, *([1] * (x.ndim - 1)))

        def view(v: Tensor | float) -> Tensor:
            return torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(shape)

        self.sigma = view(mid.sigma)
        self.at = view(mid.scale_time) * self.sigma
        self.scale = view(mid.scale_dir)


class _Run:
    """One sampler call: the sigmas in ``x``'s dtype, the counted denoiser, the AFS rule, the recording (kept only
    when a trajectory is asked for) and the per-step callback."""

    def __init__(self, denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *,
                 afs: bool, record: bool, cond: dict | None, thresholding: bool = False,
                 threshold_ratio: float = 0.995, threshold_max: float = 1.0, callback: Callback | None = None):
        if isinstance(sigmas, Tensor):
            s = sigmas.to(device=x.device, dtype=x.dtype)
            positive = bool((s > 0).all())
        else:  # a python list: no detour through float32, and checked on the host (no device read)
            s = torch.tensor(sigmas, device=x.device, dtype=x.dtype)
            positive = _all_positive(sigmas)
        self.batch = x.shape[0]
        if s.ndim == 1:
            s = s[:, None]  # one schedule for the batch: coefficients are computed once, then broadcast
        if s.ndim != 2 or s.shape[1] not in (1, self.batch) or s.shape[0] < 2:
            raise ValueError(f"sigmas must be (N,) or (N, {self.batch}) with N >= 2, got shape {tuple(s.shape)}")
        if not positive:
            raise ValueError("sigmas must be positive (the last one is sigma_min > 0; no final 0 is appended)")
        self.flat = s  # (N, 1) or (N, B)
        self.sig = s.reshape(*s.shape, *([1] * (x.ndim - 1)))  # (N, 1 or B, 1, ..., 1)
        self.steps = s.shape[0] - 1
        self.denoiser, self.cond, self.afs = denoiser, dict(cond or {}), afs
        self.thresholding, self.ratio, self.max_value = thresholding, threshold_ratio, threshold_max
        self.callback = callback
        self.calls = 0
        self.points: list[Tensor] | None = [x] if record else None
        self.dirs: list[Tensor] | None = [] if record else None

    def view(self, c: Tensor) -> Tensor:
        """A coefficient of shape ``(1,)`` or ``(B,)`` (like a row of ``flat``) as ``(1 or B, 1, ..., 1)``."""
        return c.reshape(self.sig.shape[1:])

    def level(self, s: Tensor) -> Tensor:
        """A noise level ``(1 or B, 1, ..., 1)`` as given to callbacks and noise samplers: 0-dim or ``(B,)``."""
        flat = s.reshape(-1)
        return flat[0] if flat.numel() == 1 else flat

    def model(self, x: Tensor, s: Tensor) -> Tensor:
        """``D(x, s)`` for ``s`` of shape ``(1 or B, 1, ..., 1)``, counted, thresholded when asked."""
        self.calls += 1
        out = self.denoiser(x, s.reshape(-1).expand(self.batch), **self.cond).to(x.dtype)
        return _threshold(out, self.ratio, self.max_value) if self.thresholding else out

    def direction(self, x: Tensor, s: Tensor) -> Tensor:
        return (x - self.model(x, s)) / s

    def notify(self, i: int, x: Tensor, denoised: Tensor | Callable[[], Tensor], sigma_hat: Tensor | None = None
               ) -> None:
        """Call the callback for step ``i`` (``denoised`` may be a function, evaluated only for a callback)."""
        if self.callback is None:
            return
        den = denoised() if callable(denoised) else denoised
        s = self.sig[i]
        self.callback({"i": i, "x": x, "sigma": self.level(s), "sigma_next": self.level(self.sig[i + 1]),
                       "sigma_hat": self.level(s if sigma_hat is None else sigma_hat), "denoised": den})

    def start_direction(self, x: Tensor, i: int, s: Tensor | None = None) -> Tensor:
        """The direction at the start of step ``i`` from ``x`` at level ``s`` (default ``sigma_i``; analytic for
        step 0 with AFS), recorded and reported to the callback."""
        s_hat = s
        s = self.sig[i] if s is None else s
        if self.afs and i == 0:
            d = x / (1 + s * s).sqrt()
            self.notify(i, x, lambda: x - s * d, s_hat)
        else:
            den = self.model(x, s)
            d = (x - den) / s
            self.notify(i, x, den, s_hat)
        if self.dirs is not None:
            self.dirs.append(d)
        return d

    def start_denoised(self, x: Tensor, i: int) -> Tensor:
        """The denoiser output at the start of step ``i`` (implied by the analytic direction with AFS), reported to
        the callback; the direction ``(x - D) / sigma_i`` is computed only when a trajectory is recorded."""
        s = self.sig[i]
        if self.afs and i == 0:
            den = x - s * x / (1 + s * s).sqrt()
            if self.thresholding:
                den = _threshold(den, self.ratio, self.max_value)
        else:
            den = self.model(x, s)
        self.notify(i, x, den)
        self.note_direction(x, den, s)
        return den

    def note_direction(self, x: Tensor, den: Tensor, s: Tensor) -> None:
        """Record the direction ``(x - den) / s`` (only when a trajectory is recorded)."""
        if self.dirs is not None:
            self.dirs.append((x - den) / s)

    def intermediate(self, fn: IntermediateFn, i: int, x: Tensor) -> _Mid:
        """Step ``i``'s :class:`Intermediate` from ``fn``, asked after the step's first evaluation."""
        return _Mid(fn({"i": i, "x": x, "sigma": self.level(self.sig[i]), "sigma_next": self.level(self.sig[i + 1])}),
                    x)

    def mid_direction(self, x_mid: Tensor, mid: _Mid) -> Tensor:
        """The direction at the intermediate point: ``(x_mid - D(x_mid, scale_time * sigma)) / sigma``."""
        return (x_mid - self.model(x_mid, mid.at)) / mid.sigma

    def push(self, x: Tensor) -> None:
        if self.points is not None:
            self.points.append(x)

    def result(self, x: Tensor, return_trajectory: bool) -> Tensor | Trajectory:
        if not return_trajectory:
            return x
        assert self.points is not None and self.dirs is not None
        return Trajectory(x=x, points=torch.stack(self.points), nfe=self.calls, directions=torch.stack(self.dirs))


def _all_positive(values: Sequence) -> bool:
    """Every number of a (nested) Python sequence is positive, checked without a tensor."""
    return all(_all_positive(v) if isinstance(v, (list, tuple)) else v > 0 for v in values)


def _threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language
    Understanding", 2022): ``s = max(quantile_ratio(|x0|), max_value)`` per sample, ``x0 <- clamp(x0, -s, s) / s``
    (scaled to ``max_value``). It changes D wherever ``|x0|`` exceeds ``max_value``: only for data in [-1, 1]."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), ratio, dim=1).clamp_min(max_value)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s * max_value


def _orders(max_order: int, lo: int, hi: int, name: str) -> int:
    if int(max_order) != max_order or not lo <= max_order <= hi:
        raise ValueError(f"{name}: max_order must be an integer in [{lo}, {hi}], got {max_order}")
    return int(max_order)


# --------------------------------------------------------------------------------------------------------------
# single-step solvers


def euler(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *, afs: bool = False,
          return_trajectory: bool = False, cond: dict | None = None,
          callback: Callback | None = None, intermediate: IntermediateFn | None = None) -> Tensor | Trajectory:
    """Euler's method on the probability-flow ODE, ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i``.

    In the EDM parametrisation this is DDIM (Song et al., "Denoising Diffusion Implicit Models", 2021). With
    ``intermediate`` (:class:`Intermediate`: level ``s``, scales ``c`` and ``a``) each step is two Euler steps,
    ``x_mid = x_i + (s - sigma_i) d_i`` and ``x_{i+1} = x_mid + c (sigma_{i+1} - s) d_mid`` with
    ``d_mid = (x_mid - D(x_mid, a s)) / s`` (AMED-Plugin on Euler).
    """
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)
    for i in range(run.steps):
        if intermediate is None:
            x = x + (run.sig[i + 1] - run.sig[i]) * run.start_direction(x, i)
        else:
            d = run.start_direction(x, i)
            mid = run.intermediate(intermediate, i, x)
            x_mid = x + (mid.sigma - run.sig[i]) * d
            x = x_mid + mid.scale * (run.sig[i + 1] - mid.sigma) * run.mid_direction(x_mid, mid)
        run.push(x)
    return run.result(x, return_trajectory)


def heun(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *, afs: bool = False,
         return_trajectory: bool = False, cond: dict | None = None,
          callback: Callback | None = None) -> Tensor | Trajectory:
    """Heun's second-order method (Karras et al., 2022, Algorithm 1), applied on every step including the last.

    ``x' = x_i + h d_i``, ``x_{i+1} = x_i + h (d_i + d(x', sigma_{i+1})) / 2``; two calls per step.
    """
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)
    for i in range(run.steps):
        s_next = run.sig[i + 1]
        h = s_next - run.sig[i]
        d = run.start_direction(x, i)
        d_next = run.direction(x + h * d, s_next)
        x = x + h * 0.5 * (d + d_next)
        run.push(x)
    return run.result(x, return_trajectory)


def dpm_solver_2(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *,
                 afs: bool = False, return_trajectory: bool = False, cond: dict | None = None,
                 callback: Callback | None = None, r: float = 0.5,
                 intermediate: IntermediateFn | None = None) -> Tensor | Trajectory:
    """DPM-Solver-2 (Lu et al., "DPM-Solver", 2022) in the EDM form: an intermediate point at
    ``s_mid = sigma_{i+1}^r sigma_i^(1-r)`` (the geometric midpoint for ``r = 1/2``), then
    ``x_{i+1} = x_i + h ((1/(2r)) d_mid + (1 - 1/(2r)) d_i)``; two calls per step.

    With ``intermediate`` (:class:`Intermediate`: level ``s``, scales ``c`` and ``a``; ``r`` is then unused) the
    step is the midpoint rule at ``s``: ``x_mid = x_i + (s - sigma_i) d_i``, ``d_mid = (x_mid - D(x_mid, a s)) / s``,
    ``x_{i+1} = x_i + c h d_mid`` (AMED-Solver; at ``s = sqrt(sigma_i sigma_{i+1})``, ``c = a = 1`` it is
    DPM-Solver-2 with ``r = 1/2``)."""
    if not 0.0 < r <= 1.0:
        raise ValueError(f"dpm_solver_2: r must be in (0, 1], got {r}")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)
    w = 1.0 / (2.0 * r)
    for i in range(run.steps):
        s, s_next = run.sig[i], run.sig[i + 1]
        d = run.start_direction(x, i)
        if intermediate is None:
            s_mid = s_next**r * s ** (1.0 - r)
            d_mid = run.direction(x + (s_mid - s) * d, s_mid)
            x = x + (s_next - s) * (w * d_mid + (1.0 - w) * d)
        else:
            mid = run.intermediate(intermediate, i, x)
            x = x + mid.scale * (s_next - s) * run.mid_direction(x + (mid.sigma - s) * d, mid)
        run.push(x)
    return run.result(x, return_trajectory)


# --------------------------------------------------------------------------------------------------------------
# linear multistep solvers on the direction d (Adams-Bashforth family)

#: Fixed-step Adams-Bashforth weights, newest direction first (Hairer, Norsett & Wanner, "Solving Ordinary
#: Differential Equations I", III.1); iPNDM uses them whatever the step sizes.
AB_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def lagrange_step_weights(nodes: Sequence[Tensor], t0: Tensor, t1: Tensor) -> list[Tensor]:
    """``w_j = (1 / (t1 - t0)) * integral_{t0}^{t1} l_j(t) dt`` for the Lagrange basis ``l_j`` on ``nodes``.

    The variable-step Adams-Bashforth weights when ``nodes = [t_i, t_{i-1}, ...]`` and ``[t0, t1]`` is the step
    ``[t_i, t_{i+1}]``: ``x_{i+1} = x_i + (t1 - t0) sum_j w_j f(t_{i-j})`` integrates the interpolating polynomial
    of ``f`` exactly. Computed in the scaled variable ``u = (t - t0) / (t1 - t0)`` (so only step ratios matter)
    by expanding each ``prod_{m != j} (u - u_m)`` and integrating the monomials on ``[0, 1]``. All tensors
    broadcast together (one set of weights per sample).
    """
    h = t1 - t0
    u = [(n - t0) / h for n in nodes]
    weights = []
    for j, uj in enumerate(u):
        poly = [torch.ones_like(uj)]  # coefficients of u^0, u^1, ... of prod_{m != j} (u - u_m)
        denom = torch.ones_like(uj)
        for m, um in enumerate(u):
            if m == j:
                continue
            shifted = [torch.zeros_like(uj), *poly]  # u * poly
            poly = [shifted[p] - (um * poly[p] if p < len(poly) else 0) for p in range(len(shifted))]
            denom = denom * (uj - um)
        weights.append(sum(c / (p + 1) for p, c in enumerate(poly)) / denom)
    return weights


@lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple(float(v) for v in nodes), tuple(float(v) for v in weights)


def deis_coefficients(sigma_nodes: Sequence[Tensor], sigma_cur: Tensor, sigma_next: Tensor, beta_d: float,
                      beta_min: float, quad_points: int = 24) -> list[Tensor]:
    """DEIS tAB coefficients ``C_j = integral_{sigma_cur}^{sigma_next} l_j(t(sigma)) dsigma`` (= the paper's
    ``integral (dsigma/dt) l_j(t) dt`` in VP time ``t``) with ``l_j`` the Lagrange basis on the VP times of
    ``sigma_nodes`` (newest first); ``x_{i+1} = x_i + sum_j C_j d_{i-j}`` (Zhang & Chen, "Fast Sampling of
    Diffusion Models with Exponential Integrator", 2023, tAB-DEIS).

    Integrated by Gauss-Legendre quadrature in ``log sigma`` (``quad_points`` nodes): ``t(sigma)`` has branch
    points on the imaginary axis close to 0 (about ``1e-3 i`` for the default VP constants), which in
    ``log sigma`` sit a distance pi/2 from the real line, so the rule converges fast on every interval,
    including a long one that ends at sigma_min.
    """
    xs, ws = _gauss_legendre(int(quad_points))
    xq = torch.tensor(xs, dtype=sigma_cur.dtype, device=sigma_cur.device)
    wq = torch.tensor(ws, dtype=sigma_cur.dtype, device=sigma_cur.device)
    v0, v1 = sigma_cur.log().unsqueeze(-1), sigma_next.log().unsqueeze(-1)
    sq = (v0 + 0.5 * (v1 - v0) * (1 + xq)).exp()  # (..., Q) quadrature sigmas
    wsig = 0.5 * (v1 - v0) * wq * sq  # dsigma = sigma dv
    tq = vp_time(sq, beta_d, beta_min)
    tn = [vp_time(s, beta_d, beta_min).unsqueeze(-1) for s in sigma_nodes]
    out = []
    for j, tj in enumerate(tn):
        basis = torch.ones_like(tq)
        for m, tm in enumerate(tn):
            if m != j:
                basis = basis * (tq - tm) / (tj - tm)
        out.append((basis * wsig).sum(-1))
    return out


def _multistep_ab(run: _Run, x: Tensor, max_order: int,
                  weights: Callable[[int, list[Tensor]], list[Tensor]]) -> Tensor:
    """The shared loop of iPNDM / iPNDM_v / DEIS: one direction per step, ``x += sum_j c_j d_{i-j}``.

    ``weights(i, d_history)`` returns the absolute increments' coefficients (shape ``(B, 1, ..., 1)``),
    newest first, for ``k = len(d_history)`` directions.
    """
    hist: deque[Tensor] = deque(maxlen=max_order)
    for i in range(run.steps):
        hist.appendleft(run.start_direction(x, i))
        coeffs = weights(i, list(hist))
        x = x + sum(c * d for c, d in zip(coeffs, hist))
        run.push(x)
    return x


def ipndm(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *, afs: bool = False,
          return_trajectory: bool = False, cond: dict | None = None, max_order: int = 4,
          callback: Callback | None = None, intermediate: IntermediateFn | None = None,
          history: History | None = None) -> Tensor | Trajectory:
    """Improved PNDM (Zhang & Chen, 2023; Liu et al., "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", 2022): fixed-step Adams-Bashforth on ``d`` of order ``min(max_order, i + 1)`` at step ``i``
    (lower-order warm-up), with the uniform-step weights :data:`AB_WEIGHTS` whatever the step sizes.

    On a non-uniform schedule the fixed weights make it second order asymptotically; :func:`ipndm_v` uses the
    variable-step weights. With ``intermediate`` (:class:`Intermediate`: level ``s``, scales ``c`` and ``a``)
    each step is two Adams-Bashforth sub-steps, ``sigma_i -> s`` and ``s -> sigma_{i+1}``, the second evaluating
    ``D(x_mid, a s)`` and scaling its increment by ``c``; both directions enter the history, and the weights stay
    the fixed-step ones although the sub-steps are uneven (AMED-Plugin on iPNDM, as in its reference code).
    ``history`` (:class:`History`) carries the directions from one call to the next.
    """
    max_order = _orders(max_order, 1, 4, "ipndm")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)
    hist: deque[Tensor] = deque(history.values if history is not None else (), maxlen=max_order)

    def increment(h: Tensor) -> Tensor:
        return sum(c * d for c, d in zip([h * w for w in AB_WEIGHTS[len(hist)]], hist))

    for i in range(run.steps):
        hist.appendleft(run.start_direction(x, i))
        if intermediate is None:
            x = x + increment(run.sig[i + 1] - run.sig[i])
        else:
            mid = run.intermediate(intermediate, i, x)
            x_mid = x + increment(mid.sigma - run.sig[i])
            hist.appendleft(run.mid_direction(x_mid, mid))
            x = x_mid + mid.scale * increment(run.sig[i + 1] - mid.sigma)
        run.push(x)
    if history is not None:
        history.values = list(hist)
        history.done += run.steps * (1 if intermediate is None else 2)
    return run.result(x, return_trajectory)


def ipndm_v(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *, afs: bool = False,
            return_trajectory: bool = False, cond: dict | None = None, max_order: int = 4,
          callback: Callback | None = None) -> Tensor | Trajectory:
    """iPNDM with variable-step Adams-Bashforth weights: at step ``i`` the direction is interpolated by the
    polynomial through ``d_i, ..., d_{i-k+1}`` at their sigmas (``k = min(max_order, i + 1)``) and integrated
    exactly over ``[sigma_i, sigma_{i+1}]`` (:func:`lagrange_step_weights`). On uniform steps the weights are
    iPNDM's; for ``k = 2`` they are ``(1 + q/2, -q/2)`` with ``q = h_i / h_{i-1}``."""
    max_order = _orders(max_order, 1, 4, "ipndm_v")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)

    def weights(i: int, hist: list[Tensor]) -> list[Tensor]:
        s0, s1 = run.flat[i], run.flat[i + 1]
        nodes = [run.flat[i - j] for j in range(len(hist))]
        return [run.view(w * (s1 - s0)) for w in lagrange_step_weights(nodes, s0, s1)]

    return run.result(_multistep_ab(run, x, max_order, weights), return_trajectory)


def deis(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *, afs: bool = False,
         return_trajectory: bool = False, cond: dict | None = None, callback: Callback | None = None,
         max_order: int = 3, vp_sigma_min: float = 0.002,
         vp_sigma_max: float = 80.0, vp_eps: float = 1e-3) -> Tensor | Trajectory:
    """DEIS with the time-Adams-Bashforth rule tAB-``max_order`` (Zhang & Chen, "Fast Sampling of Diffusion Models
    with Exponential Integrator", 2023): ``d`` (the noise prediction) is interpolated by a polynomial of degree
    ``min(max_order, i)`` in VP time through the last ``degree + 1`` directions and integrated exactly against
    ``dsigma`` (:func:`deis_coefficients`, numerically in ``log sigma``).

    ``max_order`` is the polynomial degree, as in the paper: tAB3 (the default) uses four directions and
    ``max_order = 0`` is Euler. The VP time is that of the SDE with ``sigma(1) = vp_sigma_max`` and
    ``sigma(vp_eps) = vp_sigma_min`` (as :func:`~mentor.diffusion.schedules.time_uniform`).
    """
    max_order = _orders(max_order, 0, 3, "deis")
    beta_d, beta_min = vp_constants(vp_sigma_min, vp_sigma_max, vp_eps)
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)

    def weights(i: int, hist: list[Tensor]) -> list[Tensor]:
        nodes = [run.flat[i - j] for j in range(len(hist))]
        return [run.view(c) for c in deis_coefficients(nodes, run.flat[i], run.flat[i + 1], beta_d, beta_min)]

    return run.result(_multistep_ab(run, x, max_order + 1, weights), return_trajectory)


# --------------------------------------------------------------------------------------------------------------
# exponential integrators on the data prediction (log-SNR time)


def phi(k: int, z: Tensor) -> Tensor:
    """``phi_k(z) = integral_0^1 exp((1 - t) z) t^(k-1) / (k-1)! dt`` (``phi_0 = exp``), stable for small ``|z|``.

    Uses the series ``sum_n z^n / (n + k)!`` for ``|z| < 1`` and the recursion ``phi_{k+1} = (phi_k - 1/k!) / z``
    from ``phi_1 = expm1(z) / z`` elsewhere (the recursion cancels catastrophically near 0).
    """
    if k == 0:
        return z.exp()
    small = z.abs() < 1.0
    series = torch.zeros_like(z)
    term = torch.full_like(z, 1.0 / math.factorial(k))
    for n in range(24):
        series = series + term
        term = term * z / (n + k + 1)
    zs = torch.where(small, torch.ones_like(z), z)
    rec = torch.expm1(zs) / zs
    for m in range(1, k):
        rec = (rec - 1.0 / math.factorial(m)) / zs
    return torch.where(small, series, rec)


#: The weight of the second divided difference ``D2 ~ h^2 D'' / 2`` in DPM-Solver++(3M), in units of
#: ``h phi_3(-h)``: ``"published"`` (1, the official DPM-Solver code, k-diffusion and diff-sampler) or ``"taylor"``
#: (2, the weight of the Taylor expansion of the exact solution).
THIRD_ORDER_WEIGHTS: dict[str, float] = {"published": 1.0, "taylor": 2.0}


def third_order_weight(form: str, name: str = "dpm_solver_pp") -> float:
    """The factor of ``h phi_3(-h) D2`` in the 3M update for ``form`` (see :data:`THIRD_ORDER_WEIGHTS`)."""
    if form not in THIRD_ORDER_WEIGHTS:
        raise ValueError(f"{name}: third_order must be one of {', '.join(map(repr, THIRD_ORDER_WEIGHTS))}, "
                         f"got {form!r}")
    return THIRD_ORDER_WEIGHTS[form]


def _order_at(i: int, steps: int, max_order: int, lower_order_final: bool) -> int:
    order = min(max_order, i + 1)
    return min(order, steps - i) if lower_order_final else order


def _dpmpp_step(x: Tensor, outs: deque[Tensor], lams: deque[Tensor], lam_next: Tensor, ratio: Tensor, order: int,
                w3: float, scale: Tensor | float | None = None) -> Tensor:
    """One multistep DPM-Solver++ step from ``lams[0]`` to ``lam_next`` (``ratio = sigma_next / sigma``) with the
    outputs ``outs`` (newest first); ``scale`` (AMED's direction scale) multiplies the data-prediction terms,
    ``ratio x + scale (...)``; without it they are added one by one."""
    h = lam_next - lams[0]
    one_minus = -torch.expm1(-h)  # 1 - e^{-h} = h phi_1(-h)
    terms = [one_minus * outs[0]]
    if order == 2:
        r0 = (lams[0] - lams[1]) / h
        terms.append(one_minus * (outs[0] - outs[1]) / (2 * r0))
    elif order == 3:
        r0, r1 = (lams[0] - lams[1]) / h, (lams[1] - lams[2]) / h
        d1_0, d1_1 = (outs[0] - outs[1]) / r0, (outs[1] - outs[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # ~ h D'
        d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 D'' / 2
        terms += [h * phi(2, -h) * d1, w3 * h * phi(3, -h) * d2]
    if scale is None:
        x_next = ratio * x
        for term in terms:
            x_next = x_next + term
        return x_next
    inc = terms[0]
    for term in terms[1:]:
        inc = inc + term
    return ratio * x + scale * inc


def dpm_solver_pp(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *,
                  afs: bool = False, return_trajectory: bool = False, cond: dict | None = None,
                  callback: Callback | None = None, max_order: int = 3, third_order: str = "published",
                  lower_order_final: bool = True, thresholding: bool = False, threshold_ratio: float = 0.995,
                  threshold_max: float = 1.0, intermediate: IntermediateFn | None = None,
                  history: History | None = None) -> Tensor | Trajectory:
    """Multistep DPM-Solver++ with data prediction (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", 2022): ``max_order = 2`` is 2M, 3 is 3M.

    With ``lambda = -log sigma``, ``h = lambda_{i+1} - lambda_i`` and ``D(lambda)`` the denoiser output, the
    exact solution is ``x_{i+1} = e^{-h} x_i + sum_k h^{k+1} phi_{k+1}(-h) D^(k)(lambda_i)``. Order 1 is
    ``e^{-h} x_i + (1 - e^{-h}) D_i`` (identical to Euler); 2M replaces ``D_i`` by
    ``D_i + (D_i - D_{i-1}) / (2 r)``, ``r = h_{i-1} / h`` (the paper's Algorithm 2); 3M adds the first and second
    divided differences ``D1 ~ h D'`` and ``D2 ~ h^2 D'' / 2`` as ``h phi_2(-h) D1 + w h phi_3(-h) D2``. The order
    at step ``i`` is ``min(max_order, i + 1)``, and with ``lower_order_final`` also at most the number of steps
    left. ``thresholding`` applies dynamic thresholding to every denoiser output (off by default).

    ``third_order`` sets ``w`` (:data:`THIRD_ORDER_WEIGHTS`): ``"published"`` (the default, ``w = 1``) is the 3M of
    the official DPM-Solver code, k-diffusion and diff-sampler, hence of the published DPM-Solver++(3M) tables;
    ``"taylor"`` (``w = 2``) is the weight of the Taylor expansion of the exact solution. Measured on a Gaussian
    oracle (d = 6, sigma 80 -> 0.002, polynomial rho = 7, largest error of 32 samples against the exact flow) at
    21 / 41 / 81 / 161 / 321 / 641 timestamps: published 1.4e-2, 3.6e-3, 1.3e-3, 3.6e-4, 9.5e-5, 2.4e-5, second
    order (slopes 1.8 to 1.98); taylor 6.1e-2, 5.2e-3, 6.2e-4, 7.6e-5, 9.4e-6, 1.2e-6, third order (slope 3.0).
    With few steps the published form is usually the more accurate (4x at 21 polynomial timestamps; 0.104
    against 0.129 RMSE at NFE 5 of the log-SNR schedule on the digits-fitted Gaussian), the Taylor form from about
    40 polynomial, 10 log-SNR, timestamps on.

    With ``intermediate`` (:class:`Intermediate`: level ``s``, scales ``c`` and ``a``) each step is two multistep
    sub-steps, ``sigma_i -> s`` and ``s -> sigma_{i+1}``, the second with the output ``D(x_mid, a s)`` and ``c``
    multiplying its data-prediction terms; both outputs enter the history (with their own ``lambda``, so the
    sub-steps use the variable-step formulas) and the orders count the ``2(N - 1)`` sub-steps (AMED-Plugin on
    DPM-Solver++). ``history`` (:class:`History`) carries the outputs, their ``lambda`` and the step count from
    one call to the next.
    """
    max_order = _orders(max_order, 1, 3, "dpm_solver_pp")
    w3 = third_order_weight(third_order, "dpm_solver_pp")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, thresholding=thresholding,
               threshold_ratio=threshold_ratio, threshold_max=threshold_max, callback=callback)
    lam = -run.sig.log()
    outs: deque[Tensor] = deque(history.values if history is not None else (), maxlen=max_order)
    lams: deque[Tensor] = deque(history.lams if history is not None else (), maxlen=max_order)
    per_step = 1 if intermediate is None else 2
    done = history.done if history is not None else 0
    total = history.total if history is not None and history.total is not None else done + per_step * run.steps

    def order() -> int:
        return min(_order_at(done, total, max_order, lower_order_final), len(outs))

    for i in range(run.steps):
        outs.appendleft(run.start_denoised(x, i))
        lams.appendleft(lam[i])
        if intermediate is None:
            x = _dpmpp_step(x, outs, lams, lam[i + 1], run.sig[i + 1] / run.sig[i], order(), w3)
            done += 1
        else:
            mid = run.intermediate(intermediate, i, x)
            lam_mid = -mid.sigma.log()
            x_mid = _dpmpp_step(x, outs, lams, lam_mid, mid.sigma / run.sig[i], order(), w3, 1.0)
            outs.appendleft(run.model(x_mid, mid.at))
            lams.appendleft(lam_mid)
            done += 1
            x = _dpmpp_step(x_mid, outs, lams, lam[i + 1], run.sig[i + 1] / mid.sigma, order(), w3, mid.scale)
            done += 1
        run.push(x)
    if history is not None:
        history.values, history.lams, history.done, history.total = list(outs), list(lams), done, total
    return run.result(x, return_trajectory)


def unipc(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *, afs: bool = False,
          return_trajectory: bool = False, cond: dict | None = None, callback: Callback | None = None,
          max_order: int = 3, variant: str = "bh2",
          lower_order_final: bool = True, thresholding: bool = False, threshold_ratio: float = 0.995,
          threshold_max: float = 1.0) -> Tensor | Trajectory:
    """UniPC with data prediction (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
    of Diffusion Models", 2023): predictor UniP-p, then corrector UniC-p with the denoiser output at the predicted
    point, which the next step reuses (one call per step; no corrector, hence no call, on the last step).

    With ``lambda = -log sigma``, ``h = lambda_{i+1} - lambda_i``, the step is
    ``x = e^{-h} x_i + (1 - e^{-h}) D_i + B(h) sum_m a_m (D_{s_m} - D_i) / r_m`` with ``r_m = (lambda_{s_m} -
    lambda_i) / h`` over the previous points (predictor) or also the new point ``r = 1`` (corrector). The weights
    solve ``sum_m a_m r_m^(k-1) = k! h phi_{k+1}(-h) / B(h)``, ``k = 1..#points``, which matches the Taylor
    expansion of the exact solution; ``B(h) = 1 - e^{-h}`` for ``bh2``, ``h`` for ``bh1``. As in the paper,
    the one-point systems (order-2 predictor, order-1 corrector) use ``a = 1/2``. Orders as in
    :func:`dpm_solver_pp`; ``thresholding`` applies dynamic thresholding to every denoiser output.
    """
    max_order = _orders(max_order, 1, 3, "unipc")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, thresholding=thresholding,
               threshold_ratio=threshold_ratio, threshold_max=threshold_max, callback=callback)
    lam = -run.sig.log()
    outs: deque[Tensor] = deque(maxlen=max_order)
    outs.appendleft(run.start_denoised(x, 0))
    for i in range(run.steps):
        if i > 0:
            run.notify(i, x, outs[0])
        order = min(_order_at(i, run.steps, max_order, lower_order_final), len(outs))
        h = lam[i + 1] - lam[i]
        one_minus = -torch.expm1(-h)
        big_b = one_minus if variant == "bh2" else h
        base = (run.sig[i + 1] / run.sig[i]) * x + one_minus * outs[0]
        rs = [(lam[i - m] - lam[i]) / h for m in range(1, order)]
        diffs = [(outs[m] - outs[0]) / r for m, r in zip(range(1, order), rs)]
        rhs = [math.factorial(k) * h * phi(k + 1, -h) / big_b for k in range(1, order + 1)]
        if order == 1:
            x_pred = base
        else:
            a = [torch.full_like(h, 0.5)] if order == 2 else _solve(rs, rhs[:-1])
            x_pred = base + big_b * sum(c * dm for c, dm in zip(a, diffs))
        if i == run.steps - 1:
            x = x_pred
        else:
            out_new = run.model(x_pred, run.sig[i + 1])
            a = [torch.full_like(h, 0.5)] if order == 1 else _solve([*rs, torch.ones_like(h)], rhs)
            x = base + big_b * (sum(c * dm for c, dm in zip(a[:-1], diffs)) + a[-1] * (out_new - outs[0]))
            outs.appendleft(out_new)
            run.note_direction(x, out_new, run.sig[i + 1])
        run.push(x)
    return run.result(x, return_trajectory)


def _solve(rs: list[Tensor], rhs: list[Tensor]) -> list[Tensor]:
    """Solve ``sum_m a_m r_m^(k-1) = rhs_k`` (k = 1..len(rs)) per sample; inputs ``(B, 1, ..., 1)``."""
    shape = rs[0].shape
    r = torch.stack([t.reshape(-1) for t in rs], dim=-1)  # (B, M)
    mat = torch.stack([r**k for k in range(len(rs))], dim=-2)  # (B, K, M): row k holds r_m^k
    b = torch.stack([t.reshape(-1) for t in rhs], dim=-1)
    a = torch.linalg.solve(mat, b)
    return [a[:, m].reshape(shape) for m in range(len(rs))]


# --------------------------------------------------------------------------------------------------------------
# stochastic samplers (seeded noise)


def _noise_source(x: Tensor, generator: torch.Generator | None, noise_sampler: NoiseSampler | None,
                  name: str) -> NoiseSampler:
    """``noise_sampler`` as given; else standard normal noise shaped like ``x`` from ``generator``, drawn on the
    generator's device (a CPU generator gives the same noise whatever the device of ``x``); else from torch's
    global generator."""
    if generator is not None and noise_sampler is not None:
        raise ValueError(f"{name}: give a generator or a noise_sampler, not both")
    if noise_sampler is not None:
        return lambda s, s_next: noise_sampler(s, s_next).to(device=x.device, dtype=x.dtype)
    if generator is None:
        return lambda s, s_next: torch.randn_like(x)
    return lambda s, s_next: torch.randn(x.shape, generator=generator, device=generator.device,
                                         dtype=x.dtype).to(x.device)


def _decreasing(run: _Run, name: str) -> None:
    if not bool((run.flat[1:] < run.flat[:-1]).all()):
        raise ValueError(f"{name}: sigmas must decrease strictly (noise is added on the way down)")


def _nonnegative(value: float, what: str, name: str) -> None:
    if not value >= 0:
        raise ValueError(f"{name}: {what} must be >= 0, got {value}")


def euler_ancestral(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *,
                    afs: bool = False, return_trajectory: bool = False, cond: dict | None = None,
                    callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
                    generator: torch.Generator | None = None,
                    noise_sampler: NoiseSampler | None = None) -> Tensor | Trajectory:
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``): each step goes down to
    ``sigma_down`` along the probability-flow direction and adds fresh noise of standard deviation ``sigma_up``,
    with ``sigma_up = min(sigma_{i+1}, eta sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2))`` and
    ``sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)``, so ``x_{i+1}`` is at noise level ``sigma_{i+1}``:
    ``x_{i+1} = x_i + (sigma_down - sigma_i) d_i + s_noise sigma_up z_i``. ``eta = 1`` is DDPM's ancestral step,
    ``eta = 0`` is :func:`euler` (no noise drawn). One call per step; the result is at ``sigmas[-1]``, with its
    last noise added (no final 0 is appended).

    Noise ``z_i`` comes from ``noise_sampler(sigma_i, sigma_{i+1})`` or is drawn from ``generator`` (the same
    seed gives the same sample), else from torch's global generator.
    """
    _nonnegative(eta, "eta", "euler_ancestral")
    noise = _noise_source(x, generator, noise_sampler, "euler_ancestral")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)
    _decreasing(run, "euler_ancestral")
    for i in range(run.steps):
        s, s_next = run.sig[i], run.sig[i + 1]
        d = run.start_direction(x, i)
        if eta == 0:
            x = x + (s_next - s) * d
        else:
            s_up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2).sqrt())
            s_down = (s_next**2 - s_up**2).sqrt()
            x = x + (s_down - s) * d
            x = x + noise(run.level(s), run.level(s_next)) * s_noise * s_up
        run.push(x)
    return run.result(x, return_trajectory)


def edm_stochastic(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *,
                   afs: bool = False, return_trajectory: bool = False, cond: dict | None = None,
                   callback: Callback | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                   s_tmax: float = float("inf"), s_noise: float = 1.0, generator: torch.Generator | None = None,
                   noise_sampler: NoiseSampler | None = None) -> Tensor | Trajectory:
    """EDM's stochastic sampler (Karras et al., 2022, Algorithm 2): at each step the noise level is first raised
    from ``sigma_i`` to ``sigma_hat = (1 + gamma_i) sigma_i`` by adding noise, ``x_hat = x_i + sqrt(sigma_hat^2 -
    sigma_i^2) s_noise z_i``, then a Heun step goes from ``sigma_hat`` to ``sigma_{i+1}``. ``gamma_i =
    min(s_churn / (N - 1), sqrt(2) - 1)`` where ``s_tmin <= sigma_i <= s_tmax``, else 0 (``N - 1`` steps).

    The defaults (``s_churn = 0``) are those of EDM's code and k-diffusion: no churn, which is :func:`heun`
    exactly; EDM's README samples ImageNet-64 with ``s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003`` (256
    steps). The Heun correction is applied on every step (the last sigma is ``sigma_min > 0``); two calls per
    step. Noise ``z_i`` (drawn only at steps with ``gamma_i > 0``) comes from ``noise_sampler(sigma_i,
    sigma_hat)`` or from ``generator``, else from torch's global generator. The callback's ``x`` and
    ``sigma_hat`` are the raised point and level, and so are the point and level of a trajectory's directions
    (its points are the ``x_i``).
    """
    for value, what in ((s_churn, "s_churn"), (s_noise, "s_noise")):
        _nonnegative(value, what, "edm_stochastic")
    noise = _noise_source(x, generator, noise_sampler, "edm_stochastic")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)
    gamma_max = min(s_churn / run.steps, math.sqrt(2.0) - 1.0)
    for i in range(run.steps):
        s, s_next = run.sig[i], run.sig[i + 1]
        s_hat = s
        if gamma_max > 0:
            inside = (s >= s_tmin) & (s <= s_tmax)
            if bool(inside.any()):
                s_hat = s * (1 + gamma_max * inside.to(s.dtype))
                x = x + (s_hat**2 - s**2).sqrt() * s_noise * noise(run.level(s), run.level(s_hat))
        h = s_next - s_hat
        d = run.start_direction(x, i, s_hat)
        d_next = run.direction(x + h * d, s_next)
        x = x + h * 0.5 * (d + d_next)
        run.push(x)
    return run.result(x, return_trajectory)


def dpm_solver_pp_2m_sde(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *,
                         afs: bool = False, return_trajectory: bool = False, cond: dict | None = None,
                         callback: Callback | None = None, eta: float = 1.0, s_noise: float = 1.0,
                         solver_type: str = "midpoint", lower_order_final: bool = False,
                         generator: torch.Generator | None = None,
                         noise_sampler: NoiseSampler | None = None) -> Tensor | Trajectory:
    """DPM-Solver++(2M) SDE (Lu et al., 2022; k-diffusion's ``sample_dpmpp_2m_sde``). With ``lambda = -log sigma``,
    ``h = lambda_{i+1} - lambda_i`` and ``H = (1 + eta) h``:
    ``x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta h} x_i + (1 - e^{-H}) D_i + c (D_i - D_{i-1}) / r
    + s_noise sigma_{i+1} sqrt(1 - e^{-2 eta h}) z_i``, ``r = h_{i-1} / h``, with ``c = (1 - e^{-H}) / 2``
    (``solver_type="midpoint"``) or ``c = H phi_2(-H)`` (``"heun"``); no correction on the first step (and on the
    last with ``lower_order_final``; off by default, as in k-diffusion). ``eta = 1`` is the paper's SDE solver;
    ``eta = 0`` draws no noise and is the deterministic 2M (``"midpoint"``: :func:`dpm_solver_pp` with
    ``max_order=2``). One call per step.

    Noise ``z_i`` comes from ``noise_sampler(sigma_i, sigma_{i+1})`` or is drawn from ``generator``, else from
    torch's global generator. k-diffusion's default noise is a Brownian tree (the same path whatever the
    steps); independent normal draws have the same distribution for a given schedule.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpm_solver_pp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    _nonnegative(eta, "eta", "dpm_solver_pp_2m_sde")
    noise = _noise_source(x, generator, noise_sampler, "dpm_solver_pp_2m_sde")
    run = _Run(denoiser, x, sigmas, afs=afs, record=return_trajectory, cond=cond, callback=callback)
    _decreasing(run, "dpm_solver_pp_2m_sde")
    lam = -run.sig.log()
    old: Tensor | None = None
    for i in range(run.steps):
        den = run.start_denoised(x, i)
        s, s_next = run.sig[i], run.sig[i + 1]
        h = lam[i + 1] - lam[i]
        big_h = h + eta * h
        one_minus = -torch.expm1(-big_h)  # 1 - e^{-H}
        x_next = (s_next / s) * torch.exp(-eta * h) * x + one_minus * den
        if old is not None and _order_at(i, run.steps, 2, lower_order_final) == 2:
            r = (lam[i] - lam[i - 1]) / h
            if solver_type == "midpoint":
                x_next = x_next + one_minus * (den - old) / (2 * r)
            else:
                x_next = x_next + big_h * phi(2, -big_h) * (den - old) / r
        if eta > 0:
            x_next = x_next + noise(run.level(s), run.level(s_next)) * s_next * (-torch.expm1(-2 * eta * h)).sqrt() \
                * s_noise
        x, old = x_next, den
        run.push(x)
    return run.result(x, return_trajectory)


# --------------------------------------------------------------------------------------------------------------
# registry and NFE accounting

SAMPLERS: dict[str, Callable[..., Tensor | Trajectory]] = {
    "euler": euler,
    "heun": heun,
    "dpm_solver_2": dpm_solver_2,
    "ipndm": ipndm,
    "ipndm_v": ipndm_v,
    "deis": deis,
    "dpm_solver_pp": dpm_solver_pp,
    "unipc": unipc,
    "euler_ancestral": euler_ancestral,
    "edm_stochastic": edm_stochastic,
    "dpm_solver_pp_2m_sde": dpm_solver_pp_2m_sde,
}

#: The samplers that add noise (they take ``generator`` / ``noise_sampler``); the others solve the ODE.
STOCHASTIC: frozenset[str] = frozenset({"euler_ancestral", "edm_stochastic", "dpm_solver_pp_2m_sde"})

_TWO_CALLS = frozenset({"heun", "dpm_solver_2", "edm_stochastic"})


def nfe(name: str, num_steps: int, afs: bool = False) -> int:
    """Denoiser calls of sampler ``name`` on ``num_steps`` timestamps: ``2(N-1)`` for Heun, DPM-Solver-2 and
    EDM's stochastic sampler, ``N-1`` for the others, one fewer with AFS."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps (timestamps) must be an integer >= 2, got {num_steps}")
    calls = (2 if name in _TWO_CALLS else 1) * (int(num_steps) - 1)
    return calls - 1 if afs else calls


__all__ = ["AB_WEIGHTS", "SAMPLERS", "STOCHASTIC", "THIRD_ORDER_WEIGHTS", "Callback", "History", "Intermediate",
           "IntermediateFn", "NoiseSampler", "Trajectory",
           "deis", "deis_coefficients", "dpm_solver_2", "dpm_solver_pp", "dpm_solver_pp_2m_sde", "edm_stochastic",
           "euler", "euler_ancestral", "heun", "ipndm", "ipndm_v", "lagrange_step_weights", "nfe", "phi",
           "third_order_weight", "unipc"]
