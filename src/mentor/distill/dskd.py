"""DSKD: the teacher's predictions and features supervise the student's shallow stages too.

Luo, Chen & Wang, "Knowledge Distillation with Deep Supervision", IJCNN 2023 (arXiv 2202.07846).
Only the paper's abstract is available (see :class:`DSKD` for what comes from it and what is designed
here); the authors' repository (github.com/luoshiya/DSKD) holds a one-line README and no code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, POSITIVE, ConfigError, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, prepool_names, stage_names
from ..nn import align_spatial, soft_kl
from .base import DistillConfig, Distiller
from .connectors import bottleneck_projector, probe_shapes
from .losses.crosslayer import dskd_weights, simkd_loss


@register_method("dskd")
class DSKD(Distiller):
    """Deeply-supervised KD (Luo, Chen & Wang, "Knowledge Distillation with Deep Supervision", IJCNN 2023).

    Sources. The full text could not be read: the public copies of arXiv 2202.07846 (v2, as listed
    on Papers with Code, DeepAI, Bohrium and Emergent Mind) give the abstract only, the authors'
    repository github.com/luoshiya/DSKD holds a one-line README (its newest snapshot, commit
    751febd), and no other implementation by the authors is public. What follows is therefore
    split by source.

    From the abstract:

    - conventional KD supervises only the student's last layer; DSKD also supervises the *shallow*
      student layers, with the teacher's *class predictions* and its *feature maps*;
    - a *loss-based* weight allocation balances the learning of the shallow layers.

    Design choices of this library (no source states them):

    - Design choice: the shallow layers are the student's stages after the stem except the last
      (``layer1`` .. ``layer{K-1}``); the last stage is supervised by the usual CE + KD on the
      student's own logits (weights 1 and 1, T = 4, the convention of the authors' group: SimKD,
      SemCKD).
    - Design choice: each shallow stage l gets a SimKD branch: its map, average-pooled to the
      teacher's last feature map when larger, goes through a bottleneck projector (``factor`` 2) to
      the teacher's last-map width, then through the teacher's frozen pool + fc. The teacher's
      predictions supervise the branch logits with KL(T) and its last feature map supervises the
      projected map with MSE: l_l = KL_T(teacher || branch_l) + ``feat_weight`` * MSE_l. Using the
      teacher's last map (not the stage of the same depth) keeps one projector per shallow stage and
      makes the projected map a valid input of the reused classifier.
    - Design choice: the layer weights are w = softmax(-l / ``weight_temperature``) over the
      detached per-layer losses (:func:`~mentor.distill.losses.dskd_weights`): they sum to one and
      favour the layers that currently fit the teacher better, so a very shallow stage with a large
      loss cannot dominate the gradient of the features the deeper stages build on. The abstract
      names the strategy but not its direction or formula.
    - Design choice: the defaults ``kd_weight`` = ``ds_weight`` = ``feat_weight`` = 1,
      ``temperature`` = 4, ``weight_temperature`` = 1, ``factor`` = 2 (no published value).
    - Total: ``ce_weight * CE + kd_weight * KD + ds_weight * sum_l w_l * l_l``. The branches are
      training-only: :meth:`deployable` is the plain student.
    """

    @rules(kd_weight=NON_NEGATIVE, temperature=POSITIVE, ds_weight=NON_NEGATIVE, feat_weight=NON_NEGATIVE,
           weight_temperature=POSITIVE, factor=COUNT)
    @dataclass
    class Config(DistillConfig):
        kd_weight: float = 1.0
        temperature: float = 4.0
        ds_weight: float = 1.0
        feat_weight: float = 1.0
        weight_temperature: float = 1.0
        factor: int = 2

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.shallow = stage_names(student, "student")[1:-1]
        if not self.shallow:
            raise ConfigError(f"dskd: the student {type(student).__name__} has no shallow stage between its stem "
                              "and its last stage to supervise; use a network with at least two stages")
        self.t_name = prepool_names(self.teacher, "teacher")[-1]
        self.s_tap = FeatureTap(student, self.shallow)
        self.t_tap = FeatureTap(self.teacher, self.t_name)

    def setup(self, batch: dict[str, Tensor]) -> None:
        x = batch["x"]
        s_shapes = probe_shapes(self.student, self.s_tap, x)
        c_t = probe_shapes(self.teacher, self.t_tap, x)[self.t_name][1]
        self.projectors = nn.ModuleList(
            bottleneck_projector(s_shapes[n][1], c_t, self.cfg.factor) for n in self.shallow).to(x.device)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        c = self.cfg
        t_logits = self.teacher_logits(x)
        f_t = self.t_tap[self.t_name]
        logits = self.student(x)
        per_layer = []
        for name, proj in zip(self.shallow, self.projectors):
            f_s, target = align_spatial(self.s_tap[name], f_t)
            h = proj(f_s)
            branch = self.teacher.fc(self.teacher.pool(h))
            per_layer.append(soft_kl(branch, t_logits, c.temperature) + c.feat_weight * simkd_loss(h, target))
        layer_losses = torch.stack(per_layer)
        w = dskd_weights(layer_losses, c.weight_temperature)
        ds = (w * layer_losses).sum()
        out = self.combine(logits, y, {"kd": soft_kl(logits, t_logits, c.temperature), "ds": ds},
                           {"kd": c.kd_weight, "ds": c.ds_weight})
        for i, name in enumerate(self.shallow):
            out[f"ds_{name}"] = layer_losses[i].detach()
            out[f"w_{name}"] = w[i]
        return out
