"""Noise-level schedules: ``num_steps`` decreasing sigmas from ``sigma_max`` to ``sigma_min`` (float64, 1-D).

``N`` timestamps give ``N - 1`` solver steps; nothing (no final 0) is appended. Schedules are data: any
1-D decreasing positive tensor (a GITS schedule, a hand-written list) works with every sampler.

- :func:`polynomial`: ``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho`` (Karras et
  al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022, eq. 5; rho = 7).
- :func:`logsnr`: uniform in ``lambda = -log sigma``, i.e. geometric in sigma (Lu et al., "DPM-Solver", 2022).
- :func:`time_uniform`: uniform (for rho = 1) in the time of the variance-preserving SDE whose
  ``beta_d``/``beta_min`` make ``sigma(1) = sigma_max`` and ``sigma(eps_s) = sigma_min`` (Song et al.,
  "Score-Based Generative Modeling through SDEs", 2021; the VP form ``sigma(t)^2 = exp(beta_d t^2 / 2 +
  beta_min t) - 1`` of Karras et al., 2022, Table 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _check(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps (timestamps) must be an integer >= 2, got {num_steps}")
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def polynomial(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's schedule: linear in ``sigma^(1/rho)`` from ``sigma_max`` to ``sigma_min``."""
    _check(num_steps, sigma_min, sigma_max)
    ramp = torch.linspace(0.0, 1.0, int(num_steps), dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def logsnr(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """Uniform in log-SNR ``lambda = -log sigma``: a geometric sequence of sigmas."""
    _check(num_steps, sigma_min, sigma_max)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), int(num_steps), dtype=torch.float64).exp()


def vp_constants(sigma_min: float = 0.002, sigma_max: float = 80.0, eps_s: float = 1e-3) -> tuple[float, float]:
    """``(beta_d, beta_min)`` of the VP SDE with ``sigma(1) = sigma_max`` and ``sigma(eps_s) = sigma_min``.

    From ``log(sigma(t)^2 + 1) = beta_d t^2 / 2 + beta_min t`` at ``t = 1`` and ``t = eps_s``.
    """
    a, b = math.log1p(sigma_max**2), math.log1p(sigma_min**2)
    beta_d = 2.0 * (b / eps_s - a) / (eps_s - 1.0)
    return beta_d, a - 0.5 * beta_d


def vp_sigma(t: Tensor, beta_d: float, beta_min: float) -> Tensor:
    """``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` of the VP SDE."""
    return torch.expm1(0.5 * beta_d * t * t + beta_min * t).sqrt()


def vp_time(sigma: Tensor, beta_d: float, beta_min: float) -> Tensor:
    """The inverse of :func:`vp_sigma`: the VP time ``t`` with noise level ``sigma``."""
    return ((beta_min**2 + 2.0 * beta_d * torch.log1p(sigma * sigma)).sqrt() - beta_min) / beta_d


def time_uniform(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 1.0,
                 eps_s: float = 1e-3) -> Tensor:
    """VP times ``t_i = (1 + i/(N-1) (eps_s^(1/rho) - 1))^rho`` mapped to sigma (uniform in time for rho = 1)."""
    _check(num_steps, sigma_min, sigma_max)
    if not 0.0 < eps_s < 1.0:
        raise ValueError(f"eps_s must be in (0, 1), got {eps_s}")
    beta_d, beta_min = vp_constants(sigma_min, sigma_max, eps_s)
    ramp = torch.linspace(0.0, 1.0, int(num_steps), dtype=torch.float64)
    t = (1.0 + ramp * (eps_s ** (1.0 / rho) - 1.0)) ** rho
    return vp_sigma(t, beta_d, beta_min)


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "polynomial": polynomial,
    "logsnr": logsnr,
    "time_uniform": time_uniform,
}


def get_schedule(name: str, num_steps: int, **kw: float) -> Tensor:
    """The schedule ``name`` (a key of :data:`SCHEDULES`) with ``num_steps`` timestamps and options ``kw``."""
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}") from None
    return fn(num_steps, **kw)


__all__ = ["SCHEDULES", "get_schedule", "logsnr", "polynomial", "time_uniform", "vp_constants", "vp_sigma",
           "vp_time"]
