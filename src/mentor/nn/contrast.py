"""The supervised contrastive loss, shared by the families that contrast two views of a batch (CPSC-DFKD's
teacher and student features, ARFNet's global and local crops)."""

from __future__ import annotations

import torch
from torch import Tensor


def sup_con(views: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """The supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
    ``L^sup_out``) of ``views`` ``[B, V, D]`` (``V`` L2-normalised views of ``B`` samples) with ``labels``
    ``[B]``: every one of the ``V*B`` vectors is an anchor; its positives are the other vectors whose sample
    has its label (the other views of its own sample included), its contrast set every other vector::

        L = mean_i  -1/|P(i)| sum_{p in P(i)} log( exp(f_i.f_p / tau) / sum_{k != i} exp(f_i.f_k / tau) )

    An anchor without positives (one view of a class seen once) contributes 0."""
    b, v, _ = views.shape
    f = views.float().transpose(0, 1).reshape(v * b, -1)  # view-major: the B first views, then the second ...
    lab = labels.repeat(v)
    self_ = torch.eye(v * b, dtype=torch.bool, device=f.device)
    logits = (f @ f.T / temperature).masked_fill(self_, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (lab[:, None] == lab[None, :]) & ~self_
    per_anchor = log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp_min(1)
    return -per_anchor.mean()
