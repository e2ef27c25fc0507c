"""RDA: a main and a complementary classifier whose unlabelled distributions align each other, with no
confidence threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, rules
from ..methods import StepContext, register_method
from ..models.penultimate import PenultimateTap
from ..nn.distalign import DistAlignQueue, reciprocal_alignment
from ..nn.mixing import step_generator
from .fixmatch import FixMatch, Logits, SemiConfig


def complementary_labels(y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A class other than ``y`` for each label, uniformly among the ``C - 1`` others: ``(y + r) mod C``
    with ``r`` drawn uniformly from ``1 .. C-1`` (one draw per label, no loop, no host read)."""
    r = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y + r) % num_classes


@register_method("rda")
class RDA(FixMatch):
    """Duan, Qi, Wang, Zhou & Shi, "RDA: Reciprocal Distribution Alignment for Robust Semi-supervised
    Learning", ECCV 2022, as its official code (``NJUyued/RDA4RobustSSL``) computes it.

    Beside the student's classifier ``f`` a complementary classifier ``g`` (one linear layer on the
    student's penultimate features ``h``, the input of its ``fc``) learns from complementary labels
    ``y_bar`` (:func:`complementary_labels`: a class the image is not). Two queues of the last ``queue_len``
    batch means, ``D`` of ``p = softmax(f(u_w))`` and ``D_bar`` of ``q = softmax(g(h_w))`` (started
    all-ones as in the reference; :class:`~mentor.nn.distalign.DistAlignQueue`), take the batch first;
    then the reciprocal alignment (:func:`~mentor.nn.distalign.reciprocal_alignment`) aligns each
    classifier's distribution with the complement of the other's, giving ``p'`` and ``q'``::

        loss = CE(x, y) + CE(g(h_x), y_bar) + lambda_u * (L_cd + L_ca)
        L_cd = mean_b CE(z_s,b, argmax p'_b)          (no threshold: every unlabelled image)
        L_ca = mean_b H(q'_b, g(h_s,b))

    Hyper-parameter free (no confidence threshold); ``lambda_u`` 1 and ``queue_len`` 128 are the official
    code's. Gradients as in the reference: ``CE(g(h_x), y_bar)`` and ``L_ca`` train ``g`` and, through the
    features, the encoder; ``p`` and ``q`` are detached.

    ``normalize`` (default ``batch``, the reference's): ``N(x) = x / sum(x)`` over the whole unlabelled
    batch, so each row of ``q'`` sums to about ``1 / (mu B)`` and ``L_ca`` is scaled down by the batch size
    against a per-image distribution; ``row`` normalises each image's ``p'`` and ``q'`` to sum 1
    (``argmax p'``, hence ``L_cd``, is the same either way). Deviations from the reference: the
    complementary labels are drawn on the device (``(y + r) mod C``, the same distribution as its
    per-label ``np.random.choice``) from a generator seeded by (run seed, step), so a resumed run draws
    them again; the queues are buffers (checkpointed; the reference keeps them in local variables that a
    resumed run restarts); the batch means and the ``batch`` normalisation are over the global batch
    under DDP (the reference recommends one GPU).
    """

    @rules(queue_len=COUNT)
    @dataclass
    class Config(SemiConfig):
        queue_len: int = 128
        normalize: Literal["batch", "row"] = "batch"

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.tap = PenultimateTap(student)
        self.comp = nn.Linear(self.tap.num_features, info.num_classes)
        self.queue_main = DistAlignQueue(info.num_classes, cfg.queue_len, init=1.0)
        self.queue_comp = DistAlignQueue(info.num_classes, cfg.queue_len, init=1.0)
        # Drawn from the global generator the engine seeds with trainer.seed before building the method.
        self.seed = int(torch.randint(2**62, ()).item())

    def build_masker(self) -> None:
        return None  # no threshold

    def forward_views(self, batch: dict[str, Tensor]) -> Logits:
        inputs = self.views(batch)
        sizes = [v.shape[0] for v in inputs.values()]
        features, logits = self.tap(torch.cat(list(inputs.values())))
        z = dict(zip(inputs, logits.split(sizes)))
        for name, g in zip(inputs, self.comp(features).split(sizes)):
            z[f"comp_{name}"] = g
        return z

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        q = z["comp_u_weak"].detach().float().softmax(1)
        self.queue_main.push(probs)
        self.queue_comp.push(q)
        p_al, z["comp_target"] = reciprocal_alignment(probs, q, self.queue_main.queue, self.queue_comp.queue,
                                                      self.cfg.normalize)  # q' is L_ca's target
        return p_al

    def mask(self, probs: Tensor, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        return torch.ones_like(probs[:, 0])

    def targets(self, probs: Tensor, raw: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        return probs.argmax(1)

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        gen = step_generator(ctx.step, self.seed, batch["y"].device)
        y_bar = complementary_labels(batch["y"], self.info.num_classes, gen)
        comp = F.cross_entropy(z["comp_x"].float(), y_bar)
        ca = -(z["comp_target"] * z["comp_u_strong"].float().log_softmax(1)).sum(1).mean()
        return {"comp": (1.0, comp), "unsup_ca": (self.cfg.lambda_u, ca)}


__all__ = ["RDA", "complementary_labels"]
