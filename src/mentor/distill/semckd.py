"""SemCKD: every student stage distils from every teacher stage, weighted by a learned attention.

Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, stage_names
from ..nn import align_spatial, conv_projector, mlp, soft_kl
from .base import DistillConfig, Distiller
from .connectors import probe_shapes
from .losses.crosslayer import semckd_attention, semckd_loss


class QueryKeyEmbed(nn.Module):
    """A stage's feature map -> one L2-normalised d-dim vector per sample: global average pooling,
    Linear(C -> 2d) -> ReLU -> Linear(2d -> d)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.mlp = mlp(channels, 2 * dim, dim)

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(self.mlp(f.mean((-2, -1))), dim=-1)


def pair_regressor(c_in: int, c_out: int) -> nn.Sequential:
    """SemCKD's per-pair projector: conv1x1 (c_in -> 2 c_out) -> BN -> ReLU -> conv3x3 -> BN -> ReLU
    -> conv1x1 (-> c_out), no output BN/ReLU (the teacher target is any real-valued map)."""
    return conv_projector(c_in, c_out, 2 * c_out, out_norm=False, out_act=False)


@register_method("semckd")
class SemCKD(Distiller):
    """SemCKD (Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021).

    Candidate layers are the stages after the stem (``layer1`` .. ``layerK``) of both networks. Each
    (student i, teacher j) pair has its own regressor; per sample, student layer i spreads its
    regression loss over the teacher layers with attention alpha_{b,i,j} = softmax_j(q_{b,i} . k_{b,j}).
    Total: ``ce_weight * CE + kd_weight * KD(T) + beta * L_SemCKD``, with the paper's CIFAR values
    1, 1, T = 4 and beta = 400.

    Design choice, not the paper's: the reference embeds each sample's row of the B x B similarity
    matrix of its batch, so its query/key layers have the batch size as input width and cannot take
    the last incomplete batch (or another batch size at all). Here the query of sample b at student
    layer i embeds that sample's globally average-pooled feature (C_i values) with a fixed-width MLP
    (:class:`QueryKeyEmbed`), and likewise the keys from the teacher stages, so one instance runs on
    any batch size and a sample's attention does not depend on the rest of its batch.
    ``embed_dim`` = 16 is the reference's width at its batch size 64 (B / 4).
    """

    @rules(kd_weight=NON_NEGATIVE, temperature=POSITIVE, beta=NON_NEGATIVE, embed_dim=COUNT)
    @dataclass
    class Config(DistillConfig):
        kd_weight: float = 1.0
        temperature: float = 4.0
        beta: float = 400.0
        embed_dim: int = 16

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.s_names = stage_names(student, "student")[1:]
        self.t_names = stage_names(self.teacher, "teacher")[1:]
        self.s_tap = FeatureTap(student, self.s_names)
        self.t_tap = FeatureTap(self.teacher, self.t_names)

    def setup(self, batch: dict[str, Tensor]) -> None:
        x = batch["x"]
        s_shapes, t_shapes = probe_shapes(self.student, self.s_tap, x), probe_shapes(self.teacher, self.t_tap, x)
        s_ch, t_ch = [s_shapes[n][1] for n in self.s_names], [t_shapes[n][1] for n in self.t_names]
        d = self.cfg.embed_dim
        self.query = nn.ModuleList(QueryKeyEmbed(c, d) for c in s_ch)
        self.key = nn.ModuleList(QueryKeyEmbed(c, d) for c in t_ch)
        self.regressors = nn.ModuleList(nn.ModuleList(pair_regressor(cs, ct) for ct in t_ch) for cs in s_ch)
        self.to(x.device)

    def attention(self, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
        """alpha [B, N_s, N_t] from the student's and teacher's stage features."""
        q = torch.stack([e(f) for e, f in zip(self.query, s_feats)], 1)
        k = torch.stack([e(f) for e, f in zip(self.key, t_feats)], 1)
        return semckd_attention(q, k)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        t_logits = self.teacher_logits(x)
        t_feats = [self.t_tap[n] for n in self.t_names]
        logits = self.student(x)
        s_feats = [self.s_tap[n] for n in self.s_names]
        proj, target = [], []
        for f_s, row in zip(s_feats, self.regressors):
            pairs = [align_spatial(f_s, f_t) for f_t in t_feats]
            proj.append([reg(s) for reg, (s, _) in zip(row, pairs)])
            target.append([t for _, t in pairs])
        sem = semckd_loss(proj, target, self.attention(s_feats, t_feats))
        c = self.cfg
        return self.combine(logits, y, {"kd": soft_kl(logits, t_logits, c.temperature), "semckd": sem},
                            {"kd": c.kd_weight, "semckd": c.beta})
