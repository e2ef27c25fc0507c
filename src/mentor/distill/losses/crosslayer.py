"""Losses of the cross-layer and projector methods: SimKD, SemCKD and DSKD.

Stateless functions on tensors the caller has already aligned (same shape for a student/teacher
pair); batch-mean. The projectors, embeddings and feature taps live in the methods
(:mod:`mentor.distill.simkd`, :mod:`mentor.distill.semckd`, :mod:`mentor.distill.dskd`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dskd_weights", "sample_similarity", "semckd_attention", "semckd_loss", "simkd_loss"]


def _check_pair(s: Tensor, t: Tensor, what: str) -> None:
    if s.shape != t.shape:
        raise ValueError(f"{what}: student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} "
                         "must have the same shape (project and spatially align the student feature first)")


def simkd_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared error over every element between the projected student feature map and the
    teacher's last feature map (Chen et al., "Knowledge Distillation with the Reused Teacher
    Classifier", CVPR 2022: the single L2 loss that trains the student encoder and projector)."""
    _check_pair(student_feat, teacher_feat, "simkd_loss")
    return F.mse_loss(student_feat.float(), teacher_feat.float())


def sample_similarity(feat: Tensor) -> Tensor:
    """The batch's sample-similarity matrix ``A = F F^T`` [B, B] of a feature ``[B, ...]`` flattened to
    ``F`` [B, D]: ``A[a, b]`` is the dot product of samples a and b (not normalised), as SemCKD's
    ``SelfA`` and MMKD's ``FeatureWeight`` build it. Computed in float32 with autocast off (in half
    precision the sums over D round coarsely and overflow float16)."""
    if feat.dim() < 2:
        raise ValueError(f"sample_similarity: expected a batch of features [B, ...], got shape {tuple(feat.shape)}")
    with torch.autocast(feat.device.type, enabled=False):
        flat = feat.float().reshape(feat.shape[0], -1)
        return flat @ flat.t()


def semckd_attention(query: Tensor, key: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample attention of every student layer over the teacher layers (SemCKD's semantic
    calibration; Chen et al., "Cross-Layer Distillation with Semantic Calibration", AAAI 2021).

    ``query``: [B, N_s, d], one embedding per sample and student layer; ``key``: [B, N_t, d].
    Returns alpha [B, N_s, N_t] = softmax over j of <q_{b,i}, k_{b,j}> / temperature; each row sums
    to one. The SemCKD code has no temperature (1); the copy in the SimKD code divides by ``--soft``
    (default 1).
    """
    if query.dim() != 3 or key.dim() != 3 or query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"semckd_attention: expected query [B, N_s, d] and key [B, N_t, d], got "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    if temperature <= 0:
        raise ValueError(f"semckd_attention: temperature must be > 0, got {temperature}")
    return torch.softmax(torch.bmm(query.float(), key.float().transpose(1, 2)) / temperature, dim=-1)


def semckd_loss(student_feats: Sequence[Sequence[Tensor]], teacher_feats: Sequence[Sequence[Tensor]],
                attention: Tensor) -> Tensor:
    """SemCKD's attention-weighted feature loss (Chen et al., AAAI 2021).

    ``student_feats[i][j]``: student layer i projected into teacher layer j's space, [B, C_j, H, W];
    ``teacher_feats[i][j]``: teacher layer j aligned to the same spatial size; ``attention``:
    [B, N_s, N_t]. Per sample, each pair's squared error is averaged over its elements, weighted
    by alpha_{b,i,j}, summed over (i, j), then averaged over samples and student layers::

        L = sum_{b,i,j} alpha_{b,i,j} * mean_elements((s_ij[b] - t_ij[b])^2) / (B * N_s)

    The attention is not detached (as in the reference code): the loss also trains the queries/keys.
    """
    b, n_s, n_t = attention.shape
    if len(student_feats) != n_s or len(teacher_feats) != n_s:
        raise ValueError(f"semckd_loss: attention has {n_s} student layers but the features have "
                         f"{len(student_feats)} (student) and {len(teacher_feats)} (teacher) rows")
    per = []
    for i in range(n_s):
        if len(student_feats[i]) != n_t or len(teacher_feats[i]) != n_t:
            raise ValueError(f"semckd_loss: attention has {n_t} teacher layers but row {i} of the features has "
                             f"{len(student_feats[i])} (student) and {len(teacher_feats[i])} (teacher)")
        for j in range(n_t):
            s, t = student_feats[i][j], teacher_feats[i][j]
            _check_pair(s, t, f"semckd_loss pair ({i}, {j})")
            per.append((s.float() - t.float()).pow(2).reshape(b, -1).mean(1))
    mse = torch.stack(per, 1).reshape(b, n_s, n_t)
    return (attention.float() * mse).sum() / (b * n_s)


def dskd_weights(losses: Tensor, temperature: float = 1.0) -> Tensor:
    """Loss-based weights of the shallow-layer terms of DSKD (Luo, Chen & Wang, "Knowledge
    Distillation with Deep Supervision", IJCNN 2023), as this library designs them.

    The paper's abstract names "a loss-based weight allocation strategy" without a formula; its full
    text and code could not be obtained. Design choice, not the paper's: w = softmax(-losses /
    temperature), computed on detached losses, so the weights sum to one, a layer that currently
    fits the teacher worse gets less weight (a very shallow layer cannot dominate the gradient the
    deeper layers rely on), and no gradient flows through the weights.
    """
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"dskd_weights: expected a 1-D tensor of per-layer losses, got shape {tuple(losses.shape)}")
    if temperature <= 0:
        raise ValueError(f"dskd_weights: temperature must be > 0, got {temperature}")
    return torch.softmax(-losses.detach().float() / temperature, dim=0)
