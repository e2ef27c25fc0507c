"""The source-free side of the Method contract: adapt a trained source network to an unlabelled target.

A source-free method trains through the engine like any other (``mentor train``): its
:attr:`~mentor.methods.Inputs` has no labelled part, so the whole training split of ``data`` (the target
domain) is its unlabelled pool, drawn in batches of ``data.batch_size`` (``u``, ``u_<view>``,
``u_index``); the student starts from ``model.init_from`` (the source run, required). Validation is
labelled target data, so the engine's ``*_best`` numbers are an oracle column; the last step is the
headline. Pseudo-labels and memory banks over the whole target split are refreshed on the host in
:meth:`~mentor.methods.Method.on_epoch` with :meth:`SourceFreeMethod.embed`.

Shared pieces of the family (SHOT, NRC, AaD, ARFNet):

- :func:`im_terms` / :func:`im_loss`: SHOT's information maximisation;
- :func:`centroid_pseudo_labels`: SHOT's ``obtain_label`` (self-supervised pseudo-labels from class
  centroids of the target features), with the options ARFNet's dynamic centroids need;
- :class:`TargetBanks` and :func:`nearest`: NRC's and AaD's feature and score banks over the pool and
  their nearest-neighbour search;
- :class:`SourceFreeConfig`: the optimizer of SHOT's code, which NRC and AaD keep (``lr``).
"""

from __future__ import annotations

import dataclasses
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
        ev = refresh.evaluator
        if getattr(getattr(ev, "dist", None), "world_size", 1) > 1:
            from ..engine.distributed import Dist

            ev = dataclasses.replace(ev, dist=Dist())
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
def im_terms(logits: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """SHOT's two entropies of a batch (Liang, Hu & Feng, ICML 2020, tim-learn/SHOT ``loss.Entropy``):
    ``(mean_i H(p_i), H(mean_i p_i))`` with ``p_i = softmax(logits_i)`` and ``H(p) = -sum_c p_c log(p_c + eps)``
    (``eps`` inside the logarithm as the official code), in float32."""
    p = logits.float().softmax(1)
    cond = -(p * torch.log(p + eps)).sum(1).mean()
    mean = p.mean(0)
    return cond, -(mean * torch.log(mean + eps)).sum()


def im_loss(logits: Tensor, eps: float = 1e-5) -> Tensor:
    """The information-maximisation loss ``mean_i H(p_i) - H(mean_i p_i)``: confident predictions
    (the first term) that stay diverse over the batch (the second); see :func:`im_terms`."""
    cond, marginal = im_terms(logits, eps)
    return cond - marginal


# -------------------------------------------------------------------------------- centroid pseudo-labels
def _nearest_centroid(f: Tensor, centroids: Tensor, allowed: Tensor) -> Tensor:
    """The class of the centroid nearest to each row of ``f`` (unit rows) by cosine distance, among the
    ``allowed`` classes; a tie goes to the lower class. A zero centroid is at distance 1 from every row."""
    dist = 1.0 - f @ F.normalize(centroids, dim=1, eps=1e-300).T
    return dist.masked_fill(~allowed, float("inf")).argmin(1)


def _centroids(weights: Tensor, f: Tensor) -> Tensor:
    return weights.T @ f / (1e-8 + weights.sum(0))[:, None]


@torch.no_grad()
def centroid_pseudo_labels(features: Tensor, scores: Tensor, rounds: int = 1, *, momentum: float | None = None,
                           weights: str = "softmax", threshold: int = 0, recount: bool = True) -> Tensor:
    """Pseudo-labels of a whole target pool from class centroids of its features: SHOT's ``obtain_label``
    (Liang, Hu & Feng, "Do We Really Need to Access the Source Data? Source Hypothesis Transfer for
    Unsupervised Domain Adaptation", ICML 2020; tim-learn/SHOT ``object/image_target.py``).

    ``features`` ``[N, D]`` are the classifier's inputs, ``scores`` ``[N, C]`` the network's outputs for the
    same images. Computed in float64 on their device; returns ``[N]`` class indices (long).

    1. Every feature gets a constant 1 appended and is L2-normalised (SHOT's cosine setting).
    2. Initial centroids ``c_k = sum_i w_ik f_i / (1e-8 + sum_i w_ik)``, weighted by ``weights``:
       ``"softmax"`` (SHOT): ``scores`` are softmax probabilities, used as they are; ``"exp_logits"``
       (ARFNet's ``obtain_label_multi_centriods``): ``scores`` are logits and ``w = exp(logits)``,
       unnormalised.
    3. Each image takes the class of its nearest centroid by cosine distance, among the classes that
       more than ``threshold`` images predict (``argmax`` of ``scores``); a class without them gets no label.
    4. ``rounds`` refinements: centroids from the current hard labels (the mean of each class's features);
       with ``momentum`` ``m`` (ARFNet: 0.9 over 5 rounds) an EMA ``c <- m c + (1 - m) c_hard`` started at
       the initial centroids, otherwise (``None``, SHOT) ``c <- c_hard``; then step 3 again. With
       ``recount`` (SHOT) the allowed classes are recounted from the labels the round starts from; without
       it (ARFNet) they stay those of step 3.

    SHOT runs one refinement (``rounds=1``) with threshold 0. A class left without members during a
    refinement has a zero hard centroid: without ``recount`` and ``momentum`` it stays allowed and sits at
    cosine distance 1 from every image (SciPy's ``cdist`` in the reference code would return NaN there).
    """
    if weights not in ("softmax", "exp_logits"):
        raise ValueError(f"weights must be 'softmax' (probabilities) or 'exp_logits' (logits), got {weights!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1) or be None, got {momentum}")
    scores = scores.double()
    f = torch.cat([features.double().flatten(1), torch.ones_like(features[:, :1], dtype=torch.float64)], 1)
    f = F.normalize(f, dim=1)
    k = scores.shape[1]
    w = scores.exp() if weights == "exp_logits" else scores
    centroids = _centroids(w, f)
    labels = scores.argmax(1)
    allowed = torch.bincount(labels, minlength=k) > threshold
    labels = _nearest_centroid(f, centroids, allowed)
    for _ in range(rounds):
        hard = _centroids(F.one_hot(labels, k).double(), f)
        centroids = hard if momentum is None else momentum * centroids + (1.0 - momentum) * hard
        if recount:
            allowed = torch.bincount(labels, minlength=k) > threshold
        labels = _nearest_centroid(f, centroids, allowed)
    return labels


# --------------------------------------------------------------------------------------- target banks
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


__all__ = ["PAPER_SGD", "SourceFreeConfig", "SourceFreeMethod", "TargetBanks", "centroid_pseudo_labels", "im_loss",
           "im_terms", "nearest"]
