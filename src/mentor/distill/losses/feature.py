"""Losses of the feature and relation baselines: FitNet hints, attention transfer, RKD.

Stateless functions on tensors, batch-mean, computed in float32 (bf16 features under autocast are
upcast). The second argument is the teacher's side, the target: pass it without gradients (the
methods run the teacher under ``torch.no_grad()``). Regressors and taps live in the methods
(:mod:`mentor.distill.fitnet`, :mod:`mentor.distill.at`, :mod:`mentor.distill.rkd`). The spatial
alignment :func:`align_spatial` and :func:`pool_to` live in :mod:`mentor.nn.align` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nn.align import align_spatial, pool_to

__all__ = ["align_spatial", "at_loss", "attention_map", "hint_loss", "pool_to", "rkd_angle_loss", "rkd_distance_loss"]


def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets' hint loss: the mean squared error over every element between the (regressed)
    student map and the teacher's hint map, after :func:`align_spatial` (Romero et al., "FitNets:
    Hints for Thin Deep Nets", ICLR 2015; the mean, not the paper's half sum, as RepDistiller's
    ``HintLoss``). Channels must already match: the regressor maps the student's onto the teacher's."""
    s, t = (align_spatial(student_feat, teacher_feat) if student_feat.dim() == 4 else (student_feat, teacher_feat))
    if s.shape != t.shape:
        raise ValueError(f"hint_loss: student feature {tuple(student_feat.shape)} and teacher feature "
                         f"{tuple(teacher_feat.shape)} differ in channels; regress the student's first")
    return F.mse_loss(s.float(), t.float())


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """The spatial attention of a feature map ``[B, C, H, W]``: the channel mean of ``|A|^p`` at each
    position, flattened to ``[B, H*W]`` and L2-normalised per sample (Zagoruyko & Komodakis, "Paying
    More Attention to Attention", ICLR 2017; the mean and the sum over channels agree after the
    normalisation)."""
    a = feat.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def at_loss(student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor],
            p: float = 2.0) -> Tensor:
    """Attention transfer: over the (student, teacher) pairs of maps, the sum of the mean squared
    difference of their :func:`attention_map` (Zagoruyko & Komodakis, ICLR 2017).

    Each pair is first brought to a common resolution with :func:`align_spatial` (the feature maps
    are pooled, then the attention taken, as RepDistiller's ``Attention``); channel counts may
    differ. The paper writes ``beta/2 * || Q_s/|Q_s| - Q_t/|Q_t| ||_2``; this is the reference
    code's form (mean of squares per pair, summed), to be weighted by ``beta`` = 1000.
    """
    if isinstance(student_feats, Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, Tensor):
        teacher_feats = [teacher_feats]
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"at_loss: needs as many student maps as teacher maps (at least one), got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats):
        s, t = align_spatial(s, t)
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return total


def _embeddings(x: Tensor) -> Tensor:
    return x.float().flatten(1)


def _normalised_distances(e: Tensor) -> Tensor:
    """[N, N] Euclidean distances divided by their mean over the N(N-1) pairs i != j; zero diagonal.

    The mean over i != j replaces the reference's mean over the positive entries (they agree unless
    two embeddings coincide) because selecting entries by value would need a host sync.
    """
    n = e.shape[0]
    # From the differences, not the Gram matrix (|a|^2 + |b|^2 - 2ab cancels badly for close points
    # far from the origin); clamped before the sqrt so the zeroed diagonal has a finite gradient.
    d2 = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1).clamp_min(1e-12)
    off = 1.0 - torch.eye(n, device=e.device, dtype=e.dtype)
    d = d2.sqrt() * off
    return d / (d.sum() / max(n * (n - 1), 1))


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD-D: Huber (smooth-L1, delta 1) loss between the student's and the teacher's pairwise
    distance matrices, each divided by its own mean distance, averaged over all N^2 entries (Park et
    al., "Relational Knowledge Distillation", CVPR 2019, Eq. 3-5). Inputs ``[N, ...]`` are flattened."""
    s, t = _embeddings(student_emb), _embeddings(teacher_emb)
    if s.shape[0] < 2 or s.shape[0] != t.shape[0]:
        raise ValueError(f"rkd_distance_loss: needs the same N >= 2 samples on both sides, got {s.shape[0]} "
                         f"and {t.shape[0]}")
    return F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))


def _angles(e: Tensor) -> Tensor:
    """[N, N, N]: entry (j, i, k) is the cosine of the angle at e_j between e_i and e_k; a zero
    difference vector (i == j or k == j) gives 0."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # [j, i] = unit(e_i - e_j)
    return diff @ diff.transpose(1, 2)


def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD-A: Huber (smooth-L1, delta 1) loss between the cosines of the angles formed by every
    triplet of embeddings in the student and in the teacher, averaged over all N^3 triplets, the
    degenerate ones included as in the reference code (Park et al., CVPR 2019, Eq. 6-7)."""
    s, t = _embeddings(student_emb), _embeddings(teacher_emb)
    if s.shape[0] < 3 or s.shape[0] != t.shape[0]:
        raise ValueError(f"rkd_angle_loss: needs the same N >= 3 samples on both sides, got {s.shape[0]} "
                         f"and {t.shape[0]}")
    return F.smooth_l1_loss(_angles(s), _angles(t))
