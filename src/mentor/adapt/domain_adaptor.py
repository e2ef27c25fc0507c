"""DomainAdaptor: AdaMixBN and generalized entropy minimisation, one fine-tuning step per test batch
(Zhang, Qi, Shi & Gao, "DomainAdaptor: A Novel Approach to Test-time Adaptation", ICCV 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, DECAY, POSITIVE, PROBABILITY, between, rules
from ..errors import ConfigError
from ..methods import MethodConfig, StepContext, register_method
from ..nn import norm_affine, replace_norm
from ..nn.crops import resized_crops
from .base import TestTimeMethod

# -- AdaMixBN ------------------------------------------------------------------------------------------


def mixture_coefficient(x: Tensor, src_mean: Tensor, src_var: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """AdaMixBN's dynamic coefficient of every sample of ``x`` ``[N, C, H, W]``, shape ``[N]``.

    With the instance statistics ``mu_i``, ``sigma_i`` of each sample over ``(H, W)`` (unbiased std), the
    batch statistics ``mean``, ``var`` and the source's ``src_mean``, ``src_var`` (all per channel), and
    ``d(a, b) = mean_c (mu_a - mu_b)^2 + mean_c (sigma_a - sigma_b)^2``:
    ``lambda_i = clip(1 - d_st / (d_st + d_is + d_it), 0, 1)``. The layer mixes with their batch mean."""
    inst_mean, inst_std = x.mean((2, 3)), x.std((2, 3))
    std, src_std = var.sqrt(), src_var.sqrt()
    d_it = (inst_mean - mean).pow(2).mean(1) + (inst_std - std).pow(2).mean(1)
    d_is = (inst_mean - src_mean).pow(2).mean(1) + (inst_std - src_std).pow(2).mean(1)
    d_st = (mean - src_mean).pow(2).mean() + (std - src_std).pow(2).mean()
    return (1.0 - d_st / (d_st + d_is + d_it)).clamp(0.0, 1.0)


def rectified_affine(weight: Tensor, bias: Tensor, lam: Tensor, src_mean: Tensor, src_var: Tensor, mean: Tensor,
                     var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The statistic transformation: the affine ``(gamma', beta')`` with which normalising by the batch
    statistics equals normalising by the mixed ones ``lam * source + (1 - lam) * batch`` with
    ``(weight, bias)``: ``gamma' = gamma sqrt(var + eps) / sqrt(var_mix + eps)``,
    ``beta' = beta + lam (mean - src_mean) / sqrt(var + eps) * gamma'``."""
    std = torch.sqrt(var + eps)
    gamma = weight * std / torch.sqrt(lam * src_var + (1.0 - lam) * var + eps)
    return gamma, bias + lam * (mean - src_mean) / std * gamma


