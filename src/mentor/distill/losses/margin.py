"""The loss of "A Comprehensive Overhaul of Feature Distillation" (OFD): the teacher's pre-ReLU map through a
margin ReLU, the partial L2 distance to the student's connected pre-ReLU map.

Heo, Kim, Yun, Park, Kwak & Choi, ICCV 2019. The connectors and the choice of the BN layers whose
statistics give the margins live in :mod:`mentor.distill.ofd`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ofd_loss", "ofd_margin", "partial_l2"]


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor, min_mass: float = 1e-3) -> Tensor:
    """The margin of OFD's margin ReLU, per channel: the mean of the negative responses of a channel
    distributed as ``N(bias, |weight|^2)``, the output of a BN layer with that affine transform.

    ``m - s * phi(m / s) / Phi(-m / s)`` for mean ``m`` and std ``s`` (the expectation of ``x`` given
    ``x < 0``, paper Eq. 3 and the reference code's ``get_margin``); where the negative mass
    ``Phi(-m / s)`` is at most ``min_mass`` (0.001 in the reference) it is ``-3 s`` instead. Computed in
    float64 and returned as float32 ``[C]``; a zero std gives ``min(m, 0)`` (the limit) instead of NaN.
    """
    s = bn_weight.detach().double().abs().clamp_min(1e-12)
    m = bn_bias.detach().double()
    z = m / s
    mass = torch.special.ndtr(-z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    mean_negative = m - s * density / mass.clamp_min(1e-300)
    return torch.where(mass > min_mass, mean_negative, -3.0 * s).float()


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """OFD's partial L2 distance for one stage, summed over channels and positions, averaged over the batch.

    The target is the margin ReLU of the teacher's pre-ReLU map, ``T = max(teacher, margin)`` (``margin``
    per channel, ``[C]``); a position adds ``(S - T)^2`` unless ``S <= T <= 0`` (paper Eq. 4: the student
    need not match a negative target it is already below). ``student`` and ``teacher`` are
    ``[B, C, H, W]`` of the same shape.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"partial_l2: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} maps "
                         "differ; connect the student and pool the teacher first")
    s, t = student.float(), teacher.float()
    target = torch.maximum(t, margin.float().view(1, -1, 1, 1).to(t.device))
    keep = (s > target) | (target > 0)
    return ((s - target).pow(2) * keep).sum() / s.shape[0]


def ofd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], margins: Sequence[Tensor]) -> Tensor:
    """OFD over stages (shallow to deep): :func:`partial_l2` of each connected student map and the
    teacher's pre-ReLU map average-pooled to the student's resolution, the stage ``i`` of ``n`` weighted
    by ``1 / 2^(n - 1 - i)`` (the deepest 1, each shallower one half the next), summed, as the reference
    code. To be weighted by ``beta`` (the reference's 1/1000)."""
    if not (len(student_feats) == len(teacher_feats) == len(margins)) or not student_feats:
        raise ValueError(f"ofd_loss: needs as many student maps, teacher maps and margins (at least one), got "
                         f"{len(student_feats)}, {len(teacher_feats)} and {len(margins)}")
    n = len(student_feats)
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for i, (s, t, m) in enumerate(zip(student_feats, teacher_feats, margins)):
        if t.shape[-2:] != s.shape[-2:]:
            t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        total = total + partial_l2(s, t, m) / 2 ** (n - 1 - i)
    return total
