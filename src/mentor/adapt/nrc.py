"""NRC: neighbourhood reciprocity clustering over feature and score banks of the target pool (Yang et al.,
NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..errors import ConfigError
from ..methods import Refresh, StepContext, register_method
from .sfda import SourceFreeConfig, SourceFreeMethod, TargetBanks, nearest


def nrc_terms(probs: Tensor, features: Tensor, index: Tensor, fea_bank: Tensor, score_bank: Tensor, k: int,
              kk: int, affinity: float = 0.1, eps: float = 1e-5, reciprocal: bool = True) -> dict[str, Tensor]:
    """NRC's three terms for a batch, with the banks already holding the batch's rows.

    ``probs`` ``[B, C]`` are the batch's softmax outputs (with gradient), ``features`` ``[B, D]`` its
    L2-normalised features, ``index`` its rows in the banks. For image ``i`` with neighbours ``N_i`` (the
    ``k`` bank rows nearest to it, itself excluded) and each neighbour's own ``kk`` nearest rows ``E_j``:

    - ``neighbour = -mean_i sum_{j in N_i} w_ij s_j . p_i``, ``w_ij`` 1 when ``i`` is in ``E_j`` (a
      reciprocal neighbour; with ``reciprocal``) and ``affinity`` otherwise;
    - ``expanded = -mean_i sum_{j in N_i} sum_{m in E_j} affinity * s_m . p_i``;
    - ``diversity = sum_c pbar_c log(pbar_c + eps)``, ``pbar`` the batch mean of ``p``.

    ``s`` are score-bank rows. The official code writes the dot products as ``F.kl_div(p, s)`` without a
    logarithm on ``p``, which adds ``sum_c s_c log s_c``, a constant without gradient: the terms here leave
    it out, so their values differ from the official log but not their gradients. Also returned: ``vote``
    ``[B]``, the class of the neighbours' summed scores (a diagnostic).
    """
    b = probs.shape[0]
    with torch.no_grad():
        near = nearest(features, fea_bank, k)  # [B, K]
        near_near = nearest(fea_bank[near].flatten(0, 1), fea_bank, kk).view(b, k, kk)  # [B, K, KK]
        if reciprocal:
            match = (near_near == index.view(b, 1, 1)).sum(-1).float()  # 1 where i is among j's neighbours
            weight = torch.where(match > 0, match, torch.full_like(match, affinity))
        else:
            weight = torch.full(near.shape, affinity, device=probs.device)
        score_near = score_bank[near]  # [B, K, C]
        score_near_near = score_bank[near_near]  # [B, K, KK, C]
    p = probs.float()
    neighbour = -((score_near * p[:, None]).sum(-1) * weight).sum(1).mean()
    expanded = -affinity * (score_near_near * p[:, None, None]).sum(-1).sum((1, 2)).mean()
    mean = p.mean(0)
    diversity = (mean * torch.log(mean + eps)).sum()
    return {"neighbour": neighbour, "expanded": expanded, "diversity": diversity, "vote": score_near.sum(1).argmax(1)}


@register_method("nrc")
class NRC(SourceFreeMethod):
    """Yang, Wang, van de Weijer, Herranz & Jui, "Exploiting the Intrinsic Neighborhood Structure for
    Source-free Domain Adaptation", NeurIPS 2021; official code Albert0147/NRC_SFDA ``train_tar.py`` (VisDA)
    and ``office-home/train_tar.py``.

    A feature bank (normalised features) and a score bank (softmax outputs) hold every target image
    (:class:`~mentor.adapt.sfda.TargetBanks`): filled by a full pass in eval mode before the first step
    (``on_epoch`` at epoch 0), then each step writes its batch's rows (train-mode features of the batch,
    as the official code) before searching neighbours. The loss is
    ``neighbour + expanded + diversity`` (:func:`nrc_terms`): each prediction is pulled towards the scores of
    its ``K`` nearest neighbours (weight 1 for reciprocal ones, ``affinity`` for the others) and of their
    ``KK`` nearest neighbours (weight ``affinity``), while the batch's mean prediction is kept diverse.

    Defaults are the official VisDA script's: ``K`` 5, ``KK`` 5, ``affinity`` 0.1, ``epsilon`` 1e-5, the
    classifier trained (unlike SHOT), SGD with momentum 0.9, Nesterov, weight decay 1e-3, ``lr`` 1e-3
    (the official Office-Home runs use ``K`` 3, ``KK`` 2).

    Design choices and reference-code quirks:

    - One learning rate for the whole network: the official code trains the backbone at 0.1 x lr and the
      bottleneck and classifier at lr; a zoo network has no bottleneck, and ``fc`` is the classifier.
    - In the VisDA script an in-place ``fill_`` on an expanded view of the reciprocal weights overwrites
      them, so there every neighbour is weighted 0.1; the Office-Home script (a ``contiguous()`` copy
      first) and the paper weigh reciprocal neighbours 1. ``reciprocal: false`` gives the former.
    - The Office-Home script switches to ``K`` 5, ``KK`` 4 halfway and drops the lr schedule; not done here.
    - The initial banks come from the un-augmented pool (the official code passes its augmenting training
      loader once, in eval mode).
    - Under DDP the banks gather every rank's rows, and the diversity term is each rank's batch mean.
    """

    freeze_classifier: ClassVar[bool] = False

    @rules(K=COUNT, KK=COUNT, affinity=NON_NEGATIVE, epsilon=POSITIVE)
    @dataclass
    class Config(SourceFreeConfig):
        lr: float | None = 1e-3
        K: int = 5
        KK: int = 5
        affinity: float = 0.1
        epsilon: float = 1e-5
        reciprocal: bool = True

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        need = max(cfg.K, getattr(cfg, "KK", 0)) + 1
        if info.unlabeled_size < need:
            raise ConfigError(f"method.name={cfg.name} searches {need - 1} neighbours in a target pool of "
                              f"{info.unlabeled_size} images: it needs at least {need}")
        self.banks = TargetBanks(info.unlabeled_size, self.tap.num_features, info.num_classes)

    def on_epoch(self, epoch: int, refresh: Refresh) -> None:
        if epoch == 0:
            self.banks.fill(*self.embed(refresh.unlabeled, refresh))

    def loss_terms(self, probs: Tensor, features: Tensor, index: Tensor,
                   ctx: StepContext) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, terms, vote)`` for the batch, the banks already updated with it."""
        c = self.cfg
        t = nrc_terms(probs, features, index, self.banks.features, self.banks.scores, c.K, c.KK, c.affinity,
                      c.epsilon, c.reciprocal)
        vote = t.pop("vote")
        return t["neighbour"] + t["expanded"] + t["diversity"], t, vote

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        feats, logits = self.tap(batch["u_weak"])
        probs = logits.float().softmax(1)
        index = batch["u_index"]
        self.banks.update(feats, probs, index)
        unit = F.normalize(feats.detach().float().flatten(1), dim=1)
        loss, terms, vote = self.loss_terms(probs, unit, index, ctx)
        ctx.pseudo_labels(vote)  # how often the neighbourhood's vote is right: a diagnostic
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
