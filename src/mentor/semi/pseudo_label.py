"""Pseudo-labelling with a confidence threshold, the simplest user of the unlabelled stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..config import NON_NEGATIVE, PROBABILITY, rules
from ..methods import Inputs, StepContext, register_method
from ..methods.supervised import Supervised
from ..nn import frozen_bn_stats, ramp


@register_method("pseudo_label")
class PseudoLabel(Supervised):
    """Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep Neural
    Networks", ICML Workshop 2013, in the form of USB's ``pseudolabel`` algorithm.

    ``loss = CE(labelled) + lambda_u * w(step) * mean_b[ mask_b * CE(z_b, argmax z_b) ]`` over the
    unlabelled batch ``z = f(u_weak)``, with the hard pseudo-label taken from the same (detached)
    logits, ``mask_b = 1[max softmax(z_b) >= p_cutoff]``, the mean over all ``mu * B`` unlabelled
    images (not over the masked ones), and ``w`` a linear warm-up over the first ``unsup_warmup``
    fraction of training. The unlabelled forward does not update BN running statistics (USB's
    ``bn_controller``). Defaults are USB's: ``p_cutoff`` 0.95, ``lambda_u`` 1, ``unsup_warmup`` 0.4.
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak",))

    @rules(p_cutoff=PROBABILITY, lambda_u=NON_NEGATIVE,
           unsup_warmup=PROBABILITY.because("a share of trainer.max_steps"))
    @dataclass
    class Config(Supervised.Config):
        p_cutoff: float = 0.95
        lambda_u: float = 1.0
        unsup_warmup: float = 0.4

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        out = super().training_step(batch, ctx)
        with frozen_bn_stats(self.student):
            logits_u = self.student(batch["u"])
        probs = logits_u.detach().float().softmax(1)
        conf, pseudo = probs.max(1)
        mask = (conf >= c.p_cutoff).float()
        ctx.pseudo_labels(pseudo, mask)
        unsup = (F.cross_entropy(logits_u, pseudo, reduction="none") * mask).mean()
        weight = ramp(ctx.step, c.unsup_warmup * ctx.max_steps)
        return {"loss": out["loss"] + c.lambda_u * weight * unsup, "sup": out["loss"].detach(),
                "unsup": unsup.detach(), "train_acc": out["train_acc"]}


__all__ = ["PseudoLabel"]
