"""ShrinkMatch: FixMatch with distribution alignment, soft certain targets, and a loss on the uncertain
images in a class space shrunk until their top class is confident."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import COUNT, DECAY, NON_NEGATIVE, PROBABILITY, rules
from ..methods import StepContext, register_method
from ..models.penultimate import PenultimateTap
from ..nn.distalign import DistAlignQueue
from ..nn.masking import all_reduce_sum, step_tensor
from .fixmatch import FixMatch, Logits, SemiConfig


def shrink_search(probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """For each row of ``probs``, sorted descending into ``s_0 >= s_1 >= ...``: the smallest rank
    ``c`` in ``[2, C-1]`` with ``s_0 / (s_0 + sum_{j >= c} s_j) >= threshold`` (dropping ranks
    ``1 .. c-1`` makes the top class confident), and whether one exists (else ``c = C-1``, as the
    reference's loop ends there). Vectorised: the tail sums are a reversed cumulative sum, the first
    rank that passes an ``argmax`` over the pass/fail row. Returns ``(c, found)``, shapes ``[N]``."""
    n, num_classes = probs.shape
    if num_classes < 3:  # no rank to drop: the reference's loop over range(2, C) is empty
        return (torch.full((n,), num_classes - 1, device=probs.device, dtype=torch.long),
                torch.zeros(n, device=probs.device, dtype=torch.bool))
    s = probs.sort(1, descending=True).values
    tail = s.flip(1).cumsum(1).flip(1)[:, 2:]  # tail[:, c - 2] = sum_{j >= c} s_j
    passes = s[:, :1] / (s[:, :1] + tail) >= threshold
    found = passes.any(1)
    first = passes.to(torch.uint8).argmax(1) + 2  # the first maximum: the smallest passing rank
    return torch.where(found, first, torch.full_like(first, num_classes - 1)), found


def shrink_loss(probs: Tensor, logits: Tensor, threshold: float) -> Tensor:
    """ShrinkMatch's per-image shrink loss (``[N]``), for the uncertain images (``max p < threshold``):

    ``max_p * 1[found] * CE([z_(0), z_(c) .. z_(C-1)], 0)``: the cross-entropy of ``logits`` (the auxiliary
    head on the strong view) restricted to the top class and the classes from rank ``c`` on (ranks by
    ``probs``, ``c`` from :func:`shrink_search`), with the top class as the target. Certain images and
    images whose top class never gets confident give 0. The restricted cross-entropy is a log-sum-exp
    over the sorted logits with the dropped ranks masked to ``-inf``."""
    num_classes = probs.shape[1]
    order = probs.argsort(1, descending=True)
    z = logits.float().gather(1, order)
    c, found = shrink_search(probs, threshold)
    rank = torch.arange(num_classes, device=probs.device)
    keep = (rank == 0) | (rank >= c[:, None])
    ce = torch.logsumexp(z.masked_fill(~keep, float("-inf")), 1) - z[:, 0]
    top = probs.max(1).values
    weight = top * found * (top < threshold)
    return weight * ce


def aux_head(width: int, num_classes: int) -> nn.Sequential:
    """ShrinkMatch's auxiliary classifier: ``d -> d/4 -> d/4 -> C`` with BatchNorm and LeakyReLU(0.1)."""
    hidden = max(1, width // 4)
    return nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1),
                         nn.Linear(hidden, num_classes))


