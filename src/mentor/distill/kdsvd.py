"""Self-supervised knowledge distillation using singular value decomposition: the student learns how the
leading singular vectors of the teacher's consecutive stages correlate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import COUNT, ConfigError, rules
from ..methods import register_method
from .fitnet import FeatureDistiller, FeatureKDConfig, pair_stages
from .losses.svd import kdsvd_loss


@register_method("kdsvd")
class KDSVD(FeatureDistiller):
    """KD-SVD (Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
    ECCV 2018): :func:`~mentor.distill.losses.kdsvd_loss` over the stages after the stem (post-ReLU
    outputs, mdistiller's ``feats[1:]``); no connectors, so student and teacher need the same channels at
    every paired stage (resnet20 -> resnet8, resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2 do).

    Defaults as mdistiller (``KDSVD.py``, ``CFG.KDSVD``): ``k`` = 1 singular vector per stage (the student
    offers ``k + 3`` to match), CE 1, no KL, ``beta`` = 1. Each map is read as the paper's ``(H*W) x C``
    matrix (the TensorFlow original's NHWC reshape); mdistiller's port reshapes NCHW maps to ``(C*H) x W``,
    which makes its singular vectors span the width axis instead of the channels. The teacher's vector
    signs follow a fixed convention (:func:`~mentor.distill.losses.sign_fixed`) where the references keep
    the solver's. Stage lists of different lengths pair their last ``min(K_s, K_t)`` (mdistiller's ``zip``
    pairs the first; its configs pair equal numbers only).
    """

    @rules(k=COUNT)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 1.0
        k: int = 1
        layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    term = "kdsvd"

    def layers(self) -> tuple[list[str], list[str]]:
        c = self.cfg
        return pair_stages(self.method_name, self.student, self.teacher, c.layers, c.teacher_layers, align="last")

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        if len(student_shapes) < 2:
            raise ConfigError(f"kdsvd: needs at least two stages to correlate, got {self.s_names}; name them in "
                              "method.layers / method.teacher_layers")
        for s_name, t_name, s, t in zip(self.s_names, self.t_names, student_shapes, teacher_shapes):
            if len(s) != 4 or len(t) != 4:
                raise ConfigError(f"kdsvd: the layers {s_name!r} (student, {tuple(s)}) and {t_name!r} (teacher, "
                                  f"{tuple(t)}) must both output feature maps [B, C, H, W]")
            if s[1] != t[1]:
                raise ConfigError(f"kdsvd: the student's {s_name!r} has {s[1]} channels and the teacher's {t_name!r} "
                                  f"{t[1]}; KD-SVD compares singular vectors over the channels, so they must agree "
                                  "(pick a pair of the same widths, e.g. resnet20 -> resnet8)")

    def feature_loss(self, fs, ft, batch):
        return kdsvd_loss(fs, ft, self.cfg.k), {}
