"""SemCKD: every student stage distils from every teacher stage, weighted by a learned attention.

Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, between, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, stage_names
from ..nn import align_spatial, conv_projector, mlp, soft_kl
from .base import DistillConfig, Distiller
from .connectors import probe_shapes
from .losses.crosslayer import sample_similarity, semckd_attention, semckd_loss

# The width of the pooled query/key embeddings when method.embed_dim is null: the reference's B / 4 at
# its batch size 64.
POOLED_EMBED_DIM = 16


def fixed_batch_error(what: str, built: int, got: int) -> ConfigError:
    """The error of a network whose input is a row of the batch's B x B similarity matrix, built for
    batches of ``built`` samples and given ``got``; ``what`` names the method and its option."""
    return ConfigError(
        f"{what}=similarity reads each sample's row of its batch's B x B similarity matrix, so its layers take "
        f"batches of exactly {built} samples (the batch size the run was set up with), got {got}: keep "
        f"data.batch_size at {built} (every training batch of the engine has that size), or set {what}=pooled, "
        "which takes any batch size")


class SimilarityEmbed(nn.Module):
    """SemCKD's ``MLPEmbed`` of a stage: per sample b, its row of the batch's similarity matrix
    ``A = F F^T`` (:func:`~mentor.distill.losses.sample_similarity`, B values) -> Linear(B -> 2d) ->
    ReLU -> Linear(2d -> d) -> L2-normalised, in float32. The input width is the batch size, so a
    sample's embedding depends on the whole batch, and only batches of ``batch_size`` are accepted."""

    def __init__(self, batch_size: int, dim: int):
        super().__init__()
        self.batch_size = batch_size
        self.mlp = mlp(batch_size, 2 * dim, dim)

    def forward(self, f: Tensor) -> Tensor:
        if f.shape[0] != self.batch_size:
            raise fixed_batch_error("method.attention_input", self.batch_size, f.shape[0])
        with torch.autocast(f.device.type, enabled=False):
            return F.normalize(self.mlp(sample_similarity(f)), dim=-1)


class QueryKeyEmbed(nn.Module):
    """The pooled variant's embedding of a stage: a sample's globally average-pooled feature (C values)
    -> Linear(C -> 2d) -> ReLU -> Linear(2d -> d) -> L2-normalised; independent of the rest of its batch."""

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
    regression loss over the teacher layers with attention
    ``alpha_{b,i,j} = softmax_j(q_{b,i} . k_{b,j} / attention_temperature)``.
    Total: ``ce_weight * CE + kd_weight * KD(T) + beta * L_SemCKD``, with the paper's CIFAR values
    1, 1, T = 4 and beta = 400.

    ``attention_input``: what the queries and keys are built from.

    - ``similarity`` (default, the paper's and its code's form): for each stage l, the batch's
      sample-similarity matrix ``A_l = F_l F_l^T`` [B, B] of the flattened features; the query of
      sample b at student layer i is ``MLPEmbed_i(A^S_i[b])`` and the key ``MLPEmbed_j(A^T_j[b])``
      (:class:`SimilarityEmbed`, width ``embed_dim``, null = B // 4 as the reference's ``factor=4``).
      The layers' input width is the training batch size, fixed at setup from the first batch: like
      the reference (which skips the last incomplete batch) the method takes only batches of that size
      (the engine's training batches always are), and a sample's attention depends on its batch.
    - ``pooled`` (a variant of this library, not the paper's): the query embeds the sample's globally
      average-pooled feature (C_i values, :class:`QueryKeyEmbed`, ``embed_dim`` null = 16), likewise the
      keys, so one instance runs on any batch size and a sample's attention does not depend on the rest
      of its batch.

    ``attention_temperature`` divides the energies (1 in the SemCKD code; ``--soft``, default 1, in
    the SimKD code's copy). The attention is not detached: the loss also trains the queries/keys and,
    through the student's similarity matrices, the student.
    """

    @rules(kd_weight=NON_NEGATIVE, temperature=POSITIVE, beta=NON_NEGATIVE, attention_temperature=POSITIVE,
           embed_dim=between(1, 4096).because("null: the batch size // 4 with similarity attention, 16 pooled"))
    @dataclass
    class Config(DistillConfig):
        kd_weight: float = 1.0
        temperature: float = 4.0
        beta: float = 400.0
        attention_input: Literal["similarity", "pooled"] = "similarity"
        embed_dim: int | None = None
        attention_temperature: float = 1.0

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
        c = self.cfg
        if c.attention_input == "similarity":
            b = x.shape[0]
            d = c.embed_dim or max(1, b // 4)
            self.query = nn.ModuleList(SimilarityEmbed(b, d) for _ in s_ch)
            self.key = nn.ModuleList(SimilarityEmbed(b, d) for _ in t_ch)
        else:
            d = c.embed_dim or POOLED_EMBED_DIM
            self.query = nn.ModuleList(QueryKeyEmbed(ch, d) for ch in s_ch)
            self.key = nn.ModuleList(QueryKeyEmbed(ch, d) for ch in t_ch)
        self.regressors = nn.ModuleList(nn.ModuleList(pair_regressor(cs, ct) for ct in t_ch) for cs in s_ch)
        self.to(x.device)

    def attention(self, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
        """alpha [B, N_s, N_t] from the student's and teacher's stage features."""
        q = torch.stack([e(f) for e, f in zip(self.query, s_feats)], 1)
        k = torch.stack([e(f) for e, f in zip(self.key, t_feats)], 1)
        return semckd_attention(q, k, self.cfg.attention_temperature)

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
