"""FixMatch, and the base of the confidence-threshold family (FlexMatch, FreeMatch, SoftMatch, Dash, UDA,
AdaMatch, DeFixMatch): one forward, a weak-view pseudo-label, a mask, a strong-view loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, Rule, rules
from ..methods import Inputs, StepContext, register_method
from ..methods.supervised import Supervised
from ..nn import FixedThreshold, train_accuracy
from ..nn.masking import MASKERS, apply_masker, named_masker

Logits = dict[str, Tensor]


@rules(lambda_u=NON_NEGATIVE,
       masker=Rule(lambda v: v in ("", *MASKERS), f"one of {', '.join(MASKERS)}, or empty for the method's own"))
@dataclass
class SemiConfig(Supervised.Config):
    """What every method of the family has: the weight of the unlabelled loss, and ``masker``: empty for the
    method's own confidence mask, or the name of another (``fixed``, ``flexmatch``, ``freematch``,
    ``softmatch``: :func:`mentor.nn.masking.named_masker`) to compose it with the method's other parts."""

    lambda_u: float = 1.0
    masker: str = ""


@rules(T=POSITIVE)
@dataclass
class TargetConfig(SemiConfig):
    """Pseudo-labels: hard (``argmax``) or sharpened with temperature ``T`` (USB's ``hard_label``, ``T``)."""

    T: float = 0.5
    hard_label: bool = True


@register_method("fixmatch")
class FixMatch(Supervised):
    """Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence",
    NeurIPS 2020, in the form of USB's ``fixmatch`` algorithm.

    One forward over ``cat(x_weak, u_weak, u_strong)`` (USB's ``use_cat``: BatchNorm sees the whole
    batch), then ``loss = CE(labelled) + lambda_u * mean_b[mask_b * CE(z_strong_b, target_b)]`` with
    the target taken from the detached weak-view probabilities ``p``: ``argmax p`` (``hard_label``) or
    ``softmax(log p / T)`` (= ``softmax(z_weak / T)``), ``mask_b = 1[max p_b >= p_cutoff]``, and the mean
    over all ``mu * B`` unlabelled images. Defaults are the paper's and USB's: ``p_cutoff`` 0.95,
    ``lambda_u`` 1, ``T`` 0.5 (used only with soft labels).

    The family's methods override small hooks, each seeing the logits of every view by name
    (``x``, ``u_weak``, ``u_strong``, plus those :meth:`views` adds):

    - :meth:`views`: the inputs of the one forward;
    - :meth:`supervised`: the labelled loss;
    - :meth:`align`: the weak probabilities the mask and targets use (distribution alignment);
    - :meth:`mask`: one weight in [0, 1] per unlabelled image;
    - :meth:`targets`: the pseudo-labels (class indices or distributions);
    - :meth:`unsup_weight`: a step-dependent factor of ``lambda_u``;
    - :meth:`extra_terms`: further weighted losses (FreeMatch's fairness, DeFixMatch's debiasing).
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "strong"))

    @rules(p_cutoff=PROBABILITY)
    @dataclass
    class Config(TargetConfig):
        p_cutoff: float = 0.95

    #: other parts of the method read its own masker's state (FreeMatch's fairness term, Dash's loss record),
    #: so ``method.masker`` cannot replace it
    keeps_own_masker: ClassVar[bool] = False

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        if cfg.masker and self.keeps_own_masker:
            raise ConfigError(f"method.masker={cfg.masker}: method {cfg.name} reads the state of its own masker "
                              "elsewhere in its loss, so another cannot replace it; leave method.masker empty, or "
                              f"use fixmatch with method.masker={cfg.masker}")
        if cfg.masker:
            if cfg.masker == "flexmatch" and info.unlabeled_size < 1:
                raise ConfigError("method.masker=flexmatch keeps one prediction per unlabelled image: it needs the "
                                  "unlabelled pool's size (the engine sets it)")
            self.masker = named_masker(cfg.masker, info.num_classes, max(1, info.unlabeled_size),
                                       getattr(cfg, "p_cutoff", 0.95))
        else:
            self.masker = self.build_masker()

    def build_masker(self) -> torch.nn.Module | None:
        """The stateful (or not) masker, a sub-module so its state is checkpointed."""
        return FixedThreshold(self.cfg.p_cutoff)

    # -- hooks -----------------------------------------------------------------------------------------
    def views(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"x": batch["x"], "u_weak": batch["u_weak"], "u_strong": batch["u_strong"]}

    def supervised(self, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        return F.cross_entropy(z["x"].float(), batch["y"], label_smoothing=self.cfg.label_smoothing)

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        return probs

    def mask(self, probs: Tensor, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        return self.masker(probs)

    def targets(self, probs: Tensor, raw: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        """Pseudo-labels from the (aligned) probabilities ``probs``; ``raw`` are the unaligned ones."""
        return hard_or_soft(probs, self.cfg.hard_label, self.cfg.T)

    def unsup_weight(self, ctx: StepContext) -> float | Tensor:
        return 1.0

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        return {}

    # -- the step --------------------------------------------------------------------------------------
    def forward_views(self, batch: dict[str, Tensor]) -> Logits:
        inputs = self.views(batch)
        logits = self.student(torch.cat(list(inputs.values())))
        return dict(zip(inputs, logits.split([v.shape[0] for v in inputs.values()])))

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        z = self.forward_views(batch)
        sup = self.supervised(z, batch, ctx)
        raw = z["u_weak"].detach().float().softmax(1)
        probs = self.align(raw, z, ctx)
        mask = apply_masker(self.masker, probs, batch["u_index"]) if c.masker else self.mask(probs, z, batch, ctx)
        target = self.targets(probs, raw, z, ctx)
        ctx.pseudo_labels(target if target.dim() == 1 else target.argmax(1), mask)
        unsup = (F.cross_entropy(z["u_strong"].float(), target, reduction="none") * mask).mean()
        loss = sup + c.lambda_u * self.unsup_weight(ctx) * unsup
        out = {"sup": sup.detach(), "unsup": unsup.detach()}
        for name, (weight, value) in self.extra_terms(z, mask, batch, ctx).items():
            loss = loss + weight * value
            out[name] = value.detach()
        return {"loss": loss, **out, "train_acc": train_accuracy(z["x"], batch["y"])}


def hard_or_soft(probs: Tensor, hard: bool, T: float) -> Tensor:
    """``argmax p`` (class indices), or the sharpened distribution ``softmax(log p / T)``."""
    if hard:
        return probs.argmax(1)
    return sharpen_logits(probs.clamp(min=1e-30).log(), T)


def sharpen_logits(logits: Tensor, T: float) -> Tensor:
    """``softmax(z / T)``, computed as ``softmax((z - max z) / T)`` with the top logit's ``0 / T`` kept at 0,
    so that a ``T`` too small for the dtype gives the one-hot limit rather than NaN."""
    shifted = logits - logits.max(1, keepdim=True).values
    return F.softmax(torch.where(shifted == 0, torch.zeros_like(shifted), shifted / T), dim=1)


__all__ = ["FixMatch", "SemiConfig", "TargetConfig", "hard_or_soft", "sharpen_logits"]
