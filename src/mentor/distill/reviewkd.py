"""Distilling knowledge via knowledge review: the student's stages, fused from the deepest to the shallowest,
match the teacher's at every level."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, ConfigError, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, stage_names
from ..nn.projectors import conv_block
from .dkd import warmup_factor
from .fitnet import FeatureDistiller, FeatureKDConfig, pair_stages
from .losses.review import hcl_loss


class ABF(nn.Module):
    """ReviewKD's attention-based fusion for one level: ``conv1`` (1x1 conv + BN, ``C_in -> mid``) of the
    student's map; with ``fuse``, the residual from the deeper level, upsampled (nearest) to this map's
    size, is mixed in with two sigmoid attention maps from a 1x1 conv of both, ``x * a0 + r * a1``; the
    result, resized (nearest) to the teacher's ``out_size``, is this level's residual for the next, and
    ``conv2`` (3x3 conv + BN, ``mid -> C_out``) makes the output matched to the teacher's map.
    ``conv1``/``conv2`` are drawn by ``kaiming_uniform_(a=1)``, as the official code."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(*conv_block(c_in, mid, 1, act=False))
        self.conv2 = nn.Sequential(*conv_block(mid, c_out, 3, act=False))
        self.att = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """``(output [B, C_out, *out_size], residual [B, mid, *out_size])``."""
        x = self.conv1(x)
        if self.att is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the residual of the deeper level")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            a = self.att(torch.cat([x, residual], 1))
            x = x * a[:, :1] + residual * a[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def as_map(feat: Tensor) -> Tensor:
    """A pooled vector ``[B, C]`` as a 1x1 map ``[B, C, 1, 1]``; a map unchanged."""
    return feat[:, :, None, None] if feat.dim() == 2 else feat


@register_method("reviewkd")
class ReviewKD(FeatureDistiller):
    """ReviewKD (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021).

    Levels: the stages after the stem (the last ``min(K_s, K_t)`` when the numbers differ) and the pooled
    vector as a 1x1 map; the student's post-ReLU outputs, the teacher's pre-ReLU maps (the official code's
    ``preact=True``). The review path runs from the deepest level to the shallowest through one
    :class:`ABF` per level (sized by the dry run: ``C_in`` the student's channels, ``C_out`` the teacher's,
    ``mid = min(max_mid_channel, C_in of the pooled level)``), and the loss is the hierarchical context loss
    :func:`~mentor.distill.losses.hcl_loss` between each fused output and the teacher's map, times
    ``beta`` and a linear warm-up over ``warmup_epochs`` (:func:`~mentor.distill.dkd.warmup_factor`).

    Defaults: ``beta`` 1 (the official ``train.py`` ``--kd-loss-weight`` and mdistiller's ``cfg.py``; the
    official scripts use 0.6 for resnet56 -> resnet20, 5 for resnet32x4 -> resnet8x4, as mdistiller's
    CIFAR config), ``warmup_epochs`` 20, ``max_mid_channel`` 512, CE 1, no KL. The channels and shapes
    mdistiller hard-codes per pair (``IN_CHANNELS``, ``SHAPES``, ...) come from the dry run here.
    """

    @rules(warmup_epochs=NON_NEGATIVE, max_mid_channel=COUNT)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 1.0
        warmup_epochs: float = 20.0
        max_mid_channel: int = 512
        layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    term = "reviewkd"

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.t_tap.remove()  # the teacher's pre-ReLU maps (the pooled vector is unchanged)
        self.t_tap = FeatureTap(self.teacher, self.t_names, pre_activation=True)

    def layers(self) -> tuple[list[str], list[str]]:
        c = self.cfg
        s, t = pair_stages(self.method_name, self.student, self.teacher, c.layers, c.teacher_layers, align="last")
        stage_names(self.student, "student", ("pool",))
        stage_names(self.teacher, "teacher", ("pool",))
        return [*s, "pool"], [*t, "pool"]

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        for names, shapes, role in ((self.s_names, student_shapes, "student"), (self.t_names, teacher_shapes,
                                                                                 "teacher")):
            for name, shape in zip(names[:-1], shapes[:-1]):
                if len(shape) != 4:
                    raise ConfigError(f"reviewkd: the {role} layer {name!r} outputs {tuple(shape)}, not a feature "
                                      "map [B, C, H, W]; name convolutional stages in method.layers / "
                                      "method.teacher_layers")
        mid = min(self.cfg.max_mid_channel, student_shapes[-1][1])
        n = len(student_shapes)
        self.abfs = nn.ModuleList(ABF(s[1], mid, t[1], i < n - 1)
                                  for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)))
        self.out_sizes = [(1, 1) if len(t) == 2 else (int(t[-2]), int(t[-1])) for t in teacher_shapes]

    def review(self, student_feats: list[Tensor]) -> list[Tensor]:
        """The fused student maps, shallow to deep, each the shape of the teacher's map at its level."""
        feats = [as_map(f) for f in student_feats]
        out, residual = self.abfs[-1](feats[-1], out_size=self.out_sizes[-1])
        results = [out]
        for i in range(len(feats) - 2, -1, -1):
            out, residual = self.abfs[i](feats[i], residual, self.out_sizes[i])
            results.insert(0, out)
        return results

    def feature_loss(self, fs, ft, batch):
        return hcl_loss(self.review(fs), [as_map(f) for f in ft]), {}

    def feature_weight(self, ctx: StepContext) -> tuple[float | Tensor, dict[str, Tensor]]:
        w = warmup_factor(ctx, self.cfg.warmup_epochs)
        return self.cfg.beta * w, {"reviewkd_warmup": w}
