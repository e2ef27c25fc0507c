"""MEDIC: dualistic meta-learning over domains and class groups, with a one-vs-all head, for open-set domain
generalisation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import NON_NEGATIVE, POSITIVE, rules
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from ..models.penultimate import classifier_path, swap_classifier
from ..nn import train_accuracy
from ..nn.masking import step_tensor
from .erm import ERM
from .openset import max_softmax


def ova_loss(binary_logits: Tensor, labels: Tensor, eps: float = 1e-8) -> Tensor:
    """The one-vs-all loss of OVANet (Saito & Saenko, "OVANet: One-vs-All Network for Universal Domain
    Adaptation", ICCV 2021), per sample, as MEDIC's ``OVALoss``: ``binary_logits`` ``[N, 2, K]`` (index 0 of
    dim 1 the "not class k" logit, index 1 the "class k" one), softmax over the pair, and

        ``l_i = (-log(p_i[1, y_i] + eps) + max_{k != y_i} -log(p_i[0, k] + eps)) / 2``

    (the positive term of the true class, the hardest negative among the others). Returns ``[N]``; MEDIC's
    loss is its mean."""
    p = binary_logits.float().softmax(1)
    k = p.shape[2]
    own = labels[:, None] == torch.arange(k, device=labels.device)
    pos = -torch.log(p[:, 1].gather(1, labels[:, None]).squeeze(1) + eps)
    neg = (-torch.log(p[:, 0] + eps)).masked_fill(own, float("-inf")).amax(1)
    return 0.5 * (pos + neg)


class OneVsAllHead(nn.Module):
    """The student's classifier with MEDIC's binary head beside it: ``main`` (``K`` closed-set logits, what
    ``forward`` returns) and ``binary`` (``2K`` logits read as ``[N, 2, K]``: MEDIC's ``b_classifier``). Inside
    :meth:`binary_outputs` every forward also appends its binary logits to the yielded list, so one forward of
    the network (plain, or through :func:`torch.func.functional_call` with other weights) gives both heads."""

    def __init__(self, main: nn.Linear):
        super().__init__()
        self.main = main
        self.in_features, self.out_features = main.in_features, main.out_features
        self.binary = nn.Linear(main.in_features, 2 * main.out_features).to(main.weight.device, main.weight.dtype)
        for layer in (self.main, self.binary):  # MutiClassifier's initialisation of both classifiers
            nn.init.xavier_uniform_(layer.weight, 0.1)
            nn.init.zeros_(layer.bias)
        self._capture: list[Tensor] | None = None

    def forward(self, f: Tensor) -> Tensor:
        if self._capture is not None:
            self._capture.append(self.binary(f).unflatten(1, (2, self.out_features)))
        return self.main(f)

    @contextlib.contextmanager
    def binary_outputs(self) -> Iterator[list[Tensor]]:
        self._capture = []
        try:
            yield self._capture
        finally:
            self._capture = None


def one_vs_all_head(net: nn.Module) -> OneVsAllHead:
    """The :class:`OneVsAllHead` of a MEDIC network (the student, or a copy of it)."""
    head = net.get_submodule(classifier_path(net))
    if not isinstance(head, OneVsAllHead):
        raise TypeError(f"{type(net).__name__} has no one-vs-all head: it is not a MEDIC network")
    return head


def _swap_head(student: nn.Module) -> None:
    """Put a :class:`OneVsAllHead` in place of the student's linear classifier (in place)."""
    swap_classifier(student, OneVsAllHead, "medic", "puts a one-vs-all head beside")


def binary_confidence(closed_logits: Tensor, binary_logits: Tensor) -> Tensor:
    """MEDIC's confidence: the "known" probability of the one-vs-all pair of the closed-set prediction,
    ``softmax(b_i[:, k])[1]`` with ``k = argmax_c z_ic``."""
    k = closed_logits.argmax(1, keepdim=True)
    return binary_logits.float().softmax(1)[:, 1].gather(1, k).squeeze(1)


@register_method("medic")
class MEDIC(ERM):
    """Wang, Zhang, Qi & Shi, "Generalizable Decision Boundaries: Dualistic Meta-Learning for Open Set Domain
    Generalization", ICCV 2023, in the form of its code (zzwdx/MEDIC ``ml_open.py``, ``loss/OVALoss.py``,
    ``model/model.py``).

    **Network.** The student's final classifier becomes a :class:`OneVsAllHead`: the closed-set classifier
    (``K`` logits) and a one-vs-all binary classifier (``2K`` logits) on the same features, both initialised as
    MEDIC's ``MutiClassifier`` (Xavier-uniform with gain 0.1, zero bias). The loss of a set of images is
    ``L = CE(closed) + ova_weight * OVA(binary)`` (:func:`ova_loss`; ``ova_weight`` 0 is MEDIC's
    ``--without-bcls``).

    **Dualistic meta-learning, each step.** The classes are cut into groups of ``(K - 1) // 10 + 1`` consecutive
    classes (one class per group up to 10 classes) and ``ceil(#groups / 3)`` groups ``G`` are drawn at random;
    the "exp" domain ``e`` is ``step mod D`` (MEDIC's round robin), and ``i``, ``j`` are two other domains drawn at
    random. With ``L(S)`` the mean loss over the images of ``S`` in the step's batch (``B_d`` the batch of domain
    ``d``, ``\\ G`` its images outside the groups, ``∩ G`` inside):

        ``L_tr = L(B_i \\ G) + L(B_j \\ G) + L(B_e ∩ G)``,
        ``theta' = theta - meta_lr * grad L_tr(theta)`` (with ``create_graph``: second order),
        ``L_te = L((B_i ∩ G) ∪ (B_j ∩ G); theta') + 2 L(B_e \\ G; theta')``,

    and the optimizer steps on ``grad(L_tr + L_te)``. Meta-train and meta-test differ in both domains and
    classes. The groups and domains are drawn with torch ops and applied as 0/1 masks (each image of domains
    ``i``, ``j``, ``e`` is in exactly one of the two phases), so shapes stay static; the inner step evaluates the
    student at ``theta'`` with :func:`torch.func.functional_call`. Each of the three domains is forwarded on its
    own (MEDIC forwards each sub-batch separately), at ``theta`` and again at ``theta'``; BatchNorm running
    statistics are updated by all six forwards, as MEDIC's ``BatchNorm2d_fw`` does.

    **Departures.** MEDIC draws each sub-batch from per-class loaders (meta-train batches of ``B`` images from
    the allowed classes, meta-test ones of ``B/2`` per domain, and the exp domain's meta-test term as two
    batches); here one batch of ``B`` images per domain is split by the masks, so the number of images in each
    term varies from step to step, and the exp domain's term is weighted 2 (the expectation of MEDIC's two
    batches). A term with no image contributes 0. MEDIC needs three training domains (``i``, ``j`` are sampled
    without replacement from the ``D - 1`` domains other than ``e``); with two, ``i = j`` is the other domain:
    its batch counts twice in ``L_tr`` (``2 L(B_o \\ G) + L(B_e ∩ G)``) and its images in ``G`` form the first
    meta-test term (``L(B_o ∩ G; theta') + 2 L(B_e \\ G; theta')``), keeping MEDIC's 2:1 weighting of the two
    sides. With more than three, the ``D - 3`` domains not drawn are unused that step, as in MEDIC.

    **Defaults**: ``meta_lr`` 0.01 (MEDIC's ``--meta-lr``), ``ova_weight`` 1. MEDIC trains an ImageNet ResNet-50
    with SGD (momentum 0.9, weight decay 5e-4) at ``lr`` 1e-4 (5e-4 in its saved PACS run), batch 8; the recipe's
    optimizer applies here.

    **Score.** Open-set runs report :mod:`mentor.generalize.openset`'s numbers with the binary head's confidence
    (:func:`binary_confidence`: MEDIC's "B classifier") and, suffixed ``_msp``, with the closed head's maximum
    softmax probability (MEDIC's "C classifier"); ``acc`` is the closed-set accuracy.
    """

    min_domains = 2

    @rules(meta_lr=POSITIVE, ova_weight=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        meta_lr: float = 0.01
        ova_weight: float = 1.0

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        _swap_head(student)
        k = info.num_classes
        self.group_length = (k - 1) // 10 + 1
        self.num_groups = (k - 1) // self.group_length + 1
        self.meta_groups = (self.num_groups - 1) // 3 + 1

    @property
    def head(self) -> OneVsAllHead:
        return one_vs_all_head(self.student)

    # -- the step ------------------------------------------------------------------------------------------
    def meta_split(self, step: int | Tensor, generator: torch.Generator | None,
                   device: torch.device) -> tuple[Tensor, Tensor]:
        """``(domains, in_group)``: the positions ``[i, j, e]`` of the step's three domains (``[o, e]`` with two
        training domains) and the ``[K]`` 0/1 indicator of the classes in the drawn groups ``G``."""
        d = self.num_domains
        e = (step_tensor(step, device).long() % d)
        keys = torch.rand(d, generator=generator, device=device)
        keys = torch.where(torch.arange(d, device=device) == e, torch.full_like(keys, 2.0), keys)
        others = keys.argsort()[: min(2, d - 1)]
        groups = torch.rand(self.num_groups, generator=generator, device=device).argsort()[: self.meta_groups]
        chosen = torch.zeros(self.num_groups, device=device).scatter(0, groups, 1.0)
        in_group = chosen[torch.arange(self.info.num_classes, device=device) // self.group_length]
        return torch.cat([others, e.view(1)]), in_group

    def sample_losses(self, x: Tensor, y: Tensor, params: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(per-sample loss [N], closed logits)`` of the student at its weights or at ``params``."""
        with self.head.binary_outputs() as binary:
            z = self.student(x) if params is None else functional_call(self.student, params, (x,))
        ce = F.cross_entropy(z.float(), y, reduction="none", label_smoothing=self.cfg.label_smoothing)
        return ce + self.cfg.ova_weight * ova_loss(binary[0], y), z

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        xs, ys = self.per_domain(batch["x"]), self.per_domain(batch["y"])
        domains, in_group = self.meta_split(ctx.step, ctx.generator, xs.device)
        xd, yd = xs[domains], ys[domains]  # [3 (or 2), B, ...]: gathered with the index tensor, no host read
        g = in_group[yd]  # [slots, B]: 1 for the images in the drawn groups
        names, params = zip(*[(n, p) for n, p in self.student.named_parameters() if p.requires_grad])

        def mean(loss: Tensor, mask: Tensor) -> Tensor:
            return (loss * mask).sum() / mask.sum().clamp(min=1.0)

        inner, logits = [], []
        for s in range(xd.shape[0]):
            loss, z = self.sample_losses(xd[s], yd[s])
            inner.append(loss)
            logits.append(z)
        two = xd.shape[0] == 2  # two training domains: i = j = the other domain
        if two:
            l_tr = 2 * mean(inner[0], 1 - g[0]) + mean(inner[1], g[1])
        else:
            l_tr = mean(inner[0], 1 - g[0]) + mean(inner[1], 1 - g[1]) + mean(inner[2], g[2])
        grads = torch.autograd.grad(l_tr, params, create_graph=True, allow_unused=True)
        fast = {n: p if gr is None else p - self.cfg.meta_lr * gr for n, p, gr in zip(names, params, grads)}
        outer = [self.sample_losses(xd[s], yd[s], fast)[0] for s in range(xd.shape[0])]
        if two:
            l_te = mean(outer[0], g[0]) + 2 * mean(outer[1], 1 - g[1])
        else:
            l_te = mean(torch.cat(outer[:2]), g[:2].flatten()) + 2 * mean(outer[2], 1 - g[2])
        z = torch.cat(logits)
        return {"loss": l_tr + l_te, "meta_train": l_tr.detach(), "meta_test": l_te.detach(),
                "train_acc": train_accuracy(z, yd.flatten())}

    # -- evaluation ------------------------------------------------------------------------------------------
    def deployable_spec(self) -> dict[str, Any] | None:
        """The student with its :class:`OneVsAllHead` (the binary head ships with it: open-set scoring reads it)."""
        return {"kind": self.method_name}

    @classmethod
    def rebuild_deployable(cls, spec: dict[str, Any], student: nn.Module, info: dict[str, Any]) -> nn.Module:
        _swap_head(student)
        return student

    def open_set_outputs(self, net: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The closed-set logits and two confidences: the binary head's (no suffix) and the maximum softmax
        probability (``_msp``)."""
        with one_vs_all_head(net).binary_outputs() as binary:
            z = net(x)
        return z, {"": binary_confidence(z, binary[0]), "_msp": max_softmax(z)}


__all__ = ["MEDIC", "OneVsAllHead", "binary_confidence", "one_vs_all_head", "ova_loss"]
