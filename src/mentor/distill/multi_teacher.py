"""Multi-teacher KD with per-sample teacher weights: the average, EBKD and CA-MKD.

All three distil ``CE + kd_weight * sum_k w_k * T^2 KL(p_k || p_s)`` with weights that sum to one
per sample (:mod:`mentor.distill.losses.multi`; EBKD's ``weight_norm=camkd`` keeps the CA-MKD code's
unnormalised weights); they differ in the weights, and CA-MKD adds a confidence-weighted
intermediate-feature term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, rules
from ..methods import StepContext, register_method
from ..models import FeatureTap, last_map_name
from ..nn import conv_projector, resize_to
from .base import MultiTeacherConfig, MultiTeacherDistiller
from .connectors import probe_shapes
from .losses.multi import (
    multi_teacher_feature_loss,
    multi_teacher_kd_loss,
    teacher_weights_average,
    teacher_weights_confidence,
    teacher_weights_entropy,
)


@rules(kd_weight=NON_NEGATIVE, temperature=POSITIVE)
@dataclass
class MultiKDConfig(MultiTeacherConfig):
    """CE 1, KD 1, T = 4: the CA-MKD code's settings (``-r 1 -a 1``, ``--kd_T 4``) for every baseline."""

    kd_weight: float = 1.0
    temperature: float = 4.0


