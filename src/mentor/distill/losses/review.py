"""The hierarchical context loss of "Distilling Knowledge via Knowledge Review" (ReviewKD).

Chen, Liu, Zhao & Jia, CVPR 2021. The attention-based fusion modules that build the student's side
live in :mod:`mentor.distill.reviewkd`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hcl_level", "hcl_loss"]


def hcl_level(student: Tensor, teacher: Tensor, levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """The hierarchical context loss of one pair of maps ``[B, C, H, W]`` (same shape).

    The mean squared error of the maps themselves (weight 1), plus that of both maps average-pooled to
    ``l x l`` for each pyramid level ``l`` in ``levels`` smaller than the map (``l < min(H, W)``), the
    successive pooled levels weighted 1/2, 1/4, 1/8, ...; the sum divided by the sum of the weights. A
    7x7 map: weights 1, 1/2, 1/4, 1/8 for 7x7, 4x4, 2x2, 1x1; a 1x1 map: its MSE alone (the official
    code's ``hcl``, as mdistiller's).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hcl_level: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} maps "
                         "differ; the fusion modules must output the teacher's shape")
    s, t = student.float(), teacher.float()
    loss = F.mse_loss(s, t)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= min(s.shape[-2:]):
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        total += weight
    return loss / total


def hcl_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """ReviewKD's distillation loss: :func:`hcl_level` summed over the pairs of (fused student, teacher)
    maps. To be weighted by ``beta`` (the official scripts' ``--kd-loss-weight``)."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"hcl_loss: needs as many student maps as teacher maps (at least one), got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats):
        total = total + hcl_level(s, t, levels)
    return total
