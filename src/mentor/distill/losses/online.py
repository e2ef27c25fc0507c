"""Losses of online distillation, where peers trained together teach each other (no frozen teacher).

Stateless functions on logits. Peer logits are stacked peers-first, ``[K, B, C]`` (a list of ``[B, C]``
tensors is accepted too). KL terms follow the library's convention, batch-mean KL(target || peer) x T^2
(:func:`mentor.nn.kl.soft_kl`).

- :func:`dml_loss`: Zhang et al., "Deep Mutual Learning", CVPR 2018.
- :func:`okddip_targets`, :func:`okddip_distillation`, :func:`rampup`: Chen et al., "Online Knowledge
  Distillation with Diverse Peers", AAAI 2020.
- :func:`diversity_loss`: the classifier-diversification term of Li et al., "Online Knowledge
  Distillation via Multi-branch Diversity Enhancement", ACCV 2020 (form not confirmed, see there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nn.kl import soft_kl


def _stack(logits: Tensor | Sequence[Tensor]) -> Tensor:
    return logits if isinstance(logits, Tensor) else torch.stack(list(logits))


def rampup(epoch: float | Tensor, length: float) -> float | Tensor:
    """The sigmoid-shaped ramp-up exp(-5 (1 - min(e, L) / L)^2) of the consistency weight.

    OKDDip (``--length 80``, after Laine & Aila's temporal ensembling) ramps the distillation weight
    from exp(-5) to 1 over the first ``length`` epochs and keeps it at 1 afterwards. ``epoch`` may be
    fractional (the engine's ``ctx.epoch``), which makes the ramp smooth instead of per-epoch steps.
    ``length <= 0`` switches the ramp off (weight 1).
    """
    if length <= 0:
        return 1.0
    if isinstance(epoch, Tensor):  # a captured step: computed on the device
        phase = 1.0 - epoch.clamp(0.0, length) / length
        return torch.exp(-5.0 * phase * phase)
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def dml_loss(logits: Tensor | Sequence[Tensor], target: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Deep mutual learning (Zhang et al., CVPR 2018) for K >= 2 peers: ``(ce, mimicry)``.

    ``ce = sum_i CE(z_i, y)`` and ``mimicry = sum_i mean_{j != i} T^2 KL(p_j || p_i)``, where every
    other peer's prediction p_j is detached: peer i only learns from its own term, so one backward of
    ``ce + mimicry`` gives each peer exactly the gradient of its own DML loss (the paper uses T = 1).
    """
    z = _stack(logits)
    k = z.shape[0]
    if k < 2:
        raise ValueError(f"deep mutual learning needs at least 2 peers, got {k}")
    ce = sum(F.cross_entropy(z[i], target) for i in range(k))
    targets = z.detach()
    mimicry = sum(soft_kl(z[i], targets[j], temperature) for i in range(k) for j in range(k) if j != i) / (k - 1)
    return ce, mimicry


def okddip_targets(query: Tensor, key: Tensor, logits: Tensor, detach_logits: bool = False) -> tuple[Tensor, Tensor]:
    """Peer-specific targets of OKDDip: ``t_i = sum_j alpha_ij z_j`` with ``alpha_i = softmax_j(q_i . k_j)``.

    ``query``/``key``: ``[K, B, D]``, the projections W_q h_i and W_k h_i of every peer's pooled
    features; ``logits``: ``[K, B, C]``. Returns ``(targets [K, B, C], attention [B, K, K])`` where
    ``attention[b, i, j] = alpha_ij`` for sample b (rows sum to one; j = i is included). As in the
    official code the scores are not scaled by sqrt(D). ``detach_logits`` stops the gradient through
    the aggregated logits z_j but keeps it through alpha, so W_q/W_k still learn.
    """
    energy = torch.einsum("ibd,jbd->bij", query, key)
    attention = energy.softmax(-1)
    z = logits.detach() if detach_logits else logits
    targets = torch.einsum("bij,jbc->ibc", attention, z)
    return targets, attention


def okddip_distillation(peer_logits: Tensor, targets: Tensor, leader_logits: Tensor, temperature: float = 3.0,
                        detach_targets: bool = False) -> tuple[Tensor, Tensor]:
    """The two distillation terms of OKDDip: ``(peers, leader)``.

    ``peers = sum_i T^2 KL(softmax(t_i/T) || softmax(z_i/T))`` (each peer from its own target) and
    ``leader = T^2 KL(softmax(mean_i z_i / T) || softmax(z_L / T))`` (the leader from the peers'
    mean logits). The official code detaches neither target; ``detach_targets`` detaches the peers'
    mean for the leader term (the peer targets' own detaching is :func:`okddip_targets`'s flag).
    """
    peers = sum(soft_kl(peer_logits[i], targets[i], temperature) for i in range(peer_logits.shape[0]))
    mean = peer_logits.mean(0)
    leader = soft_kl(leader_logits, mean.detach() if detach_targets else mean, temperature)
    return peers, leader


def diversity_loss(weights: Sequence[Tensor]) -> Tensor:
    """Classifier diversification: the mean squared cosine between the branches' class vectors.

    ``weights``: one classifier weight matrix ``[C, D]`` per branch (the ``fc.weight`` of each). The
    loss is ``mean_{i<j} mean_c cos^2(W_i[c], W_j[c])``: 0 when every class vector of a branch is
    orthogonal to that class's vector in every other branch, 1 when they are parallel.

    Li et al., ACCV 2020, push the branches' classifiers apart with a "Classifier Diversification"
    loss; only the paper's abstract could be read (no code by the authors is public), so this form is
    a design choice: cosines make the loss invariant to the weights' scale (shrinking the weights
    cannot satisfy it) and squaring makes it smooth and minimal at orthogonality rather than at the
    anti-parallel configuration that no more than two branches can reach. (Third-party
    reimplementations differ: one sums ``||W_i^T W_j||_F`` over the pairs with weight 5e-8; see
    :class:`mentor.distill.online.MBD`.)
    """
    w = [F.normalize(x.float(), dim=-1) for x in weights]
    if len(w) < 2:
        raise ValueError(f"classifier diversification needs at least 2 branches, got {len(w)}")
    pairs = [((w[i] * w[j]).sum(-1) ** 2).mean() for i in range(len(w)) for j in range(i + 1, len(w))]
    return torch.stack(pairs).mean()


__all__ = ["diversity_loss", "dml_loss", "okddip_distillation", "okddip_targets", "rampup"]