class AdaMixBN(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, mixes the source statistics (the running ones, never updated
    here) with the test batch's by a coefficient computed from the batch (:func:`mixture_coefficient`, or
    the fixed ``mix_lambda``), DomainAdaptor's adaptive mixture BN. Batch variances are unbiased, as in
    the reference code. In eval mode it is the plain BN of the source.

    With ``transform`` (the default) the mixture is applied as the statistic transformation: the first
    training forward after :meth:`rectify_next` writes ``(gamma', beta')`` of :func:`rectified_affine`
    into ``weight`` and ``bias`` (no gradient through the rewrite), and every training forward normalises
    with the batch's own statistics and the layer's current affine parameters, which may then be
    fine-tuned. Without ``transform`` every forward normalises with the mixed statistics and the
    trained ``(gamma, beta)``, the coefficient recomputed (with its gradient) each time. ``lam`` holds
    the batch coefficient last used."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, *,
                 transform: bool = True, mix_lambda: float | None = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True, device=device,
                         dtype=dtype)
        self.transform = transform
        self.mix_lambda = mix_lambda
        self.pending = True
        self.lam: Tensor | None = None

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, transform: bool = True, mix_lambda: float | None = None) -> AdaMixBN:
        """An AdaMixBN carrying ``bn``'s affine parameters, running statistics, eps and momentum."""
        if not (bn.affine and bn.track_running_stats):
            raise ConfigError("AdaMixBN mixes a BN layer's running (source) statistics and rewrites its affine "
                              f"parameters; a BatchNorm2d with affine={bn.affine}, track_running_stats="
                              f"{bn.track_running_stats} has not both")
        layer = cls(bn.num_features, bn.eps, bn.momentum, transform=transform, mix_lambda=mix_lambda,
                    device=bn.weight.device, dtype=bn.weight.dtype)
        layer.load_state_dict(bn.state_dict())
        return layer.train(bn.training)

    def rectify_next(self) -> None:
        """The next training forward computes and writes the rectified affine parameters (a new batch)."""
        self.pending = True

    def coefficient(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        if self.mix_lambda is not None:
            return torch.full((), float(self.mix_lambda), device=x.device)
        return mixture_coefficient(x, self.running_mean, self.running_var, mean, var).mean()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        xf = x.float()
        mean, var = xf.mean((0, 2, 3)), xf.var((0, 2, 3))
        if self.transform:
            if self.pending:
                with torch.no_grad():
                    lam = self.coefficient(xf, mean, var)
                    gamma, beta = rectified_affine(self.weight, self.bias, lam, self.running_mean, self.running_var,
                                                   mean, var, self.eps)
                    self.weight.copy_(gamma)
                    self.bias.copy_(beta)
                self.lam, self.pending = lam, False
        else:
            lam = self.coefficient(xf, mean, var)
            self.lam = lam.detach()
            mean = lam * self.running_mean + (1.0 - lam) * mean
            var = lam * self.running_var + (1.0 - lam) * var
        scale = torch.rsqrt(var + self.eps) * self.weight
        out = (xf - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def _outside_shortcut(name: str, layer: nn.Module) -> bool:
    return not {"shortcut", "downsample"} & set(name.split("."))


# -- GEM -----------------------------------------------------------------------------------------------


def gem_temperature(logits: Tensor) -> Tensor:
    """GEM's per-sample temperature ``T = 2 std_c(z - mean_c z)`` (unbiased std over the classes),
    detached, shape ``[N, 1]``; floored at 1e-12 so constant logits give a zero loss, not NaN."""
    z = logits.detach().float()
    return (2.0 * (z - z.mean(1, keepdim=True)).std(1, keepdim=True)).clamp_min(1e-12)


def _centred(logits: Tensor) -> Tensor:
    z = logits.float()
    return z - z.mean(1, keepdim=True).detach()


def _gem(logits: Tensor, teacher: Tensor | None) -> Tensor:
    """``-mean_i T_i^2 sum_k q_ik log softmax((z_i - mean z_i) / T_i)_k`` with ``q`` the student's own
    tempered distribution (``teacher`` None) or the given detached one."""
    t = gem_temperature(logits)
    log_p = F.log_softmax(_centred(logits) / t, dim=1)
    q = log_p.exp() if teacher is None else teacher.detach()
    return -((q * log_p).sum(1) * t.squeeze(1).pow(2)).mean()


def gem_t(logits: Tensor) -> Tensor:
    """GEM-T: the entropy of the tempered prediction ``softmax((z - mean z) / T)``, times ``T^2``."""
    return _gem(logits, None)


def gem_skd(logits: Tensor) -> Tensor:
    """GEM-SKD: cross-entropy from the detached untempered prediction ``softmax(z)`` to the tempered
    one, times ``T^2`` (self knowledge distillation)."""
    return _gem(logits, _centred(logits).softmax(1))


def gem_aug(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """GEM-Aug: cross-entropy from ``softmax(teacher_logits)`` (the mean logits of augmented views,
    detached) to the tempered prediction, times ``T^2``."""
    return _gem(logits, teacher_logits.float().softmax(1))


def crop_flip_views(x: Tensor, views: int, generator: torch.Generator | None = None,
                    scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 10) -> Tensor:
    """``views`` random horizontal flips and resized crops of every image of ``x``, sample-major: the
    reference's test-time augmentation (torchvision ``RandomHorizontalFlip`` then
    ``RandomResizedCrop(size, scale=(0.8, 1))``), by :func:`mentor.nn.crops.resized_crops`."""
    return resized_crops(x, views, generator, scale, ratio, attempts, flip=True)


# -- the method ----------------------------------------------------------------------------------------


@register_method("domain_adaptor")
class DomainAdaptor(TestTimeMethod):
    """Zhang, Qi, Shi & Gao, "DomainAdaptor: A Novel Approach to Test-time Adaptation", ICCV 2023
    (arXiv 2308.10297); official code koncle/DomainAdaptor ``models/DomainAdaptor.py`` (``AdaMixBN``,
    ``Losses``, ``EntropyMinimizationHead``, ``test_time_adaption``), defaults from ``main.py`` and
    ``script/TTA.sh``.

    Every BatchNorm2d of the network becomes an :class:`AdaMixBN` (the reference converts ``bn1`` and
    every block BN of ``layer1..layer4`` of its ResNets, the downsample BNs included: for a ResNet that is
    every BatchNorm2d; ``convert_shortcut=false`` leaves the shortcut / downsample BNs as they are). For
    each test batch:

    1. every AdaMixBN computes the batch's mixture coefficient and writes the rectified affine
       parameters ``(gamma', beta')`` in its first forward (the statistic transformation);
    2. ``ft_steps`` plain SGD steps (``lr``; momentum 0, or 0.9 with ``online``, as the reference's
       ``momentum=args.online``) of the GEM loss on the affine parameters of every BatchNorm2d, taken
       here with ``torch.autograd.grad``: what the steps update is ``(gamma', beta')`` themselves;
    3. the same batch is predicted with the updated parameters, the AdaMixBN layers normalising with the
       batch's statistics.

    Episodic unless ``online``: the runner restores the source weights before every batch. Online, the
    adapted parameters carry over and each batch rectifies them again, as the reference's online mode
    does (its AdaMixBN notes it "cannot be applied in an online manner": the rewrites compound, and on the
    test digit shift the online accuracy falls far below the episodic one). Returned terms: ``loss`` (the GEM
    loss of the first step, detached: the runner takes no step of its own), ``lambda`` (the mixture
    coefficient averaged over the layers) and ``backward_samples`` (batch size x ``ft_steps``).

    The reference default (``script/TTA.sh``: ``--loss-names gem-t --TTAug --TTA-bs 3 --TTA-head em``)
    is GEM-T. ``--TTAug`` only makes the data loader attach ``TTA-bs`` augmented views to each sample;
    they are read by GEM-Aug alone, never at prediction. ``--TTA-head em`` picks the entropy-minimisation
    head, whose prediction is the plain logits (LAME is off). So the default path predicts
    ``argmax student(x)`` after one GEM-T step and draws no augmentation. With ``loss=gem_aug`` the
    teacher is ``softmax`` of the mean logits over ``tta_bs`` views of :func:`crop_flip_views` (flip +
    resized crop at ``crop_scale``), drawn on the device with ``ctx.generator``, computed without
    gradient before the student's forward: as in the reference, that forward of the views is the first
    of the batch, so the rectified parameters come from the views' statistics.

    Design choices: the GEM temperature is floored at 1e-12 and the losses use ``log_softmax`` (the
    reference takes ``softmax(.).log()``); BatchNorm layers that are not converted (BatchNorm1d, or the
    shortcuts with ``convert_shortcut=false``) keep the source statistics (eval mode) while their affine
    parameters, when BatchNorm2d, are trained as the reference's optimizer does.
    """

    needs_bn = True

    @rules(lr=POSITIVE, momentum=DECAY, ft_steps=COUNT, tta_bs=COUNT, crop_scale=between(0, 1, lo_open=True),
           mix_lambda=PROBABILITY)
    @dataclass
    class Config(MethodConfig):
        loss: Literal["gem_t", "gem_skd", "gem_aug"] = "gem_t"
        lr: float = 1e-3
        momentum: float | None = None  # null: 0 episodic, 0.9 online (the reference's momentum=args.online)
        ft_steps: int = 1
        online: bool = False
        tta_bs: int = 3  # augmented views per sample (GEM-Aug)
        crop_scale: float = 0.8  # smallest area fraction of a GEM-Aug crop (the reference's --min-scale)
        transform: bool = True  # the statistic transformation (the reference's --Transform)
        mix_lambda: float | None = None  # a fixed coefficient instead of the dynamic one (--mix-lambda)
        convert_shortcut: bool = True

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        factory = partial(AdaMixBN.from_bn, transform=cfg.transform, mix_lambda=cfg.mix_lambda)
        where = None if cfg.convert_shortcut else _outside_shortcut
        converted = replace_norm(student, factory, kinds=(nn.BatchNorm2d,), where=where)
        if not converted:
            raise ConfigError(f"method {self.method_name} turns BatchNorm2d layers into AdaMixBN, but the network "
                              f"{type(student).__name__} has none to convert; adapt a convolutional network with "
                              "BatchNorm2d (a ResNet of the zoo)")
        self.layers = [m for m in student.modules() if isinstance(m, AdaMixBN)]
        self.affine = norm_affine(student, (nn.BatchNorm2d,))
        student.requires_grad_(False)
        for p in self.affine:
            p.requires_grad_(True)
        if cfg.momentum is not None:
            self.momentum = cfg.momentum
        else:
            self.momentum = 0.9 if cfg.online else 0.0
        self._velocity: list[Tensor] | None = None

    @property
    def episodic(self) -> bool:  # type: ignore[override]
        return not self.cfg.online

    def phases(self):
        return []  # the SGD steps are taken inside adapt_step, before the prediction

    def prepare(self) -> None:
        self.eval()
        for layer in self.layers:
            layer.train()

    def reset(self) -> None:
        super().reset()
        self._velocity = None

    def objective(self, logits: Tensor, teacher: Tensor | None) -> Tensor:
        if self.cfg.loss == "gem_t":
            return gem_t(logits)
        if self.cfg.loss == "gem_skd":
            return gem_skd(logits)
        return gem_aug(logits, teacher)

    @torch.no_grad()
    def _sgd(self, grads: tuple[Tensor, ...]) -> None:
        if self.momentum == 0.0:
            torch._foreach_add_(self.affine, grads, alpha=-self.cfg.lr)
            return
        if self._velocity is None:
            self._velocity = [torch.zeros_like(p) for p in self.affine]
        torch._foreach_mul_(self._velocity, self.momentum)
        torch._foreach_add_(self._velocity, grads)
        torch._foreach_add_(self.affine, self._velocity, alpha=-self.cfg.lr)

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        cfg = self.cfg
        for layer in self.layers:
            layer.rectify_next()
        teacher = None
        if cfg.loss == "gem_aug":
            views = crop_flip_views(x, cfg.tta_bs, ctx.generator, scale=(cfg.crop_scale, 1.0))
            with torch.no_grad():
                teacher = self.student(views).float().view(x.shape[0], cfg.tta_bs, -1).mean(1)
        first = None
        with torch.enable_grad():
            for _ in range(cfg.ft_steps):
                loss = self.objective(self.student(x), teacher)
                grads = torch.autograd.grad(loss, self.affine, allow_unused=True, materialize_grads=True)
                self._sgd(grads)
                if first is None:
                    first = loss.detach()
        lam = torch.stack([layer.lam for layer in self.layers if layer.lam is not None]).mean()
        with torch.no_grad():
            logits = self.student(x)
        return {"logits": logits, "loss": first, "lambda": lam,
                "backward_samples": torch.full((), float(x.shape[0] * cfg.ft_steps), device=x.device)}
