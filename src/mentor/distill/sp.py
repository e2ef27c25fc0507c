"""Similarity-preserving distillation: the student matches the teacher's batch similarity matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError
from ..methods import register_method
from ..models import last_map_name
from .fitnet import FeatureDistiller, FeatureKDConfig, check_modules
from .losses.distribution import sp_loss


@register_method("sp")
class SP(FeatureDistiller):
    """SP (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019):
    :func:`~mentor.distill.losses.sp_loss`, the squared Frobenius distance between the row-normalised
    ``b x b`` similarity (Gram) matrices of the student's and the teacher's features, over ``b^2``.

    Defaults as mdistiller (``SP.py``: ``feats[-1]``, ``CFG.SP``) and RepDistiller (``feat[-2]``,
    ``-b 3000``), the paper's CIFAR-10 setting: the last feature map before pooling of each network
    (:func:`~mentor.models.last_map_name`), CE 1, no KL, ``beta`` (the paper's gamma) = 3000.
    ``layers`` / ``teacher_layers`` name other modules, paired one to one and summed (the paper's sum
    over pairs (l, l')); an empty ``teacher_layers`` reuses ``layers``. No connector: widths and
    resolutions may differ.
    """

    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 3000.0
        layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    term = "sp"

    def layers(self) -> tuple[list[str], list[str]]:
        c = self.cfg
        s = list(c.layers) or [last_map_name(self.student, "student")]
        t = list(c.teacher_layers) or (list(c.layers) if c.layers else [last_map_name(self.teacher, "teacher")])
        if len(s) != len(t):
            raise ConfigError(f"sp: method.layers ({len(s)}) and method.teacher_layers ({len(t)}) must pair up "
                              "one to one")
        check_modules("sp", self.student, s, "method.layers", "student")
        t_key = "method.teacher_layers" if c.teacher_layers else "method.layers"
        check_modules("sp", self.teacher, t, t_key, "teacher")
        return s, t

    def feature_loss(self, fs, ft, batch):
        return sp_loss(fs, ft), {}