@register_method("shrinkmatch")
class ShrinkMatch(FixMatch):
    """Yang, Zhao, Qi, Qiao, Shi & Zhao, "Shrinking Class Space for Enhanced Certainty in Semi-Supervised
    Learning", ICCV 2023, as its official CIFAR code (``LiheYoung/ShrinkMatch``, ``CIFAR/shrinkmatch.py``)
    computes it, with the shrink search vectorised.

    With ``p`` the weak view's probabilities aligned by a queue of the last ``da_len`` batch means
    (:class:`~mentor.nn.distalign.DistAlignQueue`: ``p <- Normalize(p / mean(queue))``, the batch pushed
    first) and ``m_b = 1[max p_b >= p_cutoff]``::

        loss = CE(x, y) + lambda_u * (L_certain + eps_t * sum_b L_shrink,b / N)
        L_certain = mean_b m_b H(p_b, z_s,b)          (soft aligned targets, no sharpening)

    ``L_shrink`` (:func:`shrink_loss`) is, for an uncertain image, the cross-entropy of the auxiliary
    head's strong-view logits over the class space shrunk to the top class and the ranks from ``c`` on,
    ``c`` the smallest rank that makes the top class confident (:func:`shrink_search`), weighted by
    ``max p`` (principle 1). ``eps_t`` (principle 2) is the moving average (momentum ``ratio_momentum``)
    of the certain ratio ``mean_b m_b``, started at the first batch's ratio and updated with the batch
    before it weighs the loss. ``N`` counts all unlabelled images. The auxiliary head
    (:func:`aux_head`) reads the student's penultimate features (the input of its ``fc``) of the strong
    view and trains the encoder through them, as in the reference.

    Defaults are the official code's: ``p_cutoff`` 0.95, ``da_len`` 32, ``ratio_momentum`` 0.999,
    ``lambda_u`` 1. Deviations:

    - **The certain-ratio average is not reset.** The reference's ``train()`` sets it to ``None`` at the
      start of every "epoch" of 1024 steps, discarding the value it is passed and checkpoints; its
      STL-10/SVHN code keeps it for the whole run. An average that restarts from one batch every 1024
      steps looks unintended, so it runs over the whole training here; ``ratio_reset_every: 1024``
      reproduces the CIFAR code (it restarts at every step that is a multiple of it).
    - ``lambda_u`` weighs both unlabelled terms, as the STL-10/SVHN code; the CIFAR code has no
      ``lambda_u`` (= 1, the default).
    - The search and the shrunk cross-entropy run on the whole batch with tensor operations (the
      reference loops over images and classes in Python, reading values back to the host); the tail sums
      are cumulative sums, which may differ from the reference's direct sums in the last bit.
    - The certain ratio and the queue's batch mean are over the global batch under DDP (the reference
      all-reduces the queue entry but keeps each rank's own ratio).
    - The EMA evaluation copy is the engine's (``trainer.ema: 0.999``), not a part of the method.
    """

    @rules(p_cutoff=PROBABILITY, da_len=COUNT, ratio_momentum=DECAY, ratio_reset_every=NON_NEGATIVE)
    @dataclass
    class Config(SemiConfig):
        p_cutoff: float = 0.95
        da_len: int = 32
        ratio_momentum: float = 0.999
        ratio_reset_every: int = 0

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.tap = PenultimateTap(student)
        self.aux_head = aux_head(self.tap.num_features, info.num_classes)
        self.dist_align = DistAlignQueue(info.num_classes, cfg.da_len)
        self.register_buffer("certain_ratio", torch.zeros(()))
        self.register_buffer("ratio_started", torch.zeros((), dtype=torch.bool))

    def forward_views(self, batch: dict[str, Tensor]) -> Logits:
        inputs = self.views(batch)
        sizes = [v.shape[0] for v in inputs.values()]
        features, logits = self.tap(torch.cat(list(inputs.values())))
        z = dict(zip(inputs, logits.split(sizes)))
        z["u_strong_aux"] = self.aux_head(dict(zip(inputs, features.split(sizes)))["u_strong"])
        return z

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        z["u_weak_aligned"] = aligned = self.dist_align(probs)  # shared with extra_terms
        return aligned

    def targets(self, probs: Tensor, raw: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        return probs

    @torch.no_grad()
    def update_ratio(self, mask: Tensor, ctx: StepContext) -> Tensor:
        """The moving average of the certain ratio, with this batch (global over DDP ranks)."""
        sums = all_reduce_sum(torch.stack([mask.float().sum(), torch.full_like(mask[0], mask.shape[0])]))
        ratio = sums[0] / sums[1]
        fresh = ~self.ratio_started
        if self.cfg.ratio_reset_every:
            fresh = fresh | (step_tensor(ctx.step, mask.device).remainder(self.cfg.ratio_reset_every) == 0)
        m = self.cfg.ratio_momentum
        self.certain_ratio.copy_(torch.where(fresh, ratio, m * self.certain_ratio + (1 - m) * ratio))
        self.ratio_started.fill_(True)
        return self.certain_ratio.clone()

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float | Tensor, Tensor]]:
        eps = self.update_ratio(mask, ctx)
        ctx.diagnostics["certain_ratio_ema"] = eps
        shrink = shrink_loss(z["u_weak_aligned"], z["u_strong_aux"], self.cfg.p_cutoff).mean()
        return {"shrink": (self.cfg.lambda_u * eps, shrink)}


__all__ = ["ShrinkMatch", "aux_head", "shrink_loss", "shrink_search"]
