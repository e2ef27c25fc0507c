"""FitNets (hints), and the base every feature/relation baseline of this family shares.

The feature baselines (FitNet, AT, RKD, CRD) differ only in which modules they tap and in the loss
on those features; :class:`FeatureDistiller` holds the rest: the taps, the dry run that sizes the
connectors, and ``loss = ce_weight * CE + kd_weight * KD(T) + beta * feature loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, stage_names
from ..nn import soft_kl
from .base import DistillConfig, Distiller
from .connectors import ConvRegressor, probe_shapes
from .losses.feature import hint_loss


@rules(kd_weight=NON_NEGATIVE, temperature=POSITIVE, beta=NON_NEGATIVE)
@dataclass
class FeatureKDConfig(DistillConfig):
    """Weights of the feature baselines. RepDistiller's convention for them (``train_student.py``
    flags ``-r 1 -a 0 -b beta``): CE 1, no KL term, the feature loss times ``beta``."""

    kd_weight: float = 0.0
    temperature: float = 4.0
    beta: float = 1.0


class FeatureDistiller(Distiller):
    """A distiller whose teacher signal is a loss on tapped features (the forward hooks of
    :class:`~mentor.models.FeatureTap`, so any pair of hookable networks works).

    Subclasses name the modules to tap (:meth:`layers`), build their connectors from the shapes a
    dry run observes (:meth:`build`) and compute the feature loss (:meth:`feature_loss`), logged as
    ``term``. The total is ``ce_weight * CE + kd_weight * KD(T) + beta * feature loss``; the KL term
    is logged even at weight 0.
    """

    Config = FeatureKDConfig
    term = "feat"

    def __init__(self, cfg: FeatureKDConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        s_names, t_names = self.layers()
        self.s_names, self.t_names = list(s_names), list(t_names)
        self.s_tap = FeatureTap(student, self.s_names)
        self.t_tap = FeatureTap(self.teacher, self.t_names)

    def layers(self) -> tuple[Sequence[str], Sequence[str]]:
        """The student's and the teacher's modules to tap, paired in order."""
        raise NotImplementedError

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """Create the trainable connectors from the tapped shapes (none by default)."""

    def feature_loss(self, fs: list[Tensor], ft: list[Tensor],
                     batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The feature loss (weighted by ``beta``) and any sub-terms to log by name."""
        raise NotImplementedError

    def setup(self, batch: dict[str, Tensor]) -> None:
        x = batch["x"]
        s = probe_shapes(self.student, self.s_tap, x)
        t = probe_shapes(self.teacher, self.t_tap, x)
        self.build([s[n] for n in self.s_names], [t[n] for n in self.t_names])
        self.to(x.device)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y, c = batch["x"], batch["y"], self.cfg
        zt = self.teacher_logits(x)
        ft = [self.t_tap[n] for n in self.t_names]
        zs = self.student(x)
        fs = [self.s_tap[n] for n in self.s_names]
        feat, extra = self.feature_loss(fs, ft, batch)
        terms = {"kd": soft_kl(zs, zt, c.temperature), self.term: feat, **extra}
        return self.combine(zs, y, terms, {"kd": c.kd_weight, self.term: c.beta})


@register_method("fitnet")
class FitNet(FeatureDistiller):
    """FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): a convolutional
    regressor (:class:`~mentor.distill.connectors.ConvRegressor`) maps the student's guided layer
    onto the teacher's hint layer, with the MSE :func:`~mentor.distill.losses.hint_loss`.

    As in RepDistiller (the CRD code base, whose FitNet numbers most tables quote), hints and labels
    train together in one stage (the paper pre-trains on the hint first): CE 1, no KL (``-a 0``),
    ``beta`` = 100 (``-b 100``). The default layers are RepDistiller's ``hint_layer=2``: index 2 of
    its feature list (stem, stage 1, stage 2, ...), i.e. ``layer2`` of zoo networks, the middle stage
    of the CIFAR ResNets/WRNs. ``student_layer``/``teacher_layer`` name other modules.
    """

    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 100.0
        student_layer: str = ""
        teacher_layer: str = ""

    term = "hint"

    def layers(self) -> tuple[list[str], list[str]]:
        def pick(name: str, model: nn.Module, role: str) -> str:
            if name:
                return name
            names = stage_names(model, role)
            return names[min(2, len(names) - 1)]

        return ([pick(self.cfg.student_layer, self.student, "student")],
                [pick(self.cfg.teacher_layer, self.teacher, "teacher")])

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        s, t = student_shapes[0], teacher_shapes[0]
        if len(s) != 4 or len(t) != 4:
            raise ConfigError(f"fitnet: hint layers must output feature maps [B, C, H, W]; "
                              f"{self.s_names[0]!r} gives {tuple(s)} and {self.t_names[0]!r} gives {tuple(t)}")
        self.regressor = ConvRegressor(s, t)

    def feature_loss(self, fs, ft, batch):
        return hint_loss(self.regressor(fs[0]), ft[0]), {}
