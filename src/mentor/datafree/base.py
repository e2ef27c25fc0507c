"""The base of every data-free distillation method: a frozen teacher, a synthesiser and a student.

A data-free run reads no dataset (``Inputs(data=False)``): the class count, image shape and
normalisation come from the teacher's run directory, and the real validation and test splits of the
teacher's dataset are read for reporting only (``val_acc`` picks ``best.pt`` as in every run, so
``test_acc_best`` is a number chosen with real labelled data; ``test_acc_last`` is the data-free one).

Synthesis and learning are two phases of the engine with their own optimizers, in the ratio of steps a
recipe sets. Two loop families exist in the literature's code:

* :class:`GenerativeMethod` (DAFL, ZSKT, DFAD, DFQ, CPSC-DFKD, DFKD-FGVC, DFDG): an online generator.
  Every iteration is ``g_steps`` generator steps, then ``s_steps`` student steps on fresh ``G(z)``.
* :class:`InversionMethod` (DeepInversion, CMI, Fast, CSD): rounds of ``g_steps`` synthesis steps that
  optimise one batch (pixels, or a generator and its latent codes), whose lowest-loss version joins a
  :class:`~mentor.datafree.pool.SyntheticPool` on the device; then ``kd_steps`` student steps on batches
  drawn from the whole pool.

Unlike the reference code, the BN-statistics hooks record only during synthesis, the student and
teacher are never the same network, the temperature a recipe sets is the one used, the pool is device
memory rather than PNG files, and optimizers are not rebuilt every step (``Phase.fresh`` zeroes their
state once per round where a method restarts its synthesiser).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, DECAY, MAX_BATCH, NON_NEGATIVE, PATH, POSITIVE, ConfigError, between, rules
from ..data.augment import WeakAugment
from ..methods import NO_DATA, BuildInfo, Method, MethodConfig, Phase, StepContext
from ..nn import frozen_bn_stats, soft_kl, train_accuracy
from ..nn.bnstats import BNStatistics, BNStatisticsError
from .generators import Generator
from .pool import SyntheticPool


@rules(teacher=PATH, batch_size=between(1, MAX_BATCH), temperature=POSITIVE, nz=between(1, 1 << 16),
       ngf=between(1, 1 << 12), lr_g=POSITIVE,
       padding=NON_NEGATIVE, bn=NON_NEGATIVE, bn_momentum=DECAY, first_bn_multiplier=NON_NEGATIVE,
       oh=NON_NEGATIVE, adv=NON_NEGATIVE)
@dataclass
class DataFreeConfig(MethodConfig):
    """What every data-free method shares.

    ``teacher``: the run directory of the trained classifier. ``batch_size``: synthetic images per step
    (256 in the Fast-Datafree scripts). ``temperature``: of the student's KL to the teacher (20 in the
    CMI/Fast scripts). ``nz``/``ngf``: the generator's latent size and width. ``lr_g``: the
    synthesiser's Adam rate (betas ``(beta1, 0.999)``). ``augment``/``padding``/``flip``: the random crop
    and flip applied on the device to synthetic images before the networks see them. ``bn``: weight of
    the BN-statistics term (0 = none), ``bn_momentum`` Fast's moving average of batch statistics,
    ``first_bn_multiplier`` the weight of the first BN layer's term. ``oh``: weight of the teacher's
    cross-entropy to the sampled class; ``adv``: weight of the adversarial (disagreement) term.
    """

    teacher: str = ""
    batch_size: int = 256
    temperature: float = 20.0
    nz: int = 256
    ngf: int = 64
    lr_g: float = 1e-3
    beta1: float = 0.5
    augment: bool = True
    padding: int = 4
    flip: bool = True
    bn: float = 0.0
    bn_momentum: float = 0.0
    first_bn_multiplier: float = 1.0
    oh: float = 0.0
    adv: float = 0.0


def _require_classifier_teacher(path: str) -> None:
    """A teacher run must hold a classifier: say which run it is when it holds something else."""
    from ..engine import checkpoint as ckpt
    from ..errors import TeacherError

    try:
        file, info, _ = ckpt.run_info(path, "method.teacher")
    except ckpt.CheckpointError as e:
        raise TeacherError(str(e)) from None
    from ..methods.base import METHODS

    kind = info.get("method", "")
    cls = METHODS.get(kind) if kind in METHODS else None
    if (cls is not None and not cls.classifier) or not info.get("num_classes"):
        raise TeacherError(f"method.teacher={path}: {file} is a {kind or 'unknown'} run ({info.get('model')}), not a "
                           "classifier; data-free distillation inverts a trained classifier: point method.teacher at "
                           "the run directory of one, e.g. runs/supervised/fmnist_resnet20")


class DataFreeMethod(Method):
    """A student distilled from a frozen teacher on synthetic images (see the module docstring)."""

    Config = DataFreeConfig
    inputs = NO_DATA

    def __init__(self, cfg: DataFreeConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if not cfg.teacher:
            raise ConfigError(f"method.teacher is required for {cfg.name!r}: the run directory of the trained "
                              "classifier to distil without data, e.g. method.teacher=runs/supervised/fmnist_resnet20")
        from ..engine.teacher import load_teacher

        _require_classifier_teacher(cfg.teacher)
        self.add_teacher("teacher", load_teacher(cfg.teacher, info))
        self.shape = (info.in_channels, info.image_size, info.image_size)
        mean = torch.tensor(info.mean or (0.0,) * info.in_channels, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(info.std or (1.0,) * info.in_channels, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.crop = WeakAugment(padding=cfg.padding, flip=cfg.flip, padding_mode="zeros")
        self.bn_stats = self._bn_statistics(cfg) if cfg.bn > 0 else None
        self.register_buffer("synthesised", torch.zeros((), dtype=torch.long))

    def _bn_statistics(self, cfg: DataFreeConfig) -> BNStatistics:
        try:
            return BNStatistics(self.teacher, cfg.bn_momentum, cfg.first_bn_multiplier,
                                what=f"teacher {cfg.teacher}")
        except BNStatisticsError as e:
            raise ConfigError(f"method {cfg.name} matches the teacher's BatchNorm statistics (method.bn={cfg.bn}), but "
                              f"{e}. Distil a teacher with BatchNorm (a zoo ResNet or WRN), or set method.bn=0 where "
                              "the method's loss does not rest on them") from None

    # -- views of synthetic images ----------------------------------------------------------------
    def normalize(self, x01: Tensor) -> Tensor:
        return (x01 - self.mean) / self.std

    def augment(self, x01: Tensor) -> Tensor:
        """A random crop (zero padding) and flip per image, drawn from the run's random stream."""
        if not self.cfg.augment:
            return x01
        b = x01.shape[0]
        p = self.cfg.padding
        params = {"offset": torch.randint(0, 2 * p + 1, (b, 2), device=x01.device),
                  "flip": (torch.rand(b, device=x01.device) < 0.5) & self.cfg.flip}
        return self.crop.apply(x01, params)

    def view(self, x01: Tensor) -> Tensor:
        """What the networks see of images in [0, 1]: augmented, then normalised like the teacher's data."""
        return self.normalize(self.augment(x01))

    def random_labels(self, n: int) -> Tensor:
        return torch.randint(0, self.info.num_classes, (n,), device=self.mean.device)

    def teacher_bn_loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher logits on ``x`` (normalised) with the gradient to ``x``, and the BN-statistics term (0 when
        the method has none)."""
        if self.bn_stats is None:
            t = self.teacher(x)
            return t, t.new_zeros(())
        with self.bn_stats.active():
            t = self.teacher(x)
            return t, self.bn_stats.loss()

    # -- the student -------------------------------------------------------------------------------
    def kd(self, s: Tensor, t: Tensor) -> Tensor:
        return soft_kl(s, t, self.cfg.temperature)

    def student_terms(self, x01: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        """The student's step on synthetic images in [0, 1] (labels ``y`` where the synthesiser kept them):
        ``T^2 * KL(p_t^T || p_s^T)`` on one augmented view. Methods add their terms by overriding."""
        x = self.view(x01)
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        kd = self.kd(s, t)
        return {"loss": kd, "kd": kd, "agree": train_accuracy(s, t.argmax(1))}

    # -- reporting ---------------------------------------------------------------------------------
    def samples(self, n: int) -> Tensor:
        """``n`` synthetic images in [0, 1] (a grid for the docs), without touching the trained state."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        return {"images_synthesised": int(self.synthesised)}

    def phase_adam(self) -> dict[str, Any]:
        """The synthesiser's optimizer: Adam (no decay) at ``lr_g``, betas ``(beta1, 0.999)``."""
        return {"name": "adamw", "lr": self.cfg.lr_g, "betas": (self.cfg.beta1, 0.999), "weight_decay": 0.0,
                "decay_norm_bias": True}

    def student_params(self) -> list[nn.Parameter]:
        """What the student phase trains: the student and any head or adapter a method adds to it."""
        return list(self.student.parameters())

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def steps_for(cls, cfg: DataFreeConfig, student_steps: int) -> int:
        """The ``trainer.max_steps`` that gives the student ``student_steps`` steps (synthesis steps come on top
        in the method's ratio): how a benchmark gives every method the same student budget."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ online
@rules(g_steps=COUNT, s_steps=COUNT)
@dataclass
class GenerativeConfig(DataFreeConfig):
    """``g_steps`` generator steps then ``s_steps`` student steps per iteration; ``conditional`` makes a
    class-conditional generator ``G(z, y)``; ``output`` its last layer (``sigmoid`` images in [0, 1] or
    ``tanh_bn``, DFAD's normalised output)."""

    g_steps: int = 1
    s_steps: int = 5
    augment: bool = False
    conditional: bool = False
    output: str = "sigmoid"


class GenerativeMethod(DataFreeMethod):
    """An online generator trained against the student; no memory of earlier samples."""

    Config = GenerativeConfig

    def __init__(self, cfg: GenerativeConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if cfg.output not in ("sigmoid", "tanh_bn"):
            raise ConfigError(f"method.output must be sigmoid or tanh_bn, got {cfg.output!r}")
        self.generator = self.build_generator()

    def build_generator(self) -> nn.Module:
        cfg = self.cfg
        c, h, _ = self.shape
        return Generator(cfg.nz, cfg.ngf, h, c, num_classes=self.info.num_classes if cfg.conditional else 0,
                         output=cfg.output)

    def generator_params(self) -> list[nn.Parameter]:
        return list(self.generator.parameters())

    @classmethod
    def steps_for(cls, cfg: GenerativeConfig, student_steps: int) -> int:
        return -(-student_steps // cfg.s_steps) * (cfg.g_steps + cfg.s_steps)

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        period = cfg.g_steps + cfg.s_steps
        return [Phase("generator", self.generator_params(), every=period, span=cfg.g_steps, optim=self.phase_adam(),
                      schedule={"name": "constant", "warmup_steps": 0}),
                Phase("student", self.student_params(), every=period, offset=cfg.g_steps, span=cfg.s_steps)]

    def draw(self, n: int) -> tuple[Tensor, Tensor]:
        """Latent codes and (for a conditional generator; else zeros) the classes they are drawn for."""
        z = torch.randn(n, self.cfg.nz, device=self.mean.device)
        return z, self.random_labels(n)

    def generate(self, z: Tensor, y: Tensor) -> Tensor:
        """The generator's output: images in [0, 1], or normalised images (``output=tanh_bn``)."""
        return self.generator(z, y) if self.cfg.conditional else self.generator(z)

    def net_view(self, g: Tensor) -> Tensor:
        """What the networks see of a generator output."""
        return g if self.cfg.output == "tanh_bn" else self.view(g)

    def to_image(self, g: Tensor) -> Tensor:
        """A generator output as an image in [0, 1] (for the pool and the grid)."""
        return (g * self.std + self.mean).clamp(0, 1) if self.cfg.output == "tanh_bn" else g

    def generator_terms(self, x: Tensor, z: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        """The generator's loss on a batch ``x`` (as the networks see it) made from ``z`` (and ``y``)."""
        raise NotImplementedError

    def student_batch(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The student's step on a fresh generated batch (as the networks see it, no gradient to G)."""
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        kd = self.kd(s, t)
        return {"loss": kd, "kd": kd, "agree": train_accuracy(s, t.argmax(1))}

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        z, y = self.draw(self.cfg.batch_size)
        if ctx.phase == "generator":
            return self.generator_terms(self.net_view(self.generate(z, y)), z, y, ctx)
        with torch.no_grad():
            x = self.net_view(self.generate(z, y))
            self.synthesised += x.shape[0]
        return self.student_batch(x, y)

    @torch.no_grad()
    def samples(self, n: int) -> Tensor:
        z, y = self.draw(n)
        y = torch.arange(n, device=z.device) % self.info.num_classes
        with frozen_bn_stats(self.generator):
            return self.to_image(self.generate(z, y)).float()


# ------------------------------------------------------------------------------------------------ pool
@rules(g_steps=COUNT, kd_steps=COUNT, lr_z=NON_NEGATIVE, warmup_rounds=NON_NEGATIVE,
       pool_size=COUNT.because("the student draws every batch from the pool of synthetic images"))
@dataclass
class InversionConfig(DataFreeConfig):
    """Rounds of ``g_steps`` synthesis steps then ``kd_steps`` student steps. ``pool_size``: images the
    pool keeps (the oldest are overwritten; the references keep every image, about 50k on CIFAR);
    ``pool_dtype``: ``uint8`` (a PNG's precision) or ``half``. ``lr_z``: the latent codes' Adam rate.
    ``warmup_rounds``: rounds that only fill the pool (Fast's warm-up, no student steps)."""

    g_steps: int = 200
    kd_steps: int = 400
    pool_size: int = 50000
    pool_dtype: str = "uint8"
    lr_z: float = 0.0
    warmup_rounds: int = 0


class InversionMethod(DataFreeMethod):
    """Synthesis rounds that add their best batch to a device pool; the student learns from the pool.

    A subclass says what the synthesiser is (:meth:`synthesis_params`, :meth:`begin_round`,
    :meth:`synthesize`) and its loss (:meth:`synthesis_terms`); the base keeps the round's labels, the
    lowest-loss batch, the pool and the counts."""

    Config = InversionConfig
    #: the generator (if any) is re-initialised at every round (CMI, CSD)
    reset_generator: ClassVar[bool] = False

    def __init__(self, cfg: InversionConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if cfg.pool_dtype not in ("uint8", "half"):
            raise ConfigError(f"method.pool_dtype must be uint8 or half, got {cfg.pool_dtype!r}")
        self.pool = SyntheticPool(cfg.pool_size, self.shape, cfg.pool_dtype)
        b = cfg.batch_size
        self.register_buffer("y", torch.zeros(b, dtype=torch.long))
        self.register_buffer("best_x", torch.zeros(b, *self.shape))
        self.register_buffer("best_loss", torch.full((), float("inf")))

    @property
    def period(self) -> int:
        return self.cfg.g_steps + self.cfg.kd_steps

    @classmethod
    def steps_for(cls, cfg: InversionConfig, student_steps: int) -> int:
        return (-(-student_steps // cfg.kd_steps) + cfg.warmup_rounds) * (cfg.g_steps + cfg.kd_steps)

    # -- what a subclass provides ------------------------------------------------------------------
    def synthesis_params(self) -> tuple[list[nn.Parameter], list[tuple[list[nn.Parameter], dict]]]:
        """The synthesiser's parameters at ``lr_g`` and further groups with their own rate (latent codes)."""
        raise NotImplementedError

    def begin_round(self) -> None:
        """Start a round: new latent codes or pixels (and a reset generator where the method resets it)."""
        raise NotImplementedError

    def synthesize(self) -> Tensor:
        """The round's current images in [0, 1], with the gradient to the synthesiser."""
        raise NotImplementedError

    def synthesis_terms(self, x01: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        """The synthesiser's loss on the round's images (labels ``self.y``)."""
        raise NotImplementedError

    def end_round(self) -> None:
        """After the round's best batch joined the pool (meta-updates, moving averages). It runs inside the
        round's last synthesis step, before that step's backward: it must not change in place a parameter
        that step's graph holds."""
        if self.bn_stats is not None:
            self.bn_stats.update_ema()

    # -- the loop ----------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        cfg = self.cfg
        params, groups = self.synthesis_params()
        return [Phase("synthesis", params, every=self.period, span=cfg.g_steps, fresh=True, optim=self.phase_adam(),
                      schedule={"name": "constant", "warmup_steps": 0}, groups=groups),
                Phase("student", self.student_params(), every=self.period,
                      offset=cfg.g_steps + cfg.warmup_rounds * self.period, span=cfg.kd_steps)]

    def in_warmup(self, step: int | Tensor) -> bool | Tensor:
        return step < self.cfg.warmup_rounds * self.period

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if ctx.phase != "synthesis":
            x01, y = self.pool.sample(self.cfg.batch_size)
            return self.student_terms(x01, y)
        pos = int(ctx.step) % self.period
        if pos == 0:
            with torch.no_grad():
                self.y.copy_(self.random_labels(self.cfg.batch_size))
                self.best_loss.fill_(float("inf"))
            self.begin_round()
        x01 = self.synthesize()
        out = self.synthesis_terms(x01, ctx)
        with torch.no_grad():
            better = out["loss"].detach() < self.best_loss
            self.best_x.copy_(torch.where(better, x01.detach(), self.best_x))
            self.best_loss.copy_(torch.where(better, out["loss"].detach(), self.best_loss))
            if pos == self.cfg.g_steps - 1:
                self.pool.add(self.best_x, self.y)
                self.synthesised += self.cfg.batch_size
                self.end_round()
        return out

    def oh_terms(self, x01: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher logits on an augmented view of ``x01``, their cross-entropy to the round's labels and the
        BN-statistics term: the inversion core every pool method starts from."""
        t, bn = self.teacher_bn_loss(self.view(x01))
        return t, F.cross_entropy(t.float(), self.y), bn

    @torch.no_grad()
    def samples(self, n: int) -> Tensor:
        idx = (self.pool.added - 1 - torch.arange(n, device=self.pool.added.device)) % self.pool.capacity
        return self.pool.decode(idx)


class LatentGeneratorMethod(InversionMethod):
    """An inversion method whose synthesiser is a generator and its per-round latent codes ``z`` (CMI, Fast,
    CSD): Adam over {G at ``lr_g``, z at ``lr_z``}."""

    def __init__(self, cfg: InversionConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        c, h, _ = self.shape
        self.generator = Generator(cfg.nz, cfg.ngf, h, c)
        self.z = nn.Parameter(torch.randn(cfg.batch_size, cfg.nz))

    def synthesis_params(self):
        return list(self.generator.parameters()), [([self.z], {"lr": self.cfg.lr_z or self.cfg.lr_g})]

    def begin_round(self) -> None:
        from .generators import dcgan_init

        with torch.no_grad():
            self.z.normal_()
            if self.reset_generator:
                dcgan_init(self.generator)

    def synthesize(self) -> Tensor:
        return self.generator(self.z)
