"""Matching the training domains' feature distributions: Deep CORAL (means and covariances) and MMD (a
multi-bandwidth Gaussian kernel), as DomainBed runs them, on one base like DomainBed's ``AbstractMMD``.

Both add ``penalty_weight * penalty`` to the cross-entropy, the penalty being a discrepancy between the
penultimate features of every pair of training domains, averaged over the ``D (D - 1) / 2`` pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NON_NEGATIVE, POSITIVE, each, rules
from ..methods import StepContext, register_method
from ..nn import train_accuracy
from .base import at_least_float32
from .erm import ERM


def coral_discrepancy(a: Tensor, b: Tensor) -> Tensor:
    """DomainBed's ``mean_cov`` discrepancy of two samples ``a [n, F]`` and ``b [m, F]``: the mean over the
    ``F`` features of the squared difference of their means plus the mean over the ``F x F`` entries of the
    squared difference of their unbiased covariance matrices (divided by ``n - 1``)."""
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    ca, cb = a - mean_a, b - mean_b
    cov_a = ca.T @ ca / (a.shape[0] - 1)
    cov_b = cb.T @ cb / (b.shape[0] - 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2`` for every pair of rows, as ``|a_i|^2 + |b_j|^2 - 2 a_i . b_j`` clamped at 1e-30
    (DomainBed's ``my_cdist``: one matrix product, never negative after rounding)."""
    an = a.pow(2).sum(-1, keepdim=True)
    bn = b.pow(2).sum(-1, keepdim=True)
    return torch.addmm(bn.T, a, b.T, alpha=-2).add(an).clamp_min(1e-30)


def gaussian_kernel(a: Tensor, b: Tensor, gammas: tuple[float, ...] | list[float]) -> Tensor:
    """``k(a_i, b_j) = sum_g exp(-g ||a_i - b_j||^2)`` over the bandwidths ``gammas``: ``[len(a), len(b)]``."""
    dist = squared_distances(a, b)
    return sum(torch.exp(-g * dist) for g in gammas)


class FeatureAlignment(ERM):
    """Base of CORAL and MMD (DomainBed's ``AbstractMMD``): ERM plus the mean over pairs of training domains of
    a discrepancy between their penultimate features.

    One forward over the pooled per-domain batch gives the features (the input of the final classifier,
    :meth:`~mentor.generalize.base.DomainMethod.features`) and the logits. ``nll`` is the mean cross-entropy
    (DomainBed's mean of the per-domain means: every domain has ``B`` images), ``penalty`` the mean over the
    pairs ``i < j`` of :meth:`discrepancy` of domain ``i``'s and domain ``j``'s features, and
    ``loss = nll + penalty_weight * penalty`` (DomainBed's ``mmd_gamma``, default 1). The penalty is computed
    in float32 with autocast off (a half-precision covariance or distance matrix loses the small
    differences it measures). Subclasses override :meth:`discrepancy` (or :meth:`penalty`).
    """

    min_domains = 2

    @rules(penalty_weight=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        penalty_weight: float = 1.0

    def discrepancy(self, a: Tensor, b: Tensor) -> Tensor:
        """The discrepancy of two domains' features ``[B, F]`` (a 0-d tensor)."""
        raise NotImplementedError

    def penalty(self, features: Tensor) -> Tensor:
        """The mean of :meth:`discrepancy` over every pair of training domains (``features [D*B, F]``)."""
        per_domain = self.per_domain(at_least_float32(features.flatten(1)))
        pairs = list(itertools.combinations(range(self.num_domains), 2))
        return sum(self.discrepancy(per_domain[i], per_domain[j]) for i, j in pairs) / len(pairs)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        y = batch["y"]
        features, logits = self.features(batch["x"])
        nll = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        with torch.autocast(features.device.type, enabled=False):
            penalty = self.penalty(features)
        loss = nll + self.cfg.penalty_weight * penalty
        return {"loss": loss, "nll": nll.detach(), "penalty": penalty.detach(), "train_acc": train_accuracy(logits, y)}


@register_method("coral")
class CORAL(FeatureAlignment):
    """Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV workshops 2016, over
    pairs of training domains in the form of DomainBed's ``CORAL`` (Gulrajani & Lopez-Paz, "In Search of Lost
    Domain Generalization", ICLR 2021).

    The discrepancy of two domains is :func:`coral_discrepancy`: the mean squared difference of their feature
    means plus the mean squared difference of their unbiased feature covariances. (DomainBed's form: the
    paper's loss is the squared Frobenius distance of the covariances divided by ``4 F^2``, without the means.)
    Default weight: DomainBed's ``mmd_gamma`` 1.
    """

    def discrepancy(self, a: Tensor, b: Tensor) -> Tensor:
        return coral_discrepancy(a, b)


@register_method("mmd")
class MMD(FeatureAlignment):
    """Li, Pan, Wang & Kot, "Domain Generalization with Adversarial Feature Learning" (MMD-AAE), CVPR 2018: the
    feature distributions of the training domains matched by maximum mean discrepancy, in the form of
    DomainBed's ``MMD`` (without the paper's adversarial autoencoder).

    The discrepancy of domains ``i`` and ``j`` is the biased squared MMD estimate
    ``mean k(x_i, x_i') + mean k(x_j, x_j') - 2 mean k(x_i, x_j)`` (every pair of rows, the diagonal included)
    with the kernel ``k(u, v) = sum_g exp(-g ||u - v||^2)`` over DomainBed's bandwidths ``gammas``
    (1e-3 ... 1e3, seven of them). One kernel matrix over the whole pooled batch gives every domain pair's
    three means at once (the same numbers as DomainBed's three matrices per pair). Default weight:
    DomainBed's ``mmd_gamma`` 1.
    """

    @rules(gammas=each(POSITIVE))
    @dataclass
    class Config(FeatureAlignment.Config):
        gammas: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])

    def discrepancy(self, a: Tensor, b: Tensor) -> Tensor:
        g = self.cfg.gammas
        return gaussian_kernel(a, a, g).mean() + gaussian_kernel(b, b, g).mean() - 2 * gaussian_kernel(a, b, g).mean()

    def penalty(self, features: Tensor) -> Tensor:
        f = at_least_float32(features.flatten(1))
        d = self.num_domains
        # block means of the pooled kernel matrix: means[i, j] = mean over rows of domain i, columns of domain j
        means = gaussian_kernel(f, f, self.cfg.gammas).unflatten(0, (d, -1)).unflatten(2, (d, -1)).mean((1, 3))
        i, j = torch.triu_indices(d, d, offset=1, device=f.device)
        return (means[i, i] + means[j, j] - 2 * means[i, j]).mean()


__all__ = ["CORAL", "MMD", "FeatureAlignment", "coral_discrepancy", "gaussian_kernel",
           "squared_distances"]
