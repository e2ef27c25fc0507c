"""Vanilla knowledge distillation: the student learns the teacher's softened class distribution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from ..config import NON_NEGATIVE, POSITIVE, PROBABILITY, rules
from ..methods import StepContext, register_method
from .base import DistillConfig, Distiller
from .losses.logit import kd_loss, logit_mse_loss


@register_method("kd")
class KD(Distiller):
    """Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

    ``loss = ce_weight * CE(z_s, y) + kd_weight * D(z_s, z_t)`` where D is

    - ``loss: kl`` (default): T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batch mean
      (:func:`~mentor.distill.losses.kd_loss`);
    - ``loss: mse``: logit matching, ``mean_c (z_s - z_t)^2 / 2`` (:func:`~mentor.distill.losses.
      logit_mse_loss`; ``temperature`` is unused), the regression loss of Ba & Caruana ("Do Deep Nets
      Really Need to be Deep?", 2014) that Chen, "A Note on Knowledge Distillation Loss Function for
      Object Classification" (arXiv:2109.06458, 2021) relates to KD: KD tends to it as T -> infinity
      when student and teacher logits have equal means (Hinton et al. 2015, Sec. 2.1, assumed zero
      means). Its scale is that limit exactly, so ``kd_weight`` carries over from ``kl`` at large T.

    Weights: the defaults CE 0.1 / KD 0.9 at T = 4 are those of RepDistiller and mdistiller (the CRD
    and DKD code bases, whose KD numbers most tables quote). SimKD, SemCKD, CA-MKD and MMKD use
    CE 1 / KD 1 (``method.ce_weight=1 method.kd_weight=1``), which gives a stronger KD baseline.

    Label-smoothing view (Chen's note treats KD as output regularisation related to label smoothing;
    also Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR
    2020): at T = 1, ``a*CE(y) + b*KL(p_t || p_s)`` equals ``(a + b) * CE(q)`` minus the teacher's
    entropy ``b*H(p_t)`` (no gradient), with the soft target ``q = (a*onehot(y) + b*p_t) / (a + b)``;
    with a uniform teacher this is label smoothing of strength ``b / (a + b)``: KD is label smoothing
    with a per-sample teacher distribution. ``label_smoothing`` additionally smooths the hard-label
    CE term (Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", 2016).

    Sources: of Chen's note only the abstract, the introduction and a third-party summary could be
    read here; the T -> infinity limit and the soft-target identity above are derived in this library
    from the definitions and checked numerically in tests/test_distill_logit.py, not transcribed.
    """

    @rules(kd_weight=NON_NEGATIVE, temperature=POSITIVE, label_smoothing=PROBABILITY)
    @dataclass
    class Config(DistillConfig):
        ce_weight: float = 0.1
        kd_weight: float = 0.9
        temperature: float = 4.0
        loss: Literal["kl", "mse"] = "kl"
        label_smoothing: float = 0.0

    def distill_terms(self, zs: Tensor, zt: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        """The teacher terms by name; ``"kd"`` is the weighted sum added to the CE term."""
        c = self.cfg
        kd = kd_loss(zs, zt, c.temperature) if c.loss == "kl" else logit_mse_loss(zs, zt)
        return {"kd": c.kd_weight * kd}

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        zt = self.teacher_logits(x)
        zs = self.student(x)
        # Subclasses (DKD, RLD) follow papers without label smoothing: their configs have no such key. A
        # function: the teacher terms are built after the CE (see DistillerBase.combine).
        return self.combine(zs, y, lambda: self.distill_terms(zs, zt, y, ctx), {"kd": 1.0},
                            label_smoothing=getattr(self.cfg, "label_smoothing", 0.0))
