"""Lookahead with a large learning rate for domain generalisation: fast weights explore at a large rate and are
interpolated into slow weights every ``k`` steps; the slow weights are deployed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, between, rules
from ..methods import BuildInfo, MethodConfig, Refresh, StepContext, register_method
from .erm import ERM
from .swad import bn_batches, frozen_copy, recompute_bn, step_tensor


class ParamShadow(nn.Module):
    """Buffers holding one tensor per parameter of a network, in its parameter order (a copy of its weights that
    is state, checkpointed, but nothing trains)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for i, p in enumerate(net.parameters()):
            self.register_buffer(f"p{i}", p.detach().clone())

    def tensors(self) -> list[Tensor]:
        return list(self.buffers())


@register_method("lookahead_dg")
class LookaheadDG(ERM):
    """Zhang, Qi, Shi & Gao, "Exploring Flat Minima for Domain Generalization with Large Learning Rates", IEEE
    TKDE (arXiv 2309.06337), in the form of the Lookahead trainer of the authors' public code
    (koncle/Lookahead-Large-LR ``train.py: lookahead_train``; the classification code is not public).

    The student holds the fast weights ``theta``, trained by the run's optimizer at its (large) learning rate with
    ERM's loss. The method keeps the slow weights ``phi`` (``slow``, a frozen copy: the deployable) and
    ``theta_bar`` (``fast_mean``), the running mean of the fast weights within the current outer step. An outer
    step is ``k`` optimizer steps; after step ``j`` of it (``j = step mod k``, from 0):

    - ``theta_bar <- theta_bar + (theta - theta_bar) / (j + 1)`` (the mean of the fast weights after steps
      ``0..j``);
    - at its last step (``j = k - 1``): ``phi <- (1 - alpha) phi + alpha theta_final`` with ``theta_final =
      theta_bar`` (``average``, the code's ``--avgLA``) or ``theta`` (plain Lookahead); then the fast weights
      restart from the slow ones, ``theta <- phi``, and ``theta_bar <- phi``.

    ``regularize`` (the code's ``--regLA``) adds ``reg * mean((theta - theta_bar)^2)`` to the loss, the mean over
    every parameter element, with ``theta_bar`` fixed (no gradient): the fast weights are pulled toward the
    history of the outer step (``theta_bar = phi`` at its first step). Logged as ``reg``.

    All of it runs in :meth:`after_step` with ``torch.where`` on the step number, so a captured step works. The
    slow copy takes the student's buffers every step, and before every evaluation its BN statistics are
    recomputed for the slow weights on fixed training batches (:func:`~mentor.generalize.swad.recompute_bn`,
    ``bn_images`` in batches of ``bn_batch_size``; the code's ``update_bn`` over 500 batches, after training).
    ``val_acc_fast`` reports the fast weights.

    Defaults: ``k`` 15 (``--length``), ``alpha`` 0.05 (``--alpha``), ``average`` on (the released script
    ``LA_train_r50os16_gtav_base.sh`` sets ``--avgLA``), ``regularize`` off with ``reg`` 0.01
    (``--reg_strength``) when on. Design choices, as the classification code is not public: the optimizer's
    state (momentum) carries over the outer-step boundary, as in the segmentation code; the learning-rate
    schedule advances every optimizer step (the code advances it once per outer step), so give the run a
    schedule over ``trainer.max_steps``; the large learning rate is the recipe's ``optim.lr``.
    """

    @rules(k=COUNT, alpha=between(0, 1, lo_open=True), reg=NON_NEGATIVE, bn_images=COUNT, bn_batch_size=COUNT)
    @dataclass
    class Config(ERM.Config):
        k: int = 15
        alpha: float = 0.05
        average: bool = True
        regularize: bool = False
        reg: float = 0.01
        bn_images: int = 4096
        bn_batch_size: int = 128

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.slow = frozen_copy(student)
        self.fast_mean = ParamShadow(student)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        out = super().training_step(batch, ctx)
        if not self.cfg.regularize:
            return out
        reg = self.pull(self.cfg.reg)
        return {**out, "loss": out["loss"] + reg, "reg": reg.detach()}

    def pull(self, strength: float) -> Tensor:
        """``strength * mean((theta - theta_bar)^2)`` over every parameter element of the student."""
        params = list(self.student.parameters())
        total = sum(((p - m) ** 2).sum() for p, m in zip(params, self.fast_mean.tensors()))
        return strength * total / sum(p.numel() for p in params)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        k, alpha = self.cfg.k, self.cfg.alpha
        fast = [p.detach() for p in self.student.parameters()]
        slow, mean = list(self.slow.parameters()), self.fast_mean.tensors()
        j = step_tensor(ctx.step, fast[0].device) % k
        boundary = j == k - 1
        weight = 1.0 / (j + 1).double()
        for f, s, m in zip(fast, slow, mean):
            m.lerp_(f, weight.to(m.dtype))
            final = m if self.cfg.average else f
            s.copy_(torch.where(boundary, s + alpha * (final - s), s))
            f.copy_(torch.where(boundary, s, f))
            m.copy_(torch.where(boundary, s, m))
        for sb, b in zip(self.slow.buffers(), self.student.buffers()):
            sb.copy_(b)

    def before_eval(self, refresh: Refresh) -> None:
        recompute_bn(self.slow, bn_batches(refresh, self.cfg.bn_images, self.cfg.bn_batch_size))

    def deployable(self) -> nn.Module:
        return self.slow

    def eval_heads(self) -> dict[str, nn.Module]:
        return {"fast": self.student}


__all__ = ["LookaheadDG", "ParamShadow"]
