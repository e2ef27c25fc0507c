"""The denoiser protocol of :mod:`mentor.diffusion` and three denoisers that implement it.

A denoiser is any callable ``D(x, sigma, **cond) -> x0_hat`` in the EDM / variance-exploding
parametrisation ``x = y + sigma * eps`` (Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", 2022). ``sigma`` is a python float, a 0-d tensor or a ``(B,)``
tensor (one noise level per sample); :func:`as_sigma` broadcasts it against ``x``. The probability-flow
ODE it defines is ``dx/dsigma = (x - D(x, sigma)) / sigma``.

- :class:`EDMPrecond` wraps a raw network with EDM's preconditioning (trainable, an ``nn.Module``).
- :class:`EmpiricalDenoiser` is the exact minimiser of the denoising loss for a finite dataset, the
  softmax-weighted mean of the data points ("A Geometric Perspective on Diffusion Models", Chen et al.,
  2023): a "perfectly trained network" for tests and toy problems.
- :class:`GaussianDenoiser` is the optimal denoiser of Gaussian data, whose probability-flow ODE has a
  closed-form solution (:meth:`GaussianDenoiser.exact`): the reference for convergence-order tests.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, **cond) -> x0_hat``; ``sigma`` a float, 0-d or ``(B,)`` tensor; cond e.g. ``class_labels``."""

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor: ...


