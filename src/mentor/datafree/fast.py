"""Fast: Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022 (zju-vipa/Fast-Datafree,
``datafree/synthesis/fast_meta.py``).

A meta-learned generator replaces the per-round re-initialised one of CMI: each synthesis round starts a
*fast* generator from the *meta* generator, adapts it (and fresh latent codes ``z``) for only ``g_steps``
steps, and adds its lowest-loss batch to the pool; at the round's end the meta generator learns, from the
adaptation, an initialisation from which a few steps suffice. Fast-2/5/10 are the runs with 2, 5 or 10
inner steps (:data:`PRESETS`).

Inner loss (every synthesis step): ``bn * L_BN + oh * CE(T(x), y) + adv * L_adv``, with ``L_BN`` compared
against a 0.9 moving average of earlier rounds' batch statistics (``bn_momentum``), ``y`` random classes and
``L_adv`` the masked adversarial KL (:func:`~mentor.datafree.losses.masked_adversarial_kl`), off during the
``warmup_rounds`` that only fill the pool. The student sees the synthesis images in eval mode, as the
reference does.

Meta update, by ``meta``:

* ``fomaml`` (the reference's ``is_maml=1``): first-order MAML. The gradients of the ``g_steps`` inner
  losses with respect to the fast generator are summed and applied to the meta generator by its own Adam
  (rate ``lr_g * g_steps``, betas ``(beta1, 0.999)``, kept across rounds).
* ``reptile`` (``is_maml=0``): the meta generator's gradient is ``reptile_scale * (theta_meta - theta_fast)``
  (the reference hard-codes the scale 67), applied by the same Adam.

The meta step is the engine's third phase, ``"meta"``, due once per round at the last synthesis step
(after that step's inner update). Its loss is a surrogate whose gradient with respect to the meta
parameters is the meta-gradient (``sum(theta_meta * g.detach())``, shifted to the value 0); the summed inner
gradients are a checkpointed buffer filled by gradient hooks on the fast generator during the synthesis
backward passes (unclipped, per process, as the reference adds ``.grad`` before any clipping).

Defaults: the CIFAR-100 Fast-10 scripts (``scripts/fast_cifar.sh``): batch 256, nz 256, bn 10, oh 0.5,
adv 1.1, bn_mmt 0.9, warm-up 20 rounds, T 20, g_steps 10, lr_g 2e-3, lr_z 0.01, 400 student steps per round
(the student's SGD 0.2, momentum 0.9, wd 1e-4 belongs to the recipe); the first BN layer is not weighted
more (Fast's hooks have no first-layer multiplier). ``reset_l0`` re-initialises the meta generator's first
Linear (N(0, 0.02), zero bias) once, at the start of that round: the scripts' ``--reset_l0 1`` does it at
their 1-based epoch 120 + warm-up, round index 139 here (0 turns it off).

Design choices where the reference differs or is silent: the adversarial term is on from round
``warmup_rounds`` (the reference's 1-based counter switches it on one round before the student starts);
images keep the pool's ring of ``pool_size`` (the reference keeps every image, 56k for 220 rounds).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, Rule, rules
from ..methods import BuildInfo, Phase, StepContext, register_method
from .base import InversionConfig, LatentGeneratorMethod
from .losses import masked_adversarial_kl

#: Fast-k of the paper's tables: inner steps and the synthesiser's rates of the CIFAR-100 scripts
#: (``method.g_steps``, ``method.lr_g``, ``method.lr_z``); Fast-10 is the default.
PRESETS: dict[str, dict[str, Any]] = {
    "fast2": {"g_steps": 2, "lr_g": 5e-3, "lr_z": 0.015},
    "fast5": {"g_steps": 5, "lr_g": 3e-3, "lr_z": 0.01},
    "fast10": {"g_steps": 10, "lr_g": 2e-3, "lr_z": 0.01},
}

META_RULES = ("fomaml", "reptile")


@contextlib.contextmanager
def _evaluating(net: nn.Module) -> Iterator[None]:
    """``net`` in eval mode inside the block (the reference's ``student.eval()`` during synthesis)."""
    mode = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(mode)


@register_method("fast")
class Fast(LatentGeneratorMethod):
    """Fast (Fang et al., AAAI 2022): a meta-learned generator adapted for a few steps per synthesis round;
    the loss, the meta update, the defaults and the design choices are in the module docstring."""

    @rules(meta=Rule(lambda v: v in META_RULES, "fomaml or reptile"), reptile_scale=POSITIVE,
           reset_l0=NON_NEGATIVE)
    @dataclass
    class Config(InversionConfig):
        g_steps: int = 10
        kd_steps: int = 400
        lr_g: float = 2e-3
        lr_z: float = 0.01
        bn: float = 10.0
        bn_momentum: float = 0.9
        oh: float = 0.5
        adv: float = 1.1
        warmup_rounds: int = 20
        meta: str = "fomaml"
        reptile_scale: float = 67.0
        reset_l0: int = 139

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        # ``self.generator`` is the fast generator the synthesis phase adapts; the meta generator starts it.
        self.meta_generator = copy.deepcopy(self.generator)
        fast = list(self.generator.parameters())
        self.register_buffer("meta_grad", torch.zeros(sum(p.numel() for p in fast)))
        if cfg.meta == "fomaml":
            ref = weakref.ref(self)
            start = 0
            for p in fast:
                p.register_hook(self._accumulate(ref, start, p.numel()))
                start += p.numel()

    @staticmethod
    def _accumulate(ref: weakref.ref[Fast], start: int, n: int):
        def hook(grad: Tensor) -> None:
            self = ref()
            if self is not None:
                self.meta_grad[start:start + n].add_(grad.detach().reshape(-1).to(self.meta_grad.dtype))

        return hook

    # -- the loop ----------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        cfg = self.cfg
        synthesis, student = super().phases()
        meta = Phase("meta", list(self.meta_generator.parameters()), every=self.period, offset=cfg.g_steps - 1,
                     optim={**self.phase_adam(), "lr": cfg.lr_g * cfg.g_steps},
                     schedule={"name": "constant", "warmup_steps": 0})
        return [synthesis, meta, student]

    def begin_round(self) -> None:
        """New latent codes; the fast generator (parameters and BN buffers) restarts from the meta generator."""
        with torch.no_grad():
            self.z.normal_()
            for dst, src in zip(self.generator.state_dict().values(), self.meta_generator.state_dict().values()):
                dst.copy_(src)
            self.meta_grad.zero_()

    @torch.no_grad()
    def reset_first_layer(self) -> None:
        """Fast's ``reset_l0``: the meta generator's first Linear from N(0, 0.02), bias 0."""
        nn.init.normal_(self.meta_generator.l1.weight, 0.0, 0.02)
        nn.init.zeros_(self.meta_generator.l1.bias)

    def synthesis_terms(self, x01: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        x = self.view(x01)
        t, bn = self.teacher_bn_loss(x)
        ce = F.cross_entropy(t.float(), self.y)
        if cfg.adv > 0 and not self.in_warmup(int(ctx.step)):
            with _evaluating(self.student):
                adv = masked_adversarial_kl(self.student(x), t)
        else:
            adv = ce.new_zeros(())
        loss = cfg.bn * bn + cfg.oh * ce + cfg.adv * adv
        return {"loss": loss, "bn": bn, "ce": ce, "adv": adv}

    def meta_gradient(self) -> list[Tensor]:
        """The meta generator's gradient, parameter by parameter: the summed inner gradients (FOMAML) or
        ``reptile_scale * (theta_meta - theta_fast)`` (REPTILE)."""
        meta = list(self.meta_generator.parameters())
        if self.cfg.meta == "reptile":
            return [self.cfg.reptile_scale * (p - q).detach() for p, q in zip(meta, self.generator.parameters())]
        out, start = [], 0
        for p in meta:
            out.append(self.meta_grad[start:start + p.numel()].view_as(p))
            start += p.numel()
        return out

    def meta_terms(self) -> dict[str, Tensor]:
        meta = list(self.meta_generator.parameters())
        grads = self.meta_gradient()
        surrogate = torch.stack([(p * g.detach()).sum() for p, g in zip(meta, grads)]).sum()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return {"loss": surrogate - surrogate.detach(), "grad_norm": norm.detach()}

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if ctx.phase == "meta":
            return self.meta_terms()
        if ctx.phase == "synthesis" and self.cfg.reset_l0:
            step = int(ctx.step)
            if step % self.period == 0 and step // self.period == self.cfg.reset_l0:
                self.reset_first_layer()  # before begin_round copies the meta generator
        return super().training_step(batch, ctx)
