"""Invariant Risk Minimization (IRMv1) as DomainBed runs it, and the annealed penalty it shares with V-REx and
Fishr: ``loss = nll + w(step) * penalty`` with ``w`` a small weight until ``anneal_steps``, the full weight after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NON_NEGATIVE, rules
from ..methods import StepContext, register_method
from ..nn import train_accuracy
from ..nn.ramp import ramp
from .base import at_least_float32
from .erm import ERM


def prediction_error(z: Tensor, y: Tensor) -> Tensor:
    """``softmax(z) - onehot(y)`` over the last dimension: the gradient of the cross-entropy with respect to
    the logits (the one-hot made by comparison, since ``F.one_hot`` reads the labels back to check them)."""
    classes = torch.arange(z.shape[-1], device=z.device)
    return torch.softmax(z, dim=-1) - (y.unsqueeze(-1) == classes).to(z.dtype)


def irm_penalty(logits: Tensor, y: Tensor) -> Tensor:
    """IRMv1's penalty of one domain's batch, ``logits [B, C]``: the product of the derivatives of the mean
    cross-entropy of ``s * logits`` with respect to a dummy scale ``s`` at ``s = 1``, one on the even rows and
    one on the odd rows (DomainBed's unbiased estimate of the squared gradient norm).

    The derivative has a closed form, ``d/ds mean_n CE(s z_n, y_n) = mean_n <softmax(z_n) - onehot(y_n), z_n>``,
    so no double backward is needed; the result is differentiable in ``logits`` like DomainBed's
    ``create_graph=True`` gradients. ``logits`` may have leading dimensions (``[D, B, C]`` gives one penalty
    per domain)."""
    z = at_least_float32(logits)
    per_sample = (prediction_error(z, y) * z).sum(-1)  # d CE(s z_n, y_n) / ds at s = 1
    return per_sample[..., ::2].mean(-1) * per_sample[..., 1::2].mean(-1)


@register_method("irm")
class IRM(ERM):
    """Arjovsky, Bottou, Gulrajani & Lopez-Paz, "Invariant Risk Minimization" (arXiv 2019), the IRMv1
    objective in the form of DomainBed's ``IRM`` (Gulrajani & Lopez-Paz, "In Search of Lost Domain
    Generalization", ICLR 2021).

    One forward over the pooled per-domain batch; ``nll`` is the mean cross-entropy (the mean of the
    per-domain risks, every domain having ``B`` images), ``penalty`` the mean over domains of
    :func:`irm_penalty`, and ``loss = nll + w * penalty`` with ``w = initial_weight`` (1) for the steps
    before ``anneal_steps`` and ``penalty_weight`` from that step on (steps counted from 0, as DomainBed's
    ``update_count``). Defaults are DomainBed's: ``irm_lambda`` 1e2 (``penalty_weight``),
    ``irm_penalty_anneal_iters`` 500 (``anneal_steps``).

    ``rescale`` divides the whole loss by ``w`` once ``w > 1`` (the authors' Colored-MNIST code does; DomainBed
    does not, so it is off by default).

    Deviation: DomainBed builds a fresh Adam optimizer at the anneal step (its moments would otherwise lag
    the jump of the gradients' scale); here the engine owns the optimizer and it is not reset.

    The subclasses V-REx and Fishr change :meth:`penalty` (and Fishr :meth:`outputs`) and the defaults.
    """

    min_domains = 2

    @rules(penalty_weight=NON_NEGATIVE, anneal_steps=NON_NEGATIVE, initial_weight=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        penalty_weight: float = 1e2
        anneal_steps: int = 500
        initial_weight: float = 1.0
        rescale: bool = False

    def penalty_weight(self, step: int | Tensor) -> Tensor:
        """``initial_weight`` before step ``anneal_steps``, ``penalty_weight`` from it on, as a 0-d tensor
        (``step`` a Python int or a 0-d tensor; no host synchronisation)."""
        cfg = self.cfg
        # With a length of 1 the ramp is the indicator of step >= anneal_steps on integer steps.
        on = ramp(step, 1.0, start=float(cfg.anneal_steps))
        return cfg.initial_weight + (cfg.penalty_weight - cfg.initial_weight) * on

    def outputs(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(features, logits)`` of the pooled batch; IRM's penalty needs the logits only."""
        return None, self.student(x)

    def penalty(self, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor:
        """The mean over training domains of IRMv1's penalty."""
        return irm_penalty(self.per_domain(logits), self.per_domain(y)).mean()

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        y = batch["y"]
        features, logits = self.outputs(batch["x"])
        nll = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        penalty = self.penalty(features, logits, y)
        weight = self.penalty_weight(ctx.step)
        loss = nll + weight * penalty
        if self.cfg.rescale:
            loss = loss / weight.clamp(min=1.0)
        return {"loss": loss, "nll": nll.detach(), "penalty": penalty.detach(), "train_acc": train_accuracy(logits, y)}


__all__ = ["IRM", "irm_penalty", "prediction_error"]
