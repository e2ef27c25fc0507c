"""Losses that compare distributions and similarity structures: NST, PKT, SP and VID.

Stateless functions on tensors, computed in float32 at least (bf16 features under autocast are upcast). The
second argument is the teacher's side, the target: pass it without gradients (the methods run the
teacher under ``torch.no_grad()``). Each follows the reference code that published numbers come from
(mdistiller's ``NST.py``, ``PKT.py``, ``SP.py``, ``VID.py``; RepDistiller's ``distiller_zoo``), whose
normalisations the recipes' weights are tuned for; where it differs from the paper the docstring says so.
The taps, stage pairing and VID's regressors live in the methods (:mod:`mentor.distill.nst`,
:mod:`mentor.distill.pkt`, :mod:`mentor.distill.sp`, :mod:`mentor.distill.vid`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nn.align import align_spatial

__all__ = ["batch_similarity", "nst_loss", "nst_mmd", "pkt_loss", "sp_loss", "vid_alpha_init", "vid_loss",
           "vid_variance"]


def _f32(x: Tensor) -> Tensor:
    """``x`` in float32, or in its own dtype where that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pairs(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor],
           what: str) -> list[tuple[Tensor, Tensor]]:
    s = [student] if isinstance(student, Tensor) else list(student)
    t = [teacher] if isinstance(teacher, Tensor) else list(teacher)
    if len(s) != len(t) or not s:
        raise ValueError(f"{what}: needs as many student features as teacher features (at least one), got "
                         f"{len(s)} and {len(t)}")
    return list(zip(s, t))


# -- NST ------------------------------------------------------------------------------------------


def nst_mmd(student_feat: Tensor, teacher_feat: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    """Neuron selectivity transfer at one stage: the squared MMD between the student's and the teacher's
    neurons, averaged over the batch (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", 2017, Eq. 4-6).

    Each channel of a map ``[B, C, H, W]`` is one sample of its network's distribution: its ``H*W``
    activations, L2-normalised. With the polynomial kernel ``k(x, y) = (x.y + c)^degree`` (the paper's
    and the reference's d = 2, c = 0), per image::

        MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(s_j, t_i)

    over the teacher's channels i, i' and the student's j, j' (their counts may differ). Maps of
    different resolution are first average-pooled to the smaller (:func:`align_spatial`, as the
    reference's ``adaptive_avg_pool2d``). The paper's ``lambda / 2`` factor is left to the weight.
    """
    if student_feat.dim() != 4 or teacher_feat.dim() != 4 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"nst_mmd: expected two [B, C, H, W] maps of one batch, got {tuple(student_feat.shape)} "
                         f"and {tuple(teacher_feat.shape)}")
    s, t = align_spatial(student_feat, teacher_feat)
    s, t = F.normalize(_f32(s).flatten(2), dim=2), F.normalize(_f32(t).flatten(2), dim=2)

    def kernel(a: Tensor, b: Tensor) -> Tensor:  # [B]: the mean of k over every pair of channels
        return (a @ b.transpose(1, 2) + c).pow(degree).mean((1, 2))

    return (kernel(t, t) + kernel(s, s) - 2 * kernel(s, t)).mean()


def nst_loss(student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor],
             degree: int = 2, c: float = 0.0) -> Tensor:
    """NST over (student, teacher) pairs of maps: the sum of :func:`nst_mmd` (the reference's ``nst_loss``
    over ``feats[1:]``, to be weighted by ``beta`` = 50)."""
    pairs = _pairs(student_feats, teacher_feats, "nst_loss")
    total = nst_mmd(*pairs[0], degree, c)
    for s, t in pairs[1:]:
        total = total + nst_mmd(s, t, degree, c)
    return total


# -- PKT ------------------------------------------------------------------------------------------


