"""MultiMatch: FixMatch as multi-task learning over the source domains (semi-supervised domain generalisation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, PROBABILITY, rules
from ..errors import ConfigError
from ..methods import BuildInfo, Inputs, MethodConfig, StepContext, register_method
from ..models.penultimate import swap_classifier
from ..nn import train_accuracy
from ..nn.dsbn import RoutedModule, SubsetBatchNorm2d, routing
from ..nn.masking import FixedThreshold
from ..nn.norm import replace_norm
from .base import BranchEnsemble
from .erm import ERM


class TaskBatchNorm2d(RoutedModule):
    """Independent BatchNorm per task: ``tasks`` (a :class:`~mentor.nn.dsbn.SubsetBatchNorm2d` of ``T`` branches,
    each with its own affine parameters and running statistics). Sample ``i`` is normalised by branch
    ``route[i]`` with the batch statistics of the samples routed to that branch (training) or its running ones
    (evaluation); without a route every sample takes ``default`` (the global task)."""

    def __init__(self, tasks: SubsetBatchNorm2d, default: int):
        super().__init__()
        self.tasks, self.default = tasks, default

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, num_tasks: int) -> TaskBatchNorm2d:
        return cls(SubsetBatchNorm2d.from_bn(bn, num_tasks), num_tasks - 1)

    def forward(self, x: Tensor) -> Tensor:
        route = self.route
        if route is None:
            route = torch.full((x.shape[0],), self.default, dtype=torch.long, device=x.device)
        return self.tasks(x, route)


class TaskLinear(RoutedModule):
    """A linear classifier per task (``heads``); sample ``i`` is classified by ``heads[route[i]]``, every sample
    by ``heads[default]`` (the global task) without a route. ``heads[default]`` is the student's own classifier."""

    def __init__(self, main: nn.Linear, num_tasks: int):
        super().__init__()
        self.in_features, self.out_features = main.in_features, main.out_features
        others = [nn.Linear(main.in_features, main.out_features).to(main.weight.device, main.weight.dtype)
                  for _ in range(num_tasks - 1)]
        self.heads = nn.ModuleList([*others, main])
        self.default = num_tasks - 1

    def forward(self, f: Tensor) -> Tensor:
        route = self.route
        if route is None:
            return self.heads[self.default](f)
        weight = torch.stack([h.weight for h in self.heads])[route]  # [N, classes, features]
        bias = torch.stack([h.bias for h in self.heads])[route]
        return torch.einsum("nf,ncf->nc", f, weight) + bias


def task_probabilities(student: nn.Module, x: Tensor, num_tasks: int) -> Tensor:
    """``[T, N, K]``: the softmax probabilities of every task for ``x``, in one forward of ``x`` repeated ``T``
    times (copy ``t`` through task ``t``'s BatchNorm branches and classifier)."""
    n = x.shape[0]
    route = torch.arange(num_tasks, device=x.device).view(-1, 1).expand(num_tasks, n).reshape(-1)
    with routing(student, route):
        logits = student(x.repeat(num_tasks, *([1] * (x.dim() - 1))))
    return logits.float().softmax(1).view(num_tasks, n, -1)


def fuse(probs: Tensor) -> Tensor:
    """The test-time fusion of ``[T, N, K]`` task probabilities (the global task last): ``(p_global + mean of
    the local tasks' p) / 2``."""
    if probs.shape[0] == 1:
        return probs[0]
    return (probs[-1] + probs[:-1].mean(0)) / 2


class MultiMatchEnsemble(nn.Module):
    """The deployable MultiMatch network: every task's prediction for the input, fused by :func:`fuse`; returns
    the log of the fused probabilities (its argmax is the prediction)."""

    def __init__(self, student: nn.Module, num_tasks: int):
        super().__init__()
        self.student, self.num_tasks = student, num_tasks

    def forward(self, x: Tensor) -> Tensor:
        return fuse(task_probabilities(self.student, x, self.num_tasks)).clamp(min=1e-30).log()


def task_network(student: nn.Module, num_tasks: int) -> None:
    """Turn ``student`` (in place) into MultiMatch's network: every ``BatchNorm2d`` a :class:`TaskBatchNorm2d`
    and the classifier a :class:`TaskLinear` of ``num_tasks`` tasks (the global task last)."""
    swapped = replace_norm(student, lambda bn: TaskBatchNorm2d.from_bn(bn, num_tasks), kinds=(nn.BatchNorm2d,))
    if not swapped:
        raise ConfigError(
            f"method multimatch gives every task its own BatchNorm, but {type(student).__name__} has no "
            "BatchNorm2d layer; use a network with BatchNorm (model.name=resnet8 or another ResNet of the zoo)")
    swap_classifier(student, lambda head: TaskLinear(head, num_tasks), "multimatch",
                    "gives every task its own linear classifier beside")


