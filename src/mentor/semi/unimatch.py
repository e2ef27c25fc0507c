"""UniMatch: FixMatch with two strong image views and a feature-perturbation stream (dropout on the
weak view's features), in a classification form."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NON_NEGATIVE, POSITIVE, between, rules
from ..methods import Inputs, StepContext, register_method
from ..models.penultimate import PenultimateTap
from ..nn.mixing import step_generator
from .fixmatch import FixMatch, Logits


@register_method("unimatch")
class UniMatch(FixMatch):
    """Yang, Qi, Feng, Zhang & Shi, "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
    Segmentation", CVPR 2023 (UniMatch), carried over from segmentation to image classification.

    One weak view ``u_w`` gives the pseudo-label ``y_hat = argmax p``, ``p = softmax(f(u_w))`` (detached),
    and the mask ``m = 1[max p >= p_cutoff]``; it supervises three predictions:

    - two strong views ``u_s1``, ``u_s2`` (independent RandAugment draws, ``u_strong`` and ``u_strong_1``),
      the image-level perturbation stream;
    - the weak view's penultimate features ``h_w`` perturbed by dropout and classified by the same
      classifier, ``z_fp = fc(dropout(h_w))``, the feature-level stream.

    ``loss = scale * [CE(x, y) + lambda_u * (0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp)]`` with
    ``L_v = mean_b m_b CE(z_v,b, y_hat_b)`` over all unlabelled images (FixMatch's convention). Defaults are
    the official code's: ``p_cutoff`` 0.95, weights 0.25 / 0.25 / 0.5, dropout 0.5, ``lambda_u`` 1, hard
    labels (``hard_label: false`` gives FixMatch's sharpened soft targets to all three terms).

    **The official code divides the whole loss by 2** (``(L_x + ...) / 2``). Its segmentation FixMatch
    baseline is divided the same way, so the factor is a learning-rate convention of that code base, not
    part of the method; with SGD it halves the loss's step while the weight decay keeps its own. Here ``scale``
    (``loss_scale``) defaults to 1, so UniMatch's total unlabelled weight (0.25 + 0.25 + 0.5 = 1) and its
    learning rate match :class:`~mentor.semi.fixmatch.FixMatch` at the same recipe; ``loss_scale: 0.5``
    reproduces the official scaling.

    No classification code exists officially (neither ``LiheYoung/UniMatch`` nor UniMatch-V2 has any), so
    this form is a design of its own, and the method's benchmark row is ``partial``. The design choices:

    - **Dropout placement**: the official feature perturbation is ``Dropout2d(0.5)`` on the encoder's
      high-level map (and on the low-level map the DeepLabV3+ decoder reads) before the decoder. Here it is
      element-wise dropout with rate ``fp_dropout`` on the pooled penultimate vector (the input of the
      student's classifier ``fc``): since average pooling is linear, that is exactly channel dropout on the
      last feature map followed by the pooling. There is no low-level path to perturb in a classifier.
      The dropout mask is drawn from a generator seeded by (run seed, step), so a resumed run repeats it.
    - **Gradient**: as in the official code, ``L_fp`` trains the classifier and, through ``h_w``, the
      encoder; the clean weak prediction only gives targets.
    - **No CutMix mixing source**: the official strong views paste CutMix boxes from a second unlabelled
      batch (with that batch's pseudo-labels in the box). Here the strong view is the engine's per-image
      RandAugment + Cutout, as in FixMatch, and there is no second batch.
    - **One forward** over ``cat(x, u_w, u_s1, u_s2)`` (BatchNorm sees the whole batch, USB's
      ``use_cat``); the official code runs ``(x, u_w)`` and ``(u_s1, u_s2)`` as two forwards.
    - The per-pixel mean over non-ignored pixels becomes a mean over the unlabelled images.
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "strong", "strong"))

    @rules(s1_weight=NON_NEGATIVE, s2_weight=NON_NEGATIVE, fp_weight=NON_NEGATIVE,
           fp_dropout=between(0, 1, hi_open=True), loss_scale=POSITIVE)
    @dataclass
    class Config(FixMatch.Config):
        s1_weight: float = 0.25
        s2_weight: float = 0.25
        fp_weight: float = 0.5
        fp_dropout: float = 0.5
        loss_scale: float = 1.0

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.tap = PenultimateTap(student)
        # Drawn from the global generator the engine seeds with trainer.seed before building the method.
        self.seed = int(torch.randint(2**62, ()).item())

    def views(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"x": batch["x"], "u_weak": batch["u_weak"], "u_strong": batch["u_strong"],
                "u_strong_1": batch["u_strong_1"]}

    def forward_views(self, batch: dict[str, Tensor]) -> Logits:
        inputs = self.views(batch)
        sizes = [v.shape[0] for v in inputs.values()]
        features, logits = self.tap(torch.cat(list(inputs.values())))
        z = dict(zip(inputs, logits.split(sizes)))
        z["u_weak_features"] = dict(zip(inputs, features.split(sizes)))["u_weak"]
        return z

    def perturb(self, features: Tensor, ctx: StepContext) -> Tensor:
        """Dropout with rate ``fp_dropout`` (kept entries scaled by ``1 / (1 - rate)``), its mask drawn from
        the step's own generator."""
        rate = self.cfg.fp_dropout
        if rate == 0:
            return features
        gen = step_generator(ctx.step, self.seed, features.device)
        keep = torch.rand(features.shape, generator=gen, device=features.device) >= rate
        return features * keep.to(features.dtype) / (1.0 - rate)

    def unsup_weight(self, ctx: StepContext) -> float:
        return self.cfg.s1_weight

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        c = self.cfg
        probs = z["u_weak"].detach().float().softmax(1)
        target = self.targets(probs, probs, z, ctx)  # the weak view's pseudo-labels, as for u_strong
        z_fp = self.tap.head(self.perturb(z["u_weak_features"], ctx))

        def masked_ce(logits: Tensor) -> Tensor:
            return (F.cross_entropy(logits.float(), target, reduction="none") * mask).mean()

        return {"unsup_s2": (c.lambda_u * c.s2_weight, masked_ce(z["u_strong_1"])),
                "fp": (c.lambda_u * c.fp_weight, masked_ce(z_fp))}

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        out = super().training_step(batch, ctx)
        if self.cfg.loss_scale != 1.0:
            out["loss"] = out["loss"] * self.cfg.loss_scale
        return out


__all__ = ["UniMatch"]
