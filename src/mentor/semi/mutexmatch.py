"""MutexMatch: FixMatch whose low-confidence images teach a true-negative classifier ("what it is not")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Rule, rules
from ..errors import ConfigError
from ..methods import StepContext, register_method
from ..models.penultimate import PenultimateTap
from .fixmatch import FixMatch, Logits

K_RULE = Rule(lambda v: v == 0 or 0 < v < 1 or (v >= 1 and float(v).is_integer()),
              "0 (no filtering), a share of the classes in (0, 1), or a whole number of classes")


def top_k_classes(k: float, num_classes: int) -> int | None:
    """The number of classes MutexMatch's TNC consistency keeps, or ``None`` for no filtering: ``k = 0``
    or ``k = C`` keep all, ``0 < k < 1`` keeps ``round(k * C)`` (at least 1), ``k >= 1`` keeps ``k``."""
    kept = 0 if k == 0 else max(1, round(k * num_classes)) if k < 1 else int(k)
    if kept > num_classes:
        raise ConfigError(f"method.k={k:g} keeps more classes than the data has ({num_classes}); use at most "
                          f"{num_classes}, a share in (0, 1) such as 0.6, or 0 for no filtering")
    return None if kept in (0, num_classes) else kept


def tnc_consistency(q_weak: Tensor, z_strong: Tensor, k: int | None) -> Tensor:
    """Per image, ``H(q~, z~) = -sum_c q~_c log softmax(z~)_c`` between the TNC's weak-view probabilities
    ``q_weak`` (detached) and its strong-view logits ``z_strong``. With ``k``, the classes outside the
    top ``k`` of ``q_weak`` (ties with the k-th kept) are set to 0 in both, as the reference does: the
    target is not renormalised, and the zeroed logits stay in the softmax."""
    z = z_strong.float()
    if k is not None:
        keep = q_weak >= q_weak.topk(k, 1).values[:, -1:]
        q_weak, z = q_weak * keep, z * keep
    return -(q_weak * z.log_softmax(1)).sum(1)


@register_method("mutexmatch")
class MutexMatch(FixMatch):
    """Duan, Zhao, Qi, Wang, Zhou, Shi & Gao, "MutexMatch: Semi-Supervised Learning With Mutex-Based
    Consistency Regularization", IEEE TNNLS 2024, as its official code (``NJUyued/MutexMatch4SSL``)
    computes it.

    Beside the student's classifier (the true-positive classifier, TPC) a true-negative classifier (TNC,
    ``g``: one linear layer on the student's penultimate features ``h``, the input of its ``fc``) learns
    which class an image is *not*. With the weak view's ``p = softmax(z_w)`` (detached) and
    ``m_b = 1[max p_b >= p_cutoff]``::

        loss = CE(x, y) + lambda_u L_u^TPC + L_n + lambda_u L_u^TNC
        L_u^TPC = mean_b m_b CE(z_s,b, argmax p_b)                   (FixMatch)
        L_n     = mean_i CE(g(stopgrad h_i), argmin_c softmax(z_i))  (over x, u_w and u_s: every image)
        L_u^TNC = mean_b (1 - m_b) H(q~_b, g(h_s,b)~)                 (:func:`tnc_consistency`)

    with ``q = softmax(g(h_w))`` detached and ``~`` the top-``k`` filter of :func:`tnc_consistency`. The
    reverse loss ``L_n`` trains only the TNC (its features are detached); ``L_u^TNC`` trains the TNC and,
    through the strong view's features, the encoder; the low-confidence images (``1 - m``) are the ones
    FixMatch's mask drops.

    ``k`` (:func:`top_k_classes`): 0 (the official default) or ``C`` keeps every class; the paper's best
    CIFAR-10 results use ``k = 0.6C`` (README: 40 labels 94.21 % against 93.22 % with ``k = C``; CIFAR-100
    ``k = 60``), written ``k: 0.6`` (a share of the classes, rounded) or ``k: 6`` (a class count). Other
    defaults are the official code's: ``p_cutoff`` 0.95, ``lambda_u`` 1, hard labels. With
    ``hard_label: false`` the TPC term takes FixMatch's sharpened soft targets (the reference's soft-label
    branch is broken: it never defines the TNC term); the TNC term is unchanged.
    """

    @rules(k=K_RULE)
    @dataclass
    class Config(FixMatch.Config):
        k: float = 0.0

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.top_k = top_k_classes(cfg.k, info.num_classes)
        self.tap = PenultimateTap(student)
        self.tnc = nn.Linear(self.tap.num_features, info.num_classes)

    def forward_views(self, batch: dict[str, Tensor]) -> Logits:
        inputs = self.views(batch)
        sizes = [v.shape[0] for v in inputs.values()]
        features, logits = self.tap(torch.cat(list(inputs.values())))
        z = dict(zip(inputs, logits.split(sizes)))
        h = dict(zip(inputs, features.split(sizes)))
        z["tnc_u_weak"], z["tnc_u_strong"] = self.tnc(torch.cat([h["u_weak"], h["u_strong"]])).split(
            [sizes[1], sizes[2]])
        z["tnc_detached"], z["all"] = self.tnc(features.detach()), logits
        return z

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        least = z["all"].detach().float().argmin(1)  # argmin of softmax(z) = argmin of z
        reverse = F.cross_entropy(z["tnc_detached"].float(), least)
        q_weak = z["tnc_u_weak"].detach().float().softmax(1)
        tnc = (tnc_consistency(q_weak, z["tnc_u_strong"], self.top_k) * (1.0 - mask)).mean()
        return {"reverse": (1.0, reverse), "unsup_tnc": (self.cfg.lambda_u, tnc)}


__all__ = ["MutexMatch", "tnc_consistency", "top_k_classes"]
