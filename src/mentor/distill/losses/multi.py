"""Multi-teacher distillation: per-sample teacher weights and the weighted KD and feature losses.

Every weighting returns a ``[K, B]`` tensor (teacher-major, like ``teacher_logits(x) -> [K, B, C]``)
whose columns sum to one: for each sample the weights form a convex combination of the teachers, so
with K identical teachers every weighting reduces to single-teacher KD.

- :func:`teacher_weights_average`: 1/K (the AVERAGE_LOSS baseline of the CA-MKD code).
- :func:`teacher_weights_entropy`: EBKD, Kwon et al., "Adaptive Knowledge Distillation Based on
  Entropy", ICASSP 2020.
- :func:`teacher_weights_confidence`: CA-MKD, Zhang et al., "Confidence-Aware Multi-Teacher Knowledge
  Distillation", ICASSP 2022.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nn.kl import entropy, soft_kl


def teacher_weights_average(num_teachers: int, batch_size: int, device: torch.device | str | None = None,
                            dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform weights 1/K, shape ``[K, B]``."""
    return torch.full((num_teachers, batch_size), 1.0 / num_teachers, device=device, dtype=dtype)


def teacher_weights_entropy(teacher_logits: Tensor, temperature: float = 1.0, normalize: bool = True) -> Tensor:
    """EBKD weights (Kwon et al., "Adaptive Knowledge Distillation Based on Entropy", 2020), ``[K, B]``.

    ``w_k = 1 - H_k / sum_j H_j`` per sample, with ``H_k`` the entropy of softmax(z_k / T) (T = 1 in the
    CA-MKD code's EBKD baseline): a confident (low-entropy) teacher gets more weight. These raw weights
    sum to K - 1 per sample. With ``normalize`` (the default) they are divided by their per-sample sum,
    i.e. by K - 1, so they sum to one; if every teacher is exactly one-hot (all H_k = 0) the weights
    are then uniform, and one teacher gets weight 1. ``normalize=False`` returns the raw weights, as
    the CA-MKD code uses them (it divides the weighted KL sum by B*K, so its loss is (K - 1)/K times
    the loss with the normalised weights); all-one-hot teachers then get 1 each (the reference
    divides 0 by 0) and one teacher gets 0.
    """
    k = teacher_logits.shape[0]
    h = entropy(teacher_logits, temperature)  # [K, B], float32
    raw = 1.0 - h / h.sum(0, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
    if not normalize:
        return raw
    if k == 1:
        return torch.ones(teacher_logits.shape[:2], device=teacher_logits.device)
    return raw / raw.sum(0, keepdim=True)


def teacher_weights_confidence(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """CA-MKD label-aware weights (Zhang et al., "Confidence-Aware Multi-Teacher Knowledge
    Distillation", 2022), ``[K, B]``: ``w_k = (1 - softmax_k(CE_k)) / (K - 1)`` per sample.

    ``CE_k`` is the cross-entropy of teacher k's logits against the label; the softmax runs over the
    teachers, so the teacher with the lower CE gets the larger weight, and the K weights sum to
    (K - 1)/(K - 1) = 1. Differentiable in ``teacher_logits`` (CA-MKD's feature term feeds logits of
    the student's embedded features through each teacher's head). One teacher gets weight 1.
    """
    k, b, c = teacher_logits.shape
    if k == 1:
        return torch.ones(k, b, device=teacher_logits.device)
    ce = F.cross_entropy(teacher_logits.float().reshape(k * b, c), target.repeat(k), reduction="none")
    return (1.0 - ce.reshape(k, b).softmax(0)) / (k - 1)


def multi_teacher_kd_loss(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor,
                          temperature: float = 4.0) -> Tensor:
    """``mean_b sum_k w[k, b] * T^2 * KL(softmax(z_k[b] / T) || softmax(z_s[b] / T))``.

    ``student_logits`` [B, C], ``teacher_logits`` [K, B, C], ``weights`` [K, B]. With weights that sum
    to one per sample this is on the scale of single-teacher KD. The CA-MKD code divides the same sum
    by B*K instead of B (an extra 1/K that its paper's equations do not have); this function does not:
    multiply by 1/K to get the reference magnitude (:class:`mentor.distill.multi_teacher.CAMKD` does,
    by default, through ``divide_by_teachers``).
    """
    per = torch.stack([soft_kl(student_logits, t, temperature, reduction="none") for t in teacher_logits])
    return (weights * per).sum(0).mean()


def multi_teacher_feature_loss(student_feats: list[Tensor], teacher_feats: list[Tensor], weights: Tensor) -> Tensor:
    """``mean_b sum_k w[k, b] * MSE_b(s_k, t_k)``, the per-sample mean squared error over (C, H, W).

    ``student_feats[k]`` is the student's feature already mapped to teacher k's shape (CA-MKD's and
    MMKD's per-teacher ``Embed``); ``weights`` [K, B]. Like :func:`multi_teacher_kd_loss`, no 1/K.
    """
    per = torch.stack([(s.float() - t.float()).pow(2).flatten(1).mean(1)
                       for s, t in zip(student_feats, teacher_feats, strict=True)])
    return (weights * per).sum(0).mean()


__all__ = ["multi_teacher_feature_loss", "multi_teacher_kd_loss", "teacher_weights_average",
           "teacher_weights_confidence", "teacher_weights_entropy"]
