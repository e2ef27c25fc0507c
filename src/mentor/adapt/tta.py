"""The test-time baselines: the source model unchanged, and test-batch normalisation statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods import StepContext, register_method
from ..nn import use_batch_stats
from .base import TestTimeMethod


@register_method("source")
class Source(TestTimeMethod):
    """No adaptation: the source model in eval mode predicts every batch (the TTA tables' "Source")."""

    @torch.no_grad()
    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        return {"logits": self.student(batch["x"])}

    def phases(self):
        return []


@register_method("norm")
class Norm(Source):
    """Test-batch BN statistics: every BN layer normalises with the mean and variance of the current
    test batch instead of the source's running statistics, nothing is trained (Schneider et al.,
    "Improving robustness against common corruptions by covariate shift adaptation", NeurIPS 2020;
    the "BN-1" / "norm" baseline of tent and the online TTA benchmark)."""

    def prepare(self) -> None:
        use_batch_stats(self.student)
