"""Disentangling spurious and enhancing potential correlations: a frequency restriction of the training images
and a Tail Interaction among the features of all samples of all training domains."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, PROBABILITY, between, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from ..nn import train_accuracy
from .erm import ERM


def low_pass_mask(h: int, w: int, radius: Tensor) -> Tensor:
    """``[B, h, w // 2 + 1]`` 0/1 masks of an rFFT2 spectrum keeping the frequencies ``(f_u, f_v)`` (cycles per
    pixel, in ``[-1/2, 1/2]``) with ``max(|f_u|, |f_v|) <= radius_b / 2``: a centred square whose half-width is
    the fraction ``radius_b`` of the Nyquist frequency (1 keeps everything)."""
    fu = torch.fft.fftfreq(h, device=radius.device).abs()
    fv = torch.fft.rfftfreq(w, device=radius.device).abs()
    band = torch.maximum(fu[:, None], fv[None, :])  # [h, w // 2 + 1]
    return (band[None] <= radius.view(-1, 1, 1) / 2 + 1e-9).to(radius.dtype)


def restrict_frequencies(x: Tensor, radius: Tensor, keep: Tensor) -> Tensor:
    """The frequency restriction of a batch ``x`` ``[B, C, H, W]``: image ``b`` with ``keep_b`` is returned as it
    is, any other is low-pass filtered, every channel's spectrum restricted to :func:`low_pass_mask` with
    ``radius_b`` (``x' = irFFT2(M_b * rFFT2(x))``, orthonormal). Static shapes; the draws are arguments."""
    h, w = x.shape[-2:]
    spec = torch.fft.rfft2(x.float(), norm="ortho")
    mask = low_pass_mask(h, w, radius.float())[:, None]  # [B, 1, h, w // 2 + 1]
    restricted = torch.fft.irfft2(spec * mask, s=(h, w), norm="ortho").to(x.dtype)
    return torch.where(keep.view(-1, 1, 1, 1), x, restricted)


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
    Potential Correlations", IEEE TIP 2024 (arXiv 2401.05752).

    What the paper states (abstract): from the sample perspective, a *frequency restriction module* guides the
    model to the relevant correlations between object features and labels, disentangling spurious ones; from
    the feature perspective, a simple *Tail Interaction module* implicitly enhances potential correlations among
    all samples from all source domains, so the model acquires domain-invariant representations; both are
    embedded in CNN or MLP baselines. The paper's body and any official code were not available, so every
    formula below is a design choice of this implementation (status: partial):

    - Frequency restriction (:func:`restrict_frequencies`, training images only): each image, with probability
      ``frm_prob``, is low-pass filtered in the Fourier domain, keeping a centred square of frequencies whose
      half-width is a fraction ``radius ~ U(frm_min_radius, 1)`` of the Nyquist frequency (drawn per image);
      the others are left as they are. Restricting the spectrum to a random band removes the fine, high-
      frequency detail (texture, noise patterns) a network can latch onto as a domain-specific shortcut while
      the object's global shape (low frequencies) survives.
    - Tail Interaction (:class:`TailInteraction`, at the tail of the network): the penultimate features of the
      whole multi-domain batch attend to one another (``t = f + softmax(q k^T / sqrt(d)) v``), and the
      student's own classifier is trained on the interacted features as well:
      ``loss = CE(fc(f), y) + tim_weight * CE(fc(t), y)``. The module is used in training only, so predictions
      do not depend on the test batch: the deployable is the plain student.

    Defaults (all design choices): ``frm_prob`` 0.5, ``frm_min_radius`` 0.5, ``tim_weight`` 1.
    """

    @rules(frm_prob=PROBABILITY, frm_min_radius=between(0, 1, lo_open=True), tim_weight=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        frm_prob: float = 0.5
        frm_min_radius: float = 0.5
        tim_weight: float = 1.0

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        width = getattr(self.classifier_head, "in_features", None)
        if not isinstance(width, int):
            raise ConfigError(f"method spurious_dg sizes its Tail Interaction from the student's final classifier, "
                              f"which is a {type(self.classifier_head).__name__}, not a linear layer; use a zoo "
                              "network (its classifier `fc` is linear)")
        self.tim = TailInteraction(width)

    def restrict(self, x: Tensor, ctx: StepContext) -> Tensor:
        """The frequency restriction with this step's draws (``ctx.generator`` or the default generator)."""
        g, n = ctx.generator, x.shape[0]
        restricted = torch.rand(n, generator=g, device=x.device) < self.cfg.frm_prob
        lo = self.cfg.frm_min_radius
        radius = lo + (1 - lo) * torch.rand(n, generator=g, device=x.device)
        return restrict_frequencies(x, radius, ~restricted)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        y, ls = batch["y"], self.cfg.label_smoothing
        feats, logits = self.features(self.restrict(batch["x"], ctx))
        interacted = self.classifier_head(self.tim(feats))
        ce = F.cross_entropy(logits.float(), y, label_smoothing=ls)
        tim = F.cross_entropy(interacted.float(), y, label_smoothing=ls)
        return {"loss": ce + self.cfg.tim_weight * tim, "ce": ce.detach(), "tim": tim.detach(),
                "train_acc": train_accuracy(logits, y)}


__all__ = ["SpuriousDG", "TailInteraction", "low_pass_mask", "restrict_frequencies"]
