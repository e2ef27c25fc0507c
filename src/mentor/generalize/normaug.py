"""NormAUG: augmentation through normalisation, with domain-subset BatchNorm branches, a classifier per branch and
an ensemble of the single-domain paths and an optimised-normalisation main path at test time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PROBABILITY, rules
from ..errors import ConfigError
from ..methods import BuildInfo, Inputs, MethodConfig, StepContext, register_method
from ..models.penultimate import swap_classifier
from ..nn import train_accuracy
from ..nn.dsbn import DomainSubsetNorm2d, RoutedModule, routing
from ..nn.norm import replace_norm
from .base import BranchEnsemble
from .erm import ERM


class BankHead(RoutedModule):
    """The student's classifier, extended: ``main`` (the original linear classifier, for the main path) and
    ``bank`` (one linear classifier per domain subset, ``2^D`` of them). Features of the first ``len(route)``
    samples go through the bank classifier their route names, the others through ``main``."""

    def __init__(self, main: nn.Linear, branches: int):
        super().__init__()
        self.main = main
        self.in_features, self.out_features = main.in_features, main.out_features
        self.bank = nn.ModuleList(nn.Linear(main.in_features, main.out_features) for _ in range(branches))
        self.bank.to(main.weight.device, main.weight.dtype)

    def forward(self, f: Tensor) -> Tensor:
        route = self.route
        if route is None:
            return self.main(f)
        n = route.shape[0]
        weight = torch.stack([h.weight for h in self.bank])[route]  # [n, classes, features]
        bias = torch.stack([h.bias for h in self.bank])[route]
        aux = torch.einsum("nf,ncf->nc", f[:n], weight) + bias
        return aux if n == f.shape[0] else torch.cat([aux, self.main(f[n:])])


class NormAUGEnsemble(nn.Module):
    """The deployable NormAUG network: the input replicated ``D + 1`` times; copy ``d`` normalised by the BN
    branch of domain ``d`` alone (bit mask ``1 << d``) and classified by that branch's classifier, the last copy
    by the main path; the prediction is ``(mean_d logits_d + logits_main) / 2``."""

    def __init__(self, student: nn.Module, num_domains: int):
        super().__init__()
        self.student, self.num_domains = student, num_domains

    def forward(self, x: Tensor) -> Tensor:
        d, n = self.num_domains, x.shape[0]
        single = (1 << torch.arange(d, device=x.device)).view(d, 1).expand(d, n).reshape(-1)
        with routing(self.student, single):
            logits = self.student(x.repeat(d + 1, *([1] * (x.dim() - 1))))
        per_domain = logits[: d * n].view(d, n, -1).mean(0)
        return (per_domain + logits[d * n:]) / 2


def subset_network(student: nn.Module, num_domains: int) -> None:
    """Turn ``student`` (in place) into NormAUG's network: every ``BatchNorm2d`` a
    :class:`~mentor.nn.dsbn.DomainSubsetNorm2d` of ``2^D`` branches, the classifier a :class:`BankHead`."""
    swapped = replace_norm(student, lambda bn: DomainSubsetNorm2d.from_bn(bn, num_domains), kinds=(nn.BatchNorm2d,))
    if not swapped:
        raise ConfigError(
            f"method normaug turns every BatchNorm2d of the student into domain-subset BN branches, but "
            f"{type(student).__name__} has no BatchNorm2d layer. Use a network with BatchNorm (model.name="
            "resnet8 or another ResNet of the zoo)")
    swap_classifier(student, lambda head: BankHead(head, 1 << num_domains), "normaug",
                    "adds a linear classifier per domain subset beside")


@register_method("normaug")
class NormAUG(BranchEnsemble, ERM):
    """Qi, Yang, Shi & Geng, "NormAUG: Normalization-guided Augmentation for Domain Generalization", IEEE TIP
    2024 (arXiv 2307.13492), in the form of its code (``trainers/normAug.py``, ``trainers/models/augModel.py``).

    Every ``BatchNorm2d`` of the student becomes a :class:`~mentor.nn.dsbn.DomainSubsetNorm2d` (``2^D`` BN
    branches, one per subset of the ``D`` training domains, plus an optimised, DSON-style main norm), and the
    final classifier becomes a :class:`BankHead` (the original classifier for the main path, one linear
    classifier per subset). Each step:

    - draws ``o`` uniformly from ``{0, ..., D}``. ``o = D``: every domain is normalised by its own branch
      (mask ``1 << d``); ``o < D``: the domains other than ``o`` are normalised jointly by the branch of their
      subset (mask ``(2^D - 1) ^ (1 << o)``), domain ``o`` by its own;
    - builds two inputs of the per-domain batch, each image independently its weak or (with probability
      ``strong_prob``) its strong view: ``x_aux`` through the subset branches and their classifiers (each
      sample by the classifier of the branch that normalised it), ``x_main`` through the main path;
    - one forward of ``cat(x_aux, x_main)``; ``loss = CE(aux) + CE(main)``.

    At test time the deployable :class:`NormAUGEnsemble` averages the ``D`` single-domain paths and the main
    path. ``eval_heads`` also reports the main path alone (``val_acc_main``).

    Defaults and departures: ``strong_prob`` 0.5 (the code's per-sample coin). The code gives the main input
    its own draw of the strong augmentation; here both inputs share the batch's one strong view (each image
    chooses between its weak and strong view independently per input). The code trains the classifiers with
    a larger learning rate than the backbone (0.01 vs 0.003 for ImageNet-pretrained ResNet-18); here one
    optimizer trains everything with the recipe's rate. The optimised norm's instance variance is the
    population one (see :class:`~mentor.nn.dsbn.OptimizedNorm2d`). With ``D`` training domains the network
    holds ``2^D`` copies of every BN layer and of the classifier; branches the grouping never uses (the
    empty set, all domains, subsets of size 2..D-2) stay at their initial state, as in the code.
    """

    ensemble = NormAUGEnsemble
    convert = staticmethod(subset_network)

    inputs = Inputs(labeled=("weak", "strong"), domains=True)
    min_domains = 2

    @rules(strong_prob=PROBABILITY)
    @dataclass
    class Config(ERM.Config):
        strong_prob: float = 0.5

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        subset_network(student, self.num_domains)

    def subset_branches(self, o: Tensor) -> Tensor:
        """``[D]``: the BN branch (bit mask) of each domain for the grouping choice ``o`` in ``{0..D}`` (a 0-d
        tensor): its own branch ``1 << d``, or for ``d != o < D`` the branch of all domains but ``o``."""
        d = torch.arange(self.num_domains, device=o.device)
        own = 1 << d
        full = (1 << self.num_domains) - 1
        joint = full - (own * (d == o)).sum()  # = full ^ (1 << o) for o < D
        return torch.where((o < self.num_domains) & (d != o), joint, own)

    def views(self, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``(x_aux, x_main)``: each image's weak or (with probability ``strong_prob``) strong view, drawn per
        image and independently for the two inputs (a Bernoulli mask and ``torch.where``: no host sync)."""
        weak, strong = batch["x_weak"], batch["x_strong"]
        use_strong = torch.rand(2, weak.shape[0], 1, 1, 1, generator=ctx.generator, device=weak.device)
        use_strong = use_strong < self.cfg.strong_prob
        return torch.where(use_strong[0], strong, weak), torch.where(use_strong[1], strong, weak)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        y = batch["y"]
        n = y.shape[0]
        o = torch.randint(0, self.num_domains + 1, (), generator=ctx.generator, device=y.device)
        x_aux, x_main = self.views(batch, ctx)
        route = self.subset_branches(o)[batch["domain"]]
        with routing(self.student, route):
            logits = self.student(torch.cat([x_aux, x_main]))
        z_aux, z_main = logits[:n], logits[n:]
        aux = F.cross_entropy(z_aux.float(), y, label_smoothing=self.cfg.label_smoothing)
        main = F.cross_entropy(z_main.float(), y, label_smoothing=self.cfg.label_smoothing)
        return {"loss": aux + main, "aux": aux.detach(), "main": main.detach(),
                "grouping": o.float(), "train_acc": train_accuracy(z_main, y)}

    def branches(self) -> int:
        return self.num_domains

    def eval_heads(self) -> dict[str, nn.Module]:
        return {"main": self.student}


__all__ = ["BankHead", "NormAUG", "NormAUGEnsemble", "subset_network"]
