"""CSD: Luo et al., "Customizing Synthetic Data for Data-Free Student Learning", ICME 2023 (luoshiya/CSD,
``datafree/synthesis/csd.py`` and the ``csd`` branch of ``datafree_kd.py``).

CSD makes synthetic images that are hard *for the current student*. How hard an image is for the student
is read from a self-supervised task on it: rotation by ``90 * k`` degrees (all four ``k`` for every image)
crossed with the image's class, ``4K`` classes predicted by an MLP head ``h`` on the student's pooled
penultimate features ``f_S``. Each round re-initialises the generator, optimises it and the latent codes
``z`` for ``g_steps`` steps on

    ``oh * CE(T(x), y) + bn * L_BN(x) - csd * CE(h(f_S(rot_k x)), 4y + k)``

(``x`` one augmented view, the student in eval mode) and adds the lowest-loss batch, with its classes ``y``,
to the pool. The student then learns for ``kd_steps`` steps from pool batches with

    ``T^2 KL(p_T^T || p_S^T) + CE(S(x), y) + fea * MSE(A(F_S), F_T)``

where ``F`` is the output of the network's last stage (the reference's ``features[-2]``, the map before
pooling) and ``A`` an :class:`AlignHead` trained with the student. After every student step the head ``h``
learns ``CE(h(f_S(rot_k x)), 4y + k)`` on the same batch with the student's features detached (phase
``"head"``: SGD at the run's learning rate, momentum 0.9, wd 1e-4, constant rate), and it is re-initialised
once per round (N(0, 0.02) weights, zero biases) before its first step, with a fresh momentum buffer.

Defaults: ``scripts/csd/csd_cifar10_wrn402_wrn161.sh``: csd 10, oh 1, bn 1, fea 30, g_steps 200 at
lr_g 1e-3 (G and z share the rate), kd_steps 2000, T 20, 200 images per round; student SGD 0.1 belongs to
the recipe. The reference's separate "init bank" run (400 rounds of pure BN + CE inversion, ``--csd 0``,
500 steps each) is ``warmup_rounds`` here: rounds with the CSD term off and no student or head steps, at
the run's ``g_steps``. ``pool_size`` 100,000 keeps every image of the bank and the 100 rounds.

Design choices where the reference differs or is silent: the head's output is L2-normalised as the
reference's ``MLPHead`` does (``head_norm``; its logits then have unit norm); the head's SGD momentum is
cleared when the head is re-initialised (the reference keeps the buffer of the discarded weights); one
batch size serves synthesis and the student (the reference's student batch is 128); the reference's
fallback of ``csd=0, adv>0`` to an unmasked adversarial KL is not provided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, ConfigError, rules
from ..distill.connectors import probe_shapes
from ..methods import BuildInfo, Phase, StepContext, register_method
from ..models import FeatureTap, PenultimateTap, stage_names
from ..nn import train_accuracy
from ..nn.norm import evaluating
from .base import InversionConfig, LatentGeneratorMethod
from .generators import dcgan_init


def rotations(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Every image of ``x`` ``[B, C, H, W]`` in its four rotations ``torch.rot90(x_i, k, (H, W))``, k = 0..3,
    image by image (``x_0`` at k = 0..3, then ``x_1`` ...), and the rotation-by-class labels ``4 y_i + k``."""
    xr = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(4)], 1).flatten(0, 1)
    yr = (4 * y[:, None] + torch.arange(4, device=y.device)).flatten()
    return xr, yr


class RotationHead(nn.Module):
    """CSD's auxiliary classifier: ``Linear(d, d) -> ReLU -> Linear(d, 4K)``, output L2-normalised when
    ``normalize`` (the reference's ``MLPHead``)."""

    def __init__(self, dim: int, num_classes: int, normalize: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, 4 * num_classes)
        self.normalize = normalize

    def forward(self, f: Tensor) -> Tensor:
        out = self.fc2(F.relu(self.fc1(f)))
        return F.normalize(out, dim=1) if self.normalize else out


