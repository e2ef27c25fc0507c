"""Inter-domain Mixup as DomainBed runs it: each training domain's batch mixed with another domain's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import POSITIVE, rules
from ..methods import StepContext, register_method
from ..nn.mixing import sample_beta
from .erm import ERM


@register_method("mixup")
class Mixup(ERM):
    """Inter-domain Mixup (Xu et al., "Adversarial Domain Adaptation with Domain Mixup", AAAI 2020; Yan et al.,
    "Improve Unsupervised Domain Adaptation with Mixup Training", arXiv 2020) in the form of DomainBed's
    ``Mixup``.

    The ``D`` domains are put in a random order ``pi`` and each is paired with the next one, cyclically:
    ``(pi_k, pi_{k+1 mod D})`` for ``k = 0..D-1`` (DomainBed's ``random_pairs_of_minibatches``; with two
    domains, both orders). Each pair draws its own ``lam ~ Beta(alpha, alpha)``, mixes the two batches image
    by image, ``x = lam x_i + (1 - lam) x_j``, and adds ``lam CE(f(x), y_i) + (1 - lam) CE(f(x), y_j)``;
    the loss is the sum over pairs divided by ``D``. Each pair is forwarded on its own, as DomainBed's loop
    does. Default ``mixup_alpha`` 0.2 (``alpha``), DomainBed's.

    The order and the ``lam`` are drawn on the device (``ctx.generator`` where set, else the default
    generator; ``lam`` as a ratio of Gamma draws), so nothing is read back to the host.
    """

    min_domains = 2

    @rules(alpha=POSITIVE)
    @dataclass
    class Config(ERM.Config):
        alpha: float = 0.2

    def draw(self, ctx: StepContext, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(first, second, lam)``: the domain positions of each pair and its mixing weight, each ``[D]``."""
        order = torch.rand(self.num_domains, generator=ctx.generator, device=device).argsort()
        lam = sample_beta(self.cfg.alpha, self.num_domains, ctx.generator, device)
        return order, order.roll(-1), lam

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        xs, ys = self.per_domain(batch["x"]), self.per_domain(batch["y"])
        first, second, lam = self.draw(ctx, xs.device)
        shape = (-1,) + (1,) * (xs.dim() - 1)
        mixed = lam.view(shape).to(xs.dtype) * xs[first] + (1 - lam.view(shape).to(xs.dtype)) * xs[second]
        yi, yj = ys[first], ys[second]
        total = xs.new_zeros((), dtype=torch.float32)
        for k in range(self.num_domains):
            logits = self.student(mixed[k])
            total = total + lam[k] * F.cross_entropy(logits, yi[k], label_smoothing=self.cfg.label_smoothing) \
                + (1 - lam[k]) * F.cross_entropy(logits, yj[k], label_smoothing=self.cfg.label_smoothing)
        return {"loss": total / self.num_domains, "lam": lam.mean()}


__all__ = ["Mixup"]
