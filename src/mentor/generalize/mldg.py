"""Meta-Learning for Domain Generalization (MLDG), first order, as DomainBed runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from .erm import ERM

#: the epsilon of a freshly built ``torch.optim.Adam`` (DomainBed's inner optimizer keeps PyTorch's defaults)
ADAM_EPS = 1e-8


@register_method("mldg")
class MLDG(ERM):
    """Li, Yang, Song & Hospedales, "Learning to Generalize: Meta-Learning for Domain Generalization", AAAI 2018,
    to first order, in the form of DomainBed's ``MLDG``.

    Every step the ``D`` training domains are put in a random order; the last ``meta_test_domains`` are the
    meta-test domains, the others the meta-train ones, and the ``k``-th meta-train domain ``i`` is paired
    with the ``(k mod meta_test_domains)``-th meta-test domain ``j`` (DomainBed's ``split_meta_train_test``:
    ``D - meta_test_domains`` pairs). For each pair: ``L_i(theta)`` on domain ``i``, one inner step
    ``theta' = theta - delta(grad L_i(theta))``, and ``L_j(theta')`` on domain ``j``. The gradient of

        ``loss = (1 / D) sum_pairs [L_i(theta) + beta * L_j(theta')]``

    with ``delta`` held constant (first order: ``theta'`` is ``theta`` minus a detached step, evaluated with
    :func:`torch.func.functional_call`) is ``(1 / D) sum_pairs [grad L_i(theta) + beta * grad L_j(theta')]``,
    the gradient DomainBed accumulates before its optimizer step.

    The inner step: DomainBed takes one step of a freshly built Adam at the run's learning rate, which is
    ``lr * g / (|g| + 1e-8)`` (the bias corrections cancel on a first step): ``inner_optim: adam``, the
    default. ``inner_optim: sgd`` takes the paper's plain step ``lr * g``. ``inner_lr`` defaults to 1e-3,
    DomainBed's learning rate on its small-image data sets (RotatedMNIST, ColoredMNIST; 5e-5 on the others);
    DomainBed's weight decay there is 0, so the inner step has none. Defaults ``mldg_beta`` 1 (``beta``) and
    ``n_meta_test`` 2 (``meta_test_domains``) are DomainBed's; with two training domains set
    ``meta_test_domains=1``.

    Each domain's batch is forwarded on its own, as DomainBed's per-pair networks are. BatchNorm running
    statistics are updated by the forwards at ``theta`` only; the forwards at ``theta'`` write to a copy of
    the buffers (DomainBed's inner copies are thrown away with their statistics).
    """

    min_domains = 2

    @rules(beta=NON_NEGATIVE, meta_test_domains=COUNT, inner_lr=POSITIVE)
    @dataclass
    class Config(ERM.Config):
        beta: float = 1.0
        meta_test_domains: int = 2
        inner_lr: float = 1e-3
        inner_optim: Literal["adam", "sgd"] = "adam"

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if info.num_domains and self.cfg.meta_test_domains >= info.num_domains:
            raise ConfigError(
                f"method mldg holds out method.meta_test_domains={self.cfg.meta_test_domains} of the "
                f"{info.num_domains} training domains for meta-testing at each step and needs at least one left "
                f"for meta-training; set method.meta_test_domains to at most {info.num_domains - 1}, or train "
                "on more domains (data.test_domains)")

    def meta_pairs(self, ctx: StepContext, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(train, test)``: the domain positions of the meta-train and meta-test side of each pair, each
        ``[D - meta_test_domains]``, drawn on the device."""
        d, t = self.num_domains, self.cfg.meta_test_domains
        order = torch.rand(d, generator=ctx.generator, device=device).argsort()
        train, test = order[: d - t], order[d - t:]
        return train, test[torch.arange(d - t, device=device) % t]

    def inner_step(self, grad: Tensor) -> Tensor:
        """The inner optimizer's update of one parameter from its gradient."""
        if self.cfg.inner_optim == "adam":
            return self.cfg.inner_lr * grad / (grad.abs() + ADAM_EPS)
        return self.cfg.inner_lr * grad

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        xs, ys = self.per_domain(batch["x"]), self.per_domain(batch["y"])
        train, test = self.meta_pairs(ctx, xs.device)
        names, params = zip(*[(n, p) for n, p in self.student.named_parameters() if p.requires_grad])
        smoothing = self.cfg.label_smoothing
        meta_train, meta_test = [], []
        # gathered with the index tensors (indexing with one of their elements would read it back)
        xis, yis, xjs, yjs = xs[train], ys[train], xs[test], ys[test]
        for k in range(train.shape[0]):
            xi, yi, xj, yj = xis[k], yis[k], xjs[k], yjs[k]
            li = F.cross_entropy(self.student(xi), yi, label_smoothing=smoothing)
            grads = torch.autograd.grad(li, params, retain_graph=True, allow_unused=True)
            inner = {n: p if g is None else p - self.inner_step(g).detach() for n, p, g in zip(names, params, grads)}
            buffers = {n: b.clone() for n, b in self.student.named_buffers()}
            lj = F.cross_entropy(functional_call(self.student, {**buffers, **inner}, (xj,)), yj,
                                 label_smoothing=smoothing)
            meta_train.append(li)
            meta_test.append(lj)
        li, lj = torch.stack(meta_train), torch.stack(meta_test)
        loss = (li.sum() + self.cfg.beta * lj.sum()) / self.num_domains
        return {"loss": loss, "meta_train": li.mean().detach(), "meta_test": lj.mean().detach()}


__all__ = ["MLDG"]
