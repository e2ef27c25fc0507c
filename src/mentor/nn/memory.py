"""Memories of past embeddings and predictions for the contrastive semi-supervised methods, with their head.

SimMatch (Zheng et al., CVPR 2022) compares each unlabelled image with a bank of the labelled set's
embeddings; CoMatch (Li, Xiong & Hoi, ICCV 2021) smooths pseudo-labels with a queue of recent
embeddings and class distributions; both align the weak-view distribution with a queue of recent batch
means. The pieces, as USB (microsoft/Semi-supervised-learning) keeps them:

- :class:`EmbeddingHead`: the projection MLP whose l2-normalised output the memories hold;
- :class:`LabeledMemoryBank`: one embedding and label per labelled image, written at the batch's indices;
- :class:`FeatureQueue`: a first-in first-out ring of (embedding, class distribution) rows;
- :class:`DistAlignQueue`: distribution alignment to a target with a queue of recent batch means.

State lives in buffers (checkpointed with the owning method, so a resumed run continues exactly), shapes
are static and every update runs on the device without reading a value back to the host (the write
pointers are tensors): a step that uses them can be captured as a CUDA graph. Under DDP each update first
gathers every rank's rows in rank order, which is the row order of a one-process run of the global batch
(rank ``r`` holds rows ``[r*B, (r+1)*B)`` of it), so every rank holds the same memory, equal to that
run's. The memories say so with ``rank_synced = True``: the engine leaves their buffers out of DDP's
buffer broadcast (:meth:`mentor.methods.Method.rank_synced_buffers`), which would copy rank 0's whole
memory before every forward for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masking import all_gather_cat
from .projectors import mlp


class EmbeddingHead(nn.Module):
    """``normalize(mean_h MLP_h(f))``: the projection head of SimMatch and CoMatch on the penultimate
    features ``f`` of width ``in_features``, each MLP Linear(``in_features`` -> ``in_features``) -> ReLU ->
    Linear(-> ``out_features``), as USB's ``SimMatch_Net``/``CoMatch_Net`` build it.

    ``heads`` > 1 averages several MLPs before the normalisation: EPASS (K.-B. Nguyen, "Debiasing,
    calibrating, and improving Semi-supervised Learning performance via simple Ensemble Projector",
    arXiv 2310.15764, 2023), which USB's configurations switch on since 2024 (``use_epass``: 3 heads).
    The output is float32 whatever the autocast dtype (see :func:`similarity`)."""

    def __init__(self, in_features: int, out_features: int = 128, heads: int = 1):
        super().__init__()
        if in_features < 1 or out_features < 1 or heads < 1:
            raise ValueError(f"EmbeddingHead({in_features}, {out_features}, heads={heads}): sizes must be >= 1")
        self.mlps = nn.ModuleList(mlp(in_features, in_features, out_features) for _ in range(heads))

    def forward(self, features: Tensor) -> Tensor:
        out = self.mlps[0](features)
        for head in self.mlps[1:]:
            out = out + head(features)
        if len(self.mlps) > 1:
            out = out / len(self.mlps)
        return F.normalize(out.float(), dim=1)


def similarity(a: Tensor, b: Tensor, T: float) -> Tensor:
    """``a b^T / T`` for rows of unit embeddings, in float32 with autocast off: in bf16 the products of
    unit vectors carry errors of ~4e-3, which a temperature of 0.1 turns into ~0.04 on every logit."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T / T


def _gather(parts: Tensor | Sequence[Tensor]) -> Tensor:
    """Each part gathered over the ranks (rank order), the parts concatenated: ``[a_0, a_1, b_0, b_1]``
    for parts ``a``, ``b`` on two ranks, the layout of one process holding ``cat(a, b)`` of the global batch."""
    if isinstance(parts, Tensor):
        parts = [parts]
    return torch.cat([all_gather_cat(p.detach()) for p in parts])


def last_writer(index: Tensor, size: int) -> Tensor:
    """For each position ``b`` of ``index`` (entries of a table of ``size`` rows), the position of the last
    occurrence of ``index[b]``: the batch row that writes that entry when a later occurrence overwrites an
    earlier one, as a sequential loop would. Every occurrence of an index then carries the same row, so an
    indexed write gives the same table whatever order the device applies it in. No host synchronisation."""
    pos = torch.arange(index.numel(), device=index.device)
    writer = torch.full((size,), -1, dtype=torch.long, device=index.device)
    return writer.scatter_reduce_(0, index, pos, "amax")[index]


