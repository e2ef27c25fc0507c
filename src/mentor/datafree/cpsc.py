"""CPSC-DFKD: Shao, Zhang & Wang, "Conditional Pseudo-Supervised Contrast for Data-Free Knowledge
Distillation", Pattern Recognition 143 (2023) 109781 (RoryShao/CPSC-DFKD, ``CPSC_DFKD.py``).

An adversarial online generator made class-conditional: ``G(z, y)`` with ``y ~ U(K)`` and every BatchNorm
replaced by a per-class gain and bias (:class:`~mentor.datafree.generators.ConditionalBatchNorm2d`, the
reference's ``GeneratorD``). The sampled class is a pseudo-label both players use:

* generator (``g_steps`` per iteration)::

      L_G = -adv * KL(p_T || p_S) + ikd * L_IKD^G + bn * L_BN + scl * L_SCL + oh * CE(t, y)

  ``L_IKD^G = -MSE(s, t)`` (``-log MSE(s, t)`` with ``ikd_log``, the reference's CIFAR-10 form; the teacher's
  logits detached there), ``L_BN`` DeepInversion's statistics term on the teacher, and ``L_SCL`` the
  supervised contrastive loss (Khosla et al., 2020; :func:`sup_con`) over the student's and the teacher's
  L2-normalised penultimate features as two views of each image, positives being images of the same
  sampled class, temperature ``scl_temperature``;
* student (``s_steps``)::

      L_S = KL(p_T || p_S) + ikd * L_IKD^S + oh * CE(s, y)

  ``L_IKD^S = MSE(s, t)`` (``log ||t - s||_2`` over the whole batch with ``ikd_log``).

Defaults are the README's CIFAR-100 command (``--batch_size 512 --G_steps 6 --co_alpha 5 --co_beta 1
--co_gamma 0.7 --co_eta 0.7``, IKD/BN/SCL/CE all on) and the script's defaults: 5 student steps, nz 256,
generator Adam 1e-3 betas (0.5, 0.999), KL at temperature 1, SupCon temperature 0.07, student SGD 0.1
(wd 5e-4, cosine) in the recipe. The IKD form defaults to the one the README's (CIFAR-100) command runs.

Where this differs from the reference, deliberately:

* the cross-entropies are taken on the logits; the reference applies ``cross_entropy`` to
  ``softmax(logits)`` (a double softmax, whose gradient nearly vanishes once a class dominates);
* the generator's Adam is built once (the reference builds a new one at every generator step, so its
  moments never accumulate and its learning-rate schedule acts on an optimizer that is never used; the
  rate here is constant, as it effectively is there);
* the generator is the house conditional generator: ``output: tanh_bn`` ends, like ``GeneratorD``, with
  Tanh and a BatchNorm into the networks' normalised space, but that last BatchNorm has no per-class
  affine, the BatchNorms use eps 1e-5 (1e-3 in the reference) and the two middle convolutions have no
  bias (a bias before a BatchNorm cancels);
* SupCon's ``temperature / base_temperature`` factor is left out: both are 0.07 in the reference, so it is 1.

Design choices where the reference is silent or inert: when the student's feature width differs from
the teacher's, an MLP adapter (``Linear -> ReLU -> Linear``, the reference's ``WRNAdapter``) maps the
student's raw penultimate features to the teacher's width before the L2 normalisation (the reference
applies it after normalising and does not normalise again). The adapter is trained by the generator's
phase, with the generator's Adam: ``L_SCL`` is the only loss that reaches it, and it is a generator term.
(In the reference it sits in the student's optimizer, whose loss never uses the features, so it stays at
its initialisation.) As in the reference the student runs in training mode in the generator's step, so
those forwards enter its BN running statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, ConfigError, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models.penultimate import PenultimateTap
from ..nn import soft_kl, train_accuracy
from ..nn.contrast import sup_con
from ..nn.projectors import mlp
from .base import GenerativeConfig, GenerativeMethod


def ikd_generator(s: Tensor, t: Tensor, log: bool) -> Tensor:
    """The generator's inverse-KD term: ``-MSE(s, t)`` or ``-log MSE(s, t)``, the teacher's logits detached."""
    mse = F.mse_loss(s.float(), t.detach().float())
    return -mse.clamp_min(1e-12).log() if log else -mse


def ikd_student(s: Tensor, t: Tensor, log: bool) -> Tensor:
    """The student's inverse-KD term: ``MSE(s, t)`` or ``log ||t - s||_2`` (the norm over the whole batch)."""
    if log:
        return torch.linalg.vector_norm(t.float() - s.float()).clamp_min(1e-12).log()
    return F.mse_loss(s.float(), t.float())


