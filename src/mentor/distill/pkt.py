"""Probabilistic knowledge transfer: the student matches the teacher's distribution of cosine
similarities within the batch."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NON_NEGATIVE, rules
from ..methods import register_method
from .fitnet import FeatureDistiller, FeatureKDConfig, check_modules
from .losses.distribution import pkt_loss


@register_method("pkt")
class PKT(FeatureDistiller):
    """PKT (Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
    ECCV 2018): :func:`~mentor.distill.losses.pkt_loss`, the KL divergence between the teacher's and the
    student's conditional probability distributions built from the cosine similarities of the pooled
    penultimate features (``layer`` = ``pool``: mdistiller's ``pooled_feat``, RepDistiller's ``feat[-1]``).

    Defaults as mdistiller (``PKT.py``, ``CFG.PKT``) and RepDistiller (``-b 30000``): CE 1, no KL,
    ``beta`` = 30000, ``eps`` = 1e-7. Widths may differ: only relations within each network are
    compared, so there is no connector.
    """

    @rules(eps=NON_NEGATIVE)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 30000.0
        eps: float = 1e-7
        layer: str = "pool"

    term = "pkt"

    def layers(self) -> tuple[list[str], list[str]]:
        check_modules("pkt", self.student, [self.cfg.layer], "method.layer", "student")
        check_modules("pkt", self.teacher, [self.cfg.layer], "method.layer", "teacher")
        return [self.cfg.layer], [self.cfg.layer]

    def feature_loss(self, fs, ft, batch):
        return pkt_loss(fs[0], ft[0], self.cfg.eps), {}
