"""DAFL: Chen et al., "DAFL: Data-Free Learning of Student Networks", ICCV 2019.

The teacher acts as a fixed discriminator: a generator is trained, without any adversary, to make images
the teacher classifies confidently (``oh``: cross-entropy of ``T(x)`` to its own argmax), on which its
penultimate features fire strongly (``act``: ``-mean |f_T(x)|``) and whose predictions spread over every
class (``balance``: ``sum_c pbar_c log pbar_c`` of the batch-mean softmax). The student learns
``KL(p_T || p_S)`` on fresh generator samples.

Defaults are those of Fast-Datafree's ``scripts/dafl_cifar.sh`` and ``datafree_kd.py`` (the benchmark the
method is compared on): nz 512, oh 1, act 0.001, balance 20, generator Adam 1e-3, one generator step then
5 student steps, batch 256. DAFL's own code updates the generator and the student in the same step with
other weights (oh 1, ie 5, act 0.1, latent 100, generator lr 0.2); the alternation here is Fast-Datafree's.

Temperature: 1. Both DAFL's code and the Fast-Datafree runs behind the published numbers distil at T=1
(Fast-Datafree's script passes ``--T 20``, but for the generative baselines its criterion is rebuilt at
T=1 and that is what the student is trained with); here the temperature a recipe sets is the one used.
The teacher's features are the input of its final classifier (:class:`~mentor.models.penultimate.PenultimateTap`),
the pooled vector Fast-Datafree's ``return_features`` gives. The entropy uses the natural log (DAFL's code
uses log10, a constant factor absorbed by ``balance``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, ConfigError, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models.penultimate import PenultimateTap
from .base import GenerativeConfig, GenerativeMethod
from .losses import activation, class_balance


@register_method("dafl")
class DAFL(GenerativeMethod):
    @rules(act=NON_NEGATIVE, balance=NON_NEGATIVE)
    @dataclass
    class Config(GenerativeConfig):
        """``act``: weight of the activation term; ``balance``: weight of the class-balance (information
        entropy) term; ``oh``: weight of the teacher's cross-entropy to its own prediction."""

        temperature: float = 1.0
        nz: int = 512
        oh: float = 1.0
        act: float = 0.001
        balance: float = 20.0

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        if cfg.adv > 0 or cfg.bn > 0:
            raise ConfigError(f"method {cfg.name}: DAFL's generator has no adversarial or BN-statistics term "
                              f"(got adv={cfg.adv}, bn={cfg.bn}); dfq adds both, zskt and dfad are adversarial")
        super().__init__(cfg, student, info)
        self.tap = PenultimateTap(self.teacher)

    def generator_terms(self, x: Tensor, z: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        f, t = self.tap(x)
        oh = F.cross_entropy(t.float(), t.argmax(1))
        act = activation(f)
        bal = class_balance(t)
        loss = cfg.oh * oh + cfg.act * act + cfg.balance * bal
        return {"loss": loss, "oh": oh, "act": act, "balance": bal}
