"""How predictions move between classes over training, and which classes that movement groups together.

Two pieces of Duan et al., "Roll With the Punches: Expansion and Shrinkage of Soft Label Selection for
Semi-supervised Fine-Grained Learning" (SoC), AAAI 2024, written so that any method may use them:

- :class:`ClassTransitions`: the last predicted class of every unlabelled image, and how often a
  prediction changed from class ``a`` to class ``b`` over the last ``window`` batches (the paper's class
  transition tracking). Two classes between which predictions keep flipping are hard to tell apart.
- :func:`kmedoids`: k-medoids over the classes with the transition counts as similarities, batched over
  several clusterings and run for a fixed number of rounds, so its work and shapes do not depend on the data.

Both run on the device without reading a value back to the host: the tracker's update is a sort, a few
gathers and a ``scatter_add_`` (no per-image Python loop, no ``.item()``, no ``torch.bincount``), and
the clustering a fixed number of rounds of gathers, a matrix product and arg-maxima.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masking import all_gather_cat


class ClassTransitions(nn.Module):
    """Class transition tracking: per unlabelled image its last predicted class, and the counts of
    prediction changes between classes over the last ``window`` batches.

    ``update(pred, index)`` takes the batch's predicted classes and the images' positions in the
    unlabelled pool. An image seen before whose prediction differs from its recorded one counts one
    transition ``recorded -> pred`` (the first sighting only records); then its record becomes ``pred``.
    An image that appears twice in a batch is taken in batch order: its second occurrence compares with
    the first. The counts of each batch are kept in a ring of ``window`` ``C x C`` matrices, and
    :attr:`matrix` (``A[a, b]``: transitions ``a -> b`` over the window) is their running sum.

    Under DDP the ranks' indices and predictions are gathered first (rank order, the rows of the
    one-process batch): the record of an image must follow it to whichever rank draws it next, and every
    rank then counts the global batch, so the counts are the sum over the ranks and the state is the same
    on every rank and equal to one process with the global batch.

    State (buffers, checkpointed): ``last`` (pool, -1 for an image never seen), ``counts`` (the ring,
    ``window x C x C`` int32: ``4 * window * C**2`` bytes, 2 MB for 10 classes and 5120 batches), ``total``
    (their sum) and ``slot`` (the ring position the next batch writes).
    """

    def __init__(self, num_classes: int, pool_size: int, window: int):
        super().__init__()
        if num_classes < 2 or pool_size < 1 or window < 1:
            raise ValueError(f"ClassTransitions needs num_classes >= 2, pool_size >= 1 and window >= 1, got "
                             f"{num_classes}, {pool_size}, {window}")
        self.num_classes, self.pool_size, self.window = num_classes, pool_size, window
        self.register_buffer("last", torch.full((pool_size,), -1, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(window, num_classes, num_classes, dtype=torch.int32))
        self.register_buffer("total", torch.zeros(num_classes, num_classes, dtype=torch.long))
        self.register_buffer("slot", torch.zeros((), dtype=torch.long))

    @property
    def matrix(self) -> Tensor:
        """``A[a, b]``: how often a prediction changed from ``a`` to ``b`` in the last ``window`` batches."""
        return self.total

    @torch.no_grad()
    def update(self, pred: Tensor, index: Tensor) -> Tensor:
        """Record the batch's predictions; returns the batch's ``C x C`` transition counts (int64)."""
        pred, index = all_gather_cat(pred.long()), all_gather_cat(index.long())
        C, m = self.num_classes, index.numel()
        pos = torch.arange(m, device=index.device)
        # Sorting by (image, position) puts every image's occurrences next to each other in batch order.
        order = torch.argsort(index * m + pos)
        idx, new = index[order], pred[order]
        repeat = torch.zeros_like(idx, dtype=torch.bool)
        repeat[1:] = idx[1:] == idx[:-1]
        before = torch.cat([new.new_full((1,), -1), new[:-1]])
        prev = torch.where(repeat, before, self.last[idx])
        moved = (prev >= 0) & (prev != new)
        code = prev.clamp(min=0) * C + new
        batch = torch.zeros(C * C, dtype=torch.long, device=idx.device).scatter_add_(0, code, moved.long())
        batch = batch.view(C, C)
        # The record of an image is the prediction of its last occurrence: every occurrence writes that one
        # value (the first position at or after it that ends its run), so duplicates write alike.
        ends = torch.ones_like(repeat)
        ends[:-1] = ~repeat[1:]
        end_pos = torch.where(ends, pos, m).flip(0).cummin(0).values.flip(0)
        self.last.scatter_(0, idx, new[end_pos])
        slot = self.slot.view(1)
        self.total.add_(batch - self.counts.index_select(0, slot)[0].long())
        self.counts.index_copy_(0, slot, batch.to(self.counts.dtype)[None])
        self.slot.copy_((self.slot + 1) % self.window)
        return batch


def class_similarity(transitions: Tensor) -> Tensor:
    """The symmetric class similarity ``S = (A + A^T) / 2`` of a transition matrix (SoC's ``calcDis``)."""
    a = transitions.double()
    return (a + a.T) / 2


def kmedoids(transitions: Tensor, medoids: Tensor, valid: Tensor | None = None,
             rounds: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """k-medoids over the classes (SoC's ``kmeans``), for several clusterings at once.

    ``transitions`` is the ``C x C`` count matrix ``A``; the similarity of classes ``x`` and ``y`` is
    ``S[x, y] = (A[x, y] + A[y, x]) / 2``. ``medoids`` (``B x K`` class indices, distinct within a row) are
    the starting medoids of ``B`` clusterings; where ``valid`` (``B x K``) is False a slot is padding (a
    row with ``k < K`` clusters). One round:

    1. assignment: a medoid stays in its own cluster; every other class joins the medoid it is most
       similar to (``argmax_j S[x, m_j]``, the first slot on ties);
    2. update: the new medoid of a cluster is the member ``x`` with the largest ``sum_{y in cluster}
       A[x, y]``; on ties the current medoid if it is among the best, else the smallest class index.

    The reference loops until the medoids stop changing (at most 2000 rounds); here there are exactly
    ``rounds`` rounds, so shapes and work are static. A round that changes nothing leaves every later
    round unchanged, so the result equals the reference's whenever that converges within ``rounds``
    (warm-started from the previous medoids, a few rounds suffice). Sums run in float64, exact for
    integer counts. Returns ``(medoids, assignment, moved)``: the final medoids, every class's cluster
    slot for them (``B x C``, step 1 with the final medoids), and per clustering whether the last round
    still moved a medoid (not yet converged).
    """
    A = transitions.double()
    S = class_similarity(transitions)
    B, K = medoids.shape
    C = A.shape[0]
    valid = torch.ones_like(medoids, dtype=torch.bool) if valid is None else valid
    slots = torch.arange(K, device=medoids.device).expand(B, K)

    def assign(m: Tensor) -> Tensor:
        sim = S[:, m].permute(1, 0, 2).masked_fill(~valid[:, None, :], float("-inf"))  # B x C x K
        nearest = sim.argmax(2)
        own = torch.full((B, C + 1), -1, dtype=torch.long, device=m.device)
        own.scatter_(1, torch.where(valid, m, C), torch.where(valid, slots, -1))
        own = own[:, :C]
        return torch.where(own >= 0, own, nearest)

    moved = torch.zeros(B, dtype=torch.bool, device=medoids.device)
    for _ in range(rounds):
        cluster = assign(medoids)
        member = (cluster[..., None] == slots[:, None, :]).to(A.dtype)  # B x C x K (one_hot reads the max back)
        within = torch.matmul(A, member).gather(2, cluster[..., None]).squeeze(2)  # B x C: sum over own cluster
        cand = torch.where(member.bool(), within[..., None], float("-inf"))
        best, first = cand.max(1).values, cand.argmax(1)
        current = cand.gather(1, medoids[:, None, :]).squeeze(1)
        new = torch.where(valid & (current < best), first, medoids)
        moved = (new != medoids).any(1)
        medoids = new
    return medoids, assign(medoids), moved


__all__ = ["ClassTransitions", "class_similarity", "kmedoids"]
