"""Attention transfer: the student matches the teacher's spatial attention maps at every stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import POSITIVE, ConfigError, rules
from ..methods import register_method
from ..models import stage_names
from .fitnet import FeatureDistiller, FeatureKDConfig
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
        s = list(c.layers) or list(stage_names(self.student, "student")[1:])
        t = list(c.teacher_layers) or (list(c.layers) if c.layers else list(stage_names(self.teacher, "teacher")[1:]))
        if c.layers and c.teacher_layers and len(s) != len(t):
            raise ConfigError(f"at: method.layers ({len(s)}) and method.teacher_layers ({len(t)}) must pair "
                              "up one to one")
        n = min(len(s), len(t))
        if n == 0:
            raise ConfigError("at: no layers to transfer attention from (method.layers is empty and the "
                              "networks have no stage after the stem)")
        return s[:n], t[:n]

    def feature_loss(self, fs, ft, batch):
        return at_loss(fs, ft, self.cfg.p), {}
