"""LAME: Laplacian-regularised maximum-likelihood estimation of a test batch's class assignments
(Boudiaf, Mueller, Ben Ayed & Bertinetto, "Parameter-free Online Test-time Adaptation", CVPR 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import COUNT, rules
from ..methods import MethodConfig, StepContext, register_method
from ..models.penultimate import PenultimateTap
from .base import TestTimeMethod


def knn_affinity(features: Tensor, k: int) -> Tensor:
    """``W[i, j] = 1`` when ``j`` is one of the ``k`` nearest other points of ``i`` (Euclidean), else 0: not
    symmetric. A point is never its own neighbour (the reference drops the nearest point, itself unless a
    duplicate ties with it); ``k`` is capped at the batch size minus one."""
    n = features.shape[0]
    k = min(k, n - 1)
    w = torch.zeros(n, n, device=features.device, dtype=features.dtype)
    if k < 1:
        return w
    dist = torch.cdist(features, features)
    dist = dist + torch.diag(torch.full((n,), float("inf"), device=features.device, dtype=dist.dtype))
    return w.scatter_(1, dist.topk(k, dim=1, largest=False).indices, 1.0)


def rbf_affinity(features: Tensor, k: int) -> Tensor:
    """``exp(-d_ij^2 / (2 sigma^2))`` with ``sigma`` the mean distance of a point to its ``k``-th nearest point,
    itself counted (the reference's ``rbf_affinity``)."""
    dist = torch.cdist(features, features)
    kth = dist.topk(min(k, features.shape[0]), dim=1, largest=False).values[:, -1]
    return torch.exp(-dist.square() / (2 * kth.mean().square()))


def laplacian_assignments(log_probs: Tensor, affinity: Tensor, steps: int, weight: float = 1.0) -> Tensor:
    """The concave-convex iterations of LAME from ``Y = softmax(log p)``: ``Y <- softmax(log p + weight * W Y)``,
    ``steps`` times (rows of ``Y`` are the assignments, ``W`` the affinity)."""
    y = log_probs.softmax(-1)
    for _ in range(steps):  # a fixed count of batch-wide updates, never a loop over points
        y = (log_probs + weight * affinity @ y).softmax(-1)
    return y


@register_method("lame")
class LAME(TestTimeMethod):
    """Boudiaf et al., "Parameter-free Online Test-time Adaptation", CVPR 2022 (fiveai/LAME
    ``src/adaptation/lame.py``; mariodoebler/test-time-adaptation ``classification/methods/lame.py``).

    Nothing is trained and the network runs in eval mode. For each test batch, with ``p`` the softmax
    outputs and ``f`` the L2-normalised penultimate features (the input of the classifier ``fc``, read
    with :class:`~mentor.models.penultimate.PenultimateTap`), LAME minimises over assignments ``Y``
    (rows on the simplex) ``sum_i KL(y_i || p_i) - sum_ij w_ij y_i . y_j`` by the bound-optimisation
    fixed-point iterations ``Y <- softmax(log(p + 1e-10) + W Y)`` from ``Y = p``, and predicts ``Y``
    (returned as ``log Y``).

    ``affinity``: ``knn`` (``W_ij = 1`` for the ``knn`` 5 nearest neighbours of ``i``), ``rbf`` (the official
    code's default, Gaussian kernel scaled by the mean ``knn``-th neighbour distance) or ``linear``
    (``f f^T``); ``force_symmetry`` averages ``W`` with its transpose. The reference stops after
    ``max_steps`` 100 iterations or when the energy's relative change falls to 1e-8; here the
    iterations always run ``max_steps`` times (no value read back to the host), past that point the
    assignments move by less than that tolerance.
    """

    @rules(knn=COUNT, max_steps=COUNT)
    @dataclass
    class Config(MethodConfig):
        knn: int = 5
        affinity: Literal["knn", "rbf", "linear"] = "rbf"
        max_steps: int = 100
        force_symmetry: bool = False

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        student.requires_grad_(False)
        self.tap = PenultimateTap(student)

    def phases(self):
        return []

    def kernel(self, features: Tensor) -> Tensor:
        if self.cfg.affinity == "knn":
            w = knn_affinity(features, self.cfg.knn)
        elif self.cfg.affinity == "rbf":
            w = rbf_affinity(features, self.cfg.knn)
        else:
            w = features @ features.T
        return 0.5 * (w + w.T) if self.cfg.force_symmetry else w

    @torch.no_grad()
    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        features, logits = self.tap(batch["x"])
        log_p = torch.log(logits.float().softmax(1) + 1e-10)
        f = F.normalize(features.float().flatten(1), dim=1)
        y = laplacian_assignments(log_p, self.kernel(f), self.cfg.max_steps)
        return {"logits": y.clamp_min(1e-30).log()}
