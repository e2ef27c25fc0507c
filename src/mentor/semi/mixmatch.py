"""MixMatch: sharpened label guesses on K views, then MixUp across labelled and unlabelled data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, PROBABILITY, rules
from ..methods import BuildInfo, Inputs, Method, MethodConfig, StepContext, register_method
from ..nn import frozen_bn_stats, ramp, train_accuracy
from ..nn.mixing import mixup, sharpen, step_generator


@register_method("mixmatch")
class MixMatch(Method):
    """Berthelot, Carlini, Goodfellow, Papernot, Oliver & Raffel, "MixMatch: A Holistic Approach to
    Semi-Supervised Learning", NeurIPS 2019, in the form of USB's ``mixmatch`` algorithm.

    1. Label guess: ``q = sharpen(mean_k softmax(f(u_k)), T)`` over K = 2 weak views of the unlabelled
       batch (``u_weak``, ``u_weak_1``), no gradient, BN running statistics untouched.
    2. MixUp (:func:`~mentor.nn.mixing.mixup`) of ``[x, u_1, u_2]`` with targets ``[onehot(y), q, q]``
       against one shuffled copy of the whole concatenation, ``lam' = max(lam, 1 - lam)``,
       ``lam ~ Beta(alpha, alpha)`` once per batch (USB; ``mixup_per_sample: true`` draws one per
       image, as the authors' TensorFlow code does).
    3. ``loss = mean_b CE(f(x'), y') + lambda_u * w(step) * mean_{b,c} (softmax(f(u')) - q')^2`` over
       the mixed labelled rows and the mixed unlabelled rows, with ``w`` a linear ramp over the first
       ``unsup_warmup`` fraction of training.

    The mixed batch goes through the network in one forward pass, so BN normalises with the statistics
    of all of it; the reference code forwards it in batch-sized chunks, interleaved so that each chunk
    holds labelled and unlabelled rows alike, and updates the running statistics on the first chunk
    only. K is 2 (the paper's value; the authors' code asserts it). Defaults: ``temperature`` 0.5,
    ``mixup_alpha`` 0.5 (USB and the authors' code), ``lambda_u`` 100 (the authors' default, USB's for
    datasets other than CIFAR: 75 on CIFAR-10, 150 on CIFAR-100), ``unsup_warmup`` 0.4 (USB's
    classic-CV configuration; the authors ramp over 1/64 of training).
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "weak"))

    @rules(lambda_u=NON_NEGATIVE, unsup_warmup=PROBABILITY.because("a share of trainer.max_steps"),
           temperature=POSITIVE, mixup_alpha=POSITIVE)
    @dataclass
    class Config(MethodConfig):
        lambda_u: float = 100.0
        unsup_warmup: float = 0.4
        temperature: float = 0.5
        mixup_alpha: float = 0.5
        mixup_per_sample: bool = False

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        # Drawn from the global generator the engine seeds with trainer.seed before building the method.
        self.seed = int(torch.randint(2**62, ()).item())

    def guess(self, views: list[Tensor]) -> Tensor:
        """The sharpened mean class distribution of the views (no gradient, BN statistics untouched)."""
        with torch.no_grad(), frozen_bn_stats(self.student):
            mean = torch.stack([self.student(v).float().softmax(1) for v in views]).mean(0)
        return sharpen(mean, self.cfg.temperature)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        x, y, views = batch["x"], batch["y"], [batch["u_weak"], batch["u_weak_1"]]
        q = self.guess(views)
        ctx.pseudo_labels(q.argmax(1))
        n = x.shape[0]
        targets = torch.cat([F.one_hot(y, q.shape[1]).float(), *([q] * len(views))])
        mixed = mixup(torch.cat([x, *views]), targets, c.mixup_alpha, step_generator(ctx.step, self.seed, x.device),
                      per_sample=c.mixup_per_sample)
        logits = self.student(mixed.x).float()
        sup = -(mixed.y[:n] * logits[:n].log_softmax(1)).sum(1).mean()
        unsup = (logits[n:].softmax(1) - mixed.y[n:]).square().mean()
        weight = ramp(ctx.step, c.unsup_warmup * ctx.max_steps)
        # Accuracy on the mixed labelled rows: lam' >= 0.5 keeps each row's own label the largest.
        return {"loss": sup + c.lambda_u * weight * unsup, "sup": sup.detach(), "unsup": unsup.detach(),
                "train_acc": train_accuracy(logits[:n], y)}


__all__ = ["MixMatch"]
