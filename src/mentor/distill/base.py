"""The base of every distillation method: a student, frozen teacher(s) and the CE weight."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..methods import BuildInfo, Method, MethodConfig
from .teacher import load_teacher


@dataclass
class DistillConfig(MethodConfig):
    """``teacher``: the run directory (or checkpoint) of a `mentor train` run."""

    teacher: str = ""
    ce_weight: float = 1.0


@dataclass
class MultiTeacherConfig(MethodConfig):
    """``teachers``: run directories (or checkpoints) of several `mentor train` runs."""

    teachers: list[str] = field(default_factory=list)
    ce_weight: float = 1.0


class Distiller(Method):
    """A student and one frozen teacher (``self.teacher``, eval mode, never wrapped in DDP)."""

    Config = DistillConfig

    def __init__(self, cfg: DistillConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if not cfg.teacher:
            raise ConfigError(f"method.teacher is required for {cfg.name!r}: the run directory of a trained "
                              "teacher, e.g. method.teacher=runs/supervised/fmnist_resnet20")
        self.add_teacher("teacher", load_teacher(cfg.teacher, info))

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        return self.teacher(x)


class MultiTeacherDistiller(Method):
    """A student and several frozen teachers (``self.teachers``)."""

    Config = MultiTeacherConfig

    def __init__(self, cfg: MultiTeacherConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if len(cfg.teachers) < 1:
            raise ConfigError(f"method.teachers is required for {cfg.name!r}: a list of teacher run directories")
        self.add_teacher("teachers", nn.ModuleList([load_teacher(t, info) for t in cfg.teachers]))

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """Logits of every teacher, stacked: [num_teachers, B, C]."""
        return torch.stack([t(x) for t in self.teachers])
