"""SimKD: the student's last feature map, projected, goes through the teacher's frozen classifier.

Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, prepool_names
from ..nn import pool_to, soft_kl
from .base import DistillConfig, Distiller
from .connectors import bottleneck_projector, probe_shapes
from .losses.crosslayer import simkd_loss


class ReusedHeadNet(nn.Module):
    """The network SimKD deploys: student backbone -> (pool to the teacher's map size) -> projector
    -> the teacher's pooling and classifier. It never runs the teacher's backbone.

    Its modules are the method's own (shared, not copied), so training updates it and its
    ``state_dict`` is a standalone checkpoint of everything inference needs.
    """

    def __init__(self, backbone: nn.Sequential, projector: nn.Module, pool: nn.Module, fc: nn.Module,
                 size: tuple[int, int]):
        super().__init__()
        self.backbone, self.projector, self.pool, self.fc = backbone, projector, pool, fc
        self.size = tuple(size)

    def features(self, x: Tensor) -> Tensor:
        return self.projector(pool_to(self.backbone(x), self.size))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)))


@register_method("simkd")
class SimKD(Distiller):
    """SimKD (Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022).

    The student's last feature map before pooling (average-pooled to the teacher's when larger) goes
    through a bottleneck projector (``factor`` 2) and is regressed onto the teacher's last feature
    map (average-pooled to the student's when larger) with MSE; the student's logits are the
    teacher's frozen pool + fc applied to the projected map. The paper trains with the MSE alone
    (``ce_weight = kd_weight = 0``). :meth:`deployable` is student backbone + projector + teacher
    head; the student's own ``fc`` is unused and frozen.
    """

    @rules(kd_weight=NON_NEGATIVE, feat_weight=NON_NEGATIVE, temperature=POSITIVE, factor=COUNT)
    @dataclass
    class Config(DistillConfig):
        ce_weight: float = 0.0
        kd_weight: float = 0.0
        feat_weight: float = 1.0
        temperature: float = 4.0
        factor: int = 2

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.student_names = prepool_names(student, "student")
        self.teacher_names = prepool_names(self.teacher, "teacher")
        # Not part of SimKD's student; frozen so optimizers and DDP do not expect gradients for it.
        student.fc.requires_grad_(False)
        self.t_tap = FeatureTap(self.teacher, self.teacher_names[-1])
        self.projector: nn.Module | None = None

    def _backbone(self) -> nn.Sequential:
        return nn.Sequential(*(getattr(self.student, n) for n in self.student_names))

    def _teacher_feature(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(teacher logits, teacher's last feature map), without gradients."""
        return self.teacher_logits(x), self.t_tap[self.teacher_names[-1]]

    def setup(self, batch: dict[str, Tensor]) -> None:
        x = batch["x"]
        with FeatureTap(self.student, self.student_names[-1]) as tap:
            c_s, h_s, w_s = probe_shapes(self.student, tap, x)[self.student_names[-1]][1:]
        c_t, h_t, w_t = probe_shapes(self.teacher, self.t_tap, x)[self.teacher_names[-1]][1:]
        self.projector = bottleneck_projector(c_s, c_t, self.cfg.factor).to(x.device)
        # Not a registered child: its modules are already ours, and registering them twice would
        # store them twice in every checkpoint.
        object.__setattr__(self, "_net", ReusedHeadNet(self._backbone(), self.projector, self.teacher.pool,
                                                       self.teacher.fc, (min(h_s, h_t), min(w_s, w_t))))

    def deployable(self) -> nn.Module:
        if self.projector is None:
            raise RuntimeError("SimKD.deployable() needs setup(batch) first: the projector is sized by a dry run")
        return self._net

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        t_logits, f_t = self._teacher_feature(x)
        net = self._net
        h = net.features(x)
        logits = net.fc(net.pool(h))
        c = self.cfg
        terms = {"feat": simkd_loss(h, pool_to(f_t, h.shape[-2:])), "kd": soft_kl(logits, t_logits, c.temperature)}
        return self.combine(logits, y, terms, {"feat": c.feat_weight, "kd": c.kd_weight})
