"""ETA and EATA: entropy minimisation on reliable, non-redundant test samples, and EATA's Fisher
regulariser against forgetting (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, DECAY, NON_NEGATIVE, POSITIVE, SEED, rules
from ..errors import ConfigError
from ..methods import Refresh, StepContext, register_method
from ..nn import entropy, frozen_bn_stats, use_batch_stats
from .tent import Tent


@dataclass
class EATAFilter:
    """One batch's sample selection and weights (every tensor on the batch's device, no host read).

    ``reliable``: ``H_i < E0``; ``kept``: reliable and non-redundant (the samples that train);
    ``weights``: ``exp(E0 - H_i)`` (``1 / exp(H_i - E0)``) on the kept samples, 0 elsewhere, detached;
    ``probs`` / ``started``: the moving average of the probability vectors after this batch."""

    entropy: Tensor
    reliable: Tensor
    kept: Tensor
    weights: Tensor
    probs: Tensor
    started: Tensor

    @property
    def count(self) -> Tensor:
        return self.kept.sum()

    def loss(self) -> Tensor:
        """The weighted entropy averaged over the kept samples (0, with a zero gradient, when none is)."""
        return (self.entropy * self.weights).sum() / self.count.clamp(min=1)


def eata_filter(logits: Tensor, probs: Tensor, started: Tensor, e0: float, d_margin: float,
                momentum: float = 0.9) -> EATAFilter:
    """EATA's two filters and weights (Eqns. 3-6 of the paper; mr-eggplant/EATA ``eata.py:
    forward_and_adapt_eata``, ``update_model_probs``), vectorised over the batch.

    ``H_i`` is the softmax entropy of ``logits_i``. A sample is reliable when ``H_i < e0``; once the moving
    average ``probs`` has ``started``, a reliable sample is kept when ``|cos(probs, p_i)| < d_margin``
    (a prediction unlike the recent ones), else every reliable one is kept. The average then takes the
    mean probability vector of the kept samples: it starts at that mean and moves as
    ``probs <- momentum * probs + (1 - momentum) * mean``; a batch that keeps nothing leaves it as it is."""
    h = entropy(logits)
    p = logits.detach().float().softmax(1)
    reliable = h < e0
    cos = F.cosine_similarity(probs.float().unsqueeze(0), p, dim=1)
    kept = reliable & ((cos.abs() < d_margin) | ~started)
    count = kept.sum()
    mean = (p * kept.unsqueeze(1)).sum(0) / count.clamp(min=1)
    moved = torch.where(started, momentum * probs + (1.0 - momentum) * mean, mean)
    new_probs = torch.where(count > 0, moved, probs)
    weights = torch.where(kept, torch.exp(e0 - h.detach()), torch.zeros_like(h))
    return EATAFilter(h, reliable, kept, weights, new_probs, started | (count > 0))


def fisher_information(net: nn.Module, params: list[nn.Parameter], batches: Iterable[Tensor],
                       run: Callable[[nn.Module, Tensor], Tensor] | None = None) -> list[Tensor]:
    """EATA's diagonal Fisher information of ``params`` (mr-eggplant/EATA ``main.py``): for every batch of
    source images the gradient of the batch-mean cross-entropy against the network's own predictions
    (``argmax``, the pseudo-labels) is squared; the squares are averaged over the batches. A batch of one
    image gives the per-sample form ``mean_i (d CE_i / d theta)^2``.

    The network runs as it adapts (BN layers on the batch's statistics), with its running statistics left
    untouched; the modes of its modules are restored afterwards. Float32 results, on the parameters'
    devices; all zeros for an empty ``batches``."""
    modes = {m: m.training for m in net.modules()}
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    use_batch_stats(net)
    try:
        with frozen_bn_stats(net), torch.enable_grad():
            for x in batches:
                logits = net(x) if run is None else run(net, x)
                loss = F.cross_entropy(logits.float(), logits.detach().argmax(1))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for t, g in zip(total, grads):
                    if g is not None:
                        t.add_(g.detach().float().square())
                count += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [t / max(count, 1) for t in total]


@register_method("eta")
class ETA(Tent):
    """ETA, "efficient test-time adaptation": tent's setting (BN layers on test-batch statistics, only the
    BN affine parameters train, one step per batch, predictions before the update) with EATA's sample
    selection (Niu et al., ICML 2022; mr-eggplant/EATA ``eata.py``; mariodoebler/test-time-adaptation
    ``classification/methods/eata.py``, whose ``FISHER_ALPHA: 0`` is ETA).

    Per batch, :func:`eata_filter`: reliable samples ``H < E0`` with ``E0 = e_margin * ln C`` (0.4), of
    those the non-redundant ones (cosine similarity of the sample's softmax to the moving average of the
    kept probabilities below ``d_margin``; average momentum ``prob_momentum`` 0.9), each weighted by
    ``1 / exp(H - E0)``; the loss is the weighted entropy averaged over the kept samples. A batch that
    keeps none leaves the parameters unchanged (the reference skips its update). ``backward_samples`` is
    the number of kept samples; ``reliable`` and ``kept`` are logged as fractions of the batch.

    Defaults for a 10-class benchmark are those of the benchmark's CIFAR-10-C config
    (``cfgs/cifar10_c/eata.yaml``): Adam ``lr`` 1e-3, ``d_margin`` 0.4. The paper's ImageNet code uses
    ``d_margin`` 0.05 with SGD (lr 0.00025, momentum 0.9, batch 64): with C classes a confident
    prediction has cosine about ``1 / sqrt(C)`` to a near-uniform average (0.03 for ImageNet, 0.32 for
    10 classes), so 0.05 would call almost every confident sample of a 10-class stream redundant.
    ``lr: null`` trains with the run's ``optim`` section. The moving average is part of the method's
    state: a reset (``reset`` setting, episodic) starts it again, as the benchmark does.
    """

    @rules(e_margin=POSITIVE, d_margin=NON_NEGATIVE, prob_momentum=DECAY)
    @dataclass
    class Config(Tent.Config):
        e_margin: float = 0.4
        d_margin: float = 0.4
        prob_momentum: float = 0.9

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.e0 = cfg.e_margin * math.log(info.num_classes)
        self.register_buffer("probs", torch.zeros(info.num_classes))
        self.register_buffer("probs_started", torch.zeros((), dtype=torch.bool))

    def regulariser(self) -> Tensor | None:
        """A term added to the loss (EATA's Fisher penalty); none for ETA."""
        return None

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        logits = self.student(batch["x"])
        sel = eata_filter(logits, self.probs, self.probs_started, self.e0, self.cfg.d_margin,
                          self.cfg.prob_momentum)
        with torch.no_grad():
            self.probs.copy_(sel.probs)
            self.probs_started.copy_(sel.started)
        loss = sel.loss()
        out = {"logits": logits.detach(), "entropy": sel.entropy.detach().mean(),
               "reliable": sel.reliable.float().mean(), "kept": sel.kept.float().mean(),
               "backward_samples": sel.count.float()}
        reg = self.regulariser()
        if reg is not None:
            out["ewc"] = reg.detach()
            loss = loss + reg
        return {**out, "loss": loss, "apply": sel.count > 0}  # the reference skips a batch that keeps nothing


@register_method("eata")
class EATA(ETA):
    """EATA: :class:`ETA` plus an anti-forgetting penalty ``fisher_alpha * sum_k F_k (theta_k - theta_k^0)^2``
    over the trained BN affine parameters, ``theta^0`` their source values (Niu et al., "Efficient
    Test-Time Model Adaptation without Forgetting", ICML 2022, Eqns. 8-9; mr-eggplant/EATA ``main.py``,
    ``eata.py``).

    ``F`` is computed once, in :meth:`on_source`, by :func:`fisher_information` on ``fisher_samples``
    (2000) images of the source run's training split (a seeded random subset), in batches of
    ``fisher_batch_size``, with the network's own predictions as labels, as the official code does. The
    official code's Fisher batch is its test batch (64 there, 200 in the benchmark); the default here
    (128) is the adaptation runner's default test batch. ``fisher_alpha`` is the paper's 2000 (its ImageNet
    code, and the benchmark's global default). The benchmark's CIFAR-10-C config uses 1.0; on a ResNet-8
    adapting to ``fmnist_c`` the Fisher entries of a 128-image batch are so small that 1.0 makes the penalty
    about 1e-5 of the entropy loss and EATA's predictions equal ETA's, while 2000 weighs it at 1e-3 to
    1e-2. ``fisher_alpha: 0`` is ETA. A source run whose training split the runner cannot read stops with a
    :class:`~mentor.errors.ConfigError`.
    """

    @rules(fisher_alpha=NON_NEGATIVE, fisher_samples=COUNT, fisher_batch_size=COUNT, fisher_seed=SEED)
    @dataclass
    class Config(ETA.Config):
        fisher_alpha: float = 2000.0
        fisher_samples: int = 2000
        fisher_batch_size: int = 128
        fisher_seed: int = 0

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.ewc = nn.Module()  # per trained parameter: its Fisher information and its source value
        for i, p in enumerate(self.trained()):
            self.ewc.register_buffer(f"fisher{i}", torch.zeros_like(p, dtype=torch.float32))
            self.ewc.register_buffer(f"anchor{i}", p.detach().clone())

    def fisher(self) -> list[Tensor]:
        n = len(self.trained())
        return [getattr(self.ewc, f"fisher{i}") for i in range(n)]

    def anchors(self) -> list[Tensor]:
        n = len(self.trained())
        return [getattr(self.ewc, f"anchor{i}") for i in range(n)]

    def regulariser(self) -> Tensor | None:
        if self.cfg.fisher_alpha == 0:
            return None
        terms = [(f * (p.float() - a.float()).square()).sum()
                 for f, p, a in zip(self.fisher(), self.trained(), self.anchors())]
        return self.cfg.fisher_alpha * torch.stack(terms).sum()

    def on_source(self, source: Refresh) -> None:
        if self.cfg.fisher_alpha == 0:
            return
        split = source.labeled
        name = self.method_name or type(self).__name__
        if split is None or not hasattr(split, "subset"):
            raise ConfigError(f"method {name} computes its Fisher regulariser on images of the source run's "
                              "training split, which the adaptation runner cannot read for this run; use "
                              f"method.name=eta, or method.fisher_alpha=0")
        n = min(self.cfg.fisher_samples, len(split))
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.cfg.fisher_seed))
        subset = split.subset(order[:n])
        ev = dataclasses.replace(source.evaluator, batch_size=self.cfg.fisher_batch_size)
        params = self.trained()
        fisher = fisher_information(self.student, params, (x for x, _ in ev.batches(subset)), ev.run)
        with torch.no_grad():
            for f, a, value, p in zip(self.fisher(), self.anchors(), fisher, params):
                f.copy_(value)
                a.copy_(p)


__all__ = ["EATA", "ETA", "EATAFilter", "eata_filter", "fisher_information"]
