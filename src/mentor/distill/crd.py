"""Contrastive representation distillation: student and teacher embeddings of a sample attract, other
samples' repel, with negatives from a memory bank over the whole training split."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import COUNT, DECAY, POSITIVE, ConfigError, rules
from ..methods import register_method
from .connectors import EmbedHead
from .fitnet import FeatureDistiller, FeatureKDConfig
from .losses.contrastive import CRDLoss


@register_method("crd")
class CRD(FeatureDistiller):
    """CRD (Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020).

    The pooled penultimate features of both networks (``layer`` = ``pool``) go through trainable
    embedding heads (:class:`~mentor.distill.connectors.EmbedHead`: Linear to ``feat_dim`` + L2
    normalisation, sized by the dry run); :class:`~mentor.distill.losses.CRDLoss` contrasts each with
    the other network's memory of ``nce_k`` samples, with the NCE loss at temperature ``nce_t``, and
    updates the memory bank (one row per training sample, ``info.train_size``, momentum ``nce_m``).
    Defaults are the reference's: feat_dim 128, K 16384, T 0.07, momentum 0.5; weights CE 1, no KL,
    ``beta`` = 0.8 (``-a 0 -b 0.8``; CRD+KD is ``kd_weight=1``).

    ``negatives``: ``other_class`` (default) draws negatives from other classes, as the reference's
    training data loader does (mode "exact"); ``uniform`` from all samples, the paper's noise
    distribution. The bank, the NCE normalisers and the negative-sampling stream are module state,
    so checkpoints resume exactly. The bank is indexed by ``batch["index"]``.

    Under DDP (``W`` processes of batch ``B`` against one process of batch ``W * B``):

    - equal: the memory bank, both views and the labels. Every rank gathers the batch's indices,
      embeddings and labels of all ranks (rank order, the rows of the one-process batch) and applies
      the same momentum update, so every rank holds, bit for bit, the same bank, the one the
      one-process run holds given the same embeddings. The bank is ``rank_synced``: broadcast from
      rank 0 once when the engine wraps the method, never by DDP's per-step buffer broadcast.
    - equal on every rank: the NCE normalisers Z, estimated on the first step over the scores of the
      whole global batch.
    - not equal to the one-process run: the negatives. Each rank draws its ``nce_k`` negatives per
      anchor from its own stream (seeded with the rank), so the scores, hence Z, the loss and the
      gradients, and from the next step on the embeddings the bank takes, differ from the
      one-process run's; each anchor still gets ``nce_k`` fresh negatives, as in the reference.
    """

    @rules(feat_dim=COUNT, nce_k=COUNT, nce_t=POSITIVE, nce_m=DECAY)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 0.8
        feat_dim: int = 128
        nce_k: int = 16384
        nce_t: float = 0.07
        nce_m: float = 0.5
        negatives: Literal["other_class", "uniform"] = "other_class"
        layer: str = "pool"

    term = "crd"

    def __init__(self, cfg: Config, student, info):
        super().__init__(cfg, student, info)
        if info.train_size < 1:
            raise ConfigError("crd needs the size of the training split (BuildInfo.train_size) for its memory "
                              "bank; build it through the engine (mentor train) or pass info=BuildInfo(train_size=N)")
        if cfg.nce_k < 1 or cfg.feat_dim < 1 or cfg.nce_t <= 0 or not 0 <= cfg.nce_m < 1:
            raise ConfigError(f"crd: need method.nce_k >= 1, method.feat_dim >= 1, method.nce_t > 0 and "
                              f"0 <= method.nce_m < 1; got {cfg.nce_k}, {cfg.feat_dim}, {cfg.nce_t}, {cfg.nce_m}")
        self.contrast = CRDLoss(info.train_size, cfg.feat_dim, cfg.nce_k, cfg.nce_t, cfg.nce_m)

    def layers(self) -> tuple[list[str], list[str]]:
        return [self.cfg.layer], [self.cfg.layer]

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.embed_s = EmbedHead(math.prod(student_shapes[0][1:]), self.cfg.feat_dim)
        self.embed_t = EmbedHead(math.prod(teacher_shapes[0][1:]), self.cfg.feat_dim)

    def feature_loss(self, fs, ft, batch):
        labels = batch["y"] if self.cfg.negatives == "other_class" else None
        ls, lt = self.contrast(self.embed_s(fs[0]), self.embed_t(ft[0]), batch["index"], labels)
        return ls + lt, {"crd_student": ls, "crd_teacher": lt}
