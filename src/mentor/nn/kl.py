"""The temperature-scaled KL divergence of the whole library: batch-mean KL(teacher || student) x T^2.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015: the T^2 factor keeps
the gradient scale of the soft term independent of the temperature.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl_div(log_p_student: Tensor, log_p_teacher: Tensor, reduction: str = "batchmean") -> Tensor:
    """KL(teacher || student) from log-probabilities over the last dimension.

    ``reduction``: "batchmean" (sum over classes, mean over samples), or "none" (one value per sample).
    A teacher probability of exactly 0 contributes 0 (the limit of p log p).
    """
    per = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    if reduction == "none":
        return per
    if reduction == "batchmean":
        return per.mean()
    raise ValueError(f"reduction must be 'batchmean' or 'none', got {reduction!r}")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
            reduction: str = "batchmean") -> Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), computed in float32 for bf16 inputs."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return kl_div(log_s, log_t, reduction) * (t * t)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample entropy of softmax(logits / T), in nats."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


__all__ = ["entropy", "kl_div", "soft_kl"]


def train_accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Top-1 accuracy of a training batch as a 0-d tensor (a logged number, no gradient, no host sync)."""
    return (logits.detach().argmax(1) == y).float().mean()