def ring_positions(ptr: Tensor, n: int, size: int) -> Tensor:
    """The slots ``ptr, ptr + 1, ... ptr + n - 1`` modulo ``size`` of a ring buffer (``ptr`` a 0-d long
    tensor)."""
    return (ptr + torch.arange(n, device=ptr.device)) % size


class LabeledMemoryBank(nn.Module):
    """One embedding (``features``, ``size x dim``) and one label (``labels``) per image of the labelled
    set, SimMatch's labelled memory bank (Zheng et al., "SimMatch: Semi-supervised Learning with
    Similarity Matching", CVPR 2022; USB's ``mem_bank``/``labels_bank``).

    It starts as random unit vectors with label 0, as USB's. :meth:`update` writes the labelled batch's
    embeddings at its indices (positions in the labelled set): with ``momentum`` 0 the embedding itself
    (the official code and USB with an EMA teacher), otherwise ``normalize(m * old + (1 - m) * new)`` (USB on
    CIFAR, SVHN and STL-10: ``m`` 0.7 with the student's embeddings). An index that appears several times
    in a batch (a labelled set smaller than the batch is repeated) takes its last occurrence's embedding,
    computed from the entry as it was before the update; USB's indexed assignment leaves the choice to the
    device. Under DDP the ranks' embeddings, labels and indices are gathered first.
    """

    #: every update gathers all DDP ranks' rows: the bank is equal on every rank, out of DDP's broadcast
    rank_synced = True

    def __init__(self, size: int, dim: int, momentum: float = 0.0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"LabeledMemoryBank({size}, {dim}): the bank needs at least one entry and dimension")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LabeledMemoryBank momentum must lie in [0, 1), got {momentum}")
        self.size, self.dim, self.momentum = size, dim, momentum
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, index: Tensor) -> None:
        features, labels, index = _gather(features), all_gather_cat(labels), all_gather_cat(index)
        features = features.to(self.features.dtype)
        # The batch position that writes each entry (its last occurrence); every occurrence of an index
        # then carries the same row, so the order in which the device applies them does not matter.
        src = last_writer(index, self.size)
        new = features[src]
        if self.momentum > 0:
            new = F.normalize(self.momentum * self.features[index] + (1.0 - self.momentum) * new, dim=1)
        self.features.index_copy_(0, index, new)
        self.labels.index_copy_(0, index, labels[src])


class FeatureQueue(nn.Module):
    """A first-in first-out queue of ``size`` rows of (embedding, class distribution): CoMatch's memory
    (Li, Xiong & Hoi, "CoMatch: Semi-supervised Learning with Contrastive Graph Regularization", ICCV 2021;
    USB's ``queue_feats``/``queue_probs``/``queue_ptr``).

    Rows start at zero. :meth:`push` writes the batch's rows at the pointer, wrapping around the end, and
    moves the pointer on by their number (a tensor buffer): the queue always holds the last ``size`` rows
    pushed. Of a push longer than the queue only its last ``size`` rows stay. USB instead cuts a push that
    would pass the end and leaves the slots at the start as they were; the two agree whenever ``size`` is
    a multiple of the rows per push, as USB's sizing (``queue_batch`` batches) makes it. Under DDP every
    part is gathered over the ranks first (:func:`_gather`).
    """

    #: every push gathers all DDP ranks' rows: the queue is equal on every rank, out of DDP's broadcast
    rank_synced = True

    def __init__(self, size: int, dim: int, num_classes: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"FeatureQueue size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("probs", torch.zeros(size, num_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, features: Tensor | Sequence[Tensor], probs: Tensor | Sequence[Tensor]) -> None:
        """Append rows: ``features`` and ``probs`` are tensors, or lists of parts concatenated in order
        (each part gathered over the ranks on its own)."""
        features, probs = _gather(features), _gather(probs)
        if features.shape[0] != probs.shape[0]:
            raise ValueError(f"FeatureQueue.push: {features.shape[0]} embeddings but {probs.shape[0]} distributions")
        n = features.shape[0]
        keep = min(n, self.size)
        slots = ring_positions(self.ptr + (n - keep), keep, self.size)
        self.features.index_copy_(0, slots, features[n - keep:].to(self.features.dtype))
        self.probs.index_copy_(0, slots, probs[n - keep:].to(self.probs.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)


__all__ = ["EmbeddingHead", "FeatureQueue", "LabeledMemoryBank", "last_writer", "ring_positions", "similarity"]
