"""Fishr: matching across domains the variances of the classifier's per-sample gradients, as DomainBed runs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import DECAY, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, register_method
from .base import at_least_float32
from .irm import IRM, prediction_error


def classifier_sample_grads(features: Tensor, logits: Tensor, y: Tensor, bias: bool = True) -> Tensor:
    """Per-sample gradients of ``CE(W f_n + b, y_n)`` with respect to a linear classifier's ``W`` and ``b``,
    flattened to ``[N, C * F (+ C)]`` (the weight's gradient row-major, then the bias's).

    In closed form: with ``r_n = softmax(logits_n) - onehot(y_n)``, ``dCE_n/dW = r_n f_n^T`` and
    ``dCE_n/db = r_n``. Differentiable in ``features`` and ``logits`` (DomainBed takes them from BackPACK's
    ``BatchGrad`` with ``create_graph=True``)."""
    r = prediction_error(at_least_float32(logits), y)
    grads = (r.unsqueeze(-1) * at_least_float32(features).unsqueeze(-2)).flatten(-2)
    return torch.cat([grads, r], dim=-1) if bias else grads


@register_method("fishr")
class Fishr(IRM):
    """Rame, Dancette & Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization",
    ICML 2022, in the form of DomainBed's ``Fishr``.

    For each training domain ``d``: the variance over its ``B`` images (population form) of the per-sample
    gradients of the cross-entropy with respect to the final linear classifier's weight and bias
    (:func:`classifier_sample_grads`), ``v_d``; an exponential moving average over steps with decay ``ema``,
    ``m_d <- ema * m_d + (1 - ema) * v_d`` (``m_d`` kept detached, in the buffer ``grad_var``; it starts at 0),
    of which the penalty reads ``m_d / (1 - ema)`` (DomainBed's ``oneminusema_correction``: gradients reach the
    current variance with weight 1 whatever ``ema``). ``penalty = mean_d mean_k (m_dk - mean_d' m_d'k)^2`` over
    the ``k`` classifier parameters, and ``loss = nll + w * penalty`` with ``w`` 0 before ``anneal_steps`` and
    ``penalty_weight`` from it on. The moving averages are updated at every step, before the anneal step too.

    Defaults are DomainBed's: ``lambda`` 1000 (``penalty_weight``), ``penalty_anneal_iters`` 1500
    (``anneal_steps``), ``ema`` 0.95. DomainBed computes the per-sample gradients with BackPACK; here they are
    the closed form of a linear classifier, so the classifier must be an ``nn.Linear`` (every zoo network's
    ``fc`` is). As for IRM, DomainBed's reset of Adam at the anneal step is not done. Under DDP each process
    updates the moving averages from its own shard of the batch, and DDP's buffer broadcast at every forward
    hands every process rank 0's.
    """

    @rules(ema=DECAY)
    @dataclass
    class Config(IRM.Config):
        penalty_weight: float = 1000.0
        anneal_steps: int = 1500
        initial_weight: float = 0.0
        ema: float = 0.95

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        head = self.classifier_head
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"method fishr computes the per-sample gradients of the student's final classifier in "
                              f"closed form and needs it to be an nn.Linear; {type(student).__name__}'s is a "
                              f"{type(head).__name__}. Use a zoo network (`mentor list models`) or method.name=vrex")
        self.has_bias = head.bias is not None
        width = head.out_features * (head.in_features + int(self.has_bias))
        self.register_buffer("grad_var", torch.zeros(self.num_domains, width))

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.features(x)

    def penalty(self, features: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        grads = self.per_domain(classifier_sample_grads(features, logits, y, self.has_bias))  # [D, B, K]
        var = (grads - grads.mean(1, keepdim=True)).pow(2).mean(1)  # [D, K]
        ema = self.cfg.ema
        average = ema * self.grad_var + (1.0 - ema) * var
        with torch.no_grad():
            self.grad_var.copy_(average)
        average = average / (1.0 - ema)
        return (average - average.mean(0, keepdim=True)).pow(2).mean()


__all__ = ["Fishr", "classifier_sample_grads"]
