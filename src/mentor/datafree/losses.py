"""The terms data-free distillation methods combine, each as its paper and reference code define it.

``x`` is a synthetic batch, ``s`` and ``t`` the student's and the teacher's logits on it. The student's
distillation term is :func:`mentor.nn.soft_kl` (``T^2 * KL(p_t^T || p_s^T)``); the BN-statistics term is
:class:`mentor.nn.bnstats.BNStatistics`. Every term returns a 0-d float32 tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn import kl_div, soft_kl


def masked_adversarial_kl(s: Tensor, t: Tensor) -> Tensor:
    """CMI's and Fast's adversarial term ("decision adversarial distillation"):
    ``-mean_i 1[argmax s_i = argmax t_i] * KL(p_t,i || p_s,i)`` at temperature 1. The synthesiser
    maximises the disagreement only on samples where the student still agrees with the teacher, so it
    does not push images across the teacher's decision boundary."""
    agree = (s.argmax(1) == t.argmax(1)).float()
    per = soft_kl(s, t, 1.0, reduction="none")
    return -(per * agree).mean()


def adversarial_kl(s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    """ZSKT's generator term: ``-KL(p_t || p_s)`` (batch mean, temperature ``T``, times ``T^2``)."""
    return -soft_kl(s, t, temperature)


def logit_l1(s: Tensor, t: Tensor) -> Tensor:
    """DFAD's discrepancy: the mean absolute difference of the logits (the student minimises it, the
    generator maximises it)."""
    return (s.float() - t.float()).abs().mean()


def js_divergence(s: Tensor, t: Tensor, temperature: float = 3.0) -> Tensor:
    """The Jensen-Shannon divergence of DeepInversion's Adaptive DeepInversion (ADI) competition term:
    ``P = softmax(s/T)``, ``Q = softmax(t/T)``, ``M = (P + Q)/2``, each clamped to [0.01, 0.99] as the
    official code does, and ``JS = (KL(M || P) + KL(M || Q)) / 2`` (batch mean). The synthesiser adds
    ``-JS`` (or ``1 - JS``) to make images on which the student and the teacher disagree."""
    p = F.softmax(s.float() / temperature, 1)
    q = F.softmax(t.float() / temperature, 1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * (kl_div(p.log(), m.log()) + kl_div(q.log(), m.log()))


def class_balance(t: Tensor) -> Tensor:
    """DAFL's information-entropy term ``sum_c pbar_c log pbar_c`` with ``pbar`` the batch-mean softmax of
    the teacher; minimising it spreads the batch over the classes (natural log, as Fast-Datafree; DAFL's
    code uses log10, a constant factor)."""
    p = F.softmax(t.float(), 1).mean(0)
    return (p * p.clamp_min(1e-12).log()).sum()


def activation(features: Tensor) -> Tensor:
    """DAFL's activation term ``-mean |f_T(x)|`` on the teacher's penultimate features."""
    return -features.float().abs().mean()


def total_variation(x: Tensor) -> tuple[Tensor, Tensor]:
    """DeepInversion's image priors ``(TV_L1, TV_L2)`` from the differences of each pixel with its right,
    lower, and both diagonal neighbours: ``TV_L2`` is the sum of the four differences' L2 norms, ``TV_L1``
    the sum of their mean absolute values."""
    x = x.float()
    diffs = (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])
    l1 = sum(d.abs().mean() for d in diffs)
    l2 = sum(torch.linalg.vector_norm(d) for d in diffs)
    return l1, l2
