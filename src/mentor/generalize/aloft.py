"""ALOFT: dynamic low-frequency perturbation of the token spectrum inside every global-filter block of a GFNet."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, PROBABILITY, between, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from ..models.gfnet import GlobalFilter
from .erm import ERM

Mode = Literal["element", "statistic"]


def low_frequency_region(h: int, w: int, ratio: float) -> tuple[slice, slice]:
    """The low-frequency region of an rFFT2 spectrum ``[h, w]`` (``w = W // 2 + 1`` columns) whose rows were
    ``fftshift``-ed: ``floor(h sqrt(ratio))`` rows centred on the zero frequency (row ``h // 2``) and the first
    ``floor(w sqrt(ratio))`` columns (the rFFT's zero frequency is column 0), so it covers about ``ratio`` of the
    spectrum's area."""
    rows, cols = int(h * math.sqrt(ratio)), int(w * math.sqrt(ratio))
    start = h // 2 - rows // 2
    return slice(start, start + rows), slice(0, cols)


def perturb_spectrum(spec: Tensor, mode: Mode, ratio: float, strength: float, noise: Tensor,
                     eps: float = 1e-6) -> Tensor:
    """ALOFT's perturbation of a token spectrum ``spec`` (complex ``[B, h, w, C]``, as ``rfft2`` over dims 1 and
    2 gives it) with the standard-normal ``noise`` given; the phase is kept.

    The amplitude ``A = |spec|`` is ``fftshift``-ed along ``h`` and, in the low-frequency region ``M``
    (:func:`low_frequency_region`):

    - ``mode="statistic"`` (ALOFT-S): with ``mu, sigma`` the per-sample, per-channel mean and standard deviation
      of ``A`` over ``M`` and ``Sigma_mu, Sigma_sigma`` their standard deviations over the batch,
      ``beta = mu + strength * noise[0] * Sigma_mu``, ``gamma = sigma + strength * noise[1] * Sigma_sigma``
      (``noise`` is ``[2, B, 1, 1, C]``), and ``A_M <- gamma (A_M - mu) / sigma + beta``;
    - ``mode="element"`` (ALOFT-E): with ``Sigma`` the standard deviation over the batch of every element of
      ``A_M``, ``A_M <- A_M + strength * noise * Sigma`` (``noise`` is shaped like ``A_M``).

    Variances are unbiased, and every standard deviation is ``sqrt(var + eps)`` (the reference code's).
    Returns ``ifftshift(A') * exp(i angle(spec))``."""
    b, h, w, c = spec.shape
    rows, cols = low_frequency_region(h, w, ratio)
    amp = torch.fft.fftshift(spec.abs(), dim=1)
    phase = spec.angle()
    region = amp[:, rows, cols, :]
    per_batch = 1 if b > 1 else 0  # unbiased over the batch (a batch of one has no spread)
    if mode == "statistic":
        per_map = 1 if region.shape[1] * region.shape[2] > 1 else 0
        mu = region.mean((1, 2), keepdim=True)
        sigma = (region.var((1, 2), keepdim=True, correction=per_map) + eps).sqrt()
        sigma_mu = (mu.var(0, keepdim=True, correction=per_batch) + eps).sqrt()
        sigma_sigma = (sigma.var(0, keepdim=True, correction=per_batch) + eps).sqrt()
        beta = mu + strength * noise[0] * sigma_mu
        gamma = sigma + strength * noise[1] * sigma_sigma
        inside = torch.zeros(h, w, dtype=torch.bool, device=spec.device)
        inside[rows, cols] = True
        amp = torch.where(inside[None, :, :, None], gamma * (amp - mu) / sigma + beta, amp)
    elif mode == "element":
        sigma = (region.var(0, keepdim=True, correction=per_batch) + eps).sqrt()
        shift = strength * noise * sigma
        amp = amp + F.pad(shift, (0, 0, 0, w - cols.stop, rows.start, h - rows.stop))
    else:
        raise ValueError(f"unknown ALOFT mode {mode!r}")
    amp = torch.fft.ifftshift(amp, dim=1)
    return torch.complex(amp * torch.cos(phase), amp * torch.sin(phase))


class LowFrequencyPerturbation(nn.Module):
    """The hook ALOFT puts in a :class:`~mentor.models.gfnet.GlobalFilter`'s ``spectrum`` slot: in training mode,
    with probability ``prob`` (one draw per forward, for the whole batch), :func:`perturb_spectrum` with fresh
    standard-normal noise; in eval mode the identity. ``generator`` (set by the method for its step) is the
    source of randomness; ``None`` uses torch's default generator."""

    def __init__(self, mode: Mode, ratio: float, prob: float, strength: float, eps: float = 1e-6):
        super().__init__()
        self.mode, self.ratio, self.prob, self.strength, self.eps = mode, ratio, prob, strength, eps
        self.generator: torch.Generator | None = None

    def noise_shape(self, spec: Tensor) -> tuple[int, ...]:
        b, h, w, c = spec.shape
        if self.mode == "statistic":
            return (2, b, 1, 1, c)
        rows, cols = low_frequency_region(h, w, self.ratio)
        return (b, rows.stop - rows.start, cols.stop, c)

    def forward(self, spec: Tensor) -> Tensor:
        if not self.training or self.prob == 0 or 0 in self.noise_shape(spec)[1:]:
            return spec
        g, dev = self.generator, spec.device
        noise = torch.randn(self.noise_shape(spec), generator=g, device=dev)
        apply = torch.rand((), generator=g, device=dev) < self.prob
        return torch.where(apply, perturb_spectrum(spec, self.mode, self.ratio, self.strength, noise, self.eps), spec)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, ratio={self.ratio}, prob={self.prob}, strength={self.strength}"


@register_method("aloft")
class ALOFT(ERM):
    """Guo, Wang, Qi & Shi, "ALOFT: A Lightweight MLP-like Architecture with Dynamic Low-frequency Transform for
    Domain Generalization", CVPR 2023 (arXiv 2303.11674), in the form of its code (``gfnet.py``,
    ``GlobalFilter.spectrum_noise``).

    The student must be a GFNet (``model.name=gfnet_tiny`` or ``gfnet_xs``): a
    :class:`LowFrequencyPerturbation` goes into the ``spectrum`` hook of every global filter (the code's
    ``--noise_layers 0 1 2 3``: all stages), where during training it perturbs the amplitude of the
    low-frequency part of the token spectrum (:func:`perturb_spectrum`) and keeps the phase; the loss is the
    cross-entropy of the pooled per-domain batch (ERM). At evaluation the hooks are the identity, so the
    deployable is the plain GFNet.

    ``mode``: ``"element"`` (ALOFT-E, element-level Gaussian noise scaled by the batch's per-element standard
    deviation) or ``"statistic"`` (ALOFT-S, the amplitude re-normalised with perturbed statistics). Defaults are
    the paper's and its scripts' (``ALOFT-E.sh``, ``ALOFT-S.sh``): ``mask_ratio`` 0.5 (``--mask_radio``),
    ``perturb_prob`` 0.5, ``strength`` 1.0 for ALOFT-E and 0.9 for ALOFT-S (``--uncertainty_factor``; left
    ``null`` it takes the mode's value); Gaussian noise (``gauss_or_uniform=0``). The paper's backbone is an
    ImageNet-pretrained hierarchical GFNet-H-Ti trained with AdamW (lr 5e-4, weight decay 0.05, gradient
    clipping 1, drop-path 0.1); the zoo's GFNets are small isotropic ones trained from scratch, without
    drop-path.
    """

    @rules(mask_ratio=between(0, 1, lo_open=True), perturb_prob=PROBABILITY, strength=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        mode: Mode = "element"
        mask_ratio: float = 0.5
        perturb_prob: float = 0.5
        strength: float | None = None

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        filters = [m for m in student.modules() if isinstance(m, GlobalFilter)]
        if not filters:
            raise ConfigError(
                f"method aloft perturbs the spectrum inside the global-filter blocks of a GFNet, and the student "
                f"{type(student).__name__} has none. Set model.name=gfnet_tiny (or gfnet_xs), with "
                "model.kwargs.image_size set to the images' size")
        strength = cfg.strength if cfg.strength is not None else (1.0 if cfg.mode == "element" else 0.9)
        self.perturbations: list[LowFrequencyPerturbation] = []
        for f in filters:
            f.spectrum = LowFrequencyPerturbation(cfg.mode, cfg.mask_ratio, cfg.perturb_prob, strength)
            self.perturbations.append(f.spectrum)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        for p in self.perturbations:
            p.generator = ctx.generator
        try:
            return super().training_step(batch, ctx)
        finally:
            for p in self.perturbations:
                p.generator = None


__all__ = ["ALOFT", "LowFrequencyPerturbation", "low_frequency_region", "perturb_spectrum"]
