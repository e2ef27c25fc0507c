"""SoC: soft labels on a confidence-dependent set of classes, the classes that prediction flips group together."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import POSITIVE, between, rules
from ..errors import ConfigError
from ..methods import BuildInfo, StepContext, register_method
from ..nn.transitions import ClassTransitions, kmedoids
from .fixmatch import FixMatch, Logits, SemiConfig


class ClassClusterings(nn.Module):
    """SoC's clusterings of the classes, one for every ``k`` in ``{2, ..., levels + 2}``, and the soft label
    each unlabelled image takes from them.

    Clustering ``r`` (``k = r + 2`` clusters) is k-medoids (:func:`~mentor.nn.transitions.kmedoids`) over
    the class transition counts, started from ``k`` distinct random classes (the global generator at
    construction, as the reference's ``np.random.choice``) and clustered once on the empty window at
    construction, which is what the reference's clustering of every ``k`` at its first step gives
    (no transition can be counted before an image is seen twice). :meth:`refresh` then re-clusters one
    ``k`` per call, round robin (``r = calls mod (levels + 1)``), warm-started from its current medoids.

    :meth:`forward` gives the soft labels: with ``p`` the weak-view probabilities, the confidence level
    ``r = round(max_c p_c * levels)`` picks clustering ``r``; the image keeps the classes of the cluster
    that holds ``argmax p`` and takes ``p`` restricted to them and renormalised. Low confidence picks few,
    large clusters (the candidate set expands), high confidence many small ones (it shrinks).

    State (buffers): ``medoids`` (``(levels + 1) x (levels + 2)``, padding past ``k``), ``assignment``
    (every class's cluster per clustering) and ``calls``.
    """

    def __init__(self, num_classes: int, levels: int, rounds: int):
        super().__init__()
        if levels + 2 > num_classes:
            raise ValueError(f"{levels + 2} clusters of {num_classes} classes")
        self.num_classes, self.levels, self.rounds = num_classes, levels, rounds
        ks = torch.arange(levels + 1) + 2
        valid = torch.arange(levels + 2)[None, :] < ks[:, None]
        start = torch.zeros(levels + 1, levels + 2, dtype=torch.long)
        for r, k in enumerate(ks.tolist()):
            start[r, :k] = torch.randperm(num_classes)[:k]
        medoids, assignment, _ = kmedoids(torch.zeros(num_classes, num_classes), start, valid, rounds)
        self.register_buffer("valid", valid, persistent=False)
        self.register_buffer("medoids", medoids)
        self.register_buffer("assignment", assignment)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def refresh(self, transitions: Tensor) -> None:
        """Re-cluster the next ``k`` of the round robin on the transition counts ``transitions``."""
        row = (self.calls % (self.levels + 1)).view(1)
        medoids, assignment, _ = kmedoids(transitions, self.medoids.index_select(0, row),
                                          self.valid.index_select(0, row), self.rounds)
        self.medoids.index_copy_(0, row, medoids)
        self.assignment.index_copy_(0, row, assignment)
        self.calls.add_(1)

    def keep(self, probs: Tensor) -> Tensor:
        """The ``B x C`` 0/1 selection of the classes each image keeps."""
        level = torch.round(probs.max(1).values.double() * self.levels).long().clamp(0, self.levels)
        clusters = self.assignment[level]
        own = clusters.gather(1, probs.argmax(1, keepdim=True))
        return (clusters == own).to(probs.dtype)

    def forward(self, probs: Tensor) -> Tensor:
        return restrict(probs, self.keep(probs))


def restrict(probs: Tensor, keep: Tensor) -> Tensor:
    """``probs`` set to 0 outside ``keep`` and renormalised (SoC's soft label)."""
    kept = probs * keep
    return kept / kept.sum(1, keepdim=True)


@register_method("soc")
class SoC(FixMatch):
    """Duan, Zhao, Qi, Shi & Gao, "Roll With the Punches: Expansion and Shrinkage of Soft Label Selection
    for Semi-supervised Fine-Grained Learning", AAAI 2024, in the form of the authors' code
    (NJUyued/SoC4SS-FGVC, ``models/soc``).

    ``loss = CE(f(x_w), y) + lambda_u * mean_b [-sum_c q_bc log softmax(f(u_s))_bc]`` over *all* unlabelled
    images (no threshold), one forward over ``cat(x_w, u_w, u_s)`` as FixMatch. The soft label ``q_b`` is
    the weak-view distribution ``p_b`` restricted to the classes of a cluster and renormalised
    (:class:`ClassClusterings`): the classes are clustered by how often predictions move between them
    (:class:`~mentor.nn.transitions.ClassTransitions` over the last ``num_tracked_batch`` batches,
    similarity ``(A + A^T) / 2``, k-medoids for every ``k`` in ``{2, ..., round(C / alpha) + 2}``), and the
    image's confidence ``max p_b`` picks ``k``: the cluster of ``argmax p_b`` in clustering
    ``round(max p_b * round(C / alpha))``. Each step, as the reference: record the batch's weak
    predictions, refresh one clustering (round robin), then form the soft labels.

    Defaults from the authors' ``train_soc.py``: ``alpha`` 2.5 (their value for Semi-Aves; 4 for
    Semi-Fungi), ``num_tracked_batch`` (N_B) 5120, ``lambda_u`` (``ulb_loss_ratio``) 1. Their EMA of 0.999
    for evaluation is the engine's ``trainer.ema``.

    Deviations from the reference code, each deliberate:

    - The clustering runs on the device, ``kmedoids_rounds`` (10) rounds per refresh, where the
      reference runs a Python k-medoids until the medoids stop changing (at most 2000 rounds): shapes and
      work are static and nothing is read back to the host. Warm-started from the previous medoids, it
      reaches the same clustering whenever that converges within the rounds, and otherwise continues at
      the next refresh of that ``k``.
    - The reference's final partition puts each cluster's *starting* medoid into it (its ``cluster =
      [[centroids[i]] ...]`` uses the function's input, not the medoids it converged to), so a medoid that
      moved can leave its own cluster; here every cluster holds its final medoid. The two agree whenever
      the medoids did not move.
    - The window holds the last ``num_tracked_batch`` batches; the reference zeroes the next ring slot
      right after writing the current one, so its sum covers ``N_B - 1`` batches.
    - The tracker's records, the ring and the clusterings are buffers, checkpointed: a resumed run
      continues exactly (the reference restarts its record of last predictions empty on resume).
    - Under DDP the records and counts are those of the global batch (see ``ClassTransitions``).

    Memory: the ring is ``4 * N_B * C**2`` bytes (2 MB for 10 classes; 819 MB for Semi-Aves' 200, the
    size of the reference's float32 ``label_matrix``); lower ``num_tracked_batch`` for many classes.
    The mean number of classes kept per image is logged as ``soc_classes``.
    """

    @rules(alpha=POSITIVE, num_tracked_batch=between(1, 2**20), kmedoids_rounds=between(1, 2000))
    @dataclass
    class Config(SemiConfig):
        alpha: float = 2.5
        num_tracked_batch: int = 5120
        kmedoids_rounds: int = 10

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        C = info.num_classes
        if info.unlabeled_size < 1:
            raise ConfigError("method soc keeps the last prediction of every unlabelled image: it needs the size "
                              "of the unlabelled pool (BuildInfo.unlabeled_size; the engine sets it)")
        levels = round(C / cfg.alpha)  # Python's rounding, as the reference
        if levels + 2 > C:
            raise ConfigError(f"method.alpha={cfg.alpha}: SoC clusters the {C} classes into up to round(C / alpha) "
                              f"+ 2 = {levels + 2} clusters, more than there are classes; raise method.alpha so "
                              f"that round({C} / alpha) <= {C - 2}")
        ring = 4 * cfg.num_tracked_batch * C * C
        if ring > 2**33:
            raise ConfigError(f"method.num_tracked_batch={cfg.num_tracked_batch}: the ring of per-batch transition "
                              f"counts of {C} classes would take {ring / 2**30:.0f} GiB (4 * N_B * C^2 bytes); "
                              f"track at most {2**33 // (4 * C * C)} batches")
        self.transitions = ClassTransitions(C, info.unlabeled_size, cfg.num_tracked_batch)
        self.clusterings = ClassClusterings(C, levels, cfg.kmedoids_rounds)

    def build_masker(self) -> None:
        return None

    def mask(self, probs: Tensor, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        """Every image counts (weight 1). The one hook that sees ``u_index``, so the step's class
        transitions are recorded and one clustering refreshed here, before :meth:`targets` uses them."""
        self.transitions.update(probs.argmax(1), batch["u_index"])
        self.clusterings.refresh(self.transitions.matrix)
        return torch.ones_like(probs[:, 0])

    def targets(self, probs: Tensor, raw: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        keep = self.clusterings.keep(probs)
        ctx.diagnostics["soc_classes"] = keep.sum(1).mean()
        return restrict(probs, keep)


__all__ = ["ClassClusterings", "SoC", "restrict"]
