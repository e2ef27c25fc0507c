"""Dash: keep the unlabelled images whose loss is below a threshold that falls as training goes on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import COUNT, POSITIVE, at_least, rules
from ..methods import StepContext, register_method
from ..nn import DashThreshold
from .fixmatch import FixMatch, Logits, SemiConfig, sharpen_logits


@register_method("dash")
class Dash(FixMatch):
    """Xu et al., "Dash: Semi-Supervised Learning with Dynamic Thresholding", ICML 2021, in the form of
    USB's ``dash`` algorithm (defaults from its ``get_argument``: ``T`` 0.5, ``gamma`` 1.27, ``C``
    1.0001, ``rho_min`` 0.05, ``num_wu_iter`` 2048).

    The first ``warmup_steps`` steps train on the labels only (the unlabelled loss is masked out) and
    estimate ``rho_hat`` from the labelled loss of their last ``rho_window`` steps; afterwards an
    unlabelled image is kept when ``CE(z_weak, target) <= rho_t`` (:class:`~mentor.nn.DashThreshold`),
    ``rho_t = max(C * gamma^-k * rho_hat, rho_min)`` with ``k`` the number of ``decay_every``-step
    periods since the warm-up, and the strong view learns ``target``: the soft ``softmax(z_weak / T)``
    until ``rho_t`` reaches ``rho_min``, ``argmax`` after (USB's switch). USB lowers the threshold every
    10 of its 1024-iteration epochs (``decay_every`` 10240) and runs its warm-up before the
    ``2^20`` training iterations; here the warm-up is part of ``trainer.max_steps`` and its labelled
    forward also carries the unlabelled views (one concatenated forward, as every step).
    """

    keeps_own_masker = True

    @rules(T=POSITIVE, gamma=at_least(1), C=POSITIVE, rho_min=POSITIVE, warmup_steps=COUNT, rho_window=COUNT,
           decay_every=COUNT)
    @dataclass
    class Config(SemiConfig):
        T: float = 0.5
        gamma: float = 1.27
        C: float = 1.0001
        rho_min: float = 0.05
        warmup_steps: int = 2048
        rho_window: int = 100
        decay_every: int = 10240

    def build_masker(self) -> DashThreshold:
        c = self.cfg
        return DashThreshold(c.rho_min, c.gamma, c.C, c.warmup_steps, c.rho_window, c.decay_every)

    def supervised(self, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        sup = super().supervised(z, batch, ctx)
        self.masker.observe(ctx.step, sup)
        return sup

    def targets(self, probs: Tensor, raw: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        soft = sharpen_logits(z["u_weak"].detach().float(), self.cfg.T)
        hard = torch.zeros_like(soft).scatter_(1, probs.argmax(1, keepdim=True), 1.0)
        return torch.where(self.masker.hard(ctx.step), hard, soft)

    def mask(self, probs: Tensor, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        target = self.targets(probs, probs, z, ctx)
        loss_w = F.cross_entropy(z["u_weak"].detach().float(), target, reduction="none")
        return self.masker(loss_w, ctx.step)


__all__ = ["Dash"]