def as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` (float, 0-d, ``(1,)``, ``(B,)`` or ``(B, 1, ..., 1)``) as a ``(B, 1, ..., 1)`` tensor in ``x``'s dtype.

    The result broadcasts against ``x`` of shape ``(B, ...)`` and lives on ``x``'s device.
    """
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    batch = x.shape[0]
    if s.numel() == 1:
        s = s.expand(batch)
    elif s.numel() != batch:
        raise ValueError(f"sigma has {s.numel()} values for a batch of {batch}; give one value or one per sample")
    return s.reshape(batch, *([1] * (x.ndim - 1)))


class EDMPrecond(nn.Module):
    """EDM preconditioning of a raw network ``net(x_in, c_noise, class_labels=None) -> F``.

    ``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))`` with ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = ln(s) / 4``
    (Karras et al., 2022, Table 1). ``sigma_min``/``sigma_max`` are the range the model was trained for,
    kept as metadata for samplers and schedules.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for a sigma tensor of any shape."""
        sd2 = self.sigma_data**2
        total = sigma * sigma + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        s = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        f = self.net(c_in * x, c_noise.reshape(-1), class_labels=class_labels, **kwargs)
        return c_skip * x + c_out * f.to(x.dtype)


class EmpiricalDenoiser:
    """Optimal denoiser of data ``{y_i}``: ``D(x, s) = sum_i w_i y_i``, ``w = softmax_i(-|x - y_i|^2 / 2s^2)``.

    This is ``E[y | x]`` for ``y`` uniform over the data and ``x = y + s * eps`` (Chen et al., "A Geometric
    Perspective on Diffusion Models", 2023; one Euler step of its ODE is a mean-shift step). ``data`` is
    ``(n, ...)``; inputs ``x`` are ``(B, ...)`` with the same trailing shape. The weighted mean is taken over
    chunks of ``chunk`` data points with a running log-sum-exp, so memory is ``O(B * chunk)`` whatever ``n``.

    With ``labels`` (``(n,)`` integers) the denoiser is class-conditional when called with
    ``class_labels`` (``(B,)``): each sample's mean runs over the points of its class only (a label that
    no data point has gives NaN). Without ``class_labels`` it uses the whole dataset.

    Computation runs in ``x``'s dtype (use float64 for accurate references at small sigma); the data are
    cast to it once and cached.
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, chunk: int = 4096):
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be (n, ...) with n >= 1, got shape {tuple(data.shape)}")
        if labels is not None and labels.shape != (data.shape[0],):
            raise ValueError(f"labels must be ({data.shape[0]},), got {tuple(labels.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.data = data.detach()
        self.labels = None if labels is None else labels.detach().long()
        self.chunk = int(chunk)
        self._cache: tuple[torch.dtype, torch.device, Tensor, Tensor, Tensor, Tensor | None] | None = None

    def __len__(self) -> int:
        return self.data.shape[0]

    def _prepared(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        c = self._cache
        if c is None or c[0] != x.dtype or c[1] != x.device:
            flat = self.data.reshape(self.data.shape[0], -1).to(device=x.device, dtype=x.dtype)
            # Centring shrinks |x|, |y| and so the rounding error of the expanded squared distance.
            mean = flat.mean(0)
            centred = flat - mean
            half_sq = 0.5 * (centred * centred).sum(1)
            labels = None if self.labels is None else self.labels.to(x.device)
            c = self._cache = (x.dtype, x.device, centred, half_sq, mean, labels)
        return c[2], c[3], c[4], c[5]

    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, **_: Any) -> Tensor:
        if x.shape[1:] != self.data.shape[1:]:
            raise ValueError(f"x has sample shape {tuple(x.shape[1:])}, data {tuple(self.data.shape[1:])}")
        ys, half_sq, mean, labels = self._prepared(x)
        b = x.shape[0]
        xf = x.reshape(b, -1) - mean
        inv_var = 1.0 / as_sigma(sigma, xf).square()  # (B, 1)
        masked = class_labels is not None and labels is not None
        if masked:
            class_labels = class_labels.to(x.device).reshape(b, 1)
        run_max = torch.full((b, 1), float("-inf"), dtype=x.dtype, device=x.device)
        total = torch.zeros((b, 1), dtype=x.dtype, device=x.device)
        acc = torch.zeros_like(xf)
        for start in range(0, ys.shape[0], self.chunk):
            y = ys[start : start + self.chunk]
            # -|x - y|^2 / 2s^2 up to the per-row constant -|x|^2 / 2s^2, which the softmax ignores.
            logits = (xf @ y.T - half_sq[start : start + self.chunk]) * inv_var
            if masked:
                logits = logits.masked_fill(labels[start : start + self.chunk] != class_labels, float("-inf"))
            new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
            # A row with no point of its class so far has max -inf; shift by 0 there to avoid inf - inf.
            shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            scale = torch.exp(run_max - shift)
            p = torch.exp(logits - shift)
            acc = acc * scale + p @ y
            total = total * scale + p.sum(1, keepdim=True)
            run_max = new_max
        return (acc / total + mean).reshape(x.shape)


class GaussianDenoiser:
    """The optimal denoiser of Gaussian data ``y ~ N(mean, cov)`` and the exact flow of its probability-flow ODE.

    With ``cov = U diag(lam) U^T``: ``D(x, s) = mean + U diag(lam / (lam + s^2)) U^T (x - mean)``, and the ODE
    ``dx/ds = U diag(s / (lam + s^2)) U^T (x - mean)`` integrates to
    ``x(s_b) = mean + U diag(sqrt((lam + s_b^2) / (lam + s_a^2))) U^T (x(s_a) - mean)`` (the Gaussian case
    studied in Chen et al., "Geometric Regularity in Deterministic Sampling of Diffusion-based Generative
    Models", 2024). ``mean`` has the sample shape (e.g. ``(C, H, W)``); ``cov`` is ``(F, F)`` over the
    flattened ``F`` features and may be singular (low-rank data). Conditioning keywords are ignored.
    """

    def __init__(self, mean: Tensor, cov: Tensor):
        dim = mean.numel()
        if cov.shape != (dim, dim):
            raise ValueError(f"cov must be ({dim}, {dim}) for a mean of {dim} features, got {tuple(cov.shape)}")
        self.mean = mean.detach()
        cov64 = cov.detach().to(torch.float64)
        lam, u = torch.linalg.eigh(0.5 * (cov64 + cov64.T))
        self.eigenvalues = lam.clamp_min(0.0)
        self.eigenvectors = u
        self._cache: tuple[torch.dtype, torch.device, Tensor, Tensor, Tensor] | None = None

    def _prepared(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self._cache
        if c is None or c[0] != x.dtype or c[1] != x.device:
            cast = {"dtype": x.dtype, "device": x.device}
            c = self._cache = (x.dtype, x.device, self.mean.reshape(-1).to(**cast),
                               self.eigenvalues.to(**cast), self.eigenvectors.to(**cast))
        return c[2], c[3], c[4]

    def _spectral(self, x: Tensor, gain: Any) -> Tensor:
        """``mean + U diag(gain(lam)) U^T (x - mean)`` with ``gain`` mapping ``lam (F,)`` to ``(B, F)``."""
        if x[0].numel() != self.mean.numel():
            raise ValueError(f"x has {x[0].numel()} features per sample, the Gaussian {self.mean.numel()}")
        mean, lam, u = self._prepared(x)
        z = (x.reshape(x.shape[0], -1) - mean) @ u
        return ((z * gain(lam)) @ u.T + mean).reshape(x.shape)

    def __call__(self, x: Tensor, sigma: Tensor | float, **_: Any) -> Tensor:
        s2 = as_sigma(sigma, x).reshape(-1, 1).square()
        return self._spectral(x, lambda lam: lam / (lam + s2))

    def exact(self, x: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float) -> Tensor:
        """The probability-flow ODE solution at ``sigma_to`` of the trajectory through ``x`` at ``sigma_from``."""
        a2 = as_sigma(sigma_from, x).reshape(-1, 1).square()
        b2 = as_sigma(sigma_to, x).reshape(-1, 1).square()
        return self._spectral(x, lambda lam: ((lam + b2) / (lam + a2)).sqrt())

    def sample(self, num: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """``num`` draws of the data ``y ~ N(mean, cov)``, shape ``(num, *mean.shape)``."""
        eps = torch.randn(num, self.mean.numel(), generator=generator, dtype=torch.float64)
        y = self.mean.reshape(-1).to(torch.float64) + (eps * self.eigenvalues.sqrt()) @ self.eigenvectors.T
        return y.reshape(num, *self.mean.shape).to(dtype=dtype, device=self.mean.device)