@register_method("avg_mkd")
class AvgMKD(MultiTeacherDistiller):
    """Multi-teacher KD with equal weights: the mean of the per-teacher KD losses (the AVERAGE_LOSS
    baseline of "Confidence-Aware Multi-Teacher Knowledge Distillation", Zhang et al., 2022)."""

    Config = MultiKDConfig
    kd_scale = 1.0  # CA-MKD's reference 1/K, see CAMKD.divide_by_teachers

    def teacher_weights(self, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample weights of the teachers, ``[K, B]``, summing to one over K."""
        return teacher_weights_average(*teacher_logits.shape[:2], device=teacher_logits.device)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        t = self.teacher_logits(x)
        s = self.student(x)
        w = self.teacher_weights(t, y)
        # A function: the KD term is built after the CE (see DistillerBase.combine).
        out = self.combine(s, y, lambda: {"kd": multi_teacher_kd_loss(s, t, w, self.cfg.temperature) * self.kd_scale},
                           {"kd": self.cfg.kd_weight})
        out.update({f"w{k}": wk.mean() for k, wk in enumerate(w.detach())})
        return out


@dataclass
class EBKDConfig(MultiKDConfig):
    """``weight_norm``: ``one`` (default) normalises the per-sample weights to sum to one; ``camkd``
    keeps the raw weights and divides by K, the EBKD baseline of the CA-MKD code."""

    weight_norm: Literal["one", "camkd"] = "one"


@register_method("ebkd")
class EBKD(AvgMKD):
    """Entropy-weighted multi-teacher KD: a confident (low-entropy) teacher counts more, per sample
    (Kwon et al., "Adaptive Knowledge Distillation Based on Entropy", ICASSP 2020), with the raw
    weights ``w_k = 1 - H_k / sum_j H_j`` (entropies of the teachers' softmax at T = 1,
    :func:`~mentor.distill.losses.teacher_weights_entropy`), which sum to K - 1 per sample.

    Scale: with ``weight_norm=one`` (the default) the weights are divided by K - 1 so that they sum to
    one, as every weighting of this module does (K identical teachers give single-teacher KD); the KD
    term is then ``mean_b sum_k w_k T^2 KL_k``, which is **K/(K - 1) times** the EBKD baseline of the
    CA-MKD code (``sum_{b,k} raw_k T^2 KL_k / (B K)``): 1.5x with three teachers, so the same
    ``kd_weight`` distils more strongly than in the CA-MKD table. ``weight_norm=camkd`` uses the raw
    weights and the reference's 1/K (needs two teachers at least: with one, the raw weight is 0),
    reproducing that baseline's loss.
    """

    Config = EBKDConfig

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        if cfg.weight_norm == "camkd":
            if len(self.teachers) < 2:
                raise ConfigError("ebkd: method.weight_norm=camkd reproduces the CA-MKD code's EBKD baseline, whose "
                                  "raw weights 1 - H_k / sum_j H_j are all 0 with a single teacher: give at least two "
                                  "method.teachers, or set method.weight_norm=one")
            self.kd_scale = 1.0 / len(self.teachers)

    def teacher_weights(self, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return teacher_weights_entropy(teacher_logits, normalize=self.cfg.weight_norm == "one")


# -- features ---------------------------------------------------------------------------------------


class Embed(nn.Sequential):
    """The student-to-teacher connector of CA-MKD and MMKD: conv1x1 -> BN -> ReLU, or with ``convs`` a
    bottleneck conv1x1 -> conv3x3 -> conv1x1 (each with BN and ReLU) through ``c_in // factor``
    (:func:`mentor.nn.conv_projector`; the convs have a bias, as the reference's)."""

    def __init__(self, c_in: int, c_out: int, convs: bool = False, factor: int = 2):
        super().__init__(*conv_projector(c_in, c_out, max(1, c_in // factor) if convs else None, bias=True))


class Embeds(nn.ModuleList):
    """One :class:`Embed` per teacher; ``forward(list of maps) -> list of maps`` (so that
    ``torch.func.functional_call`` can run all of them with substituted parameters)."""

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [m(x) for m, x in zip(self, xs, strict=True)]


@rules(feat_weight=NON_NEGATIVE)
@dataclass
class FeatureMKDConfig(MultiKDConfig):
    """``convs``: the 3-conv bottleneck Embed instead of conv1x1 -> BN -> ReLU."""

    feat_weight: float = 50.0
    convs: bool = False


class FeatureMKD(AvgMKD):
    """Multi-teacher KD that also reads the last feature map (the input of ``pool``) of the student
    and of every teacher through forward hooks, with one :class:`Embed` per teacher sized in setup."""

    Config = FeatureMKDConfig

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.student_tap = FeatureTap(student, last_map_name(student, "student"))
        self.teacher_taps = [FeatureTap(t, last_map_name(t, "teacher")) for t in self.teachers]

    def teacher_maps(self) -> list[Tensor]:
        """Each teacher's map from its latest forward pass (``teacher_logits``)."""
        return [tap[tap.names[0]] for tap in self.teacher_taps]

    def last_maps(self) -> tuple[Tensor, list[Tensor]]:
        """The maps of the latest forward passes: (student's, [each teacher's])."""
        return self.student_tap[self.student_tap.names[0]], self.teacher_maps()

    def setup(self, batch: dict[str, Tensor]) -> None:
        x = batch["x"]
        for net, tap in zip(self.teachers, self.teacher_taps):
            probe_shapes(net, tap, x)
        probe_shapes(self.student, self.student_tap, x)
        f_s, f_t = self.last_maps()  # the dry run's maps, which the taps still hold
        self.embeds = Embeds([Embed(f_s.shape[1], f.shape[1], self.cfg.convs) for f in f_t]).to(x.device)


@rules(feat_warmup_epochs=NON_NEGATIVE)
@dataclass
class CAMKDConfig(FeatureMKDConfig):
    """Defaults of the CA-MKD README command (``-r 1 -a 1 -b 50``, ``--distill inter``).

    ``feat_warmup_epochs``: the feature term is off before this epoch (the reference skips epoch 1).
    ``detach_feature_weights``: stop gradients through the feature weights (see :class:`CAMKD`).
    ``divide_by_teachers``: keep the reference code's extra 1/K on both distillation terms, the scale
    its alpha = 1, beta = 50 were tuned for (the paper's equations have no 1/K).
    """

    feat_warmup_epochs: float = 1.0
    detach_feature_weights: bool = True
    divide_by_teachers: bool = True


@register_method("camkd")
class CAMKD(FeatureMKD):
    """Confidence-Aware Multi-Teacher KD (Zhang et al., "Confidence-Aware Multi-Teacher Knowledge
    Distillation", ICASSP 2022).

    Logit term: teacher weights ``(1 - softmax_k(CE_k)) / (K - 1)`` from each teacher's CE on the
    label. Intermediate term: the student's last feature map is resized to teacher k's, mapped by
    ``Embed_k`` to its channels and matched to its map by MSE; the weights are the same confidence
    formula applied to the CE of *teacher k's own head* (pool + fc) on the embedded student map.

    The reference code lets gradients flow through those feature weights, so the student can also
    lower the term by making its embedded map *less* recognisable to the head of the teacher it
    matches worst (shifting weight away from it). We stop that gradient by default
    (``detach_feature_weights=True``): the weights then are the confidence estimate the paper
    describes; ``false`` reproduces the reference.
    """

    Config = CAMKDConfig

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        if len(self.teachers) < 2:
            raise ConfigError("camkd weighs several teachers: method.teachers needs at least two")
        for path, t in zip(cfg.teachers, self.teachers):
            if not (isinstance(getattr(t, "pool", None), nn.Module) and isinstance(getattr(t, "fc", None), nn.Module)):
                raise ConfigError(f"camkd reuses each teacher's head (pool, fc): teacher {path} has none")
        self.kd_scale = 1.0 / len(self.teachers) if cfg.divide_by_teachers else 1.0

    def teacher_weights(self, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return teacher_weights_confidence(teacher_logits, target)

    def feature_term(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """(the weighted feature MSE, its teacher weights ``[K, B]``) of the latest forward pass."""
        f_s, f_t = self.last_maps()
        e = self.embeds([resize_to(f_s, f.shape[-2:]) for f in f_t])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.detach_feature_weights):
            # The embedded student map classified by each frozen teacher's own head.
            z = torch.stack([t.fc(t.pool(ek)) for t, ek in zip(self.teachers, e)])
            v = teacher_weights_confidence(z, target)
        return multi_teacher_feature_loss(e, f_t, v) * self.kd_scale, v

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        out = super().training_step(batch, ctx)
        feat, v = self.feature_term(batch["y"])
        if isinstance(ctx.epoch, Tensor):  # a captured step: computed on the device
            beta = self.cfg.feat_weight * (ctx.epoch >= self.cfg.feat_warmup_epochs).float()
        else:
            beta = self.cfg.feat_weight if ctx.epoch >= self.cfg.feat_warmup_epochs else 0.0
        out["loss"] = out["loss"] + beta * feat
        out["feat"] = feat
        out.update({f"v{k}": vk.mean() for k, vk in enumerate(v.detach())})
        return out


__all__ = ["AvgMKD", "CAMKD", "EBKD", "EBKDConfig", "Embed", "Embeds", "FeatureMKD", "MultiKDConfig", "last_map_name",
           "resize_to"]
