"""Virtual adversarial training: smoothness of the prediction against its most sensitive direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MANY, NON_NEGATIVE, POSITIVE, PROBABILITY, between, rules
from ..methods import BuildInfo, Inputs, StepContext, register_method
from ..methods.supervised import Supervised
from ..nn import entropy, frozen_bn_stats, ramp, soft_kl
from ..nn.mixing import step_generator, vat_perturbation


@register_method("vat")
class VAT(Supervised):
    """Miyato, Maeda, Koyama & Ishii, "Virtual Adversarial Training: A Regularization Method for
    Supervised and Semi-Supervised Learning", TPAMI 2018, with entropy minimisation (the paper's
    "VAT+EntMin"), in the form of USB's ``vat`` algorithm.

    ``loss = CE(labelled) + lambda_u * w(step) * KL(p(u) || p(u + r_adv)) + ent_weight * H(p(u))``,
    batch means over the unlabelled batch ``u`` (one weak view), with ``p(u)`` detached in the KL but
    not in the entropy, ``r_adv`` of norm ``vat_eps`` per image found by
    :func:`~mentor.nn.mixing.vat_perturbation` (``vat_iterations`` power-iteration steps with a
    finite-difference probe of norm ``vat_xi``), and ``w`` a linear ramp over the first
    ``unsup_warmup`` fraction of training (the entropy term is not ramped, as in USB). No unlabelled
    forward updates BN running statistics. Defaults are USB's: ``vat_eps`` 6, ``vat_xi`` 1e-6, one
    iteration, ``ent_weight`` 0.06 (``ent_loss_ratio``), ``unsup_warmup`` 0.4, ``lambda_u`` 1.

    The probe's starting direction is drawn from :func:`~mentor.nn.mixing.step_generator`, a pure
    function of the run's seed and the step (eager steps).
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak",))

    @rules(lambda_u=NON_NEGATIVE, unsup_warmup=PROBABILITY.because("a share of trainer.max_steps"),
           vat_eps=POSITIVE, vat_xi=POSITIVE, ent_weight=NON_NEGATIVE,
           vat_iterations=between(1, MANY).because("forward-backward passes per step; the paper uses 1"))
    @dataclass
    class Config(Supervised.Config):
        lambda_u: float = 1.0
        unsup_warmup: float = 0.4
        vat_eps: float = 6.0
        vat_xi: float = 1e-6
        vat_iterations: int = 1
        ent_weight: float = 0.06

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        # Drawn from the global generator the engine seeds with trainer.seed before building the method.
        self.seed = int(torch.randint(2**62, ()).item())

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        out = super().training_step(batch, ctx)
        u = batch["u"]
        with frozen_bn_stats(self.student):
            logits_u = self.student(u)
            r_adv = vat_perturbation(self.student, u, logits_u, c.vat_xi, c.vat_eps, c.vat_iterations,
                                     step_generator(ctx.step, self.seed, u.device))
            logits_adv = self.student(u + r_adv.to(u.dtype))
        ctx.pseudo_labels(logits_u.detach().argmax(1))
        vat = soft_kl(logits_adv, logits_u.detach(), temperature=1.0)
        ent = entropy(logits_u).mean()
        weight = ramp(ctx.step, c.unsup_warmup * ctx.max_steps)
        return {"loss": out["loss"] + c.lambda_u * weight * vat + c.ent_weight * ent,
                "sup": out["loss"].detach(), "unsup": vat.detach(), "entropy": ent.detach(),
                "train_acc": out["train_acc"]}


__all__ = ["VAT"]
