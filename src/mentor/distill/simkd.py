"""SimKD: the student's last feature map, projected, goes through the teacher's frozen classifier.

Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, create_model, prepool_names
from ..nn import pool_to, soft_kl
from .base import DistillConfig, Distiller
from .connectors import bottleneck_projector, probe_shapes
from .losses.crosslayer import simkd_loss


class ReusedHeadNet(nn.Module):
    """The network SimKD deploys: student backbone -> (pool to the teacher's map size) -> projector
    -> the teacher's pooling and classifier. It never runs the teacher's backbone.

    Its modules are the method's own (shared, not copied), so training updates it and its
    ``state_dict`` is a standalone checkpoint of everything inference needs. A run records how to build
    it again (:meth:`SimKD.deployable_spec`), so a checkpoint loads without the teacher's run.
    """

    def __init__(self, backbone: nn.Sequential, projector: nn.Module, pool: nn.Module, fc: nn.Module,
                 size: tuple[int, int]):
        super().__init__()
        self.backbone, self.projector, self.pool, self.fc = backbone, projector, pool, fc
        self.size: tuple[int, int] = (int(size[0]), int(size[1]))

    def features(self, x: Tensor) -> Tensor:
        h = self.backbone(x)
        if h.shape[-2] != self.size[0] or h.shape[-1] != self.size[1]:  # pool_to, in a form torch.jit.script takes
            h = F.adaptive_avg_pool2d(h, self.size)
        return self.projector(h)

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
        self.student_stages = prepool_names(student, "student")
        self.teacher_stages = prepool_names(self.teacher, "teacher")
        # Not part of SimKD's student; frozen so optimizers and DDP do not expect gradients for it.
        student.fc.requires_grad_(False)
        self.t_tap = FeatureTap(self.teacher, self.teacher_stages[-1])
        self.projector: nn.Module | None = None
        from ..engine.checkpoint import run_info

        _, t_info, _ = run_info(cfg.teacher, "method.teacher")
        self._teacher_arch = {"model": t_info["model"], "kwargs": dict(t_info.get("kwargs", {}))}
        self._spec: dict[str, Any] | None = None

    def _backbone(self) -> nn.Sequential:
        return nn.Sequential(*(getattr(self.student, n) for n in self.student_stages))

    def _teacher_feature(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(teacher logits, teacher's last feature map), without gradients."""
        return self.teacher_logits(x), self.t_tap[self.teacher_stages[-1]]

    def setup(self, batch: dict[str, Tensor]) -> None:
        x = batch["x"]
        with FeatureTap(self.student, self.student_stages[-1]) as tap:
            c_s, h_s, w_s = probe_shapes(self.student, tap, x)[self.student_stages[-1]][1:]
        c_t, h_t, w_t = probe_shapes(self.teacher, self.t_tap, x)[self.teacher_stages[-1]][1:]
        self.projector = bottleneck_projector(c_s, c_t, self.cfg.factor).to(x.device)
        size = (min(h_s, h_t), min(w_s, w_t))
        # Not a registered child: its modules are already ours, and registering them twice would
        # store them twice in every checkpoint.
        object.__setattr__(self, "_net", ReusedHeadNet(self._backbone(), self.projector, self.teacher.pool,
                                                       self.teacher.fc, size))
        self._spec = {"kind": self.method_name, "teacher": self._teacher_arch, "channels": [int(c_s), int(c_t)],
                      "factor": int(self.cfg.factor), "size": [int(size[0]), int(size[1])]}

    def deployable(self) -> nn.Module:
        if self.projector is None:
            raise RuntimeError("SimKD.deployable() needs setup(batch) first: the projector is sized by a dry run")
        return self._net

    def deployable_spec(self) -> dict[str, Any] | None:
        """The student's architecture is the run's ``model``; the spec adds the teacher's (whose ``pool`` and
        ``fc`` are reused), the projector's channels and factor, and the map size the projector sees."""
        return self._spec

    @classmethod
    def rebuild_deployable(cls, spec: dict[str, Any], student: nn.Module, info: dict[str, Any]) -> ReusedHeadNet:
        teacher = create_model(spec["teacher"]["model"], num_classes=info["num_classes"],
                               in_channels=info["in_channels"], **spec["teacher"].get("kwargs", {}))
        backbone = nn.Sequential(*(getattr(student, n) for n in prepool_names(student, "student")))
        c_s, c_t = spec["channels"]
        return ReusedHeadNet(backbone, bottleneck_projector(c_s, c_t, spec["factor"]), teacher.pool, teacher.fc,
                             tuple(spec["size"]))

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        t_logits, f_t = self._teacher_feature(x)
        net = self._net
        h = net.features(x)
        logits = net.fc(net.pool(h))
        c = self.cfg
        terms = {"feat": simkd_loss(h, pool_to(f_t, h.shape[-2:])), "kd": soft_kl(logits, t_logits, c.temperature)}
        return self.combine(logits, y, terms, {"feat": c.feat_weight, "kd": c.kd_weight})
