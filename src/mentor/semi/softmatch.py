"""SoftMatch: uniform distribution alignment and truncated Gaussian weights instead of a hard mask."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import DECAY, POSITIVE, rules
from ..methods import StepContext, register_method
from ..nn import DistAlignEMA, SoftMatchWeight
from .fixmatch import FixMatch, Logits, TargetConfig, hard_or_soft


@register_method("softmatch")
class SoftMatch(FixMatch):
    """Chen et al., "SoftMatch: Addressing the Quantity-Quality Trade-off in Semi-supervised Learning",
    ICLR 2023, in the form of USB's ``softmatch`` algorithm.

    The weak probabilities are aligned to a uniform target (:class:`~mentor.nn.DistAlignEMA`; with
    ``dist_uniform: false`` to the moving average of the labelled batch's), the Gaussian statistics are
    updated with and the weights taken of the *aligned* probabilities (:class:`~mentor.nn.SoftMatchWeight`,
    USB's order; the paper and TorchSSL update them before the alignment, USB issue #89), and the
    pseudo-labels come from the *unaligned* weak logits. Defaults: ``ema_p`` 0.999, ``n_sigma`` 2, hard
    labels, ``lambda_u`` 1.
    """

    @rules(ema_p=DECAY, n_sigma=POSITIVE)
    @dataclass
    class Config(TargetConfig):
        ema_p: float = 0.999
        n_sigma: float = 2.0
        dist_uniform: bool = True

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.dist_align = DistAlignEMA(info.num_classes, cfg.ema_p, "uniform" if cfg.dist_uniform else "model")

    def build_masker(self) -> SoftMatchWeight:
        return SoftMatchWeight(self.info.num_classes, self.cfg.n_sigma, self.cfg.ema_p)

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        probs_lb = None if self.cfg.dist_uniform else z["x"].detach().float().softmax(1)
        return self.dist_align(probs, probs_lb)

    def targets(self, probs: Tensor, raw: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        return hard_or_soft(raw, self.cfg.hard_label, self.cfg.T)


__all__ = ["SoftMatch"]
