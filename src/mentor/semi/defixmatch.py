"""DeFixMatch: FixMatch debiased with the same pseudo-label loss measured on the labelled images."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..methods import Inputs, StepContext, register_method
from .fixmatch import FixMatch, Logits, hard_or_soft


@register_method("defixmatch")
class DeFixMatch(FixMatch):
    """Schmutz et al., "Don't fear the unlabelled: safe semi-supervised learning via simple debiasing",
    2022 (arXiv 2203.07512; ICLR 2023), in the form of USB's ``defixmatch`` algorithm.

    The labelled images come in a weak and a strong view, and all four views go through one forward.
    ``loss = (CE(x_weak) + CE(x_strong)) / 2 + lambda_u * (L_u - L_anti)``: ``L_u`` is FixMatch's
    unlabelled loss and ``L_anti`` the same loss on the labelled images (their weak-view pseudo-label and
    mask, the strong view's cross-entropy, the mean over the labelled batch), whose subtraction removes
    the bias the pseudo-labels add to the risk estimate. Defaults are FixMatch's.
    (USB dropped it from its registry in 2024 together with the labelled strong view it needs; here the
    engine makes any view the method declares.)
    """

    keeps_own_masker = True

    inputs = Inputs(labeled=("weak", "strong"), unlabeled=("weak", "strong"))

    def views(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"x": batch["x"], "x_strong": batch["x_strong"], "u_weak": batch["u_weak"],
                "u_strong": batch["u_strong"]}

    def supervised(self, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        ls = self.cfg.label_smoothing
        return 0.5 * (F.cross_entropy(z["x"].float(), batch["y"], label_smoothing=ls)
                      + F.cross_entropy(z["x_strong"].float(), batch["y"], label_smoothing=ls))

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        probs_lb = z["x"].detach().float().softmax(1)
        target = hard_or_soft(probs_lb, self.cfg.hard_label, self.cfg.T)
        anti = (F.cross_entropy(z["x_strong"].float(), target, reduction="none") * self.masker(probs_lb)).mean()
        return {"anti": (-self.cfg.lambda_u, anti)}


__all__ = ["DeFixMatch"]
