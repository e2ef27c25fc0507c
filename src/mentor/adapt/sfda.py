"""The source-free side of the Method contract: adapt a trained source network to an unlabelled target.

A source-free method trains through the engine like any other (``mentor train``): its
:attr:`~mentor.methods.Inputs` has no labelled part, so the whole training split of ``data`` (the target
domain) is its unlabelled pool, drawn in batches of ``data.batch_size`` (``u``, ``u_<view>``,
``u_index``); the student starts from ``model.init_from`` (the source run, required). Validation is
labelled target data, so the engine's ``*_best`` numbers are an oracle column; the last step is the
headline. Pseudo-labels and memory banks over the whole target split are refreshed on the host in
:meth:`~mentor.methods.Method.on_epoch` with :meth:`SourceFreeMethod.embed`.

Shared pieces of the family (SHOT, NRC, AaD, ARFNet):

- :mod:`mentor.nn.pseudo` (shared with DSBF): ``im_terms`` / ``im_loss``, SHOT's information maximisation,
  and ``centroid_pseudo_labels``, SHOT's ``obtain_label`` with the options ARFNet's dynamic centroids need;
- :class:`TargetBanks` and :func:`nearest`: NRC's and AaD's feature and score banks over the pool and
  their nearest-neighbour search;
- :class:`SourceFreeConfig`: the optimizer of SHOT's code, which NRC and AaD keep (``lr``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import POSITIVE, rules
from ..methods import Inputs, Method, MethodConfig, Phase, Refresh
from ..models.penultimate import PenultimateTap
from ..nn.masking import all_gather_cat

#: SHOT's optimizer (``lr_scheduler`` of tim-learn/SHOT ``object/image_target.py``, also NRC's and AaD's):
#: SGD, momentum 0.9, Nesterov, weight decay 1e-3 on every parameter (norms and biases included).
PAPER_SGD = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "decay_norm_bias": True}


@rules(lr=POSITIVE)
@dataclass
class SourceFreeConfig(MethodConfig):
    """``lr``: the learning rate of :data:`PAPER_SGD`, which then replaces the run's ``optim`` section (its
    name, rate, momentum, Nesterov, weight decay and ``decay_norm_bias``); ``null`` trains with the run's
    ``optim`` section as it is. The run's ``schedule`` applies either way."""

    lr: float | None = 1e-2


class SourceFreeMethod(Method):
    """Base of SHOT and its successors: the student's features and logits in one forward
    (``self.tap(x) -> (features, logits)``, the features being the input of the final classifier ``fc``),
    and that classifier frozen when ``freeze_classifier`` (SHOT's hypothesis transfer).

    A ``Config`` with an ``lr`` field (:class:`SourceFreeConfig`) trains every trainable parameter with
    :data:`PAPER_SGD` at that rate; without one (or with ``lr: null``) the run's ``optim`` applies."""

    inputs: ClassVar[Inputs] = Inputs(labeled=(), unlabeled=("weak",))
    freeze_classifier: ClassVar[bool] = True

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.tap = PenultimateTap(student)
        if self.freeze_classifier:
            self.tap.head.requires_grad_(False)

    def phases(self) -> list[Phase]:
        params = [p for p in self.parameters() if p.requires_grad]
        lr = getattr(self.cfg, "lr", None)
        return [Phase("main", params, optim={} if lr is None else {**PAPER_SGD, "lr": lr})]

    @torch.no_grad()
    def embed(self, split, refresh: Refresh, net=None) -> tuple[Tensor, Tensor]:
        """``(features [N, D], softmax probabilities [N, C])`` of every image of ``split`` (the target pool,
        in its order, so row ``i`` is ``u_index == i``), in eval mode (running BN statistics), float32.
        Every process reads the whole split (a distributed run's evaluator would read its share only).
        The labels the split carries are not read."""
        tap = self.tap if net is None else PenultimateTap(net)
        ev = refresh.evaluator.local()
        was = self.training
        self.eval()
        feats, probs = [], []
        try:
            for x, _ in ev.batches(split):
                f, logits = ev.run(tap, x)
                feats.append(f.float().flatten(1))
                probs.append(logits.float().softmax(1))
        finally:
            self.train(was)
            if net is not None:
                tap.remove()
        return torch.cat(feats), torch.cat(probs)


# ------------------------------------------------------------------------------ information maximisation
class TargetBanks(nn.Module):
    """A feature bank (``features``, ``[N, D]``, L2-normalised) and a score bank (``scores``, ``[N, C]``,
    softmax probabilities) over the target pool, row ``i`` for ``u_index == i``: the memories of NRC (Yang
    et al., NeurIPS 2021) and AaD (Yang et al., NeurIPS 2022).

    :meth:`fill` writes the whole pool (a full pass at the start of adaptation); :meth:`update` writes a
    batch at its indices inside the step (``index_copy_``, no host synchronisation). Both banks are buffers,
    so they are checkpointed and a resumed run continues with them exactly. Under DDP the ranks' rows are
    gathered first, so every rank holds the same banks."""

    def __init__(self, size: int, dim: int, num_classes: int):
        super().__init__()
        if size < 1 or dim < 1 or num_classes < 1:
            raise ValueError(f"TargetBanks({size}, {dim}, {num_classes}): sizes must be >= 1")
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("scores", torch.zeros(size, num_classes))

    @torch.no_grad()
    def fill(self, features: Tensor, probs: Tensor) -> None:
        """Every row at once, from the features and probabilities of the whole pool (in pool order)."""
        self.features.copy_(F.normalize(features.float().flatten(1), dim=1))
        self.scores.copy_(probs.float())

    @torch.no_grad()
    def update(self, features: Tensor, probs: Tensor, index: Tensor) -> None:
        """Write the batch's normalised ``features`` and ``probs`` at rows ``index``. An index that occurs
        twice (a pool smaller than a batch) keeps its last occurrence's row."""
        f = all_gather_cat(F.normalize(features.detach().float().flatten(1), dim=1))
        p, index = all_gather_cat(probs.detach().float()), all_gather_cat(index)
        pos = torch.arange(index.numel(), device=index.device)
        writer = torch.full((self.features.shape[0],), -1, dtype=torch.long, device=index.device)
        src = writer.scatter_reduce_(0, index, pos, "amax")[index]
        self.features.index_copy_(0, index, f[src])
        self.scores.index_copy_(0, index, p[src])


def nearest(query: Tensor, bank: Tensor, k: int) -> Tensor:
    """``[B, k]`` indices of the bank rows with the largest dot products with each query row (unit rows:
    cosine similarity), the most similar one dropped: the query's own row, as NRC's and AaD's code takes
    ``topk(k + 1)[:, 1:]``. Computed in float32 outside autocast."""
    with torch.autocast(query.device.type, enabled=False):
        sims = query.float() @ bank.float().T
    return sims.topk(k + 1, dim=1).indices[:, 1:]


__all__ = ["PAPER_SGD", "SourceFreeConfig", "SourceFreeMethod", "TargetBanks", "nearest"]
