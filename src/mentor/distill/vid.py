"""Variational information distillation: the student predicts a Gaussian over the teacher's features."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, rules
from ..methods import BuildInfo, register_method
from ..nn import align_spatial
from ..nn.projectors import conv_block
from .fitnet import FeatureKDConfig, StageMapDistiller
from .losses.distribution import vid_alpha_init, vid_loss, vid_variance


class GaussianRegressor(nn.Module):
    """VID's variational distribution for one stage: the mean from the student's map by a 1x1 conv stack
    ``conv(C_s -> C_t) -> ReLU -> conv(C_t -> C_t) -> ReLU -> conv(C_t -> C_t)`` (no biases, no BN, as the
    reference's), and one variance per teacher channel, ``softplus(alpha) + eps``, starting at ``init_var``."""

    def __init__(self, c_in: int, c_out: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.mean = nn.Sequential(*conv_block(c_in, c_out, 1, norm=False), *conv_block(c_out, c_out, 1, norm=False),
                                  *conv_block(c_out, c_out, 1, norm=False, act=False))
        self.alpha = nn.Parameter(torch.full((c_out,), vid_alpha_init(init_var, eps)))
        self.eps = eps

    def variance(self) -> Tensor:
        """The per-channel variance ``[C_t]``."""
        return vid_variance(self.alpha, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.mean(x)


@register_method("vid")
class VID(StageMapDistiller):
    """VID (Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019): at
    every paired stage a :class:`GaussianRegressor` (sized by the dry run) predicts the teacher's map from
    the student's (pooled to the smaller resolution first), and the loss is the Gaussian negative
    log-likelihood :func:`~mentor.distill.losses.vid_loss`, summed over the stages.

    Defaults as mdistiller (``VID.py``: ``feats[1:]``, ``CFG.VID``) and RepDistiller (``-b 1``): the
    stages after the stem (paired as :func:`~mentor.distill.fitnet.pair_stages`), CE 1, no KL, ``beta`` = 1,
    ``init_pred_var`` = 5.0, ``eps`` = 1e-5. The variances are trained with the regressors, as in the
    paper and RepDistiller (whose ``VIDLoss`` owns them as parameters); mdistiller keeps them in a plain
    list that never reaches its optimizer, so they stay at ``init_pred_var``: ``learn_variance: false``
    reproduces that.
    """

    @rules(init_pred_var=POSITIVE, eps=NON_NEGATIVE)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 1.0
        init_pred_var: float = 5.0
        eps: float = 1e-5
        learn_variance: bool = True
        layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    term = "vid"

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        if not cfg.init_pred_var > cfg.eps:
            raise ConfigError(f"vid: method.init_pred_var ({cfg.init_pred_var}) must exceed method.eps ({cfg.eps}): "
                              "the variance is softplus(alpha) + eps; the defaults are 5.0 and 1e-5")
        super().__init__(cfg, student, info)

    def build(self, student_shapes, teacher_shapes) -> None:
        super().build(student_shapes, teacher_shapes)
        c = self.cfg
        self.regressors = nn.ModuleList(GaussianRegressor(s[1], t[1], c.init_pred_var, c.eps)
                                        for s, t in zip(student_shapes, teacher_shapes))
        for r in self.regressors:
            r.alpha.requires_grad_(c.learn_variance)

    def feature_loss(self, fs, ft, batch):
        total = None
        for reg, s, t in zip(self.regressors, fs, ft):
            s, t = align_spatial(s, t)
            term = vid_loss(reg(s), t, reg.variance())
            total = term if total is None else total + term
        return total, {}
