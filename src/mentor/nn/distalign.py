"""Distribution alignment of pseudo-label probabilities with a moving average of the model's marginal.

Berthelot et al., "ReMixMatch: Semi-Supervised Learning with Distribution Matching and Augmentation
Anchoring", ICLR 2020, introduced ``p <- Normalize(p * p_target / p_model)``: the unlabelled
predictions are scaled by the ratio of a target class distribution to a running estimate of the
model's own marginal over the unlabelled data, so that on average the pseudo-labels follow the target.
SoftMatch (uniform target) and AdaMatch (target: the model's marginal on the labelled batch) reuse it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masking import all_reduce_sum

TARGETS = ("uniform", "model", "gt")


def _global_mean(probs: Tensor, dtype: torch.dtype) -> Tensor:
    """The class-wise mean of ``probs`` over the global batch (all DDP ranks), as ``dtype``."""
    n = torch.full((1,), float(probs.shape[0]), device=probs.device, dtype=dtype)
    sums = all_reduce_sum(torch.cat([probs.detach().to(dtype).sum(0), n]))
    return sums[:-1] / sums[-1]


class DistAlignEMA(nn.Module):
    """``p <- Normalize(p * (p_target + 1e-6) / (p_model + 1e-6))`` with moving averages, as USB's
    ``DistAlignEMAHook``.

    ``p_model`` is the moving average (momentum ``momentum``) of the unlabelled batch's mean
    probabilities, set to the first batch's mean at the first call; it is updated with the batch before
    the batch is aligned. ``target``:

    - ``"uniform"``: ``p_target = 1/C`` (SoftMatch);
    - ``"model"``: ``p_target`` starts at ``1/C`` and follows the moving average of the labelled batch's
      mean probabilities (AdaMatch; :meth:`forward` then needs ``probs_lb``);
    - ``"gt"``: a fixed ``p_target`` given, e.g. the labelled class distribution.

    State (``p_model``, ``p_target``, ``started``) is in buffers; means are over the global batch under
    DDP (USB gathers the ranks' probabilities), so no value is read back to the host.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, target: str = "uniform",
                 p_target: Tensor | None = None):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"distribution-alignment target {target!r}: use one of {', '.join(TARGETS)}")
        if (target == "gt") != (p_target is not None):
            raise ValueError("a p_target is given exactly for target='gt'")
        self.num_classes, self.momentum, self.target = num_classes, momentum, target
        start = torch.full((num_classes,), 1.0 / num_classes) if p_target is None else p_target.float().clone()
        self.register_buffer("p_target", start / start.sum())
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, probs: Tensor, probs_lb: Tensor | None = None) -> Tensor:
        self.update(probs, probs_lb)
        aligned = probs * (self.p_target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(1, keepdim=True)

    @torch.no_grad()
    def update(self, probs: Tensor, probs_lb: Tensor | None = None) -> None:
        m = self.momentum
        mean = _global_mean(probs, self.p_model.dtype)
        self.p_model.copy_(torch.where(self.started, m * self.p_model + (1 - m) * mean, mean))
        self.started.fill_(True)
        if self.target == "model":
            if probs_lb is None:
                raise ValueError("DistAlignEMA(target='model') follows the labelled batch: pass probs_lb")
            self.p_target.mul_(m).add_((1 - m) * _global_mean(probs_lb, self.p_target.dtype))


__all__ = ["DistAlignEMA"]
