"""Logit distillation losses: vanilla KD, its logit-matching limit, DKD and RLD.

Every function takes raw logits ``[B, C]`` of any float dtype (computed in float32 for bf16/fp16;
float64 stays float64 except in :func:`kd_loss`, which is :func:`mentor.nn.kl.soft_kl` and computes in
float32), returns batch means, and follows the library's one KL convention: KL(teacher || student)
x T^2.

Class removal (DKD's non-target term, RLD's masked term) is exact here: :func:`_masked_log_softmax`
sets the removed logits to the lowest finite float, whose ``exp`` is exactly 0 next to any finite
logit, so the kept classes' softmax is bit-identical to a softmax over them alone, and then zeroes
the removed entries' log-probabilities so they add exactly 0 to the KL (with -inf they would give
exp(-inf) * (-inf + inf) = NaN). The reference code removes a class the same way with a margin:
DKD (mdistiller) subtracts 1000 from the target logit after dividing by T, which leaves a relative
error of ``exp(z_t/T - max_{c != t} z_c/T - 1000)``, below float32 rounding unless the target
logit / T exceeds every other one by more than about 980 (never in normal training); RLD overwrites
the masked logits with -1e9, exact in practice.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nn.kl import kl_div, soft_kl


class DKDLoss(NamedTuple):
    """The two terms of DKD (each T^2-scaled, batch mean) and ``loss = alpha*tckd + beta*nckd``."""

    tckd: Tensor
    nckd: Tensor
    loss: Tensor


class RLDLoss(NamedTuple):
    """The two terms of RLD (each scaled by its temperature squared, batch mean) and
    ``loss = alpha*scd + beta*mcd``."""

    scd: Tensor
    mcd: Tensor
    loss: Tensor


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _masked_log_softmax(x: Tensor, remove: Tensor) -> Tensor:
    """log softmax over the classes not in ``remove`` (bool, same shape); removed entries are 0.

    A row with every class removed gives all zeros (a KL of 0, and zero, not NaN, gradients).
    """
    logp = F.log_softmax(x.masked_fill(remove, torch.finfo(x.dtype).min), dim=-1)
    return logp.masked_fill(remove, 0.0)


def _binary_log_probs(log_p: Tensor, index: Tensor) -> Tensor:
    """[log p_k, log(1 - p_k)] per row for class ``index``, with 1 - p_k summed in log space
    (no cancellation when p_k is close to 1)."""
    one = F.one_hot(index, log_p.shape[-1]).bool()
    log_k = log_p.gather(-1, index[:, None])
    log_rest = log_p.masked_fill(one, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([log_k, log_rest], dim=-1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batch mean (Hinton, Vinyals & Dean, "Distilling
    the Knowledge in a Neural Network", 2015)."""
    return soft_kl(student_logits, teacher_logits, temperature)


def logit_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Logit matching: ``mean_c (z_s - z_t)^2 / 2``, batch mean.

    Matching logits by regression is the compression loss of Ba & Caruana ("Do Deep Nets Really Need
    to be Deep?", 2014). Hinton et al. (2015, Sec. 2.1) showed KD tends to it as T -> infinity for
    zero-mean logits, and Chen ("A Note on Knowledge Distillation Loss Function for Object
    Classification", arXiv:2109.06458, 2021) that equal-mean logits suffice. The scale (1/2, mean
    over classes) is chosen so that this IS that limit of :func:`kd_loss`:
    ``T^2 KL -> mean_c(d_c - mean(d))^2 / 2`` with ``d = z_s - z_t``, which equals this loss when the
    two logit vectors have the same mean. It is half of ``F.mse_loss(z_s, z_t)``.
    """
    d = _f32(student_logits) - _f32(teacher_logits)
    return 0.5 * d.pow(2).mean()


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> DKDLoss:
    """Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

    With p = softmax(z/T) and t the label:

    - ``tckd`` = T^2 KL(b_t || b_s), b = [p_t, 1 - p_t] (target vs all non-target classes);
    - ``nckd`` = T^2 KL(q_t || q_s), q = softmax(z/T) over the C - 1 non-target classes.

    Per sample, T^2 KL(p_t || p_s) = tckd + (1 - p^T_t) * nckd (the paper's decomposition); DKD
    replaces the weight (1 - p^T_t) by beta, freeing the non-target term from the teacher's
    confidence. See the module docstring for how the target class is removed.
    """
    t = temperature
    zs, zt = _f32(student_logits) / t, _f32(teacher_logits) / t
    log_ps, log_pt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    tckd = kl_div(_binary_log_probs(log_ps, target), _binary_log_probs(log_pt, target)) * (t * t)
    gt = F.one_hot(target, zs.shape[-1]).bool()
    nckd = kl_div(_masked_log_softmax(zs, gt), _masked_log_softmax(zt, gt)) * (t * t)
    return DKDLoss(tckd, nckd, alpha * tckd + beta * nckd)


def rld_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, scd_temperature: float = 1.0) -> RLDLoss:
    """Refined Logit Distillation (Sun, Chen, Lyu et al., "Knowledge Distillation with Refined
    Logits", 2024; official code zju-SWJ/RLD).

    - ``scd`` (sample confidence) = Ta^2 KL([p^T_m, 1 - p^T_m] || [p^S_t, 1 - p^S_t]) at
      Ta = ``scd_temperature``, where m is the teacher's top class and t the label: the student's
      label confidence learns the teacher's top confidence, not the teacher's (possibly wrong)
      label probability.
    - ``mcd`` (masked correlation) = T^2 KL over the classes the teacher ranks strictly below the
      label: the label and every class with z^T_c >= z^T_t are removed from both distributions, so
      a wrong teacher never teaches its misranking.

    When the teacher's top class is the label (strictly) and Ta == T, this is exactly DKD.
    A sample whose label the teacher ranks last keeps no class and adds 0 to ``mcd``.
    """
    zs, zt = _f32(student_logits), _f32(teacher_logits)
    ta = scd_temperature
    log_ps, log_pt = F.log_softmax(zs / ta, -1), F.log_softmax(zt / ta, -1)
    scd = kl_div(_binary_log_probs(log_ps, target), _binary_log_probs(log_pt, zt.argmax(-1))) * (ta * ta)
    t = temperature
    remove = zt >= zt.gather(-1, target[:, None])
    mcd = kl_div(_masked_log_softmax(zs / t, remove), _masked_log_softmax(zt / t, remove)) * (t * t)
    return RLDLoss(scd, mcd, alpha * scd + beta * mcd)


__all__ = ["DKDLoss", "RLDLoss", "dkd_loss", "kd_loss", "logit_mse_loss", "rld_loss"]
