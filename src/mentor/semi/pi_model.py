"""The Pi-model: consistency between two stochastic views of each unlabelled image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..config import NON_NEGATIVE, PROBABILITY, rules
from ..methods import Inputs, StepContext, register_method
from ..methods.supervised import Supervised
from ..nn import frozen_bn_stats, ramp


@register_method("pi_model")
class PiModel(Supervised):
    """Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017 (the Pi-model), in
    the form of USB's ``pimodel`` algorithm.

    ``loss = CE(labelled) + lambda_u * w(step) * mean_{b,c} (softmax(f(u2))_bc - softmax(f(u1))_bc)^2``
    with ``u1``, ``u2`` two independent weak views of the unlabelled batch (``u_weak``, ``u_weak_1``),
    the target ``softmax(f(u1))`` detached (USB; the paper lets gradients through both branches), the
    squared error averaged over images and classes (USB's ``consistency_loss(..., "mse")``, the paper's
    ``1/C ||.||^2``), and ``w`` a ramp over the first ``unsup_warmup`` fraction of training: linear as
    in USB, or ``warmup_shape: sigmoid`` for the paper's ``exp(-5 (1 - t)^2)``. The unlabelled forwards
    do not update BN running statistics (USB's ``bn_controller``). Defaults are USB's classic-CV
    configuration: ``lambda_u`` 10, ``unsup_warmup`` 0.4.
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "weak"))

    @rules(lambda_u=NON_NEGATIVE, unsup_warmup=PROBABILITY.because("a share of trainer.max_steps"))
    @dataclass
    class Config(Supervised.Config):
        lambda_u: float = 10.0
        unsup_warmup: float = 0.4
        warmup_shape: Literal["linear", "sigmoid"] = "linear"

    def targets(self, u: Tensor) -> Tensor:
        """The class distributions the second view is pulled towards (no gradient)."""
        with torch.no_grad(), frozen_bn_stats(self.student):
            return self.student(u).float().softmax(1)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        out = super().training_step(batch, ctx)
        target = self.targets(batch["u_weak"])
        ctx.pseudo_labels(target.argmax(1))
        with frozen_bn_stats(self.student):
            logits_u = self.student(batch["u_weak_1"])
        unsup = (logits_u.float().softmax(1) - target).square().mean()
        weight = ramp(ctx.step, c.unsup_warmup * ctx.max_steps, shape=c.warmup_shape)
        return {"loss": out["loss"] + c.lambda_u * weight * unsup, "sup": out["loss"].detach(),
                "unsup": unsup.detach(), "train_acc": out["train_acc"]}


__all__ = ["PiModel"]
