"""AaD: attracting neighbours and dispersing the batch, over the banks of NRC (Yang et al., NeurIPS 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import COUNT, NON_NEGATIVE, rules
from ..methods import StepContext, register_method
from .nrc import NRC
from .sfda import SourceFreeConfig, nearest


def aad_terms(probs: Tensor, features: Tensor, fea_bank: Tensor, score_bank: Tensor, k: int) -> dict[str, Tensor]:
    """AaD's two terms for a batch, with the banks already holding the batch's rows.

    - ``attract = -mean_i sum_{j in N_i} s_j . p_i`` over the ``k`` nearest bank rows ``N_i`` of image ``i``
      (itself excluded), ``s`` score-bank rows;
    - ``disperse = mean_i sum_{j != i} p_i . p_j`` over the batch, the gradient flowing through both factors
      (the official code does not detach either).

    As in :func:`~mentor.adapt.nrc.nrc_terms` the attraction leaves out the constant ``sum_c s_c log s_c``
    that the official ``F.kl_div`` form adds. Also returned: ``vote`` ``[B]`` (a diagnostic).
    """
    with torch.no_grad():
        near = nearest(features, fea_bank, k)
        score_near = score_bank[near]  # [B, K, C]
    p = probs.float()
    attract = -(score_near * p[:, None]).sum(-1).sum(1).mean()
    others = p.sum(0, keepdim=True) - p  # sum_{j != i} p_j
    disperse = (p * others).sum(1).mean()
    return {"attract": attract, "disperse": disperse, "vote": score_near.sum(1).argmax(1)}


def dispersion_weight(step: int | Tensor, max_steps: int, alpha: float, beta: float) -> Tensor:
    """AaD's decaying weight of the dispersion term, ``alpha * (1 + 10 * step / max_steps) ** -beta`` with
    the 0-based step (the official code computes it before counting the iteration), as a 0-d tensor."""
    t = step.float() if isinstance(step, Tensor) else torch.tensor(float(step))
    return alpha * (1.0 + 10.0 * t / max(1, max_steps)) ** (-beta)


@register_method("aad")
class AaD(NRC):
    """Yang, Wang, Wang, Jui & van de Weijer, "Attracting and Dispersing: A Simple Approach for Source-free
    Domain Adaptation", NeurIPS 2022; official code Albert0147/AaD_SFDA ``tar_adaptation.py`` (VisDA).

    NRC's feature and score banks (filled by a full pass before the first step, the batch's rows written
    in every step), and the loss ``attract + lambda_t * disperse`` (:func:`aad_terms`): each prediction is
    pulled towards the scores of its ``K`` nearest neighbours and pushed away from the other predictions
    of the batch, with ``lambda_t = alpha * (1 + 10 t / T) ** -beta`` (:func:`dispersion_weight`, ``t``
    the step, ``T`` ``trainer.max_steps``). Logged: ``attract``, ``disperse``, ``disperse_weight``.

    Defaults are the official VisDA script's: ``K`` 5, ``alpha`` 1, ``beta`` 5, the classifier trained,
    SGD with momentum 0.9, Nesterov, weight decay 1e-3, ``lr`` 1e-3 (the Office-Home runs use ``K`` 3).
    Design choices as :class:`~mentor.adapt.nrc.NRC` (one learning rate for the whole network; initial
    banks from the un-augmented pool); the dispersion runs over each rank's batch under DDP.
    """

    @rules(K=COUNT, alpha=NON_NEGATIVE, beta=NON_NEGATIVE)
    @dataclass
    class Config(SourceFreeConfig):
        lr: float | None = 1e-3
        K: int = 5
        alpha: float = 1.0
        beta: float = 5.0

    def loss_terms(self, probs: Tensor, features: Tensor, index: Tensor,
                   ctx: StepContext) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        c = self.cfg
        t = aad_terms(probs, features, self.banks.features, self.banks.scores, c.K)
        vote = t.pop("vote")
        weight = dispersion_weight(ctx.step, ctx.max_steps, c.alpha, c.beta).to(probs.device)
        return t["attract"] + weight * t["disperse"], {**t, "disperse_weight": weight}, vote
