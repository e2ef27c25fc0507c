"""FreeMatch: a self-adaptive threshold and a self-adaptive fairness term."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import DECAY, NON_NEGATIVE, rules
from ..methods import StepContext, register_method
from ..nn import FreeMatchThreshold, freematch_fairness
from .fixmatch import FixMatch, Logits, TargetConfig


@register_method("freematch")
class FreeMatch(FixMatch):
    """Wang et al., "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning", ICLR 2023, in the
    form of USB's ``freematch`` algorithm.

    ``loss = CE(labelled) + lambda_u * L_u + lambda_e * L_f``: ``L_u`` is FixMatch's strong-view loss with
    the self-adaptive threshold (:class:`~mentor.nn.FreeMatchThreshold`, moving averages with momentum
    ``ema_p``) in place of ``p_cutoff``, and ``L_f`` the self-adaptive fairness term
    (:func:`~mentor.nn.freematch_fairness`, 0 when the mask keeps nothing). Defaults: ``ema_p`` 0.999,
    hard labels, ``lambda_u`` 1, and ``lambda_e`` 0.001 as USB's classic-CV configs set it
    (``freematch_cifar10_40_0.yaml``; the argument's default is 0.01).
    """

    keeps_own_masker = True

    @rules(lambda_e=NON_NEGATIVE, ema_p=DECAY)
    @dataclass
    class Config(TargetConfig):
        lambda_e: float = 0.001
        ema_p: float = 0.999

    def build_masker(self) -> FreeMatchThreshold:
        return FreeMatchThreshold(self.info.num_classes, self.cfg.ema_p)

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        fair = freematch_fairness(z["u_strong"], mask, self.masker.p_model, self.masker.label_hist)
        return {"fair": (self.cfg.lambda_e, fair)}


__all__ = ["FreeMatch"]
