"""Self-supervised contrastive regularisation (SelfReg) as DomainBed runs it: every image's logits and features
are pulled towards those of a random image of its class, and towards a mixup of two such images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, rules
from ..methods import StepContext, register_method
from ..nn import train_accuracy
from ..nn.mixing import sample_beta
from .erm import ERM


def class_partners(y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation ``partner`` of the batch that maps every sample to one of its class
    (itself possibly; a class seen once maps to itself), drawn on the device with static shapes.

    The batch sorted by class, stably, lists the classes in blocks; a random permutation sorted stably by
    class lists the same blocks with each block's members in random order. Matching the two position by
    position pairs every sample with a random member of its block."""
    base = torch.sort(y, stable=True).indices
    shuffled = torch.randperm(y.shape[0], generator=generator, device=y.device)
    mixed = shuffled[torch.sort(y[shuffled], stable=True).indices]
    return torch.empty_like(base).scatter_(0, base, mixed)


def projection_mlp(width: int) -> nn.Sequential:
    """SelfReg's class-discriminative projection: three linear layers with BatchNorm after each and ReLU after
    the first two, ``width -> hidden -> hidden -> width``, ``hidden = width`` for 2048-wide features (ResNet-50)
    and ``2 * width`` otherwise (DomainBed's ``cdpl``)."""
    hidden = width if width == 2048 else 2 * width
    return nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, width), nn.BatchNorm1d(width))


@register_method("selfreg")
class SelfReg(ERM):
    """Kim, Yoo, Park, Kim & Lee, "SelfReg: Self-supervised Contrastive Regularization for Domain
    Generalization", ICCV 2021, in the form of DomainBed's ``SelfReg`` (Gulrajani & Lopez-Paz, "In Search of
    Lost Domain Generalization", ICLR 2021).

    One forward of the pooled per-domain batch gives the features ``h`` (the classifier's input), the logits
    ``z`` and the projection ``q = proj(h)`` (:func:`projection_mlp`). Two random same-class partners ``a`` and
    ``b`` are drawn for every image (:func:`class_partners`, across domains) and one
    ``lam ~ Beta(alpha, alpha)`` per step; with ``MSE`` the mean squared error over all entries:

    - individualised terms: ``L_ind = MSE(z, z[a]) + feature_weight * MSE(h, q[a])``;
    - heterogeneous (mixup) terms: ``L_hdl = MSE(z, lam z[a] + (1 - lam) z[b]) + feature_weight *
      MSE(h, lam q[a] + (1 - lam) q[b])``;
    - ``loss = CE(z, y) + c * (lam L_ind + (1 - lam) L_hdl)`` with ``c = min(CE(z, y), 1)`` held constant
      (DomainBed's ``C_scale``, read back there with ``.item()``, a detached tensor here).

    The features are compared with the partners' projections (not with their features), as DomainBed does.
    Defaults are DomainBed's constants: ``alpha`` 0.5, ``feature_weight`` 0.3.
    """

    @rules(alpha=POSITIVE, feature_weight=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        alpha: float = 0.5
        feature_weight: float = 0.3

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.projector = projection_mlp(self.feature_width)

    def draw(self, y: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, b, lam)``: two same-class partner permutations and the 0-d mixing weight."""
        a = class_partners(y, ctx.generator)
        b = class_partners(y, ctx.generator)
        lam = sample_beta(self.cfg.alpha, 1, ctx.generator, y.device)[0]
        return a, b, lam

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        y = batch["y"]
        h, z = self.features(batch["x"])
        q = self.projector(h)
        a, b, lam = self.draw(y, ctx)
        lam = lam.to(z.dtype)
        fw = self.cfg.feature_weight
        ind_logit = F.mse_loss(z, z[a])
        hdl_logit = F.mse_loss(z, lam * z[a] + (1 - lam) * z[b])
        ind_feat = fw * F.mse_loss(h, q[a])
        hdl_feat = fw * F.mse_loss(h, lam * q[a] + (1 - lam) * q[b])
        nll = F.cross_entropy(z, y, label_smoothing=self.cfg.label_smoothing)
        scale = nll.detach().clamp(max=1.0)
        reg = lam * (ind_logit + ind_feat) + (1 - lam) * (hdl_logit + hdl_feat)
        return {"loss": nll + scale * reg, "nll": nll.detach(), "reg": reg.detach(), "lam": lam.detach().float(),
                "train_acc": train_accuracy(z, y)}


__all__ = ["SelfReg", "class_partners", "projection_mlp"]
