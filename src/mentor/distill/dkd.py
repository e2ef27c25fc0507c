"""Decoupled knowledge distillation: target-class and non-target-class KD weighted separately."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import NON_NEGATIVE, POSITIVE, rules
from ..methods import StepContext, register_method
from ..nn import ramp
from .base import DistillConfig
from .kd import KD
from .losses.logit import dkd_loss


def warmup_factor(ctx: StepContext, warmup_epochs: float) -> Tensor:
    """Linear warm-up of the distillation terms over ``warmup_epochs`` epochs, per step, in (0, 1].

    ``min((step + 1) / (warmup_epochs * steps_per_epoch), 1)``. The reference (mdistiller) uses
    ``min(epoch / W, 1)`` with epochs counted from 1, constant within an epoch: 1/W during the whole
    first epoch, 1 from the first step of epoch W. Counting steps from 1 gives the same value at the
    last step of every epoch, ramps smoothly in between, never multiplies the terms by 0, and reaches
    1 at the last step of epoch W (one epoch later than the reference's constant-per-epoch ramp).
    """
    return ramp(ctx.step, warmup_epochs * ctx.steps_per_epoch)


@register_method("dkd")
class DKD(KD):
    """Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022.

    ``loss = ce_weight * CE + w(step) * (alpha * TCKD + beta * NCKD)`` (:func:`~mentor.distill.
    losses.dkd_loss`) with the linear warm-up ``w`` of :func:`warmup_factor`. Defaults are the
    official code's CIFAR-100 ones (mdistiller ``cfg.py``): CE 1, alpha 1, beta 8, T 4, 20 warm-up
    epochs. Its per-pair configs lower beta to 6 (wrn40-2 and vgg13 teachers) or 2 (resnet56 ->
    resnet20, resnet110 -> resnet32).
    """

    @rules(alpha=NON_NEGATIVE, beta=NON_NEGATIVE, temperature=POSITIVE, warmup_epochs=NON_NEGATIVE)
    @dataclass
    class Config(DistillConfig):
        alpha: float = 1.0
        beta: float = 8.0
        temperature: float = 4.0
        warmup_epochs: float = 20.0

    def distill_terms(self, zs: Tensor, zt: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        tckd, nckd, loss = dkd_loss(zs, zt, y, c.alpha, c.beta, c.temperature)
        return {"kd": warmup_factor(ctx, c.warmup_epochs) * loss, "tckd": tckd, "nckd": nckd}
