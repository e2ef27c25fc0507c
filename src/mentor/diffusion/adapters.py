"""Any network with the denoiser protocol: VP ε- and v-prediction networks, diffusers U-Nets, and
classifier-free guidance.

mentor's solvers integrate the probability-flow ODE of a denoiser ``D(x, sigma) -> x0`` in the EDM /
variance-exploding (VE) form ``x = x0 + sigma * eps`` (:mod:`mentor.diffusion.denoisers`). Most published
networks are instead trained on a variance-preserving (VP) schedule,
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, and predict ``eps`` or ``v``. The two forms describe the
same process (Karras et al., 2022, Table 1; k-diffusion's ``external.py`` wrappers):

- noise level: ``sigma_t = sqrt((1 - abar_t) / abar_t)``, so ``abar_t = 1 / (1 + sigma^2)``;
- state: ``x_t = sqrt(abar_t) x = x / sqrt(1 + sigma^2)`` (the VE state is the VP one divided by
  ``alpha_t = sqrt(abar_t)``);
- ε-prediction: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) = x - sigma * eps_hat``;
- v-prediction (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", 2022),
  ``v = alpha_t eps - s_t x0`` with ``alpha_t = 1 / sqrt(1 + sigma^2)``, ``s_t = sigma / sqrt(1 + sigma^2)``:
  since ``alpha_t^2 + s_t^2 = 1``, ``alpha_t x_t - s_t v = x0``, so
  ``x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat`` (EDM's ``c_skip``/``c_out`` with
  ``sigma_data = 1``);
- x0-prediction (diffusers' ``sample``): ``x0 = net(x_t, t)``.

:class:`VPDenoiser` applies these maps around a network ``net(x_t, t, **cond)``; the network's time ``t``
comes from a schedule: :class:`ContinuousVPSchedule` (``abar`` a function of ``t``; the linear VP SDE and
the cosine schedule of Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021) or
:class:`DiscreteVPSchedule` (a table ``abar_0 .. abar_{N-1}``; DDPM's linear betas and the cosine table,
indexed like diffusers' timesteps). Both give ``sigma_min``/``sigma_max`` so that
:func:`~mentor.diffusion.schedules.polynomial` etc. can be built for the adapted network.
:func:`diffusers_denoiser` reads a diffusers scheduler config; :func:`load_diffusers` loads a saved
``UNet2DModel`` (needs ``pip install 'mentor[diffusers]'``). :class:`CFGDenoiser` adds classifier-free
guidance to any denoiser, mentor's conditional EDM models included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MentorError, SampleError
from .denoisers import as_sigma
from .schedules import vp_time

DIFFUSERS_EXTRA = "pip install 'mentor[diffusers]'"
PREDICTIONS = ("epsilon", "v_prediction", "sample")
_PREDICTION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction",
                       "sample": "sample", "x0": "sample"}


def _time_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# --------------------------------------------------------------------------------------------------------------
# schedules


class ContinuousVPSchedule:
    """A VP schedule ``abar(t)`` of a continuous time ``t`` (decreasing from ``abar(0) = 1``).

    ``alpha_bar`` maps a float64 tensor of times to ``abar``; ``time`` (optional) is the inverse map from
    ``sigma`` to ``t``: without it ``t`` is found by bisection on ``[0, t_hi]``. ``t_min``/``t_max`` is the time
    range the network was trained on; it sets ``sigma_min``/``sigma_max``. The network receives ``t`` itself.
    """

    def __init__(self, alpha_bar: Callable[[Tensor], Tensor], t_min: float, t_max: float,
                 time: Callable[[Tensor], Tensor] | None = None, t_hi: float = 1.0):
        if not 0.0 < t_min < t_max <= t_hi:
            raise ValueError(f"need 0 < t_min < t_max <= t_hi, got {t_min}, {t_max}, {t_hi}")
        self.alpha_bar, self.t_min, self.t_max, self.t_hi = alpha_bar, float(t_min), float(t_max), float(t_hi)
        self._time = time
        self.sigma_min = float(self.sigma(torch.tensor(t_min, dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor(t_max, dtype=torch.float64)))
        if not 0.0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"abar must decrease from 1 over [t_min, t_max]; sigma(t_min)={self.sigma_min}, "
                             f"sigma(t_max)={self.sigma_max}")

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3,
               t_max: float = 1.0) -> ContinuousVPSchedule:
        """The VP SDE of Song et al. (2021), ``abar(t) = exp(-beta_d t^2 / 2 - beta_min t)``, ``beta_d = beta_max -
        beta_min``: the continuous limit of DDPM's linear betas 1e-4..0.02 over 1000 steps (``beta = t * 1000``)."""
        beta_d = beta_max - beta_min
        return cls(lambda t: torch.exp(-0.5 * beta_d * t * t - beta_min * t), t_min, t_max,
                   time=lambda s: vp_time(s, beta_d, beta_min))

    @classmethod
    def cosine(cls, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> ContinuousVPSchedule:
        """Nichol & Dhariwal (2021): ``abar(t) = f(t) / f(0)``, ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)``.

        ``abar(1) = 0`` (infinite sigma), so the range stops at ``t_max`` (0.9946, as DPM-Solver does;
        ``sigma_max`` about 119). The inverse is closed-form:
        ``t = (1 + s) * 2 / pi * arccos(cos(s / (1 + s) * pi / 2) / sqrt(1 + sigma^2)) - s``.
        """
        half_pi = 0.5 * math.pi
        c0 = math.cos(s / (1 + s) * half_pi)
        return cls(lambda t: (torch.cos((t + s) / (1 + s) * half_pi) / c0).square(), t_min, t_max,
                   time=lambda sig: (1 + s) / half_pi * torch.acos(c0 * torch.rsqrt(1 + sig * sig)) - s)

    def sigma(self, t: Tensor) -> Tensor:
        """``sigma(t) = sqrt((1 - abar(t)) / abar(t))``."""
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).sqrt()

    def time(self, sigma: Tensor) -> Tensor:
        """The network time of noise level ``sigma`` (float64 unless on MPS), same shape."""
        sigma = sigma.to(_time_dtype(sigma.device))
        if self._time is not None:
            return self._time(sigma)
        target = -torch.log1p(sigma * sigma)  # log abar
        lo, hi = torch.zeros_like(sigma), torch.full_like(sigma, self.t_hi)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.alpha_bar(mid).log() > target  # abar still too large: t lies further on
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)


