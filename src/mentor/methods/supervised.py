"""Plain supervised training: the baseline every teacher-student table starts from."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..config import PROBABILITY, rules
from ..nn import train_accuracy
from .base import Method, MethodConfig, StepContext, register_method


@register_method("supervised")
class Supervised(Method):
    """Cross-entropy on the labelled batch, with optional label smoothing
    (Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", 2016)."""

    @rules(label_smoothing=PROBABILITY)
    @dataclass
    class Config(MethodConfig):
        label_smoothing: float = 0.0

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        logits = self.student(batch["x"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss, "train_acc": train_accuracy(logits, batch["y"])}
