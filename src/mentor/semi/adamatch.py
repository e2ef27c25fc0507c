"""AdaMatch: distribution alignment to the labelled marginal and a threshold relative to the labelled
batch's confidence."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import DECAY, PROBABILITY, rules
from ..methods import StepContext, register_method
from ..nn import DistAlignEMA, ramp, relative_threshold
from .fixmatch import FixMatch, Logits


@register_method("adamatch")
class AdaMatch(FixMatch):
    """Berthelot et al., "AdaMatch: A Unified Approach to Semi-Supervised Learning and Domain Adaptation",
    ICLR 2022, in the form of USB's ``adamatch`` algorithm, with the paper's weight schedule.

    The weak probabilities are aligned to the moving average (``ema_p``) of the labelled batch's mean
    prediction (:class:`~mentor.nn.DistAlignEMA`, ``target="model"``); the mask keeps
    ``max p >= p_cutoff * mean_b max p_lb`` (:func:`~mentor.nn.relative_threshold`); the targets are the
    aligned probabilities' ``argmax`` (or, with soft labels, sharpened with ``T``). The unlabelled loss is
    weighted by the paper's ``mu(t) = 1/2 - cos(min(pi, 2 pi t / T)) / 2``, which rises over the first
    ``unsup_warmup`` (0.5) of ``trainer.max_steps``; ``unsup_warmup: 0`` is USB's constant weight. The
    paper's random logit interpolation and its labelled strong view are not part of USB's form.
    Defaults: ``p_cutoff`` 0.95, ``ema_p`` 0.999, hard labels, ``lambda_u`` 1.
    """

    @rules(ema_p=DECAY, unsup_warmup=PROBABILITY.because("a share of trainer.max_steps"))
    @dataclass
    class Config(FixMatch.Config):
        ema_p: float = 0.999
        unsup_warmup: float = 0.5

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.dist_align = DistAlignEMA(info.num_classes, cfg.ema_p, "model")

    def build_masker(self) -> None:
        return None  # the threshold follows the labelled batch: relative_threshold, no state

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        return self.dist_align(probs, z["x"].detach().float().softmax(1))

    def mask(self, probs: Tensor, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        return relative_threshold(z["x"].detach().float().softmax(1), probs, self.cfg.p_cutoff)

    def unsup_weight(self, ctx: StepContext) -> float | Tensor:
        return ramp(ctx.step, self.cfg.unsup_warmup * ctx.max_steps, shape="cosine", offset=0.0)


__all__ = ["AdaMatch"]
