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


def pair_stages(method: str, student: nn.Module, teacher: nn.Module, layers: Sequence[str],
                teacher_layers: Sequence[str], align: str = "first") -> tuple[list[str], list[str]]:
    """The (student, teacher) modules a stage-wise method taps, paired in order.

    Empty ``layers`` means every stage after the stem (``layer1`` .. ``layerK``: the references'
    ``feats[1:]``); empty ``teacher_layers`` means the student's names when ``layers`` is given, else the
    teacher's stages after the stem. Stage lists of different lengths pair their first ``min(K_s, K_t)``
    (``align="first"``, the references' ``zip``) or their last (``align="last"``, mdistiller's ``_align_list``);
    explicit lists must have equal lengths. Names that are not modules are one error naming the recipe key.
    """
    s = list(layers) or list(stage_names(student, "student")[1:])
    t = list(teacher_layers) or (list(layers) if layers else list(stage_names(teacher, "teacher")[1:]))
    if layers and teacher_layers and len(s) != len(t):
        raise ConfigError(f"{method}: method.layers ({len(s)}) and method.teacher_layers ({len(t)}) must pair "
                          "up one to one")
    n = min(len(s), len(t))
    if n == 0:
        raise ConfigError(f"{method}: no layers to distil (method.layers is empty and the networks have no "
                          "stage after the stem)")
    s, t = (s[:n], t[:n]) if align == "first" else (s[len(s) - n:], t[len(t) - n:])
    check_modules(method, student, s, "method.layers", "student")
    check_modules(method, teacher, t, "method.teacher_layers" if teacher_layers else "method.layers", "teacher")
    return s, t


def check_modules(method: str, model: nn.Module, names: list[str], key: str, role: str) -> None:
    """Refuse names that are not sub-modules of ``model``, naming the recipe key and the modules there are."""
    known = dict(model.named_modules())
    missing = [n for n in names if not n or n not in known]
    if missing:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"{method}: {key} names {missing}, not modules of the {role} ({type(model).__name__}); "
                          f"its top-level modules are {top} (nested ones as in named_modules(), e.g. layer2.0)")


def check_maps(method: str, names: list[str], shapes: list[torch.Size], role: str) -> None:
    """Refuse tapped features that are not feature maps ``[B, C, H, W]``, naming the module."""
    for name, shape in zip(names, shapes):
        if len(shape) != 4:
            raise ConfigError(f"{method}: the {role} layer {name!r} outputs {tuple(shape)}, not a feature map "
                              "[B, C, H, W]; name convolutional stages in method.layers / method.teacher_layers")


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
        weight, logged = self.feature_weight(ctx)
        terms = {"kd": soft_kl(zs, zt, c.temperature), self.term: feat, **extra, **logged}
        return self.combine(zs, y, terms, {"kd": c.kd_weight, self.term: weight})

    def feature_weight(self, ctx: StepContext) -> tuple[float | Tensor, dict[str, Tensor]]:
        """The weight of the feature term at this step (``beta``; a method with a warm-up scales it) and any
        number to log with it."""
        return self.cfg.beta, {}


class StageMapDistiller(FeatureDistiller):
    """A feature distiller over paired stages' feature maps (NST, VID, ...): ``method.layers`` /
    ``method.teacher_layers`` paired by :func:`pair_stages`, every tapped feature a map ``[B, C, H, W]``."""

    def layers(self) -> tuple[list[str], list[str]]:
        c = self.cfg
        return pair_stages(self.method_name, self.student, self.teacher, c.layers, c.teacher_layers)

    def build(self, student_shapes, teacher_shapes) -> None:
        check_maps(self.method_name, self.s_names, student_shapes, "student")
        check_maps(self.method_name, self.t_names, teacher_shapes, "teacher")


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
