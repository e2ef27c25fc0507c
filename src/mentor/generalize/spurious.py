"""Disentangling spurious and enhancing potential correlations: every training image is seen with a frequency-
restricted (high-pass) copy of itself, and a Tail Interaction relates the features of all samples of all training
domains."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, PROBABILITY, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from ..nn import train_accuracy
from .erm import ERM


def restriction_mask(h: int, w: int, radius: float, device: torch.device | str | None = None) -> Tensor:
    """``[h, w]`` 0/1 mask of an (unshifted) FFT2 spectrum removing the disk of low frequencies
    ``(k_u - (h mod 2)/2)^2 + (k_v - (w mod 2)/2)^2 < radius^2``, ``k`` the signed frequency-bin index. In the
    ``fftshift``-ed spectrum this is the disk about the point ``(h/2, w/2)`` that the authors' filter removes
    (which, for an odd side, is half a bin from the zero frequency)."""
    ku = torch.fft.fftfreq(h, d=1.0 / h, device=device) - (h % 2) / 2
    kv = torch.fft.fftfreq(w, d=1.0 / w, device=device) - (w % 2) / 2
    return ((ku[:, None] ** 2 + kv[None, :] ** 2) >= radius**2).float()


def restrict_frequencies(pixels: Tensor, ratio: float) -> Tensor:
    """The frequency restriction of images ``pixels`` ``[B, C, H, W]`` in ``[0, 1]``: every channel's FFT2
    spectrum loses the disk of :func:`restriction_mask` with radius ``ratio * H`` bins, and the image is
    ``clip(|IFFT2(M * FFT2(x))|, 0, 1)`` (the modulus of the inverse transform, clipped to the pixel range).
    A ratio of 0 removes nothing. Static shapes; float32 transforms, returned in ``pixels``' dtype."""
    h, w = pixels.shape[-2:]
    spec = torch.fft.fft2(pixels.float())
    kept = spec * restriction_mask(h, w, ratio * h, pixels.device)
    return torch.fft.ifft2(kept).abs().clamp(0.0, 1.0).to(pixels.dtype)


class TailInteraction(nn.Module):
    """Interaction of every sample's penultimate features with those of all samples of the batch (all training
    domains): ``t_i = f_i + sum_j softmax_j(q_i . k_j / sqrt(d)) v_j`` with ``q, k, v`` linear maps of the
    features (single-head attention over the batch dimension, the sample itself included)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, f: Tensor) -> Tensor:
        attn = (self.q(f) @ self.k(f).t() / math.sqrt(self.dim)).softmax(1)  # [N, N]
        return f + attn @ self.v(f)


@register_method("spurious_dg")
class SpuriousDG(ERM):
    """Wang, Qi, Guo, Shi & Gao, "Learning Generalizable Models via Disentangling Spurious and Enhancing
    Potential Correlations", IEEE TIP 2024 (arXiv 2401.05752); official code github.com/RubyHoho/DGeneralization.

    The paper: from the sample perspective, a *frequency restriction module* manipulates the training data so
    the model keeps to the correlations between object features and labels, disentangling spurious ones; from
    the feature perspective, a simple *Tail Interaction module* implicitly enhances the potential correlations
    among all samples from all source domains; both are embedded in a CNN or an MLP-like baseline.

    What the official code states, and this implementation follows (the repository holds its data pipeline and
    training loop, but neither its network nor the module of its loader's filter, ``HighPass``):

    - Frequency restriction: every training image is given a second, high-pass filtered view, and the two are
      concatenated into one batch with the labels repeated; the classification loss is the mean cross-entropy
      over the doubled batch (evaluation sees the plain images only).
    - The high-pass filter, as the authors' filter script (``drawHP.py``, in the repository's history) writes
      it: per channel of the ``[0, 1]`` image, the FFT2 spectrum, shifted, loses the disk of radius
      ``ratio * H`` bins about its centre ``(H/2, W/2)``, and the view is ``clip(|IFFT2(M * FFT2(x))|, 0, 1)``
      (:func:`restrict_frequencies`). The script's ratios are 0.01 to 0.05 and it uses 0.02: ``frm_ratio``
      defaults to 0.02.

    Design choices (no available source states them; status: partial):

    - That the loader's ``HighPass`` view is the script's filter, and at which ratio it trains: the module is
      missing from the repository, so the script's filter and its ratio stand in for it.
    - The Tail Interaction (:class:`TailInteraction`): the paper's body and the network file were not available.
      Its name places it at the tail of the network; here the penultimate features of the whole doubled batch
      (every domain, both views) attend to one another (``t = f + softmax(q k^T / sqrt(d)) v``) and the
      student's own classifier is also trained on the interacted features,
      ``loss = CE(fc(f), y) + tim_weight * CE(fc(t), y)`` (``tim_weight`` 1). It is used in training only, so
      predictions do not depend on the test batch: the deployable is the plain student.
    - The radius ``ratio * H`` is kept real; the script floors it to an integer, which at the ratio 0.02 empties
      the disk (the restriction would change nothing) on every image under 50 pixels. Kept real, the disk takes
      about the same share of the spectrum at every size: at 0.02 a 28-pixel image loses its zero frequency
      only (0.56 bins; 1 of 784 bins, 0.13%), the share a 4.48-bin disk takes of a 224-pixel spectrum.
    - The restricted view is made, on the device, from the engine's (normalised, possibly augmented) training
      view: un-normalised to pixels with the dataset statistics, filtered, and normalised again (the script
      filters the decoded image and re-quantises the result to 8 bits, which is not done here). ``frm_ratio`` 0
      leaves the restricted view out (the Tail Interaction alone).
    """

    @rules(frm_ratio=PROBABILITY, tim_weight=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        frm_ratio: float = 0.02
        tim_weight: float = 1.0

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        width = getattr(self.classifier_head, "in_features", None)
        if not isinstance(width, int):
            raise ConfigError(f"method spurious_dg sizes its Tail Interaction from the student's final classifier, "
                              f"which is a {type(self.classifier_head).__name__}, not a linear layer; use a zoo "
                              "network (its classifier `fc` is linear)")
        self.tim = TailInteraction(width)
        c = info.in_channels
        self.register_buffer("pixel_mean", torch.tensor(info.mean or (0.0,) * c).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(info.std or (1.0,) * c).view(1, -1, 1, 1), persistent=False)

    def restrict(self, x: Tensor) -> Tensor:
        """The frequency-restricted copy of an engine-normalised batch ``x``, normalised the same way."""
        pixels = x.float() * self.pixel_std + self.pixel_mean
        restricted = restrict_frequencies(pixels, self.cfg.frm_ratio)
        return ((restricted - self.pixel_mean) / self.pixel_std).to(x.dtype)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y, ls = batch["x"], batch["y"], self.cfg.label_smoothing
        n = x.shape[0]
        if self.cfg.frm_ratio > 0:
            x, targets = torch.cat([x, self.restrict(x)]), torch.cat([y, y])
        else:
            targets = y
        feats, logits = self.features(x)
        interacted = self.classifier_head(self.tim(feats))
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=ls)
        tim = F.cross_entropy(interacted.float(), targets, label_smoothing=ls)
        return {"loss": ce + self.cfg.tim_weight * tim, "ce": ce.detach(), "tim": tim.detach(),
                "train_acc": train_accuracy(logits[:n], y)}


__all__ = ["SpuriousDG", "TailInteraction", "restrict_frequencies", "restriction_mask"]
