"""ReMixMatch: MixMatch with distribution alignment, strong views anchored to a weak one, and rotations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, rules
from ..methods import BuildInfo, Inputs, Method, MethodConfig, Refresh, StepContext, register_method
from ..models import FeatureTap
from ..nn import frozen_bn_stats, ramp, train_accuracy
from ..nn.distalign import DistAlignEMA
from ..nn.mixing import mixup, sharpen, step_generator


def rotate(x: Tensor, k: Tensor) -> Tensor:
    """Image ``i`` of ``x`` ([N, C, H, H]) turned by ``k[i]`` quarter turns counter-clockwise, on the device."""
    turns = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    return turns[k, torch.arange(x.shape[0], device=x.device)]


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``mean_b -sum_c target_bc log softmax(logits)_bc`` (USB's ``ce_loss`` with soft targets)."""
    return -(target * logits.float().log_softmax(1)).sum(1).mean()


@register_method("remixmatch")
class ReMixMatch(Method):
    """Berthelot, Carlini, Cubuk, Kurakin, Sohn, Zhang & Raffel, "ReMixMatch: Semi-Supervised Learning
    with Distribution Matching and Augmentation Anchoring", ICLR 2020, in the form of USB's
    ``remixmatch`` algorithm.

    1. Guess: ``q = sharpen(DA(softmax(f(u_w))), T)`` on the weak view (no gradient, BN statistics
       untouched), with distribution alignment ``DA(p) = Normalize(p * p_target / p_model)``
       (:class:`~mentor.nn.distalign.DistAlignEMA`: ``p_model`` a moving average of the unlabelled
       predictions, ``p_target`` the labelled split's class distribution, set before the first step).
    2. Augmentation anchoring: the guess is the target of two strong views ``u_s0``, ``u_s1`` (USB draws
       2; the paper K = 8 CTAugment views; here the engine's ``strong`` RandAugment view).
    3. MixUp of ``[x, u_s0, u_s1, u_w]`` with targets ``[onehot(y), q, q, q]`` (one shuffle,
       ``lam' = max(lam, 1 - lam)``, ``lam ~ Beta(0.75, 0.75)`` once per batch as in USB).
    4. ``loss = CE(f(x'), y') + w(step) * (lambda_u * CE(f(u'), q') + u1_weight * CE(f(u_s0), q))
       + rot_weight * CE(g(feat(rotate(u_s0, k))), k)``: soft cross-entropies on the mixed rows, the
       un-mixed first strong view, and the rotation ``k`` (a quarter-turn count drawn per image) of
       that view predicted by a linear head ``g`` on the pooled features (the network's ``pool``
       output); ``w`` a linear ramp over the first ``unsup_warmup`` fraction of training.

    Defaults are USB's (its ``get_argument`` and classic-CV configuration): ``lambda_u`` 1.5,
    ``u1_weight`` 0.5 (``kl_loss_ratio``), ``rot_weight`` 0.5, ``unsup_warmup`` 1/64, ``temperature`` 0.5,
    ``mixup_alpha`` 0.75, alignment momentum 0.999. As in :class:`~mentor.semi.mixmatch.MixMatch` the mixed
    batch is one forward pass (USB: batch-sized interleaved chunks, BN statistics from the first); USB's
    extra labelled forward and second strong-view forward, whose outputs its loss does not use, are
    left out. ``rot_weight: 0`` drops the rotation head (and the need for a ``pool`` module).
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "strong", "strong"))

    @rules(lambda_u=NON_NEGATIVE, u1_weight=NON_NEGATIVE, rot_weight=NON_NEGATIVE,
           unsup_warmup=PROBABILITY.because("a share of trainer.max_steps"), temperature=POSITIVE,
           mixup_alpha=POSITIVE, da_momentum=DECAY)
    @dataclass
    class Config(MethodConfig):
        lambda_u: float = 1.5
        u1_weight: float = 0.5
        rot_weight: float = 0.5
        unsup_warmup: float = 1 / 64
        temperature: float = 0.5
        mixup_alpha: float = 0.75
        mixup_per_sample: bool = False
        da_momentum: float = 0.999

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        # Drawn from the global generator the engine seeds with trainer.seed before building the method.
        self.seed = int(torch.randint(2**62, ()).item())
        self.dist_align = DistAlignEMA(info.num_classes, cfg.da_momentum, target="gt",
                                       p_target=torch.ones(info.num_classes))
        self.rot_head: nn.Linear | None = None
        if cfg.rot_weight > 0:
            pool, fc = getattr(student, "pool", None), getattr(student, "fc", None)
            if not isinstance(pool, nn.Module) or not isinstance(fc, nn.Linear):
                raise ConfigError(f"remixmatch's rotation head reads the pooled features of the student, its `pool` "
                                  f"module, and sizes itself by `fc`; {type(student).__name__} has no such modules. "
                                  "Use a zoo network (`mentor list models`) or set method.rot_weight=0")
            self.rot_head = nn.Linear(fc.in_features, 4)
            self._tap = FeatureTap(student, "pool")

    def on_epoch(self, epoch: int, refresh: Refresh) -> None:
        """``p_target``: the class distribution of the labelled split (USB's ``lb_class_dist``)."""
        labels = getattr(refresh.labeled, "labels", None)
        if labels is not None:
            counts = torch.bincount(labels.reshape(-1).cpu(), minlength=self.info.num_classes).double()
            self.dist_align.p_target.copy_(counts / counts.sum())

    def guess(self, u_weak: Tensor) -> Tensor:
        """The aligned, sharpened class distribution of the weak view (no gradient)."""
        with torch.no_grad(), frozen_bn_stats(self.student):
            probs = self.student(u_weak).float().softmax(1)
            return sharpen(self.dist_align(probs), self.cfg.temperature)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        x, y = batch["x"], batch["y"]
        u_w, u_s0, u_s1 = batch["u_weak"], batch["u_strong"], batch["u_strong_1"]
        gen = step_generator(ctx.step, self.seed, x.device)
        q = self.guess(u_w)
        ctx.pseudo_labels(q.argmax(1))
        n = x.shape[0]
        targets = torch.cat([F.one_hot(y, q.shape[1]).float(), q, q, q])
        mixed = mixup(torch.cat([x, u_s0, u_s1, u_w]), targets, c.mixup_alpha, gen, per_sample=c.mixup_per_sample)
        logits = self.student(mixed.x)
        sup = soft_cross_entropy(logits[:n], mixed.y[:n])
        unsup = soft_cross_entropy(logits[n:], mixed.y[n:])
        with frozen_bn_stats(self.student):
            u1 = soft_cross_entropy(self.student(u_s0), q)
        weight = ramp(ctx.step, c.unsup_warmup * ctx.max_steps)
        loss = sup + weight * (c.lambda_u * unsup + c.u1_weight * u1)
        out = {"sup": sup.detach(), "unsup": unsup.detach(), "u1": u1.detach(),
               "train_acc": train_accuracy(logits[:n], y)}
        if self.rot_head is not None:
            k = torch.randint(0, 4, (u_s0.shape[0],), generator=gen, device=x.device)
            with frozen_bn_stats(self.student):
                self.student(rotate(u_s0, k))
            rot = F.cross_entropy(self.rot_head(self._tap["pool"]).float(), k)
            loss = loss + c.rot_weight * rot
            out["rot"] = rot.detach()
        return {"loss": loss, **out}


__all__ = ["ReMixMatch", "rotate", "soft_cross_entropy"]
