"""EDM training of a denoiser on the engine, and loading the trained denoiser back.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (NeurIPS 2022):
the network is preconditioned (:class:`~mentor.diffusion.denoisers.EDMPrecond`), noise levels are
drawn log-normally, ``ln sigma ~ N(P_mean, P_std^2)``, and the denoising error is weighted by
``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2`` so that every noise level
contributes an effective target of unit variance.

The method's student is the preconditioned denoiser, so ``deployable()`` is the denoiser and the
engine's EMA (``trainer.ema``) averages it. Images enter the step normalised by the engine and are
mapped back to [-1, 1], the data range of the EDM convention.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import COUNT, DECAY, MANY, POSITIVE, SEED, ConfigError, between, rules
from ..engine import checkpoint as ckpt
from ..methods.base import BuildInfo, Method, MethodConfig, StepContext, register_method
from .denoisers import EDMPrecond


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(denoiser: nn.Module, y: Tensor, sigma: Tensor, noise: Tensor, sigma_data: float,
             class_labels: Tensor | None = None) -> Tensor:
    """Per-sample weighted denoising loss ``lambda(sigma) * mean_pixels (D(y + sigma n; sigma) - y)^2``.

    ``y`` are clean images in [-1, 1], ``sigma`` one noise level per sample (B,), ``noise`` standard
    normal of ``y``'s shape.
    """
    s = sigma.reshape(-1, *([1] * (y.dim() - 1)))
    cond = {} if class_labels is None else {"class_labels": class_labels}
    d = denoiser(y + s * noise, sigma, **cond)
    err = (d - y).square().flatten(1).mean(1)  # bf16 outputs promote to y's (float32) dtype
    return edm_weight(sigma.to(err.dtype), sigma_data) * err


@register_method("edm")
class EDM(Method):
    """EDM training (Karras et al., 2022) of a zoo network wrapped in ``EDMPrecond``.

    Reports ``loss``: the weighted denoising loss over a split at ``eval_sigmas`` fixed noise levels
    (the quantiles of the training distribution of sigma) with noise drawn from a generator seeded by
    ``eval_seed``, so validation numbers of different evaluations compare the same noisy inputs.
    ``eval_images`` caps the images scored per split (the first ones of each rank's share), which keeps
    evaluation affordable on a CPU. Lower is better; it picks ``best.pt``.
    """

    select = ("loss_ema", "min")  # the EMA copy is the network one samples from; the raw one without EMA
    classifier = False  # the student is a denoiser (checked in __init__)

    @rules(P_std=POSITIVE, sigma_data=POSITIVE, sigma_min=POSITIVE, sigma_max=POSITIVE, label_dropout=DECAY,
           eval_sigmas=between(1, MANY), eval_seed=SEED, eval_images=COUNT.because("null scores every image"))
    @dataclass
    class Config(MethodConfig):
        P_mean: float = -1.2
        P_std: float = 1.2
        sigma_data: float = 0.5
        sigma_min: float = 0.002
        sigma_max: float = 80.0
        conditional: bool = False
        label_dropout: float = 0.0
        eval_sigmas: int = 8
        eval_seed: int = 0
        eval_images: int | None = None

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        params = inspect.signature(student.forward).parameters
        if "class_labels" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"method edm trains a denoiser F(x, c_noise, class_labels), and the model "
                              f"{type(student).__name__} is not one; use model.name=edm_unet")
        if cfg.conditional and not getattr(student, "conditional", False):
            raise ConfigError("method.conditional: true needs a class-conditional network "
                              "(set model.kwargs.conditional: true)")
        if not cfg.sigma_min < cfg.sigma_max:
            raise ConfigError(f"method.sigma_min={cfg.sigma_min} must be below method.sigma_max={cfg.sigma_max}")
        if not 0.0 <= cfg.label_dropout < 1.0:
            raise ConfigError(f"method.label_dropout must be in [0, 1), got {cfg.label_dropout}")
        if cfg.eval_sigmas < 1:
            raise ConfigError(f"method.eval_sigmas must be >= 1, got {cfg.eval_sigmas}")
        if cfg.eval_images is not None and cfg.eval_images < 1:
            raise ConfigError(f"method.eval_images must be >= 1 or null (all), got {cfg.eval_images}")
        precond = EDMPrecond(student, sigma_data=cfg.sigma_data, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
        super().__init__(cfg, precond, info)
        mean = torch.tensor(info.mean or (0.5,) * info.in_channels, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(info.std or (0.5,) * info.in_channels, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("data_mean", mean, persistent=False)
        self.register_buffer("data_std", std, persistent=False)

    # -- data range --------------------------------------------------------------------------------
    def to_signed(self, x: Tensor) -> Tensor:
        """Engine-normalised images -> [-1, 1]."""
        return (x.float() * self.data_std + self.data_mean) * 2 - 1

    def eval_sigma_values(self, device: torch.device | str = "cpu") -> Tensor:
        """The fixed validation noise levels: ``exp(P_mean + P_std * z_k)`` at the mid-quantiles
        ``(k + 1/2) / K`` of the standard normal, a quadrature of the training distribution."""
        k = self.cfg.eval_sigmas
        p = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        z = torch.special.ndtri(p)
        return torch.exp(self.cfg.P_mean + self.cfg.P_std * z).float().to(device)

    # -- the contract ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        y = self.to_signed(batch["x"])
        b = y.shape[0]
        sigma = (torch.randn(b, device=y.device) * cfg.P_std + cfg.P_mean).exp()
        noise = torch.randn_like(y)
        labels = None
        if cfg.conditional:
            labels = batch["y"]
            if cfg.label_dropout > 0:
                drop = torch.rand(b, device=y.device) < cfg.label_dropout
                labels = torch.where(drop, torch.full_like(labels, -1), labels)
        per_sample = edm_loss(self.student, y, sigma, noise, cfg.sigma_data, labels)
        return {"loss": per_sample.mean()}

    @torch.no_grad()
    def score(self, net: nn.Module, split, ev) -> dict[str, float]:
        if len(split) == 0:
            return {"loss": float("nan")}
        sigmas = self.eval_sigma_values(ev.device)
        g = torch.Generator(device=ev.device)
        g.manual_seed(self.cfg.eval_seed * 1000003 + ev.dist.rank)
        total = torch.zeros((), dtype=torch.float64, device=ev.device)
        count = torch.zeros((), dtype=torch.float64, device=ev.device)
        cap = self.cfg.eval_images
        limit = None if cap is None else -(-cap // ev.dist.world_size)  # this rank's share
        seen = 0
        autocast = ev.autocast or contextlib.nullcontext
        for x, labels in ev.batches(split):
            if limit is not None:
                if seen >= limit:
                    break
                x, labels = x[:limit - seen], labels[:limit - seen]
            seen += x.shape[0]
            count += x.shape[0]
            y = self.to_signed(x)
            cond = labels if self.cfg.conditional else None
            for s in sigmas:
                noise = torch.randn(y.shape, generator=g, device=y.device)
                with autocast():
                    loss = edm_loss(net, y, s.expand(y.shape[0]), noise, self.cfg.sigma_data, cond)
                total += loss.double().sum()
        both = ev.total(torch.stack([total, count]))
        return {"loss": (both[0] / (both[1] * len(sigmas))).item()}

    def warnings(self, max_steps: int, ema: float | None) -> list[str]:
        """EDM has no EMA of its own: it samples from (and selects ``best.pt`` on) the engine's EMA copy
        (``trainer.ema``). That copy starts from the random initial weights, which weigh ``ema**max_steps`` in
        it at the end; above 10% (a run shorter than ~2.3 EMA horizons) its samples are mostly noise, so this
        replaces the engine's milder check (horizon longer than the run)."""
        out = super().warnings(max_steps, None)
        if ema is None or ema**max_steps <= 0.1:
            return out
        steps = math.ceil(math.log(0.1) / math.log(ema))
        return [*out, f"method edm samples from the EMA copy of the denoiser (mentor sample; best.pt is selected on "
                      f"loss_ema), and after trainer.max_steps={max_steps:,} steps with trainer.ema={ema} the random "
                      f"initial weights still make up {ema**max_steps:.0%} of it: its samples will be mostly noise. "
                      f"Train more than {steps:,} steps, or lower trainer.ema below "
                      f"{0.1 ** (1 / max_steps):.4g} (or set it to null and sample the trained weights)"]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        raise NotImplementedError("edm: the deployable is a denoiser D(x, sigma); sample with "
                                  "mentor.diffusion.sample or `mentor sample RUN_DIR`")


# --------------------------------------------------------------------------------------------------
# trained denoisers


def load_edm(run_dir: str | Path, ema: bool = True, device: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The denoiser of an ``edm`` run (``best.pt``, its EMA weights when present and ``ema``) and what
    sampling needs to know about it. ``run_dir`` may also name a checkpoint file (e.g. ``last.pt``).

    Returns ``(denoiser, info)``; the denoiser is frozen, in eval mode, on ``device``, and maps
    ``(x, sigma, class_labels=None)`` in the [-1, 1] data range. ``info`` holds ``image_shape``
    (C, H, W), ``num_classes``, ``conditional``, ``label_dropout``, ``sigma_min``, ``sigma_max``, ``sigma_data``,
    the data ``mean``/``std`` the engine normalised with, ``dataset``, ``checkpoint``, ``step`` and ``ema``.
    """
    from ..engine.run import load_run

    cfg, method, splits, file, step = load_run(run_dir, device=device)
    if not isinstance(method, EDM):
        raise ckpt.CheckpointError(f"{file} was trained with method {cfg.method.name!r}, not 'edm'")
    denoiser = method.deployable()
    state = ckpt.load(file, map_location=next(denoiser.parameters()).device)
    used_ema = bool(ema and state.get("ema"))
    if used_ema:
        # best.pt stores the averaged network's own state; last.pt the EMA wrapper's ("module." prefix)
        weights = state["ema"]
        if all(k.startswith("module.") for k in weights):
            weights = {k[len("module."):]: v for k, v in weights.items()}
        ckpt.load_weights(denoiser, weights, file, "the EDM denoiser")
    elif "model" in state:  # the raw weights (load_run gives best.pt's EMA copy to a run selected on it)
        ckpt.load_weights(denoiser, state["model"], file, "the EDM denoiser")
    denoiser.eval().requires_grad_(False)
    c, h, w = splits.train.image_shape
    info = {"image_shape": (c, h, w), "num_classes": method.info.num_classes,
            "conditional": bool(cfg.method.conditional), "label_dropout": float(cfg.method.label_dropout),
            "sigma_min": cfg.method.sigma_min,
            "sigma_max": cfg.method.sigma_max, "sigma_data": cfg.method.sigma_data,
            "mean": tuple(float(v) for v in method.info.mean), "std": tuple(float(v) for v in method.info.std),
            "dataset": cfg.data.name, "checkpoint": str(file), "step": step, "ema": used_ema}
    return denoiser, info


def to_images(x: Tensor) -> Tensor:
    """Samples in [-1, 1] -> uint8 images in [0, 255] (EDM's ``x * 127.5 + 128``, clipped, truncated)."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
