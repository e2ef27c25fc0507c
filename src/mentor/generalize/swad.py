"""SWAD: a dense, every-step average of the student's weights along the training trajectory, deployed with
BatchNorm statistics recomputed for the averaged weights. Also the BN recompute that Lookahead's slow weights use."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import COUNT, between, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, Refresh, StepContext, register_method
from ..models.tap import strip_taps
from ..nn.norm import bn_layers
from .erm import ERM

#: the seed of the fixed order in which the BN recompute reads the training images
BN_ORDER_SEED = 0


def bn_batches(refresh: Refresh, images: int, batch_size: int) -> Iterator[Tensor]:
    """The fixed batches a BN recompute reads: ``images`` training images (all, if fewer) taken in one seeded
    random order of the pooled training split (so every training domain is represented), un-augmented, in
    batches of ``batch_size``, normalised with the evaluator's mean and std, on its device. Every rank reads the
    same batches (no sharding), so every rank computes the same statistics."""
    split, ev = refresh.labeled, refresh.evaluator
    if split is None or len(split) == 0:
        return
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(BN_ORDER_SEED))[:images]
    for x, _ in split.subset(order).batches(batch_size):
        x = x.to(ev.device).float().div_(255.0)
        yield (x - ev.mean) / ev.std


@torch.no_grad()
def recompute_bn(net: nn.Module, batches) -> None:
    """Replace the running statistics of every BatchNorm layer of ``net`` by their average over ``batches``: each
    layer's statistics restart (mean 0, variance 1, no batch seen), the layers take a cumulative average
    (``momentum=None``: the mean over batches of each batch's mean and unbiased variance), and ``net`` runs
    forward on every batch in training mode; then momenta and mode are restored. The ``update_bn`` of SWAD's code
    and of ``torch.optim.swa_utils``."""
    layers = bn_layers(net)
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = net.training
    net.train()
    try:
        for x in batches:
            net(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        net.train(was_training)


def frozen_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` that no optimizer trains (no gradients) and that carries none of ``net``'s hooks."""
    return strip_taps(copy.deepcopy(net)).requires_grad_(False)


def step_tensor(step: int | Tensor, device: torch.device) -> Tensor:
    """``ctx.step`` as a 0-d int64 tensor on ``device`` (a captured step's tensor stays where it is)."""
    return torch.as_tensor(step, device=device).long()


@register_method("swad")
class SWAD(ERM):
    """Cha et al., "SWAD: Domain Generalization by Seeking Flat Minima", NeurIPS 2021, in the form of its code
    (khanrc/swad: ``domainbed/lib/swa_utils.py``, ``domainbed/swad.py``, ``domainbed/trainer.py``).

    The student trains with ERM's loss. After every step inside the averaging window, the parameters go into a
    running mean kept in ``averaged``, a frozen copy of the student (``avg <- avg + (theta - avg) / (n + 1)``,
    ``n_averaged`` the count so far: a buffer, checkpointed): the dense stochastic weight average. Before the
    window the copy follows the student; after it, the copy stays. Buffers (BN statistics) are copied from the
    student each step, and before every evaluation :meth:`before_eval` recomputes the copy's BN statistics for the
    averaged weights on fixed training batches (:func:`recompute_bn`, :func:`bn_batches`: ``bn_images`` images in
    batches of ``bn_batch_size``). The deployable is the averaged copy; ``val_acc_online`` reports the student.
    The update runs inside the step with ``torch.where``/``lerp`` on the step number (no host synchronisation).

    Deviation: the code chooses the window from the validation loss it records at every checkpoint (the
    "LossValley" rule: it starts where the loss of the first of ``n_converge`` 3 successive checkpoints is their
    minimum, and ends when the smallest loss of the last ``n_tolerance`` 6 checkpoints exceeds ``1 +
    tolerance_ratio`` (0.3) times the mean loss of those 3), which the method's hooks do not see (the evaluation
    hooks receive the training data, not the validation split). Here the window is fixed in advance: the steps
    ``s`` with ``floor(start_fraction T) <= s < ceil(end_fraction T)`` (``T = trainer.max_steps``; at least one
    step), defaults 0.5 and 1.0 (a design choice). The code runs its BN update for 500 training minibatches
    once, after training (and only when BN is not frozen; its defaults freeze it); here it runs before every
    evaluation.
    """

    @rules(start_fraction=between(0, 1, hi_open=True), end_fraction=between(0, 1, lo_open=True), bn_images=COUNT,
           bn_batch_size=COUNT)
    @dataclass
    class Config(ERM.Config):
        start_fraction: float = 0.5
        end_fraction: float = 1.0
        bn_images: int = 4096
        bn_batch_size: int = 128

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if cfg.start_fraction >= cfg.end_fraction:
            raise ConfigError(f"method swad averages the steps from start_fraction to end_fraction of training; "
                              f"start_fraction={cfg.start_fraction} is not below end_fraction={cfg.end_fraction}. "
                              "Set method.start_fraction < method.end_fraction (defaults 0.5 and 1.0)")
        self.averaged = frozen_copy(student)
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))

    def window(self, max_steps: int) -> tuple[int, int]:
        """``[start, end)``: the steps whose weights are averaged, for a run of ``max_steps`` steps."""
        start = math.floor(self.cfg.start_fraction * max_steps)
        return start, max(start + 1, math.ceil(self.cfg.end_fraction * max_steps))

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        start, end = self.window(ctx.max_steps)
        step = step_tensor(ctx.step, self.n_averaged.device)
        inside = (step >= start) & (step < end)
        n = self.n_averaged
        # in the window: the running mean's weight 1/(n+1); before it (n = 0): follow the student; after: stay
        weight = torch.where(inside, 1.0 / (n + 1).double(), (n == 0).double()).float()
        for avg, p in zip(self.averaged.parameters(), self.student.parameters()):
            avg.lerp_(p.detach(), weight.to(avg.dtype))
        for avg_b, b in zip(self.averaged.buffers(), self.student.buffers()):
            avg_b.copy_(b)
        n.add_(inside.long())

    def before_eval(self, refresh: Refresh) -> None:
        recompute_bn(self.averaged, bn_batches(refresh, self.cfg.bn_images, self.cfg.bn_batch_size))

    def deployable(self) -> nn.Module:
        return self.averaged

    def eval_heads(self) -> dict[str, nn.Module]:
        return {"online": self.student}


__all__ = ["SWAD", "bn_batches", "frozen_copy", "recompute_bn", "step_tensor"]
