"""Relational knowledge distillation on the unlabelled stream: the student's pairwise relations follow a
trained teacher's, beside FixMatch's consistency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, PATH, rules
from ..engine.teacher import load_teacher
from ..errors import ConfigError
from ..methods import BuildInfo, Inputs, StepContext, register_method
from .fixmatch import FixMatch, Logits

Relation = Literal["cos", "argmax"]
Pairs = Literal["halves", "all"]


def teacher_relation(a: Tensor, b: Tensor, relation: Relation) -> Tensor:
    """The teacher's edge weight between rows of ``a`` and rows of ``b`` (``a[i]`` with ``b[i]`` for equal
    shapes): the cosine similarity of the outputs, or 1 where their arg-maxima agree, else 0."""
    if relation == "cos":
        return (F.normalize(a.float(), dim=1) * F.normalize(b.float(), dim=1)).sum(1)
    return (a.argmax(1) == b.argmax(1)).float()


def relation_loss(student: Tensor, teacher: Tensor, relation: Relation = "cos", pairs: Pairs = "halves",
                  p: int = 2) -> Tensor:
    """``|| w_T - w_S ||_p / n_pairs`` over pairs of unlabelled images: ``w_T`` the teacher's edge weights
    (:func:`teacher_relation`), ``w_S = f(x)^T f(x')`` the inner products of the student's outputs.

    ``pairs="halves"`` pairs image ``i`` of the first half of the batch with image ``i`` of the second
    (``n = N // 2`` disjoint pairs; for odd ``N`` the middle image is left out), as the authors' code;
    ``"all"`` takes every ordered pair of distinct images (``N (N - 1)`` entries of the kernel matrix).
    """
    n_img = student.shape[0]
    s, t = student.float(), teacher.float()
    if pairs == "halves":
        n, start = n_img // 2, (n_img + 1) // 2
        w_t = teacher_relation(t[:n], t[start:start + n], relation)
        w_s = (s[:n] * s[start:start + n]).sum(1)
        return torch.linalg.vector_norm(w_t - w_s, ord=p) / max(n, 1)
    if relation == "cos":
        tn = F.normalize(t, dim=1)
        w_t = tn @ tn.T
    else:
        top = t.argmax(1)
        w_t = (top[:, None] == top[None, :]).float()
    off = 1.0 - torch.eye(n_img, device=s.device)
    return torch.linalg.vector_norm((w_t - s @ s.T) * off, ord=p) / max(n_img * (n_img - 1), 1)


@register_method("rkd_unlabeled")
class RKDUnlabeled(FixMatch):
    """Relational knowledge distillation on unlabelled data, after Dong, Miller, Lei & Ward, "Cluster-aware
    Semi-supervised Learning: Relational Knowledge Distillation Provably Learns Clustering", NeurIPS 2023
    (arXiv 2307.11030), and the authors' experiment code (dyjdongyijun/Semi_Supervised_Knowledge_Distillation,
    ``train.py``).

    ``loss = CE(f(x_w), y) + lambda_u * FixMatch(u_w, u_s) + rkd_lambda * || w_T - w_S ||_p / n_pairs``

    **The paper's.** A trained teacher induces a graph on the (population of) unlabelled data whose edge
    weights are its pairwise relations; RKD trains the student so that the relations of its outputs
    ``f(x)^T f(x')`` match those weights, which the paper casts as spectral clustering of that graph, and
    shows that it learns a clustering of low error, after which few labels suffice. The labelled
    cross-entropy is added; the experiments (CIFAR-10/100, few labels) combine RKD with data-augmentation
    consistency, FixMatch ("DAC + RKD").

    **The authors' code** (what this class follows): the edge weight of the teacher is the cosine
    similarity of its outputs (``rkd_edge: cos``; ``argmax``: 1 where the teacher's arg-maxima agree, their
    ``maxmatch``), the student's is the inner product of its *logits* on the weak view, pairs are image
    ``i`` of the first half of the unlabelled batch with image ``i`` of the second, and the loss is the
    ``p``-norm (``p`` = 2) of the differences divided by the number of pairs, weighted ``rkd_lambda`` = 1e-3
    (CIFAR-10 and CIFAR-100), added to FixMatch with ``p_cutoff`` 0.95 (0.8 for CIFAR-100), ``lambda_u`` 1
    and hard labels (:func:`relation_loss`). The teacher's outputs are those of the un-augmented image
    (their ``offline`` features: computed once in eval mode, indexed by the image).

    **Design choices here.** The teacher is the network of a `mentor train` run (``teacher``, loaded as
    distillation loads teachers; same classes, channels and image size), its output its logits, computed
    each step in eval mode on the un-augmented view ``u_none`` (``teacher_view: weak`` gives it the
    student's weak view, their ``online`` mode). ``pairs: all`` compares the whole ``N x N`` kernel matrix
    (off the diagonal) instead of ``N / 2`` disjoint pairs, the empirical form of the paper's objective; its
    scale differs, so ``rkd_lambda`` needs re-tuning. The code's ``rkd_edge_min`` (it drops pairs whose
    teacher cosine is at most ``edge_min - 1``; at its default 0 only exactly opposite outputs) is left out:
    a boolean selection would read the pair count back to the host. ``lambda_u: 0`` trains on the labels and
    the relations alone. Under DDP each rank pairs the images of its own share of the batch, as the authors'
    code does.
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "strong", "none"))

    @rules(teacher=PATH, rkd_lambda=NON_NEGATIVE)
    @dataclass
    class Config(FixMatch.Config):
        teacher: str = ""
        rkd_lambda: float = 1e-3
        relation: Relation = "cos"
        pairs: Pairs = "halves"
        norm: Literal[1, 2] = 2
        teacher_view: Literal["none", "weak"] = "none"

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if not cfg.teacher:
            raise ConfigError("method.teacher is required for 'rkd_unlabeled': the run directory of a trained "
                              "teacher, e.g. method.teacher=runs/supervised/fmnist_resnet20")
        self.add_teacher("teacher", load_teacher(cfg.teacher, info))

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        c = self.cfg
        with torch.no_grad():
            t = self.teacher(batch[f"u_{c.teacher_view}"]).float()
        return {"rkd": (c.rkd_lambda, relation_loss(z["u_weak"], t, c.relation, c.pairs, c.norm))}


__all__ = ["RKDUnlabeled", "relation_loss", "teacher_relation"]
