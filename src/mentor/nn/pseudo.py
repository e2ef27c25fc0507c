"""Pseudo-labellers and information maximisation shared by source-free adaptation (SHOT, NRC, ARFNet) and
domain generalisation with unlabelled domains (DSBF): the entropy/diversity terms of information
maximisation and SHOT's centroid pseudo-labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
