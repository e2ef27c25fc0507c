"""Attention transfer: the student matches the teacher's spatial attention maps at every stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import POSITIVE, rules
from ..methods import register_method
from .fitnet import FeatureDistiller, FeatureKDConfig, pair_stages
from .losses.feature import at_loss


@register_method("at")
class AT(FeatureDistiller):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017):
    :func:`~mentor.distill.losses.at_loss` with ``p`` = 2 over pairs of stages, no connectors.

    ``layers`` (student) and ``teacher_layers`` default to every stage after the stem (``layer1`` ..
    ``layerK``: RepDistiller's ``feat[1:-1]``). When the two networks have different numbers of
    stages, the first ``min(K_s, K_t)`` are paired, as the reference's ``zip`` does; explicit lists
    must have equal lengths. Weights as RepDistiller: CE 1, no KL, ``beta`` = 1000 (``-b 1000``).
    """

    @rules(p=POSITIVE)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 1000.0
        p: float = 2.0
        layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    term = "at"

    def layers(self) -> tuple[list[str], list[str]]:
        c = self.cfg
        return pair_stages(self.method_name, self.student, self.teacher, c.layers, c.teacher_layers)

    def feature_loss(self, fs, ft, batch):
        return at_loss(fs, ft, self.cfg.p), {}