class AlignHead(nn.Module):
    """Maps a student map ``[C_s, H_s, W_s]`` onto the teacher's ``[C_t, H_t, W_t]``: an adaptive average
    pool to the teacher's size where the sizes differ, then 1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU
    -> 1x1 conv, ``2 C_t`` channels in between (the reference's ``AlignHead``)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        c_s, c_t = student_shape[1], teacher_shape[1]
        self.size = None if tuple(student_shape[2:]) == tuple(teacher_shape[2:]) else tuple(teacher_shape[2:])
        mid = 2 * c_t
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, c_t, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None:
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.regressor(x)


@register_method("csd")
class CSD(LatentGeneratorMethod):
    """CSD (Luo et al., ICME 2023): synthesis against a rotation-by-class head on the student; the loss
    terms, the phases, the defaults and the design choices are in the module docstring."""

    @rules(csd=NON_NEGATIVE, fea=NON_NEGATIVE)
    @dataclass
    class Config(InversionConfig):
        batch_size: int = 200
        g_steps: int = 200
        kd_steps: int = 2000
        lr_g: float = 1e-3
        bn: float = 1.0
        oh: float = 1.0
        csd: float = 10.0
        fea: float = 30.0
        head_norm: bool = True
        warmup_rounds: int = 400
        pool_size: int = 100000

    reset_generator = True

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.s_name = stage_names(student, "student")[-1]
        self.t_name = stage_names(self.teacher, "teacher")[-1]
        self.s_tap = FeatureTap(student, self.s_name)
        self.t_tap = FeatureTap(self.teacher, self.t_name)
        self.penultimate = PenultimateTap(student)
        probe = torch.zeros(2, *self.shape)
        s = probe_shapes(student, self.s_tap, probe)[self.s_name]
        t = probe_shapes(self.teacher, self.t_tap, probe)[self.t_name]
        if len(s) != 4 or len(t) != 4:
            raise ConfigError(f"csd aligns the last stages' feature maps [B, C, H, W]; the student's {self.s_name!r} "
                              f"gives {tuple(s)} and the teacher's {self.t_name!r} {tuple(t)}")
        self.align = AlignHead(tuple(s), tuple(t))
        self.head = RotationHead(self.penultimate.num_features, info.num_classes, cfg.head_norm)
        self._head_batch: tuple[Tensor, Tensor] | None = None  # the student step's view and labels

    def student_params(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.align.parameters()]

    def phases(self) -> list[Phase]:
        phases = super().phases()
        if self.cfg.csd > 0:
            student = phases[1]
            phases.append(Phase("head", list(self.head.parameters()), every=student.every, offset=student.offset,
                                span=student.span, fresh=True,
                                optim={"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                                       "decay_norm_bias": True},
                                schedule={"name": "constant", "warmup_steps": 0}))
        return phases

    # -- the terms ---------------------------------------------------------------------------------
    def rotation_logits(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The head's logits on the student's pooled features of the four rotations of ``x`` (the
        student in eval mode; gradients flow to ``x`` and the head), and their labels ``4y + k``."""
        xr, yr = rotations(x, y)
        with evaluating(self.student):
            f, _ = self.penultimate(xr)
        return self.head(f), yr

    def synthesis_terms(self, x01: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        x = self.view(x01)
        t, bn = self.teacher_bn_loss(x)
        ce = F.cross_entropy(t.float(), self.y)
        if cfg.csd > 0 and not self.in_warmup(int(ctx.step)):
            logits, yr = self.rotation_logits(x, self.y)
            csd = F.cross_entropy(logits.float(), yr)
        else:
            csd = ce.new_zeros(())
        loss = cfg.oh * ce + cfg.bn * bn - cfg.csd * csd
        return {"loss": loss, "bn": bn, "ce": ce, "csd": csd}

    def student_terms(self, x01: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        x = self.view(x01)
        with torch.no_grad():
            t = self.teacher(x)
            f_t = self.t_tap[self.t_name]
        s = self.student(x)
        f_s = self.s_tap[self.s_name]
        kd = self.kd(s, t)
        ce = F.cross_entropy(s.float(), y)
        fea = F.mse_loss(self.align(f_s).float(), f_t.float())
        self._head_batch = (x.detach(), y)
        return {"loss": kd + ce + self.cfg.fea * fea, "kd": kd, "ce": ce, "fea": fea,
                "acc": train_accuracy(s, y), "agree": train_accuracy(s, t.argmax(1))}

    def head_terms(self, ctx: StepContext) -> dict[str, Tensor]:
        if int(ctx.step) % self.period == self.cfg.g_steps:
            dcgan_init(self.head)  # a new head for the round (its phase is fresh: momentum cleared too)
        if self._head_batch is None:  # the head's step without the student's before it (a direct call)
            x01, y = self.pool.sample(self.cfg.batch_size)
            self._head_batch = (self.view(x01), y)
        x, y = self._head_batch
        self._head_batch = None
        xr, yr = rotations(x, y)
        with torch.no_grad(), evaluating(self.student):
            f, _ = self.penultimate(xr)
        logits = self.head(f)
        ce = F.cross_entropy(logits.float(), yr)
        return {"loss": ce, "acc": train_accuracy(logits, yr)}

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if ctx.phase == "head":
            return self.head_terms(ctx)
        return super().training_step(batch, ctx)