class DiscreteVPSchedule:
    """A VP schedule given as a table ``abar_0 > ... > abar_{N-1}`` (index ``i`` = diffusers' timestep ``i``).

    ``sigmas[i] = sqrt((1 - abar_i) / abar_i)``; ``sigma_min``/``sigma_max`` are its first and last entries.
    A noise level maps to a fractional index by linear interpolation of ``log sigma`` between table entries
    (clamped to ``[0, N - 1]``), or to the nearest index with ``quantize=True`` (as k-diffusion's
    ``DiscreteSchedule``). Tables are kept in float64.
    """

    def __init__(self, alphas_cumprod: Tensor, quantize: bool = False):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if ab.numel() < 2 or not bool(((ab > 0) & (ab < 1)).all()) or not bool((ab[1:] < ab[:-1]).all()):
            raise ValueError("alphas_cumprod must hold >= 2 values in (0, 1), strictly decreasing (a table ending in "
                             "abar = 0, zero terminal SNR, has an infinite sigma_max and cannot be used)")
        self.alphas_cumprod = ab
        self.sigmas = ((1 - ab) / ab).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.quantize = bool(quantize)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def __len__(self) -> int:
        return self.alphas_cumprod.numel()

    @classmethod
    def from_betas(cls, betas: Tensor, quantize: bool = False) -> DiscreteVPSchedule:
        """The table ``abar_i = prod_{j <= i} (1 - beta_j)``."""
        return cls(torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0), quantize)

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               quantize: bool = False) -> DiscreteVPSchedule:
        """DDPM's linear betas (Ho et al., 2020): ``beta`` evenly spaced from ``beta_start`` to ``beta_end``."""
        return cls.from_betas(torch.linspace(beta_start, beta_end, int(num_steps), dtype=torch.float64), quantize)

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      quantize: bool = False) -> DiscreteVPSchedule:
        """``sqrt(beta)`` evenly spaced (latent diffusion's schedule; diffusers' ``scaled_linear``)."""
        root = torch.linspace(beta_start**0.5, beta_end**0.5, int(num_steps), dtype=torch.float64)
        return cls.from_betas(root.square(), quantize)

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
               quantize: bool = False) -> DiscreteVPSchedule:
        """Nichol & Dhariwal (2021): ``beta_i = min(1 - f((i + 1) / N) / f(i / N), max_beta)`` with
        ``f(u) = cos^2((u + s) / (1 + s) * pi / 2)`` (diffusers' ``squaredcos_cap_v2``). The clipping of the last
        betas makes ``sigma_max`` large (about 2e4 for 1000 steps)."""
        u = torch.arange(int(num_steps) + 1, dtype=torch.float64) / int(num_steps)
        f = torch.cos((u + s) / (1 + s) * (0.5 * math.pi)).square()
        return cls.from_betas((1 - f[1:] / f[:-1]).clamp(max=max_beta), quantize)

    def time(self, sigma: Tensor) -> Tensor:
        """The (fractional, or with ``quantize`` nearest integer, int64) table index of ``sigma``, same shape."""
        log_s = sigma.to(_time_dtype(sigma.device)).log()
        table = self.log_sigmas.to(device=log_s.device, dtype=log_s.dtype)
        low = (torch.searchsorted(table, log_s.contiguous()) - 1).clamp(0, table.numel() - 2)
        lo, hi = table[low], table[low + 1]
        t = low + ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return t.round().long() if self.quantize else t

    def timestep_sigmas(self, num_steps: int) -> Tensor:
        """``num_steps`` decreasing sigmas on the table, at timesteps ``round(linspace(N - 1, 0, num_steps))``."""
        if not 2 <= num_steps <= len(self):
            raise ValueError(f"num_steps must be in [2, {len(self)}], got {num_steps}")
        idx = torch.linspace(len(self) - 1, 0, int(num_steps), dtype=torch.float64).round().long()
        return self.sigmas[idx]


