"""Relational knowledge distillation: the student matches the distances and angles between samples."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NON_NEGATIVE, rules
from ..methods import register_method
from .fitnet import FeatureDistiller, FeatureKDConfig
from .losses.feature import rkd_angle_loss, rkd_distance_loss


@register_method("rkd")
class RKD(FeatureDistiller):
    """RKD (Park et al., "Relational Knowledge Distillation", CVPR 2019) on the pooled penultimate
    embeddings (``layer`` = ``pool``, RepDistiller's ``feat[-1]``): ``distance_weight * RKD-D +
    angle_weight * RKD-A`` (:func:`~mentor.distill.losses.rkd_distance_loss`,
    :func:`~mentor.distill.losses.rkd_angle_loss`) with the paper's and the reference's 25 and 50.
    Weights as RepDistiller: CE 1, no KL, ``beta`` = 1 (``-b 1``). Student and teacher widths may
    differ: only relations within each network are compared, so there is no connector.
    """

    @rules(distance_weight=NON_NEGATIVE, angle_weight=NON_NEGATIVE)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 1.0
        distance_weight: float = 25.0
        angle_weight: float = 50.0
        layer: str = "pool"

    term = "rkd"

    def layers(self) -> tuple[list[str], list[str]]:
        return [self.cfg.layer], [self.cfg.layer]

    def feature_loss(self, fs, ft, batch):
        d = rkd_distance_loss(fs[0], ft[0])
        a = rkd_angle_loss(fs[0], ft[0])
        return self.cfg.distance_weight * d + self.cfg.angle_weight * a, {"rkd_distance": d, "rkd_angle": a}
