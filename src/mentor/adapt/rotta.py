"""RoTTA: robust test-time adaptation in changing environments (Yuan, Xie & Li, "Robust Test-Time Adaptation
in Dynamic Scenarios", CVPR 2023)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import COUNT, DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, rules
from ..methods import MethodConfig, Phase, StepContext, register_method
from ..nn import replace_norm
from .base import TestTimeMethod
from .cotta import PixelViews, TTAViews, soft_cross_entropy


class RobustBN(nn.Module):
    """Robust batch normalisation (RBN): normalises with global statistics that follow the test stream.

    In training mode it normalises with ``(1 - alpha) * global + alpha * batch`` (mean and biased variance
    of the batch, with gradient) and makes that mixture the new global statistics; in eval mode it
    normalises with the global statistics. They start from the source BN's running statistics, kept
    under BN's names (``running_mean``, ``running_var``) beside its affine ``weight`` and ``bias``.

    ``mask`` (set by :func:`sample_mask`) limits the batch statistics to the samples it marks, so a
    fixed-size memory bank with empty slots can pass through the network.
    """

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, alpha: float):
        super().__init__()
        self.num_features, self.eps, self.alpha = layer.num_features, layer.eps, alpha
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError("RobustBN needs a BatchNorm layer with running statistics")
        self.register_buffer("running_mean", layer.running_mean.detach().clone())
        self.register_buffer("running_var", layer.running_var.detach().clone())
        affine = layer.weight is not None
        self.weight = nn.Parameter(layer.weight.detach().clone()) if affine else None
        self.bias = nn.Parameter(layer.bias.detach().clone()) if affine else None
        self.mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            dims = (0, *range(2, x.dim()))
            if self.mask is None:
                var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            else:
                w = self.mask.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
                count = (w.sum() * (x[0, 0].numel())).clamp_min(1.0)
                mean = (x * w).sum(dims) / count
                var = ((x - mean.view(shape)).square() * w).sum(dims) / count
            mean = (1 - self.alpha) * self.running_mean + self.alpha * mean
            var = (1 - self.alpha) * self.running_var + self.alpha * var
            self.running_mean.copy_(mean.detach())
            self.running_var.copy_(var.detach())
        else:
            mean, var = self.running_mean, self.running_var
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha={self.alpha}, eps={self.eps}"


@contextlib.contextmanager
def sample_mask(module: nn.Module, mask: Tensor) -> Iterator[None]:
    """Every :class:`RobustBN` of ``module`` takes its batch statistics over the samples ``mask`` marks."""
    layers = [m for m in module.modules() if isinstance(m, RobustBN)]
    for m in layers:
        m.mask = mask
    try:
        yield
    finally:
        for m in layers:
            m.mask = None


class CategoryBalancedMemory(nn.Module):
    """RoTTA's category-balanced sampling with timeliness and uncertainty (CSTU), in fixed-size tensors.

    ``capacity`` slots hold an image, its pseudo-label, its uncertainty (entropy) and its age. A sample of
    class ``c`` with uncertainty ``u`` scores ``lambda_t * sigmoid(age / capacity) + lambda_u * u / log K``
    (age 0 for a newcomer). It enters a free slot while its class holds fewer than ``capacity / K`` items
    and the bank is not full; else it replaces the highest-scoring item of the majority classes (class
    ``c`` under its quota, the bank full) or of its own class (at or over the quota), when that score is
    above its own, and is dropped otherwise. After each arrival every stored item (the newcomer included)
    ages by one. Samples are inserted one after another as the reference does: :meth:`add` loops over the
    batch with tensor operations only (no value read back to the host).
    """

    def __init__(self, capacity: int, num_classes: int, image_shape: tuple[int, ...], lambda_t: float = 1.0,
                 lambda_u: float = 1.0):
        super().__init__()
        self.capacity, self.num_classes = capacity, num_classes
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.register_buffer("images", torch.zeros(capacity, *image_shape))
        self.register_buffer("labels", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("uncertainty", torch.zeros(capacity))
        self.register_buffer("age", torch.zeros(capacity))
        self.register_buffer("valid", torch.zeros(capacity, dtype=torch.bool))

    def score(self, age: Tensor, uncertainty: Tensor) -> Tensor:
        return (self.lambda_t * torch.sigmoid(age / self.capacity)
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    @torch.no_grad()
    def add(self, images: Tensor, labels: Tensor, uncertainty: Tensor) -> None:
        quota = self.capacity / self.num_classes
        classes = torch.arange(self.num_classes, device=labels.device)
        for i in range(images.shape[0]):  # arrivals in stream order: each depends on the bank the last left
            c, u = labels[i:i + 1], uncertainty[i:i + 1].float()  # [1]: a tensor index, not a host number
            counts = ((self.labels.view(-1, 1) == classes) & self.valid.view(-1, 1)).sum(0)
            under = counts.gather(0, c) < quota
            full = self.valid.sum() >= self.capacity
            majority = counts[self.labels] == counts.max()
            candidates = self.valid & torch.where(under, majority, self.labels == c)
            scores = torch.where(candidates, self.score(self.age, self.uncertainty), float("-inf"))
            best = scores.argmax().view(1)
            direct = under & ~full
            evict = ~direct & (scores.gather(0, best) > self.score(torch.zeros_like(u), u))
            slot = torch.where(direct, (~self.valid).to(torch.uint8).argmax().view(1), best)
            keep = direct | evict
            self.images.index_copy_(0, slot, torch.where(keep.view(1, *(1,) * (images.dim() - 1)),
                                                         images[i:i + 1].to(self.images.dtype), self.images[slot]))
            self.labels.index_copy_(0, slot, torch.where(keep, c, self.labels[slot]))
            self.uncertainty.index_copy_(0, slot, torch.where(keep, u, self.uncertainty[slot]))
            self.age.index_copy_(0, slot, torch.where(keep, torch.zeros_like(self.age[slot]), self.age[slot]))
            self.valid.index_copy_(0, slot, self.valid[slot] | keep)
            self.age.add_(self.valid.to(self.age.dtype))

    def weights(self) -> Tensor:
        """Timeliness weights of the slots, ``exp(-a) / (1 + exp(-a))`` with ``a = age / capacity`` (0 for empty
        slots)."""
        return torch.sigmoid(-self.age / self.capacity) * self.valid


@register_method("rotta")
class RoTTA(TestTimeMethod):
    """Yuan, Xie & Li, "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023 (BIT-DA/RoTTA
    ``core/adapter/rotta.py``, ``core/utils/bn_layers.py``, ``core/utils/memory.py``; mariodoebler/
    test-time-adaptation ``classification/methods/rotta.py``).

    Every BatchNorm becomes a :class:`RobustBN` (global statistics, ``alpha`` 0.05; only its affine
    parameters train). A teacher (an exponential moving average of the student's parameters, ``nu``
    0.001 per update) predicts each batch in eval mode (global statistics): those predictions are scored.
    Its pseudo-labels and entropies send each sample to the :class:`CategoryBalancedMemory` (``memory_size``
    64, ``lambda_t`` = ``lambda_u`` = 1). Once every ``update_frequency`` (64) samples the student learns
    from the bank: the teacher (training mode) on the stored images, the student (training mode) on their
    :class:`~mentor.adapt.cotta.TTAViews` views, loss ``mean_i w_i * CE(softmax(teacher_i), student_i)``
    with the timeliness weights ``w_i``; Adam, lr 1e-3, betas (0.9, 0.999), no weight decay (AdamW with zero
    decay); then :meth:`after_step` moves the teacher's parameters toward the student's. Both networks'
    RBN statistics move in their own training-mode forwards, so the teacher keeps its own (its buffers are
    not copied from the student, as in the reference).

    Design for the device: the bank is fixed-size tensors and empty slots are masked out of the RBN
    statistics and the loss. The update runs after the batch in which the sample count reaches a multiple
    of ``update_frequency`` (the count is known on the host from the batch sizes), on the bank after the
    whole batch has arrived: with the paper's batch of 64 and ``update_frequency`` 64 this is the
    reference's schedule; a batch that crosses several multiples updates once. ``backward_samples`` is
    the number of stored samples an update trains on.
    """

    needs_bn = True

    @rules(memory_size=COUNT, update_frequency=COUNT, nu=PROBABILITY, alpha=PROBABILITY, lambda_t=NON_NEGATIVE,
           lambda_u=NON_NEGATIVE, lr=POSITIVE, beta=DECAY)
    @dataclass
    class Config(MethodConfig):
        memory_size: int = 64
        update_frequency: int = 64
        nu: float = 0.001
        alpha: float = 0.05
        lambda_t: float = 1.0
        lambda_u: float = 1.0
        lr: float = 1e-3
        beta: float = 0.9
        flip: bool = True

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        student.requires_grad_(False)
        replace_norm(student, lambda layer: RobustBN(layer, cfg.alpha))
        self.add_ema_teacher("teacher", "student", 1.0 - cfg.nu)
        self.memory = CategoryBalancedMemory(cfg.memory_size, info.num_classes,
                                             (info.in_channels, info.image_size, info.image_size),
                                             cfg.lambda_t, cfg.lambda_u)
        self.views = PixelViews(TTAViews(flip=cfg.flip), info)
        self.seen = 0  # samples since the last reset (host-side: the batch sizes)

    def trainable(self) -> list[nn.Parameter]:
        return [p for m in self.student.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)
                if p is not None]

    def phases(self) -> list[Phase]:
        return [Phase("main", self.trainable(),
                      optim={"name": "adamw", "lr": self.cfg.lr, "betas": (self.cfg.beta, 0.999), "weight_decay": 0.0})]

    def reset(self) -> None:
        super().reset()
        self.seen = 0

    def deployable(self):
        return self.teacher

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        self.student.eval()
        self.teacher.eval()
        with torch.no_grad():
            logits = self.teacher(x).float()
            p = logits.softmax(1)
            self.memory.add(x.detach(), p.argmax(1), -(p * torch.log(p + 1e-6)).sum(1))
        before, self.seen = self.seen, self.seen + x.shape[0]
        zero = torch.zeros((), device=x.device)
        if before // self.cfg.update_frequency == self.seen // self.cfg.update_frequency:
            return {"logits": logits, "loss": zero, "backward_samples": zero}
        mem = self.memory
        valid = mem.valid.float()
        images = mem.images.to(x.dtype)
        self.student.train()
        self.teacher.train()
        with sample_mask(self.student, valid), sample_mask(self.teacher, valid):
            with torch.no_grad():
                target = self.teacher(images)
            student = self.student(self.views(images, ctx.generator))
        self.student.eval()
        self.teacher.eval()
        count = valid.sum()
        loss = (soft_cross_entropy(student, target) * mem.weights()).sum() / count.clamp_min(1.0)
        return {"logits": logits, "loss": loss, "backward_samples": count}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """The teacher's parameters move toward the student's by ``nu``; its RBN statistics stay its own."""
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()), self.cfg.nu)
