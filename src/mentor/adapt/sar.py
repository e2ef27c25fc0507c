"""SAR: sharpness-aware and reliable entropy minimisation with model recovery (Niu et al., "Towards Stable
Test-Time Adaptation in Dynamic Wild World", ICLR 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import DECAY, NON_NEGATIVE, POSITIVE, rules
from ..methods import Phase, StepContext, register_method
from ..nn import entropy
from .tent import Tent, affine_outside, paper_optim

#: SAR's base optimizer (mr-eggplant/SAR ``main.py``: ``SAM(params, torch.optim.SGD, lr, momentum=0.9)``):
#: SGD with momentum, no Nesterov, no weight decay.
SGD = {"name": "sgd", "nesterov": False, "weight_decay": 0.0}


def sam_perturbation(grads: list[Tensor], params: list[Tensor], rho: float, adaptive: bool = False) -> list[Tensor]:
    """SAM's ascent step ``e = rho * g / (||g|| + 1e-12)`` over all ``params`` together (Foret et al., ICLR
    2021; davda54/sam ``first_step``, which SAR uses); ``adaptive`` (ASAM) scales each entry by ``p^2`` and
    measures the norm of ``|p| g``."""
    scaled = [(p.detach().abs() * g) if adaptive else g for g, p in zip(grads, params)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
    scale = rho / (norm + 1e-12)
    return [((p.detach().square() if adaptive else 1.0) * g * scale).to(p.dtype) for g, p in zip(grads, params)]


@register_method("sar")
class SAR(Tent):
    """Niu, Wu, Zhang, Wen, Chen, Zhao & Tan, "Towards Stable Test-Time Adaptation in Dynamic Wild World",
    ICLR 2023 (mr-eggplant/SAR ``sar.py``, ``sam.py``, ``main.py``; mariodoebler/test-time-adaptation
    ``classification/methods/sar.py``).

    Tent's setting (BN layers on test-batch statistics, BN affine parameters trained; as the reference,
    the layers inside ``skip`` stay as they are: ``layer4`` of a ResNet-50, which a three-stage CIFAR
    network does not have). Per test batch:

    1. forward; the predictions scored are these logits (before the update); the reliable samples are
       those with entropy ``H < E0 = e_margin * ln C`` (0.4);
    2. SAM's ascent: the gradient ``g`` of the mean entropy of the reliable samples (by
       ``torch.autograd.grad``) moves the trained parameters in place to ``theta + e``,
       ``e = rho * g / ||g||`` (:func:`sam_perturbation`, ``rho`` 0.05);
    3. a second forward at ``theta + e``; of the reliable samples those still below ``E0`` give the loss
       ``"loss"`` (their mean entropy), which the runner back-propagates and steps on with SGD
       (``lr``, ``momentum`` 0.9, no weight decay);
    4. :meth:`after_step` takes ``e`` back off the stepped parameters, which is SAM's update
       ``theta <- step(theta, g(theta + e))`` exactly for an optimizer whose step does not depend on the
       parameter's value (SGD or Adam without weight decay on these parameters);
    5. model recovery: an exponential moving average (``ema_decay`` 0.9, started at the first value) of the
       second-pass loss, skipped on a batch where no sample is left; when it falls below
       ``reset_constant`` (0.2) every trained parameter and buffer (the moving average included) is put
       back to the source state with ``torch.where``, on the device.

    Learning rate: the reference scales SGD's rate to its ImageNet ResNets as 0.00025 for test batches of
    32 and more (``0.00025 * 2 * batch / 64`` below); the benchmark's CIFAR-10-C config runs SAR with SGD at
    1e-3 (``OPTIM.LR``) and momentum 0.9, which is the default here for 10-class streams. ``lr: null``
    trains with the run's ``optim`` section. ``backward_samples`` counts the samples of both backward
    passes (the reliable ones of the first, the kept ones of the second).

    The reference also resets its optimizer's state (the momentum buffer) on recovery; the runner owns
    the optimizer, so its momentum buffer carries over a recovery here.
    """

    @rules(lr=POSITIVE, momentum=DECAY, rho=NON_NEGATIVE, e_margin=POSITIVE, reset_constant=NON_NEGATIVE,
           ema_decay=DECAY)
    @dataclass
    class Config(Tent.Config):
        lr: float | None = 1e-3
        momentum: float = 0.9
        rho: float = 0.05
        adaptive: bool = False
        e_margin: float = 0.4
        reset_constant: float = 0.2
        ema_decay: float = 0.9
        skip: tuple[str, ...] = ("layer4",)

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.e0 = cfg.e_margin * math.log(info.num_classes)
        self.register_buffer("loss_ema", torch.zeros(()))
        self.register_buffer("ema_started", torch.zeros((), dtype=torch.bool))
        self._perturbation: list[Tensor] | None = None
        self._recover: Tensor | None = None
        self._reset_optimizer: Tensor | None = None
        self.snapshot()  # the source state recovery returns to (the runner takes it again after on_source)

    def adapted_parameters(self) -> list[nn.Parameter]:
        return affine_outside(self.student, tuple(self.cfg.skip))

    def phases(self) -> list[Phase]:
        return [Phase("main", self.trained(),
                      optim=paper_optim({**SGD, "momentum": self.cfg.momentum}, self.cfg.lr))]

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        params = self.trained()
        logits = self.student(x)
        h1 = entropy(logits)
        reliable = h1 < self.e0
        n1 = reliable.sum()
        first = torch.where(reliable, h1, torch.zeros_like(h1)).sum() / n1.clamp(min=1)
        grads = torch.autograd.grad(first, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        e = sam_perturbation(grads, params, self.cfg.rho, self.cfg.adaptive)
        with torch.no_grad():
            torch._foreach_add_(params, e)
        self._perturbation = e
        h2 = entropy(self.student(x))
        kept = reliable & (h2 < self.e0)
        n2 = kept.sum()
        loss = torch.where(kept, h2, torch.zeros_like(h2)).sum() / n2.clamp(min=1)
        with torch.no_grad():
            value = loss.detach()
            moved = torch.where(self.ema_started, self.cfg.ema_decay * self.loss_ema + (1 - self.cfg.ema_decay) * value,
                                value)
            self.loss_ema.copy_(torch.where(n2 > 0, moved, self.loss_ema))
            self.ema_started.copy_(self.ema_started | (n2 > 0))
            self._recover = self.ema_started & (self.loss_ema < self.cfg.reset_constant)
        return {"logits": logits.detach(), "loss": loss, "entropy": h1.detach().mean(),
                "reliable": reliable.float().mean(), "kept": kept.float().mean(), "loss_ema": self.loss_ema.clone(),
                "recovered": self._recover.float(), "backward_samples": (n1 + n2).float()}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)
        if self._perturbation is not None:
            torch._foreach_sub_(self.trained(), self._perturbation)
            self._perturbation = None
        if self._recover is not None:
            self.recover(self._recover)
            self._reset_optimizer, self._recover = self._recover, None

    def optimizer_reset(self) -> Tensor | None:
        """The recovery flag of the step just taken: the runner restarts the optimizer with the weights."""
        flag, self._reset_optimizer = self._reset_optimizer, None
        return flag

    @torch.no_grad()
    def recover(self, flag: Tensor) -> None:
        """Where ``flag`` (0-d bool) holds, put every trained parameter and every buffer back to the
        snapshot (the source state); a no-op elsewhere. No host read."""
        if self._snapshot is None:
            raise RuntimeError("recover() before snapshot()")
        names = {n for n, p in self.named_parameters() if p.requires_grad} | {n for n, _ in self.named_buffers()}
        state = self.state_dict()
        for name in names:
            if name in state and name in self._snapshot:
                t = state[name]
                t.copy_(torch.where(flag, self._snapshot[name].to(t.device), t))


__all__ = ["SAR", "SGD", "sam_perturbation"]