VPSchedule = ContinuousVPSchedule | DiscreteVPSchedule


# --------------------------------------------------------------------------------------------------------------
# the adapter


def _prediction(name: str) -> str:
    key = _PREDICTION_ALIASES.get(str(name).lower())
    if key is None:
        raise SampleError(f"prediction type {name!r} is not known; use one of {', '.join(PREDICTIONS)} "
                          f"(or eps, v, x0)")
    return key


def _network_output(out: Any) -> Tensor:
    """A tensor from what a network returned: a tensor, a diffusers output (``.sample``) or a tuple."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"the network returned {type(out).__name__}; expected a tensor, an object with .sample "
                    f"or a tuple whose first item is a tensor")


class VPDenoiser(nn.Module):
    """A VP network ``net(x_t, t, **cond)`` as a denoiser ``D(x, sigma, **cond) -> x0`` in the EDM / VE form.

    ``x_t = x / sqrt(1 + sigma^2)``, ``t = schedule.time(sigma)``, and the output ``out`` becomes
    ``x0 = x - sigma * out`` (``prediction="epsilon"``), ``x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) *
    out`` (``"v_prediction"``) or ``x0 = out`` (``"sample"``); the module docstring derives them. The network
    may return a tensor, a diffusers output (``.sample``) or a tuple; with ``learned_variance`` it returns twice
    the input channels (prediction, variance) and the first half is used. ``sigma_min``/``sigma_max`` are the
    schedule's, for building sampling schedules.
    """

    def __init__(self, net: Callable[..., Any], schedule: VPSchedule, prediction: str = "epsilon",
                 learned_variance: bool = False):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction = _prediction(prediction)
        self.learned_variance = bool(learned_variance)
        self.sigma_min, self.sigma_max = schedule.sigma_min, schedule.sigma_max

    def network_time(self, sigma: Tensor, x: Tensor) -> Tensor:
        """The ``(B,)`` times the network receives for noise levels ``sigma`` (``(B,)``), in ``x``'s dtype (at
        least float32) or int64 for a quantized table."""
        t = self.schedule.time(sigma)
        return t if not t.is_floating_point() else t.to(torch.promote_types(x.dtype, torch.float32))

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        s = as_sigma(sigma, x)
        scale = torch.rsqrt(1 + s * s)  # sqrt(abar) = alpha_t
        out = _network_output(self.net(x * scale, self.network_time(s.reshape(-1), x), **cond))
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for an input of {tuple(x.shape)}"
                             f"{'' if self.learned_variance else ' (learned variance? set learned_variance=True)'}")
        out = out.to(x.dtype)
        if self.prediction == "epsilon":
            return x - s * out
        if self.prediction == "v_prediction":
            return x * scale.square() - s * scale * out
        return out


# --------------------------------------------------------------------------------------------------------------
# diffusers


def diffusers_schedule(config: Mapping[str, Any] | Any, quantize: bool = False) -> DiscreteVPSchedule:
    """The table of a diffusers scheduler (an object with ``.config``, or its config as a mapping).

    Reads ``num_train_timesteps`` (1000), ``beta_schedule`` (``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``), ``beta_start`` (1e-4), ``beta_end`` (0.02) and ``trained_betas``; the defaults are
    diffusers' DDPM ones. Zero-terminal-SNR rescaling has no finite ``sigma_max`` and is refused.
    """
    cfg = dict(getattr(config, "config", config))
    if cfg.get("rescale_betas_zero_snr"):
        raise SampleError("the scheduler config sets rescale_betas_zero_snr: its last timestep has sigma = inf, "
                          "which the EDM form cannot represent; use a config without it")
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return DiscreteVPSchedule.from_betas(torch.tensor(cfg["trained_betas"], dtype=torch.float64), quantize)
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return DiscreteVPSchedule.linear(n, start, end, quantize)
    if kind == "scaled_linear":
        return DiscreteVPSchedule.scaled_linear(n, start, end, quantize)
    if kind == "squaredcos_cap_v2":
        return DiscreteVPSchedule.cosine(n, quantize=quantize)
    raise SampleError(f"scheduler config: beta_schedule {kind!r} is not supported; use linear, scaled_linear or "
                      f"squaredcos_cap_v2, or give trained_betas")


def diffusers_denoiser(unet: Callable[..., Any], scheduler: Mapping[str, Any] | Any,
                       quantize: bool = False) -> VPDenoiser:
    """A diffusers ``UNet2DModel`` (any ``model(sample, timestep, **cond)`` returning ``.sample``) as a denoiser.

    ``scheduler`` is a diffusers scheduler or its config: :func:`diffusers_schedule` builds the table and
    ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``) the output conversion; a
    ``variance_type`` of ``learned``/``learned_range`` drops the variance channels. The U-Net receives
    fractional timesteps (interpolated in ``log sigma``) unless ``quantize``. Class labels pass through as
    ``class_labels=...``. No diffusers import is needed for an existing module.
    """
    cfg = dict(getattr(scheduler, "config", scheduler))
    learned = str(cfg.get("variance_type") or "").startswith("learned")
    return VPDenoiser(unet, diffusers_schedule(cfg, quantize), _prediction(cfg.get("prediction_type", "epsilon")),
                      learned_variance=learned)


def load_diffusers(path: str | Path, *, unet_subfolder: str = "unet", scheduler_subfolder: str = "scheduler",
                   device: str | torch.device = "cpu", quantize: bool = False) -> VPDenoiser:
    """The denoiser of a diffusers pipeline folder saved with ``save_pretrained`` (offline, nothing downloads).

    ``path/unet`` holds the ``UNet2DModel``, ``path/scheduler/scheduler_config.json`` its scheduler config.
    Needs the ``diffusers`` package (``pip install 'mentor[diffusers]'``); the model is frozen and in eval mode.
    """
    root = Path(path)
    config_file = root / scheduler_subfolder / "scheduler_config.json"
    if not (root / unet_subfolder).is_dir() or not config_file.is_file():
        raise SampleError(f"{root} is not a saved diffusers pipeline: expected the folders {unet_subfolder}/ and "
                          f"{config_file.relative_to(root)} (save one with pipeline.save_pretrained(path))")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise MentorError(f"loading a diffusers U-Net needs the diffusers package: {DIFFUSERS_EXTRA} "
                          "(or pip install diffusers)") from None
    unet = UNet2DModel.from_pretrained(root / unet_subfolder, local_files_only=True)
    unet = unet.to(device).eval().requires_grad_(False)
    return diffusers_denoiser(unet, json.loads(config_file.read_text()), quantize=quantize)


# --------------------------------------------------------------------------------------------------------------
# classifier-free guidance


def _batched_pair(key: str, cond: Any, uncond: Any, batch: int) -> Any:
    """``cond`` and ``uncond`` values of ``key`` as one value for a doubled batch (cond first)."""
    if isinstance(cond, (Tensor, int, float)) or isinstance(uncond, (Tensor, int, float)):
        if cond is None or uncond is None:
            raise ValueError(f"guidance: {key!r} is given for only one branch; give it in both cond and uncond")
        like = cond if isinstance(cond, Tensor) else uncond if isinstance(uncond, Tensor) else None
        parts = []
        for v in (cond, uncond):
            v = torch.as_tensor(v, dtype=None if like is None else like.dtype,
                                device=None if like is None else like.device)
            if v.ndim == 0 or v.shape[0] == 1:
                v = v.reshape(1, *v.shape[1:]).expand(batch, *v.shape[1:])
            elif v.shape[0] != batch:
                raise ValueError(f"guidance: {key!r} has {v.shape[0]} rows for a batch of {batch}")
            parts.append(v)
        return torch.cat(parts)
    if cond != uncond:
        raise ValueError(f"guidance: {key!r} is not a tensor and differs between cond and uncond")
    return cond


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans, 2022): ``D = D_uncond + scale * (D_cond - D_uncond)``.

    Both branches run in ONE call of ``denoiser`` on a doubled batch (the conditional half first); the
    conditioning keywords of the two halves are concatenated key by key. ``uncond`` holds the unconditional
    values (for mentor's conditional EDM U-Net, ``{"class_labels": -1}``, the label its training drops to);
    ``cond`` the conditional ones, overridden or completed by keywords given at call time (so a sampler's
    ``cond=`` works). Numbers and 0-d or one-row tensors are broadcast over the batch. ``scale = 0`` gives the
    unconditional denoiser, ``1`` the conditional one (both exactly, by ``torch.lerp``), ``> 1`` guides.
    """

    def __init__(self, denoiser: Callable[..., Tensor], scale: float, uncond: Mapping[str, Any],
                 cond: Mapping[str, Any] | None = None):
        self.denoiser, self.scale = denoiser, float(scale)
        self.uncond, self.cond = dict(uncond), dict(cond or {})
        for name in ("sigma_min", "sigma_max", "sigma_data"):
            if hasattr(denoiser, name):
                setattr(self, name, getattr(denoiser, name))

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        given = {**self.cond, **cond}
        batch = x.shape[0]
        merged = {k: _batched_pair(k, given.get(k), self.uncond.get(k), batch) for k in {**given, **self.uncond}}
        s = as_sigma(sigma, x).reshape(-1)
        out = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), **merged).to(x.dtype)
        d_cond, d_uncond = out[:batch], out[batch:]
        return torch.lerp(d_uncond, d_cond, self.scale)


def cfg_denoiser(denoiser: Callable[..., Tensor], scale: float, cond: Mapping[str, Any],
                 uncond: Mapping[str, Any]) -> CFGDenoiser:
    """``D(x, sigma) = D_uncond + scale * (D_cond - D_uncond)`` with ``cond``/``uncond`` bound (see
    :class:`CFGDenoiser`); e.g. ``cfg_denoiser(edm, 2.0, {"class_labels": labels}, {"class_labels": -1})``."""
    return CFGDenoiser(denoiser, scale, uncond, cond)
