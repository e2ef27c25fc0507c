"""SWAD: a dense, every-step average of the student's weights over the loss valley that the validation loss marks
out (or over a fixed window), deployed with BatchNorm statistics recomputed for the averaged weights. Also the BN
recompute that Lookahead's slow weights use."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, between, rules
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


Window = Literal["valley", "fixed"]


@register_method("swad")
class SWAD(ERM):
    """Cha et al., "SWAD: Domain Generalization by Seeking Flat Minima", NeurIPS 2021, in the form of its code
    (khanrc/swad: ``domainbed/swad.py`` ``LossValley``, ``domainbed/lib/swa_utils.py``, ``domainbed/trainer.py``).

    The student trains with ERM's loss; what is deployed is a dense average of its weights (every step's) over a
    range of steps, ``averaged``, a frozen copy of the student whose BN statistics :meth:`before_eval` recomputes
    for the averaged weights before every evaluation, on fixed training batches (:func:`recompute_bn`,
    :func:`bn_batches`: ``bn_images`` images in batches of ``bn_batch_size``). ``val_acc_online`` reports the
    student. ``window`` chooses the range.

    **window "valley"** (default; the code's ``swad: LossValley``). The steps between two evaluations form a
    *segment*: after every step :meth:`after_step` folds the student's parameters into the segment's running mean
    (``segment``, ``segment_steps``; ``lerp`` by ``1 / (n + 1)``, no host synchronisation), the code's
    ``swad_algorithm``. Before every evaluation (:meth:`record_segment`) the segment closes with the student's
    validation loss at that step (mean cross-entropy over the validation split, student in eval mode: the code
    records ``tr_outloss`` of the trained network, not of the segment's average) and goes into a ring of the last
    ``max(n_converge, n_tolerance)`` segments (weights, loss, steps, end step): the code's converge queue is its
    newest ``n_converge`` entries, its tolerance queue the newest ``n_tolerance``. Then:

    - *convergence*: the first time the oldest segment ``c`` of the converge queue has its smallest loss (the first
      of equal ones, ``np.argmin``), the threshold becomes ``(1 + tolerance_ratio)`` times the mean loss of the
      converge queue and the valley average starts with ``c``; before ``c`` it takes the segments of the tolerance
      queue whose own loss, whose predecessor's loss (the loss at the segment's start) and the loss of every
      segment up to ``c`` are within the threshold (the code's backward search, which never takes the queue's
      oldest entry: its predecessor has left the queue); after ``c``, when ``n_tolerance < n_converge``, the
      segments of the converge queue older than the tolerance queue's head;
    - *in the valley*: at every later evaluation whose tolerance-queue head is ``c`` or newer, if the smallest loss
      of the tolerance queue exceeds the threshold the valley is dead and averaging stops for good (the code also
      stops training; here the student trains on, reported as ``val_acc_online``); otherwise the head joins the
      average (a segment joins once its ``n_tolerance`` losses from it onwards are known and not all above the
      threshold).

    The valley average (``valley``, ``n_averaged`` its steps) weighs every segment by its number of steps, so it
    is the mean of the weights after every step from its first segment's first step (``valley_start``) to its last
    segment's last (``valley_end``): the paper's ``theta_SWAD = mean_{t_s <= i <= t_e} theta_i``. The deployed
    weights at an evaluation are what the code's ``get_final_model`` would return if training ended there: before
    any segment the student; before convergence the newest segment's average (the code's ``converge_Q[-1]``);
    after it the valley average, extended (unless the valley is dead; without changing the state) by the segments
    after its newest one, in order, while the smallest loss from each of them to the newest segment stays within
    the threshold. All the state (segment, ring, valley average, threshold, flags) is registered buffers, and the rule
    is a deterministic function of it, so a resumed run is exact.

    Defaults: ``n_converge`` 3, ``n_tolerance`` 6, ``tolerance_ratio`` 0.3 (the code's ``config.yaml``, for every
    dataset; its README runs VLCS with 0.2). The segments' length is ``trainer.eval_every`` (the code's
    ``checkpoint_freq``: 100 for PACS, OfficeHome and TerraIncognita, 50 for VLCS, 500 for DomainNet).

    As the code: the per-step segment averages, the two queues, the convergence test, the threshold, the backward
    search, the tolerance rule, the dead valley, the final step's extension and what is deployed before convergence.
    Differences from the code: (1) its ``AveragedModel`` counts every segment once, whatever its length; here a
    segment weighs its step count (the same for segments of equal length; the code's first segment is its step 0
    alone, and here a run's last one is shorter when ``trainer.max_steps`` is not a multiple of
    ``trainer.eval_every``). (2) every segment joins at most once, and ``c`` always: the code starts its average
    from a copy of ``c`` that counts zero times (the next update overwrites it), so it takes ``c`` twice when
    ``n_tolerance > n_converge`` (again when ``c`` reaches the tolerance queue's head) and otherwise drops it as
    soon as another segment joins. Where the tolerance queue is not yet full at convergence, the code's backward
    search also takes segments newer than ``c`` at once (here they join by the tolerance rule) and it adds the
    queue's oldest again at each evaluation until the queue fills; and in the ``n_tolerance - n_converge``
    evaluations after convergence its final step would take back the segments older than ``c`` that the backward
    search left out (here they stay out). Apart from these, the segments chosen are the code's
    (``test_generalize_flat.py`` compares them with a rewrite of ``LossValley``). (3) the validation loss is the
    mean over the pooled validation split (the code averages each training domain's mean: the same for holdout parts
    of equal size). (4) the code recomputes BN once, after training, on 500 training minibatches (and only when BN
    is not frozen; its defaults freeze it); here before every evaluation on ``bn_images`` images. (5) the code also
    evaluates at step 0; the engine's first evaluation follows step ``eval_every``.

    **window "fixed"**: the steps ``s`` with ``floor(start_fraction T) <= s < ceil(end_fraction T)`` (``T =
    trainer.max_steps``; at least one step), defaults 0.5 and 1.0 (a design choice), averaged into ``averaged``
    inside the step (``avg <- avg + (theta - avg) / (n + 1)``, ``n_averaged`` the count so far, ``torch.where`` on
    the step number); before the window the copy follows the student, after it the copy stays; its buffers are
    copied from the student every step. No validation data is read.
    """

    @rules(start_fraction=between(0, 1, hi_open=True), end_fraction=between(0, 1, lo_open=True), bn_images=COUNT,
           bn_batch_size=COUNT, n_converge=COUNT, n_tolerance=COUNT, tolerance_ratio=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        window: Window = "valley"
        n_converge: int = 3
        n_tolerance: int = 6
        tolerance_ratio: float = 0.3
        start_fraction: float = 0.5
        end_fraction: float = 1.0
        bn_images: int = 4096
        bn_batch_size: int = 128

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if cfg.window not in ("valley", "fixed"):
            raise ConfigError(f"method swad: window={cfg.window!r} is not a window rule; set method.window to "
                              "valley (the loss-valley rule of SWAD's code, the default) or fixed "
                              "(start_fraction..end_fraction of training)")
        if cfg.window == "fixed" and cfg.start_fraction >= cfg.end_fraction:
            raise ConfigError(f"method swad averages the steps from start_fraction to end_fraction of training; "
                              f"start_fraction={cfg.start_fraction} is not below end_fraction={cfg.end_fraction}. "
                              "Set method.start_fraction < method.end_fraction (defaults 0.5 and 1.0)")
        self.averaged = frozen_copy(student)
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))
        if cfg.window == "valley":
            params = list(student.parameters())
            size = sum(p.numel() for p in params)
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
            ring = max(cfg.n_converge, cfg.n_tolerance)
            long = {"dtype": torch.long}
            self.register_buffer("segment", torch.zeros(size, dtype=dtype))
            self.register_buffer("segment_steps", torch.zeros((), **long))
            self.register_buffer("segment_end", torch.zeros((), **long))
            self.register_buffer("recent", torch.zeros(ring, size, dtype=dtype))
            self.register_buffer("recent_loss", torch.zeros(ring, dtype=torch.float64))
            self.register_buffer("recent_steps", torch.zeros(ring, **long))
            self.register_buffer("recent_end", torch.zeros(ring, **long))
            self.register_buffer("segments", torch.zeros((), **long))
            self.register_buffer("converged", torch.full((), -1, **long))  # the segment c where the valley starts
            self.register_buffer("joined", torch.full((), -1, **long))  # the newest segment in the valley average
            self.register_buffer("dead", torch.zeros((), dtype=torch.bool))
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))  # set at convergence
            self.register_buffer("valley", torch.zeros(size, dtype=dtype))
            self.register_buffer("valley_start", torch.full((), -1, **long))
            self.register_buffer("valley_end", torch.full((), -1, **long))

    # -- the fixed window ----------------------------------------------------------------------------------------
    def window(self, max_steps: int) -> tuple[int, int]:
        """``[start, end)``: the steps whose weights the fixed window averages, for a run of ``max_steps`` steps."""
        start = math.floor(self.cfg.start_fraction * max_steps)
        return start, max(start + 1, math.ceil(self.cfg.end_fraction * max_steps))

    # -- every step ----------------------------------------------------------------------------------------------
    def _views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` (one value per parameter element of the student, in its parameter order) as one view per
        parameter, shaped like it."""
        out, offset = [], 0
        for p in self.student.parameters():
            out.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        if self.cfg.window == "valley":
            n = self.segment_steps
            weight = (1.0 / (n + 1).double()).to(self.segment.dtype)  # 1 at a segment's first step: a copy
            for avg, p in zip(self._views(self.segment), self.student.parameters()):
                avg.lerp_(p.detach().to(avg.dtype), weight)
            n.add_(1)
            self.segment_end.copy_(step_tensor(ctx.step, n.device) + 1)
            return
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

    # -- the loss valley (on the host, before every evaluation) --------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, refresh: Refresh) -> float:
        """The student's mean cross-entropy over the whole validation split (eval mode, the run's autocast),
        summed over ranks."""
        val, ev = refresh.val, refresh.evaluator
        if val is None or len(val) == 0:
            raise ConfigError("method swad with window=valley reads the validation loss before every evaluation, "
                              "but this run has no validation images; give the training domains a holdout part "
                              "(data.holdout_fraction, default 0.2) or set method.window=fixed")
        total = torch.zeros((), dtype=torch.float64, device=ev.device)
        was_training = self.student.training
        self.student.eval()
        try:
            for x, y in ev.batches(val):
                total += F.cross_entropy(ev.run(self.student, x).float(), y, reduction="sum").double()
        finally:
            self.student.train(was_training)
        return ev.total(total).item() / len(val)

    def _join(self, i: int) -> None:
        """Fold segment ``i`` (in the ring) into the valley average, weighted by its steps."""
        slot = i % self.recent.shape[0]
        steps = self.recent_steps[slot]
        if self.n_averaged.item() == 0:
            self.valley_start.copy_(self.recent_end[slot] - steps)
        self.n_averaged.add_(steps)
        self.valley.lerp_(self.recent[slot], (steps.double() / self.n_averaged.double()).to(self.valley.dtype))
        self.valley_end.copy_(self.recent_end[slot])
        self.joined.fill_(i)

    @torch.no_grad()
    def record_segment(self, loss: float) -> None:
        """Close the running segment with the validation loss ``loss`` of the student at its end and apply the
        loss-valley rule (see the class docstring). A dead valley takes nothing more."""
        steps = self.segment_steps.item()
        self.segment_steps.zero_()
        if steps == 0 or bool(self.dead):
            return
        ring = self.recent.shape[0]
        k = int(self.segments)
        slot = k % ring
        self.recent[slot].copy_(self.segment)
        self.recent_loss[slot] = loss
        self.recent_steps[slot] = steps
        self.recent_end[slot] = self.segment_end
        self.segments.fill_(k + 1)
        n = k + 1  # segments recorded; the newest is n - 1
        losses = self.recent_loss.tolist()

        def loss_of(i: int) -> float:
            return losses[i % ring]

        n_c, n_t = self.cfg.n_converge, self.cfg.n_tolerance
        head = max(0, n - n_t)  # the tolerance queue's oldest entry
        c = int(self.converged)
        if c < 0:
            if n < n_c:
                return
            window = [loss_of(i) for i in range(n - n_c, n)]
            if min(range(n_c), key=window.__getitem__) != 0:
                return
            c = n - n_c
            threshold = sum(window) / n_c * (1.0 + self.cfg.tolerance_ratio)
            self.converged.fill_(c)
            self.threshold.fill_(threshold)
            above = [i for i in range(head, c) if loss_of(i) > threshold]
            first = min(c, (above[-1] + 2) if above else head + 1)
            for i in range(first, max(c, head) + 1):
                self._join(i)
            return
        if head < c:
            return
        if min(loss_of(i) for i in range(head, n)) > self.threshold.item():
            self.dead.fill_(True)
            return
        if head > int(self.joined):
            self._join(head)

    @torch.no_grad()
    def deployed_weights(self) -> Tensor | None:
        """The flat weights the valley rule deploys now (the class docstring), or None for the student's own."""
        n = int(self.segments)
        ring = self.recent.shape[0]
        if n == 0:
            return None
        if int(self.converged) < 0:
            return self.recent[(n - 1) % ring]
        if bool(self.dead):
            return self.valley
        losses, threshold = self.recent_loss.tolist(), self.threshold.item()
        weights, count = self.valley.clone(), self.n_averaged.item()
        for j in range(int(self.joined) + 1, n):
            if min(losses[i % ring] for i in range(j, n)) > threshold:
                break
            steps = self.recent_steps[j % ring].item()
            count += steps
            weights.lerp_(self.recent[j % ring], steps / count)
        return weights

    @torch.no_grad()
    def _deploy(self, flat: Tensor | None) -> None:
        """Load ``flat`` (None: the student's parameters) and the student's buffers into ``averaged``."""
        sources = self.student.parameters() if flat is None else self._views(flat)
        for p, w in zip(self.averaged.parameters(), sources):
            p.copy_(w)
        for b, s in zip(self.averaged.buffers(), self.student.buffers()):
            b.copy_(s)

    def before_eval(self, refresh: Refresh) -> None:
        if self.cfg.window == "valley":
            if self.segment_steps.item() > 0:
                self.record_segment(self.validation_loss(refresh))
            self._deploy(self.deployed_weights())
        recompute_bn(self.averaged, bn_batches(refresh, self.cfg.bn_images, self.cfg.bn_batch_size))

    def deployable(self) -> nn.Module:
        return self.averaged

    def eval_heads(self) -> dict[str, nn.Module]:
        return {"online": self.student}


__all__ = ["SWAD", "bn_batches", "frozen_copy", "recompute_bn", "step_tensor"]
