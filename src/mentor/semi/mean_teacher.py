"""Mean Teacher: consistency with an exponential moving average of the student."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal  # noqa: F401  (the inherited Config fields' annotations, resolved here by doc tools)

import torch
from torch import Tensor, nn

from ..config import DECAY, rules
from ..methods import BuildInfo, register_method
from ..nn import bn_layers, frozen_bn_stats
from .pi_model import PiModel


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """A forward of an eval-mode network (an EMA teacher) whose BN layers normalise with the statistics
    of the batch at hand, leaving the running statistics as they are."""
    layers = bn_layers(module)
    modes = [m.training for m in layers]
    for m in layers:
        m.train()
    try:
        with frozen_bn_stats(module):
            yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


@register_method("mean_teacher")
class MeanTeacher(PiModel):
    """Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency targets
    improve semi-supervised deep learning results", NeurIPS 2017, in the form of USB's ``meanteacher``.

    The Pi-model's loss with the target taken from the teacher, an exponential moving average of the
    student (``teacher <- decay * teacher + (1 - decay) * student`` after every optimizer step, by the
    engine; BN running statistics copied): ``lambda_u * w(step) * mean_{b,c} (softmax(f(u2)) -
    softmax(f_ema(u1)))^2`` on two independent weak views. The teacher runs in training mode without
    updating anything, so its BN layers normalise with the unlabelled batch's statistics (the
    authors' code and USB both run it so). Defaults are USB's classic-CV configuration: ``lambda_u``
    50, ``unsup_warmup`` 0.4, ``ema_decay`` 0.999 (USB's ``ema_m``). The teacher is reported as
    ``val_acc_teacher``.

    USB's ``meanteacher.train_step`` computes the consistency between the teacher's output and itself
    (``logits_x_ulb_s = outs_x_ulb_w['logits']``), so its unsupervised term has no gradient and its
    Mean Teacher trains on the labels alone (its classic-CV errors match ``supervised``); this class
    uses the student's output on the second view, as the paper does.
    """

    @rules(ema_decay=DECAY)
    @dataclass
    class Config(PiModel.Config):
        lambda_u: float = 50.0
        ema_decay: float = 0.999

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.add_ema_teacher("teacher", "student", cfg.ema_decay)

    def targets(self, u: Tensor) -> Tensor:
        with torch.no_grad(), batch_statistics(self.teacher):
            return self.teacher(u).float().softmax(1)

    def eval_heads(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}


__all__ = ["MeanTeacher", "batch_statistics"]
