"""Risk Extrapolation (V-REx) as DomainBed runs it: IRM's annealed objective with the variance of the
per-domain risks as the penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..methods import register_method
from .irm import IRM, at_least_float32


@register_method("vrex")
class VREx(IRM):
    """Krueger et al., "Out-of-Distribution Generalization via Risk Extrapolation (REx)", ICML 2021, the V-REx
    objective in the form of DomainBed's ``VREx``.

    ``penalty`` is the variance (over domains, population form) of the per-domain mean cross-entropies,
    ``loss = nll + w * penalty`` with IRM's step switch of ``w`` (:meth:`IRM.penalty_weight`); ``nll`` is the
    mean of the per-domain risks. Defaults are DomainBed's: ``vrex_lambda`` 1e1 (``penalty_weight``),
    ``vrex_penalty_anneal_iters`` 500 (``anneal_steps``), weight 1 before the anneal step. As for IRM,
    DomainBed's reset of Adam at the anneal step is not done (the engine owns the optimizer).
    """

    @dataclass
    class Config(IRM.Config):
        penalty_weight: float = 1e1

    def penalty(self, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor:
        risks = self.per_domain(F.cross_entropy(at_least_float32(logits), y, reduction="none")).mean(1)
        return (risks - risks.mean()).pow(2).mean()


__all__ = ["VREx"]
