"""The base of every distillation method: a student, frozen teacher(s), the CE weight, and the step's
result: the supervised CE plus the weighted teacher terms (:meth:`DistillerBase.combine`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, PATH, ConfigError, each, rules
from ..methods import BuildInfo, Method, MethodConfig
from ..nn import train_accuracy as train_accuracy
from .teacher import load_teacher


@rules(ce_weight=NON_NEGATIVE, teacher=PATH)
@dataclass
class DistillConfig(MethodConfig):
    """``teacher``: the run directory (or checkpoint) of a `mentor train` run, or a network and its local weights,
    MODEL@WEIGHTS (:mod:`mentor.engine.teacher`)."""

    teacher: str = ""
    ce_weight: float = 1.0


@rules(ce_weight=NON_NEGATIVE, teachers=each(PATH))
@dataclass
class MultiTeacherConfig(MethodConfig):
    """``teachers``: run directories (or checkpoints) of several `mentor train` runs, or networks with their local
    weights, MODEL@WEIGHTS (:mod:`mentor.engine.teacher`)."""

    teachers: list[str] = field(default_factory=list)
    ce_weight: float = 1.0


class DistillerBase(Method):
    """What single- and multi-teacher distillers share: the labelled loss and the step's result."""

    def combine(self, logits: Tensor, y: Tensor, terms: dict[str, Tensor] | Callable[[], dict[str, Tensor]],
                weights: dict[str, float | Tensor] | None = None, label_smoothing: float = 0.0) -> dict[str, Tensor]:
        """The result of a training step from the student's logits and the distillation terms.

        ``loss = cfg.ce_weight * CE(logits, y) + sum_k weights[k] * terms[k]``, summed in that order
        (CE computed in float32, with optional ``label_smoothing``). Returns ``{"loss", "ce", **terms,
        "train_acc"}``: every term is logged as given (unweighted), including terms that ``weights``
        leaves out of the loss (sub-terms, weights).

        ``terms`` may be a function returning the dict, called after the CE is built. The order in
        which a step builds its autograd nodes decides the order in which backward sums the gradients
        of a tensor used several times, and so the last bits of every gradient: methods whose terms
        follow the CE pass a function to keep that order.
        """
        ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if callable(terms):
            terms = terms()
        loss = self.cfg.ce_weight * ce
        for name, w in (weights or {}).items():
            loss = loss + w * terms[name]
        return {"loss": loss, "ce": ce, **terms, "train_acc": train_accuracy(logits, y)}


class Distiller(DistillerBase):
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


class MultiTeacherDistiller(DistillerBase):
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
