"""The loss of "Self-supervised Knowledge Distillation Using Singular Value Decomposition" (KD-SVD).

Lee, Kim & Song, ECCV 2018: each stage's feature map, a ``(H*W) x C`` matrix per sample, is compressed
to its leading right singular vectors; the student's are matched to the teacher's and sign-aligned, and
the student learns the teacher's radial-basis correlations between the vectors of consecutive stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["align_singular_vectors", "kdsvd_loss", "rbf_correlation", "sign_fixed", "truncated_svd"]


class _TopEigh(torch.autograd.Function):
    """The ``n`` largest eigenvalues (descending) and their eigenvectors of symmetric matrices ``[B, d, d]``,
    with the first-order perturbation gradient of those alone: the eigenvector ``v_i`` moves by
    ``sum_{j != i} v_j v_j^T dG v_i / (lambda_i - lambda_j)`` over the full eigenbasis, so only pairs
    with a leading eigenvalue appear (degenerate trailing eigenvalues, e.g. dead channels, cannot make
    it NaN); pairs closer than the solver's precision get no gradient, as the reference's SVD gradient."""

    @staticmethod
    def forward(ctx, gram: Tensor, n: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(-1), vectors.flip(-1)
        ctx.save_for_backward(values, vectors)
        ctx.n = n
        return values[..., :n], vectors[..., :n]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_values: Tensor, g_vectors: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        values, vectors = ctx.saved_tensors
        n = ctx.n
        gap = values[..., None, :n] - values[..., :, None]  # [.., j, i] = lambda_i - lambda_j
        tol = torch.finfo(values.dtype).eps * values.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
        inverse = torch.where(gap.abs() > tol, 1.0 / torch.where(gap == 0, torch.ones_like(gap), gap),
                              torch.zeros_like(gap))
        middle = (vectors.transpose(-2, -1) @ g_vectors) * inverse  # [.., d, n]
        middle[..., :n, :] += torch.diag_embed(g_values)
        grad = vectors @ middle @ vectors[..., :n].transpose(-2, -1)
        return (grad + grad.transpose(-2, -1)) / 2, None


def truncated_svd(feat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` largest singular values ``[B, n]`` and right singular vectors ``[B, C, n]`` (unit columns)
    of each sample's map ``[B, C, H, W]`` read as the ``(H*W) x C`` matrix (rows: positions, columns:
    channels), ``n`` capped at ``min(H*W, C)``.

    Computed as the eigenvectors of the ``C x C`` Gram matrix ``X^T X`` in float32 (autocast off), with the
    gradient of :class:`_TopEigh`. Each vector's sign is the solver's: see :func:`sign_fixed`.
    """
    if feat.dim() != 4:
        raise ValueError(f"truncated_svd: needs feature maps [B, C, H, W], got {tuple(feat.shape)}")
    n = max(1, min(n, feat.shape[2] * feat.shape[3], feat.shape[1]))
    with torch.autocast(feat.device.type, enabled=False):  # the Gram matrix and eigh in float32 under autocast
        x = feat.float().flatten(2).transpose(1, 2)  # [B, HW, C]
        values, vectors = _TopEigh.apply(x.transpose(1, 2) @ x, n)
    return values.clamp_min(0).sqrt(), vectors


def sign_fixed(vectors: Tensor) -> Tensor:
    """``vectors`` ``[B, d, n]`` with each column's sign chosen so that its entry of largest magnitude is
    positive: a convention independent of the solver (and of the device) that computed them."""
    idx = vectors.detach().abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(vectors.detach().gather(-2, idx))
    return vectors * torch.where(sign == 0, torch.ones_like(sign), sign)


def align_singular_vectors(student: Tensor, teacher: Tensor) -> Tensor:
    """For each of the teacher's vectors ``[B, d, n_t]``, the student's vector ``[B, d, n_s]`` of largest
    absolute cosine with it, its sign flipped to make that cosine positive: ``[B, d, n_t]`` (the
    reference's ``align_rsv``; the selection is constant, the gradient flows through the vectors)."""
    cosine = (student.transpose(-2, -1) @ teacher).detach()  # [B, n_s, n_t]
    best = cosine.abs().amax(dim=-2, keepdim=True)
    select = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return student @ select


def rbf_correlation(vectors: Tensor, previous: Tensor) -> Tensor:
    """The radial-basis correlation of two stages' (weighted) singular vectors ``[B, d, k]`` and
    ``[B, d', k]``: ``exp(-(v[a] - v'[b])^2 / 8)`` for every pair of entries (a, b) of the k-th vectors,
    ``[B, d, d', k]`` (paper Eq. 6, the reference's width 8)."""
    return torch.exp(-(vectors.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / 8.0)


def kdsvd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], k: int = 1) -> Tensor:
    """KD-SVD over stages (shallow to deep, at least two).

    Per stage: the teacher's ``k`` leading right singular vectors (signs by :func:`sign_fixed`) and the
    student's ``k + 3``, of which :func:`align_singular_vectors` keeps the ``k`` matching the teacher's;
    both sets are scaled by the teacher's ``k`` singular values, L2-normalised over the ``k``. For each
    pair of consecutive stages, the squared L2 distance between the student's and the teacher's
    :func:`rbf_correlation`, summed and divided by the batch size; the pairs summed (as mdistiller's
    ``kdsvd_loss``). The teacher's side is a constant target. Student and teacher must have the same
    channels at each stage.
    """
    if len(student_feats) != len(teacher_feats) or len(student_feats) < 2:
        raise ValueError(f"kdsvd_loss: needs as many student maps as teacher maps, at least two stages, got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    prev: tuple[Tensor, Tensor] | None = None
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        if fs.shape[1] != ft.shape[1]:
            raise ValueError(f"kdsvd_loss: stage {i} has {fs.shape[1]} student and {ft.shape[1]} teacher channels; "
                             "the correlations compare the singular vectors entry by entry, so they must agree")
        with torch.no_grad():
            s_t, v_t = truncated_svd(ft, k)
            v_t = sign_fixed(v_t)
        _, v_s = truncated_svd(fs, k + 3)
        v_s = align_singular_vectors(v_s, v_t)
        weight = F.normalize(s_t, dim=1).unsqueeze(1)  # [B, 1, k]
        v_s, v_t = v_s * weight, v_t * weight
        if prev is not None:
            n = min(v_s.shape[-1], prev[0].shape[-1])
            s_rbf = rbf_correlation(v_s[..., :n], prev[0][..., :n])
            t_rbf = rbf_correlation(v_t[..., :n], prev[1][..., :n])
            total = total + (s_rbf - t_rbf).pow(2).sum() / fs.shape[0]
        prev = (v_s, v_t)
    return total