@register_method("multimatch")
class MultiMatch(BranchEnsemble, ERM):
    """Qi, Yang, Shi & Geng, "MultiMatch: Multi-task Learning for Semi-supervised Domain Generalization", ACM TOMM
    2024 (arXiv 2208.05853). Not to be confused with the semi-supervised text classifier of the same name.

    **Tasks.** Every training domain is a local task and all of them together the global task: the student's
    BatchNorm layers become :class:`TaskBatchNorm2d` (one BN branch per task) and its classifier a
    :class:`TaskLinear` (one classifier per task); every other parameter is shared. The local tasks are the
    labelled training domains in order, then any domain of ``data.unlabeled_domains`` (a local task trained
    by its pseudo-labels only); the global task is the last (its classifier is the student's own, and it is
    what a plain ``student(x)`` computes).

    **Each step** (FixMatch per task, USB's conventions: :class:`~mentor.semi.fixmatch.FixMatch`): one forward of
    ``cat(x_weak, x_weak, u_weak, u_weak, u_strong, u_strong)``, each first copy through the image's own local
    task and each second copy through the global task (each BN branch sees the images routed to it, labelled
    and unlabelled together, as FixMatch's ``use_cat``). The pseudo-label of an unlabelled image fuses its
    local and global tasks' weak-view probabilities, ``q = (p_local + p_global) / 2``: target ``argmax q``, mask
    ``max q >= p_cutoff`` (:class:`~mentor.nn.masking.FixedThreshold`). Then

        ``loss = CE_local(x) + CE_global(x) + lambda_u * [mean(mask * CE_local(u_strong, t))
        + mean(mask * CE_global(u_strong, t))]``.

    **Test.** The deployable :class:`MultiMatchEnsemble` fuses the global task with the local ones,
    ``(p_global + mean_d p_local_d) / 2``; ``eval_heads`` also reports the global task alone
    (``val_acc_global``).

    **Sources and design choices** (status partial). The code was not available and the paper's method section
    could not be consulted; what the abstract states is followed: FixMatch extended to multi-task learning,
    one local task per training domain and a global task over all of them, independent BN and classifier per
    task with every other parameter shared, predictions of the global and local task fused for the
    pseudo-labels during training and fused at test time. Design choices where it says nothing: fusion by
    averaging softmax probabilities (training: the image's local task and the global task, equal weights;
    test: the global task and the mean of the local tasks, equal weights); every labelled and unlabelled image
    trains both its local task and the global task with equal weights; the local tasks' BN and classifiers
    start as copies of the student's BN layers and fresh linear layers. FixMatch's defaults apply: ``p_cutoff``
    0.95, ``lambda_u`` 1, weak and strong views (``data.augment`` is not used).
    """

    ensemble = MultiMatchEnsemble
    convert = staticmethod(task_network)

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "strong"), domains=True)

    @rules(p_cutoff=PROBABILITY, lambda_u=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        p_cutoff: float = 0.95
        lambda_u: float = 1.0

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        labelled = list(info.domain_names) or [f"domain{i}" for i in range(self.num_domains)]
        self.local_names = labelled + [n for n in info.unlabeled_domains if n not in labelled]
        self.num_tasks = len(self.local_names) + 1
        task_network(student, self.num_tasks)
        # the local task of each unlabelled pool (``u_domain`` is a position in info.unlabeled_domains)
        pool_task = [self.local_names.index(n) for n in info.unlabeled_domains]
        self.register_buffer("pool_task", torch.tensor(pool_task or [0], dtype=torch.long), persistent=False)
        self.masker = FixedThreshold(self.cfg.p_cutoff)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        x, y, uw, us = batch["x_weak"], batch["y"], batch["u_weak"], batch["u_strong"]
        local_x, local_u = batch["domain"], self.pool_task[batch["u_domain"]]
        glob = self.num_tasks - 1
        parts = [(x, local_x), (x, None), (uw, local_u), (uw, None), (us, local_u), (us, None)]
        route = torch.cat([r if r is not None else torch.full((v.shape[0],), glob, dtype=torch.long, device=v.device)
                           for v, r in parts])
        with routing(self.student, route):
            logits = self.student(torch.cat([v for v, _ in parts])).float()
        zx_l, zx_g, zw_l, zw_g, zs_l, zs_g = logits.split([v.shape[0] for v, _ in parts])
        sup = F.cross_entropy(zx_l, y, label_smoothing=c.label_smoothing) + \
            F.cross_entropy(zx_g, y, label_smoothing=c.label_smoothing)
        with torch.no_grad():
            q = (zw_l.softmax(1) + zw_g.softmax(1)) / 2
            mask = self.masker(q)
            target = q.argmax(1)
        ctx.pseudo_labels(target, mask)
        unsup = (F.cross_entropy(zs_l, target, reduction="none") * mask).mean() + \
            (F.cross_entropy(zs_g, target, reduction="none") * mask).mean()
        return {"loss": sup + c.lambda_u * unsup, "sup": sup.detach(), "unsup": unsup.detach(),
                "train_acc": train_accuracy(zx_g, y)}

    def branches(self) -> int:
        return self.num_tasks

    def eval_heads(self) -> dict[str, nn.Module]:
        return {"global": self.student}


__all__ = ["MultiMatch", "MultiMatchEnsemble", "TaskBatchNorm2d", "TaskLinear", "fuse", "task_network",
           "task_probabilities"]
