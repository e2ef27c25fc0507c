"""DFAD: Fang et al., "Data-Free Adversarial Distillation", arXiv 1912.11006 (VainF/Data-Free-Adversarial-
Distillation).

A generator and the student play a min-max game on the mean absolute difference of the logits: the
student minimises ``L1(S(G(z)), T(G(z)))`` for 5 steps, the generator maximises it for one. The
generator is DFAD's ``GeneratorA``: it ends with Tanh and a BatchNorm without affine parameters, so it
emits images already in the networks' normalised space. Defaults of ``DFAD_cifar.py``: nz 256, batch
256, generator Adam at 1e-3; the student is trained with SGD (lr 0.1, wd 5e-4) in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import StepContext, register_method
from ..nn import train_accuracy
from .base import GenerativeConfig, GenerativeMethod
from .losses import logit_l1


@register_method("dfad")
class DFAD(GenerativeMethod):
    @dataclass
    class Config(GenerativeConfig):
        output: str = "tanh_bn"
        beta1: float = 0.9  # DFAD's Adam keeps torch's default betas
        adv: float = 1.0

    def generator_terms(self, x: Tensor, z: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        t = self.teacher(x)
        s = self.student(x)
        gap = logit_l1(s, t)
        return {"loss": -self.cfg.adv * gap, "gap": gap}

    def student_batch(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        gap = logit_l1(s, t)
        return {"loss": gap, "l1": gap, "agree": train_accuracy(s, t.argmax(1))}
