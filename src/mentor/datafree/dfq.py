"""DFQ: Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation", CVPR
Workshops 2020.

ZSKT's adversarial game with the generator also held to the teacher's data: its loss is

    bn * L_BN + oh * CE(T(x), argmax T(x)) + balance * sum_c pbar_c log pbar_c - adv * KL(p_T || p_S)

where ``L_BN`` matches the batch statistics at the input of every teacher BN layer to the layer's running
statistics (:class:`~mentor.nn.bnstats.BNStatistics`), the cross-entropy makes each image confidently one
class (the paper's instance entropy) and the balance term spreads the batch over the classes (its batch
entropy). The student minimises ``KL(p_T || p_S)`` on fresh generator samples.

Defaults are Fast-Datafree's ``scripts/dfq_cifar.sh`` (the benchmark the method is compared on): adv 1,
bn 1, oh 1, balance 20, one generator step then 10 student steps, generator Adam 1e-3, nz 256, batch
256, temperature 1 (the value its runs used: its script's ``--T 20`` is overwritten for this method; here
the temperature a recipe sets is the one used). The BN term weighs every layer alike (no first-layer
multiplier, no moving average), as Fast-Datafree's hooks do. The student and its BN statistics are
treated as in :class:`~mentor.datafree.zskt.ZSKT`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..config import NON_NEGATIVE, rules
from ..methods import StepContext, register_method
from .losses import class_balance
from .zskt import ZSKT


@register_method("dfq")
class DFQ(ZSKT):
    @rules(balance=NON_NEGATIVE)
    @dataclass
    class Config(ZSKT.Config):
        """``bn``, ``oh``, ``balance`` and ``adv``: the weights of the four terms of the generator's loss."""

        s_steps: int = 10
        bn: float = 1.0
        oh: float = 1.0
        balance: float = 20.0

    def generator_terms(self, x: Tensor, z: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        t, bn = self.teacher_bn_loss(x)
        oh = F.cross_entropy(t.float(), t.argmax(1))
        bal = class_balance(t)
        kl = self.disagreement(x, t)
        loss = cfg.bn * bn + cfg.oh * oh + cfg.balance * bal - cfg.adv * kl
        return {"loss": loss, "bn": bn, "oh": oh, "balance": bal, "kl": kl}
