"""Refined logit distillation: DKD whose teacher signal cannot carry the teacher's mistakes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import POSITIVE, rules
from ..methods import StepContext, register_method
from .dkd import DKD, warmup_factor
from .losses.logit import rld_loss


@register_method("rld")
class RLD(DKD):
    """Sun, Chen, Lyu et al., "Knowledge Distillation with Refined Logits", 2024 (arXiv:2408.07703).

    ``loss = ce_weight * CE + w(step) * (alpha * SCD + beta * MCD)`` (:func:`~mentor.distill.
    losses.rld_loss`), with DKD's linear warm-up ``w``. Defaults are the official code's
    (zju-SWJ/RLD ``engine/cfg.py``): CE 1, alpha 1, beta 8, T 4, SCD temperature 1, 20 warm-up
    epochs. Its README example sets the SCD temperature to T (``--same-t``); with a teacher that is
    right on every sample that setting equals DKD.
    """

    @rules(scd_temperature=POSITIVE)
    @dataclass
    class Config(DKD.Config):
        scd_temperature: float = 1.0

    def distill_terms(self, zs: Tensor, zt: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        scd, mcd, loss = rld_loss(zs, zt, y, c.alpha, c.beta, c.temperature, c.scd_temperature)
        return {"kd": warmup_factor(ctx, c.warmup_epochs) * loss, "scd": scd, "mcd": mcd}