def _conditional_probabilities(x: Tensor, eps: float) -> Tensor:
    """[N, N]: row i is p(. | i), the cosine kernel (cos + 1) / 2 to every sample, self included,
    normalised to sum to one."""
    x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
    k = (x @ x.T + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018, Eq. 6-10): the KL divergence between the teacher's
    and the student's conditional distributions of the batch, built from the cosine-similarity kernel
    ``K(a, b) = (cos(a, b) + 1) / 2``.

    As the authors' code (mdistiller's and RepDistiller's ``PKT``): embeddings ``[N, ...]`` are
    flattened and divided by ``norm + eps``; each sample's distribution ``p(j | i) = K(x_i, x_j) /
    sum_k K(x_i, x_k)`` includes ``j = i`` (the paper leaves the diagonal out); the divergence
    ``sum p_t log((p_t + eps) / (p_s + eps))`` is averaged over the ``N^2`` entries, i.e. the mean
    per-sample KL divided by N. The paper's reported weight (``beta`` = 30000) is for this form.
    """
    s, t = _f32(student_emb).flatten(1), _f32(teacher_emb).flatten(1)
    if s.shape[0] < 2 or s.shape[0] != t.shape[0]:
        raise ValueError(f"pkt_loss: needs the same N >= 2 samples on both sides, got {s.shape[0]} and {t.shape[0]}")
    p_s, p_t = _conditional_probabilities(s, eps), _conditional_probabilities(t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# -- SP -------------------------------------------------------------------------------------------


def batch_similarity(feat: Tensor) -> Tensor:
    """SP's similarity matrix of a batch: ``Q Q^T`` of the flattened features ``Q`` ``[B, C*H*W]``, each
    row L2-normalised (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, Eq. 1-2)."""
    q = _f32(feat).flatten(1)
    return F.normalize(q @ q.T, dim=1)


def sp_loss(student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor]) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, Eq. 3-4): over the (student, teacher) pairs
    of features, the sum of ``||G_T - G_S||_F^2 / b^2``, the squared Frobenius distance between their
    :func:`batch_similarity` matrices divided by the squared batch size. Only relations within a
    network are compared, so widths and resolutions may differ. Weighted by ``gamma`` (``beta``) = 3000."""
    terms = []
    for s, t in _pairs(student_feats, teacher_feats, "sp_loss"):
        b = s.shape[0]
        if b != t.shape[0]:
            raise ValueError(f"sp_loss: student and teacher batches differ ({b} and {t.shape[0]})")
        terms.append((batch_similarity(t) - batch_similarity(s)).pow(2).sum() / (b * b))
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


# -- VID ------------------------------------------------------------------------------------------


def vid_alpha_init(init_var: float, eps: float = 1e-5) -> float:
    """The softplus parameter ``alpha`` whose :func:`vid_variance` is ``init_var``: the inverse softplus
    ``log(exp(init_var - eps) - 1)``, written ``v + log(1 - exp(-v))`` so that large values do not
    overflow. Needs ``init_var > eps``."""
    v = init_var - eps
    if not v > 0:
        raise ValueError(f"vid_alpha_init: the initial variance ({init_var}) must exceed eps ({eps})")
    return v + math.log(-math.expm1(-v))


def vid_variance(alpha: Tensor, eps: float = 1e-5) -> Tensor:
    """VID's per-channel variance ``sigma_c^2 = softplus(alpha_c) + eps = log(1 + exp(alpha_c)) + eps``
    (Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019, Sec. 3):
    positive for any ``alpha``, at least ``eps``."""
    return F.softplus(_f32(alpha)) + eps


def vid_loss(pred_mean: Tensor, teacher_feat: Tensor, variance: Tensor) -> Tensor:
    """VID's Gaussian negative log-likelihood of the teacher's feature ``t`` under the student's
    prediction (Ahn et al., CVPR 2019, Eq. 2 and 5, without its constant): the mean over every element
    of ``0.5 * ((t - mu)^2 / sigma_c^2 + log sigma_c^2)``, with one variance per channel (dim 1).

    The paper sums over channels and positions; the reference code (mdistiller's and RepDistiller's
    ``VIDLoss``) takes the mean, which its weight (1) is tuned for. ``pred_mean`` and ``teacher_feat``
    must have the same shape (regress and spatially align the student's first); ``variance`` ``[C]``.
    """
    if pred_mean.shape != teacher_feat.shape:
        raise ValueError(f"vid_loss: predicted mean {tuple(pred_mean.shape)} and teacher feature "
                         f"{tuple(teacher_feat.shape)} differ; regress and align the student's feature first")
    if variance.dim() != 1 or pred_mean.dim() < 2 or variance.shape[0] != pred_mean.shape[1]:
        raise ValueError(f"vid_loss: expected one variance per channel ({pred_mean.shape[1]}), got "
                         f"{tuple(variance.shape)}")
    var = _f32(variance).view(1, -1, *([1] * (pred_mean.dim() - 2)))
    return (0.5 * ((_f32(teacher_feat) - _f32(pred_mean)).pow(2) / var + var.log())).mean()
