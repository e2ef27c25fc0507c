"""Representation Self-Challenging as DomainBed runs it: the features the true class leans on most are muted,
for the samples whose prediction they carry most, and the network is trained on what remains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import between, rules
from ..methods import StepContext, register_method
from ..nn import train_accuracy
from .base import at_least_float32
from .erm import ERM


def rsc_mask(features: Tensor, logits: Tensor, muted_logits_fn, y: Tensor, f_drop: float, b_drop: float) -> Tensor:
    """RSC's 0/1 mask of the features ``[N, F]`` (the classifier's input; ``logits`` its output with the graph
    from ``features``; ``muted_logits_fn`` the classifier).

    1. ``g = d z_y / d features`` per sample, ``z_y`` the true class's logit (eq. 1);
    2. ``mask_f``: 1 where ``g`` lies below the sample's ``(1 - f_drop)`` quantile of ``g`` (linear
       interpolation, numpy's default percentile), so the top ``f_drop`` share of each sample's features is 0
       (eq. 2);
    3. ``change = p_y(features) - p_y(features * mask_f)``, the drop of the true class's probability when
       they are muted; the samples at or above the batch's ``(1 - b_drop)`` quantile of ``change`` keep
       ``mask_f``, every other sample keeps all its features (``mask_f OR change < quantile``, section 3.3).

    Nothing of the mask carries a gradient. Shapes are static: quantiles are computed by sorting.
    """
    onehot = (y.unsqueeze(1) == torch.arange(logits.shape[1], device=y.device)).to(logits.dtype)
    (g,) = torch.autograd.grad((logits * onehot).sum(), features, retain_graph=True)
    g = at_least_float32(g.detach())
    mask_f = g < torch.quantile(g, 1.0 - f_drop, dim=1, keepdim=True)
    with torch.no_grad():
        muted = muted_logits_fn(features * mask_f.to(features.dtype))
        p = F.softmax(at_least_float32(logits.detach()), dim=1)
        p_muted = F.softmax(at_least_float32(muted), dim=1)
        change = ((p - p_muted) * onehot).sum(1)
        mask_b = change < torch.quantile(change, 1.0 - b_drop)
    return (mask_f | mask_b.unsqueeze(1)).to(features.dtype)


@register_method("rsc")
class RSC(ERM):
    """Huang, Wang, Xing & Huang, "Self-Challenging Improves Cross-Domain Generalization", ECCV 2020 (RSC), in
    the form of DomainBed's ``RSC`` (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR
    2021).

    One forward of the pooled per-domain batch gives the penultimate features and the logits; :func:`rsc_mask`
    mutes each challenged sample's top ``f_drop_factor`` share of features by the gradient of its true-class
    logit, the challenged samples being the ``b_drop_factor`` share of the batch whose true-class probability
    drops most when they are muted; ``loss = CE(classifier(features * mask), y)`` (eq. 5). The classifier runs
    again on the muted features, so the gradient reaches the network through the features that remain.
    Defaults are DomainBed's: ``rsc_f_drop_factor`` and ``rsc_b_drop_factor`` 1/3. ``train_acc`` is that of
    the unmuted logits.
    """

    @rules(f_drop_factor=between(0, 1, hi_open=True), b_drop_factor=between(0, 1, hi_open=True))
    @dataclass
    class Config(ERM.Config):
        f_drop_factor: float = 1 / 3
        b_drop_factor: float = 1 / 3

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        y = batch["y"]
        features, logits = self.features(batch["x"])
        head = self.classifier_head
        mask = rsc_mask(features, logits, head, y, self.cfg.f_drop_factor, self.cfg.b_drop_factor)
        muted_logits = head(features * mask)
        loss = F.cross_entropy(muted_logits, y, label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss, "muted": 1 - mask.detach().float().mean(), "train_acc": train_accuracy(logits, y)}


__all__ = ["RSC", "rsc_mask"]