@register_method("cpsc_dfkd")
class CPSCDFKD(GenerativeMethod):
    @rules(ikd=NON_NEGATIVE, scl=NON_NEGATIVE, scl_temperature=POSITIVE)
    @dataclass
    class Config(GenerativeConfig):
        """``adv``: weight of the generator's ``-KL``; ``ikd``: alpha, of the inverse-KD terms (both players);
        ``ikd_log``: their log form (the reference's CIFAR-10 branch); ``bn``: beta, of the BN-statistics
        term; ``scl``: gamma, of the supervised contrastive term, at ``scl_temperature``; ``oh``: eta, of the
        cross-entropy to the sampled class (both players)."""

        batch_size: int = 512
        temperature: float = 1.0
        nz: int = 256
        g_steps: int = 6
        s_steps: int = 5
        lr_g: float = 1e-3
        conditional: bool = True
        output: str = "tanh_bn"
        adv: float = 1.0
        ikd: float = 5.0
        ikd_log: bool = False
        bn: float = 1.0
        scl: float = 0.7
        scl_temperature: float = 0.07
        oh: float = 0.7

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        if not cfg.conditional:
            raise ConfigError(f"method {cfg.name}: CPSC-DFKD's generator is class-conditional (its sampled classes "
                              "are the pseudo-labels of the CE and contrastive terms); keep method.conditional=true")
        super().__init__(cfg, student, info)
        self.t_tap = PenultimateTap(self.teacher)
        self.s_tap = PenultimateTap(student)
        ds, dt = self.s_tap.num_features, self.t_tap.num_features
        self.adapter = mlp(ds, ds, dt) if ds != dt else None

    def generator_params(self) -> list[nn.Parameter]:
        extra = list(self.adapter.parameters()) if self.adapter is not None else []
        return [*self.generator.parameters(), *extra]

    def student_features(self, f: Tensor) -> Tensor:
        """The student's penultimate features at the teacher's width, L2-normalised."""
        return F.normalize((self.adapter(f) if self.adapter is not None else f).float(), dim=1)

    def generator_terms(self, x: Tensor, z: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        if self.bn_stats is None:
            f_t, t = self.t_tap(x)
            bn = x.new_zeros((), dtype=torch.float32)
        else:
            with self.bn_stats.active():
                f_t, t = self.t_tap(x)
                bn = self.bn_stats.loss()
        f_s, s = self.s_tap(x)
        kl = soft_kl(s, t, cfg.temperature)
        ikd = ikd_generator(s, t, cfg.ikd_log)
        views = torch.stack([self.student_features(f_s), F.normalize(f_t.float(), dim=1)], dim=1)
        scl = sup_con(views, y, cfg.scl_temperature)
        ce = F.cross_entropy(t.float(), y)
        loss = -cfg.adv * kl + cfg.ikd * ikd + cfg.bn * bn + cfg.scl * scl + cfg.oh * ce
        return {"loss": loss, "kl": kl, "ikd": ikd, "bn": bn, "scl": scl, "ce": ce,
                "t_acc": train_accuracy(t, y)}

    def student_batch(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        with torch.no_grad():
            t = self.teacher(x)
        s = self.student(x)
        kd = self.kd(s, t)
        ikd = ikd_student(s, t, cfg.ikd_log)
        ce = F.cross_entropy(s.float(), y)
        loss = kd + cfg.ikd * ikd + cfg.oh * ce
        return {"loss": loss, "kd": kd, "ikd": ikd, "ce": ce, "agree": train_accuracy(s, t.argmax(1))}
