"""Group distributionally robust optimisation (GroupDRO) over training domains, as DomainBed runs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, rules
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from ..nn import train_accuracy
from .erm import ERM
from .irm import at_least_float32


@register_method("groupdro")
class GroupDRO(ERM):
    """Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural Networks for Group Shifts: On the
    Importance of Regularization for Worst-Case Generalization", ICLR 2020 (Algorithm 1), with the training
    domains as the groups, in the form of DomainBed's ``GroupDRO``.

    Each domain's batch is forwarded on its own (as DomainBed's loop does; with BatchNorm in training mode
    each domain is normalised with its own statistics) giving the risks ``l_d``. The group weights ``q`` (the
    buffer ``q``, checkpointed, uniform at the start) are updated by exponentiated gradient ascent on the
    detached risks, ``q_d <- q_d exp(eta * l_d)``, then normalised to sum 1, and the loss is
    ``sum_d q_d * l_d`` with the updated ``q`` (a constant for the backward). Default ``groupdro_eta`` 1e-2
    (``eta``), DomainBed's. Under DDP each process updates ``q`` from its own shard of
    the batch, and DDP's buffer broadcast at every forward hands every process rank 0's.
    """

    min_domains = 2

    @rules(eta=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        eta: float = 1e-2

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.register_buffer("q", torch.full((self.num_domains,), 1.0 / self.num_domains))

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        xs, ys = self.per_domain(batch["x"]), self.per_domain(batch["y"])
        logits = [self.student(xs[d]) for d in range(self.num_domains)]
        risks = torch.stack([at_least_float32(F.cross_entropy(z, ys[d], label_smoothing=self.cfg.label_smoothing))
                             for d, z in enumerate(logits)])
        with torch.no_grad():
            q = self.q * torch.exp(self.cfg.eta * risks.detach())
            self.q.copy_(q / q.sum())
        loss = (self.q.clone() * risks).sum()
        return {"loss": loss, "nll": risks.mean().detach(), "worst_risk": risks.max().detach(),
                "train_acc": train_accuracy(torch.cat(logits), batch["y"])}


__all__ = ["GroupDRO"]
