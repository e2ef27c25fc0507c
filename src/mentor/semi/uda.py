"""UDA: sharpened soft pseudo-labels with a confidence mask, and optional training-signal annealing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods import StepContext, register_method
from ..nn import step_tensor
from .fixmatch import FixMatch, Logits


def tsa_threshold(schedule: str, step: int | Tensor, max_steps: int, num_classes: int,
                  device: torch.device) -> Tensor:
    """Training-signal annealing's ``eta_t = alpha_t (1 - 1/K) + 1/K`` with ``alpha_t`` = ``t/T``
    (linear), ``1 - exp(-5 t/T)`` (log) or ``exp(5 (t/T - 1))`` (exp); 1 for ``none``. ``t`` is the
    step counted from 0 and ``T`` the run's length, as USB's ``UDA.TSA``."""
    t = step_tensor(step, device) / max(1, max_steps)
    if schedule == "none":
        return torch.ones_like(t)
    alpha = {"linear": t, "log": 1.0 - torch.exp(-5.0 * t), "exp": torch.exp(5.0 * (t - 1.0))}[schedule]
    return alpha * (1.0 - 1.0 / num_classes) + 1.0 / num_classes


@register_method("uda")
class UDA(FixMatch):
    """Xie et al., "Unsupervised Data Augmentation for Consistency Training", NeurIPS 2020, in the form of
    USB's ``uda`` algorithm: FixMatch with soft targets ``softmax(z_weak / T)`` (``T`` 0.4) and the
    mask ``max p >= p_cutoff`` (0.8) on the unsharpened weak probabilities; the cross-entropy to a soft
    target is the paper's KL up to the target's entropy, which has no gradient.

    Training-signal annealing (``tsa_schedule``: ``none`` by default, as USB; ``linear``, ``log``,
    ``exp``) drops from the labelled loss the images whose probability of their *true* class exceeds
    ``eta_t`` (:func:`tsa_threshold`), the paper's rule (USB compares the *largest* probability), and
    averages over the whole labelled batch as USB does (the official code divides by the kept count).

    USB at HEAD passes the already-softmaxed weak probabilities to its pseudo-labeller with
    ``softmax=False``, which returns them unsharpened: its ``T`` has no effect there. This method
    sharpens, as the paper does.
    """

    @dataclass
    class Config(FixMatch.Config):
        p_cutoff: float = 0.8
        T: float = 0.4
        hard_label: bool = False
        tsa_schedule: Literal["none", "linear", "log", "exp"] = "none"

    def supervised(self, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        c = self.cfg
        logits = z["x"].float()
        per = F.cross_entropy(logits, batch["y"], reduction="none", label_smoothing=c.label_smoothing)
        if c.tsa_schedule == "none":
            return per.mean()
        eta = tsa_threshold(c.tsa_schedule, ctx.step, ctx.max_steps, logits.shape[1], logits.device)
        p_true = logits.detach().softmax(1).gather(1, batch["y"][:, None])[:, 0]
        return (per * (p_true <= eta).float()).mean()


__all__ = ["UDA", "tsa_threshold"]
