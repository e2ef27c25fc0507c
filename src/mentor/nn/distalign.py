"""Distribution alignment of pseudo-label probabilities with a moving average of the model's marginal.

Berthelot et al., "ReMixMatch: Semi-Supervised Learning with Distribution Matching and Augmentation
Anchoring", ICLR 2020, introduced ``p <- Normalize(p * p_target / p_model)``: the unlabelled
predictions are scaled by the ratio of a target class distribution to a running estimate of the
model's own marginal over the unlabelled data, so that on average the pseudo-labels follow the target.
SoftMatch (uniform target) and AdaMatch (target: the model's marginal on the labelled batch) reuse it.
ShrinkMatch keeps the marginal as the mean of a queue of recent batch means (:class:`DistAlignQueue`),
and RDA aligns two classifiers' distributions to each other (:func:`reciprocal_alignment`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masking import all_reduce_sum

TARGETS = ("uniform", "model", "gt")


def _global_mean(probs: Tensor, dtype: torch.dtype) -> Tensor:
    """The class-wise mean of ``probs`` over the global batch (all DDP ranks), as ``dtype``."""
    n = torch.full((1,), float(probs.shape[0]), device=probs.device, dtype=dtype)
    sums = all_reduce_sum(torch.cat([probs.detach().to(dtype).sum(0), n]))
    return sums[:-1] / sums[-1]


class DistAlignEMA(nn.Module):
    """``p <- Normalize(p * (p_target + 1e-6) / (p_model + 1e-6))`` with moving averages, as USB's
    ``DistAlignEMAHook``.

    ``p_model`` is the moving average (momentum ``momentum``) of the unlabelled batch's mean
    probabilities, set to the first batch's mean at the first call; it is updated with the batch before
    the batch is aligned. ``target``:

    - ``"uniform"``: ``p_target = 1/C`` (SoftMatch);
    - ``"model"``: ``p_target`` starts at ``1/C`` and follows the moving average of the labelled batch's
      mean probabilities (AdaMatch; :meth:`forward` then needs ``probs_lb``);
    - ``"gt"``: a fixed ``p_target`` given, e.g. the labelled class distribution.

    State (``p_model``, ``p_target``, ``started``) is in buffers; means are over the global batch under
    DDP (USB gathers the ranks' probabilities), so no value is read back to the host.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, target: str = "uniform",
                 p_target: Tensor | None = None):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"distribution-alignment target {target!r}: use one of {', '.join(TARGETS)}")
        if (target == "gt") != (p_target is not None):
            raise ValueError("a p_target is given exactly for target='gt'")
        self.num_classes, self.momentum, self.target = num_classes, momentum, target
        start = torch.full((num_classes,), 1.0 / num_classes) if p_target is None else p_target.float().clone()
        self.register_buffer("p_target", start / start.sum())
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, probs: Tensor, probs_lb: Tensor | None = None) -> Tensor:
        self.update(probs, probs_lb)
        aligned = probs * (self.p_target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(1, keepdim=True)

    @torch.no_grad()
    def update(self, probs: Tensor, probs_lb: Tensor | None = None) -> None:
        m = self.momentum
        mean = _global_mean(probs, self.p_model.dtype)
        self.p_model.copy_(torch.where(self.started, m * self.p_model + (1 - m) * mean, mean))
        self.started.fill_(True)
        if self.target == "model":
            if probs_lb is None:
                raise ValueError("DistAlignEMA(target='model') follows the labelled batch: pass probs_lb")
            self.p_target.mul_(m).add_((1 - m) * _global_mean(probs_lb, self.p_target.dtype))


class DistAlignQueue(nn.Module):
    """Distribution alignment with a queue of the last ``length`` batch-mean predictions.

    ``forward(p)`` pushes the global batch's class-wise mean of ``p`` into the queue, then returns
    ``Normalize(p / mean_t Q[t])`` (each row renormalised to sum 1): ShrinkMatch's alignment to a uniform
    target (Yang et al., "Shrinking Class Space for Enhanced Certainty in Semi-Supervised Learning", ICCV
    2023, with a queue of 32; USB's ``DistAlignQueueHook`` keeps the same kind of queue). :meth:`push` alone
    keeps the queue for other uses (RDA's reciprocal alignment, :func:`reciprocal_alignment`).

    ``eps`` (USB's ``1e-6`` in SimMatch and CoMatch) is added to the uniform target ``1/C`` and to the
    queue's mean, ``Normalize(p * (1/C + eps) / (mean_t Q[t] + eps))``; without it the ``1/C`` cancels.

    The queue starts filled with ``init``: ShrinkMatch's zeros (then ``mean_t Q[t]`` is the mean of the
    pushed entries times a constant, which the row normalisation cancels, so the alignment uses exactly the
    batches seen so far) or RDA's ones (which weigh in until overwritten). State (``queue``, ``ptr``) is
    in buffers, updated on the device with no value read back to the host; the batch mean is over all
    DDP ranks, as the references all-reduce it.
    """

    def __init__(self, num_classes: int, length: int, init: float = 0.0, eps: float = 0.0):
        super().__init__()
        if length < 1:
            raise ValueError(f"distribution-alignment queue length must be >= 1, got {length}")
        self.num_classes, self.length, self.eps = num_classes, length, eps
        self.register_buffer("queue", torch.full((length, num_classes), float(init)))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def push(self, probs: Tensor) -> None:
        """Write the global batch mean of ``probs`` at the pointer and advance it (wrapping around)."""
        mean = _global_mean(probs, self.queue.dtype)
        self.queue.index_copy_(0, self.ptr, mean.unsqueeze(0))
        self.ptr.add_(1).remainder_(self.length)

    def mean(self) -> Tensor:
        return self.queue.mean(0)

    def forward(self, probs: Tensor) -> Tensor:
        self.push(probs)
        if self.eps:
            # USB's DistAlignQueueHook (SimMatch, CoMatch): Normalize(p * (1/C + eps) / (mean Q + eps))
            aligned = probs * (1.0 / self.num_classes + self.eps) / (self.mean().to(probs.dtype) + self.eps)
        else:
            aligned = probs / self.mean().to(probs.dtype)
        return aligned / aligned.sum(1, keepdim=True)


NORMALIZE = ("batch", "row")


def reciprocal_alignment(p: Tensor, q: Tensor, dist_p: Tensor, dist_q: Tensor,
                         normalize: str = "batch") -> tuple[Tensor, Tensor]:
    """RDA's reciprocal distribution alignment (Duan et al., "RDA: Reciprocal Distribution Alignment for
    Robust Semi-supervised Learning", ECCV 2022), as its official code computes it.

    ``p`` are the main classifier's probabilities of the unlabelled batch, ``q`` the complementary
    classifier's; ``dist_p``, ``dist_q`` their queues of batch means (``[L, C]``, e.g.
    :attr:`DistAlignQueue.queue`). With ``N(x) = x / sum(x)`` over *every* entry of ``x``::

        p' = N(p * mean_t N(1 - dist_q)[t] / mean_t dist_p[t])
        q' = N(q * mean_t N(1 - dist_p)[t] / mean_t dist_q[t])

    Each classifier's distribution is aligned to the complement of the other's. ``normalize="batch"``
    normalises ``p'`` and ``q'`` over the whole batch as the reference does (rows then sum to about
    ``1 / batch``; the sum runs over all DDP ranks, so the global batch is normalised as one process
    would); ``"row"`` makes each image's row a distribution. Returns ``(p', q')``, detached.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"reciprocal alignment normalize={normalize!r}: use one of {', '.join(NORMALIZE)}")
    with torch.no_grad():
        comp_q, comp_p = 1.0 - dist_q, 1.0 - dist_p
        comp_q, comp_p = comp_q / comp_q.sum(), comp_p / comp_p.sum()
        p_al = p * (comp_q.mean(0) / dist_p.mean(0)).to(p.dtype)
        q_al = q * (comp_p.mean(0) / dist_q.mean(0)).to(q.dtype)
        if normalize == "row":
            return p_al / p_al.sum(1, keepdim=True), q_al / q_al.sum(1, keepdim=True)
        sums = all_reduce_sum(torch.stack([p_al.sum(), q_al.sum()]))
        return p_al / sums[0], q_al / sums[1]


__all__ = ["DistAlignEMA", "DistAlignQueue", "reciprocal_alignment"]
