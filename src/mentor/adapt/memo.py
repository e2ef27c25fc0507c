"""MEMO: marginal entropy minimisation over augmentations of one test point (Zhang, Levine & Finn, "MEMO:
Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..data.augment import OPS, StrongAugment, WeakAugment, _constant
from ..methods import MethodConfig, StepContext, register_method
from ..nn import replace_norm
from .base import TestTimeMethod

#: AugMix's operations (google-research/augmix ``augmentations``; MEMO's ``third_party.py``), as the
#: names of :data:`mentor.data.augment.OPS`.
AUGMIX_OPS = ("AutoContrast", "Equalize", "Rotate", "Solarize", "ShearX", "ShearY", "TranslateX", "TranslateY",
              "Posterize")


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax over the first dimension (the augmented copies of one point):
    ``-sum_c pbar_c log pbar_c`` with ``pbar = mean_i softmax(z_i)``, computed in log space."""
    log_p = logits.float().log_softmax(-1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum(-1)


@dataclass(frozen=True)
class AugMix:
    """AugMix views (Hendrycks et al., ICLR 2020) as MEMO draws them for CIFAR, on the device, per copy:

    a random crop of the zero-padded image (``padding`` pixels) and a horizontal flip (``flip``); then
    ``width`` 3 chains of 1 to 3 operations drawn uniformly from :data:`AUGMIX_OPS` with severity-1
    magnitudes (rotation 0-2 degrees, shear up to 0.03, translation up to side/30 pixels, solarize
    threshold 231-254 of 255, posterize to 4 bits), mixed with Dirichlet(1, 1, 1) weights, and the mix
    blended with the cropped image by ``m ~ Beta(1, 1)`` (``m * image + (1 - m) * mix``, MEMO's form).
    The operations run as :class:`mentor.data.augment.StrongAugment` slots (colour operations in
    order, then one nearest-neighbour warp with grey fill for the geometric ones; the reference warps
    bilinearly, in the drawn order).
    """

    padding: int = 4
    flip: bool = True
    width: int = 3
    max_depth: int = 3
    severity: float = 1.0

    def chain(self) -> StrongAugment:
        return StrongAugment(num_ops=self.max_depth, cutout=0.0, fill=0.5)

    def sample_params(self, batch: int, side: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Per copy: the crop ``weak_offset`` / ``weak_flip``, the chains' mixing ``weights`` [B, width] and
        ``m`` [B], and per chain ``ops`` / ``magnitudes`` [width, B, max_depth] in the units of
        :data:`mentor.data.augment.OP_RANGES` (slots past a chain's depth hold ``Identity``)."""
        dev = generator.device
        weak = WeakAugment(padding=self.padding, flip=self.flip, padding_mode="zeros")
        params = {f"weak_{k}": v for k, v in weak.sample_params(batch, generator).items()}
        gamma = -torch.log(torch.rand((batch, self.width), generator=generator, device=dev).clamp_min(1e-12))
        params["weights"] = gamma / gamma.sum(1, keepdim=True)  # Dirichlet(1, ..., 1)
        params["m"] = torch.rand(batch, generator=generator, device=dev)  # Beta(1, 1)
        shape = (self.width, batch, self.max_depth)
        pick = torch.randint(0, len(AUGMIX_OPS), shape, generator=generator, device=dev)
        depth = torch.randint(1, self.max_depth + 1, (self.width, batch, 1), generator=generator, device=dev)
        level = 0.1 + (self.severity - 0.1) * torch.rand(shape, generator=generator, device=dev)
        sign = torch.where(torch.rand(shape, generator=generator, device=dev) < 0.5, -1.0, 1.0)
        ops = _constant(tuple(OPS.index(n) for n in AUGMIX_OPS), dev, torch.long)[pick]
        unit = level / 10.0  # AugMix's int_parameter / float_parameter scale levels by maxval / 10
        mags = torch.zeros(shape, device=dev)
        mags = torch.where(ops == OPS.index("Rotate"), sign * torch.floor(unit * 30.0), mags)
        mags = torch.where(ops == OPS.index("Solarize"), (256.0 - torch.floor(unit * 256.0)) / 255.0, mags)
        mags = torch.where((ops == OPS.index("ShearX")) | (ops == OPS.index("ShearY")), sign * unit * 0.3, mags)
        shift = sign * torch.floor(unit * side / 3.0) / side
        mags = torch.where((ops == OPS.index("TranslateX")) | (ops == OPS.index("TranslateY")), shift, mags)
        mags = torch.where(ops == OPS.index("Posterize"), 4.0 - torch.floor(unit * 4.0), mags)
        # slots beyond a chain's depth do nothing
        used = torch.arange(self.max_depth, device=dev).view(1, 1, -1) < depth
        params["ops"] = torch.where(used, ops, torch.full_like(ops, OPS.index("Identity")))
        params["magnitudes"] = mags
        return params

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        b = x.shape[0]
        weak = WeakAugment(padding=self.padding, flip=self.flip, padding_mode="zeros")
        image = weak.apply(x, {"offset": params["weak_offset"], "flip": params["weak_flip"]})
        chain = self.chain()
        no_cutout = {"cutout_size": torch.zeros(b, device=x.device),
                     "cutout_center": torch.zeros(b, 2, device=x.device)}
        mix = torch.zeros_like(image)
        for j in range(self.width):  # over the chains (a fixed count), never over images
            out = chain.apply(image, {"ops": params["ops"][j], "magnitudes": params["magnitudes"][j], **no_cutout})
            mix = mix + params["weights"][:, j].view(-1, 1, 1, 1) * out
        m = params["m"].view(-1, 1, 1, 1)
        return m * image + (1 - m) * mix

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.sample_params(x.shape[0], x.shape[-1], generator))


class PriorBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises with ``prior * source + (1 - prior) * batch`` statistics (MEMO's test-time
    BN for its ImageNet networks, from Schneider et al., NeurIPS 2020): the batch mean and unbiased
    variance enter as constants (no gradient), as the reference's in-place estimate does. ``prior`` 1
    is plain eval-mode BN. In training mode it is an ordinary BatchNorm2d."""

    prior: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.prior >= 1.0:
            return super().forward(x)
        dims = (0, 2, 3)
        n = x.numel() // x.shape[1]
        stats = x.detach().float()
        mean = stats.mean(dims)
        var = stats.var(dims, correction=1 if n > 1 else 0)
        mean = self.prior * self.running_mean + (1 - self.prior) * mean
        var = self.prior * self.running_var + (1 - self.prior) * var
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), self.weight, self.bias, False, 0.0, self.eps)


def _prior_bn(layer: nn.BatchNorm2d, prior: float) -> PriorBatchNorm2d:
    new = PriorBatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                           track_running_stats=layer.track_running_stats)
    new.load_state_dict(layer.state_dict())
    new.prior = prior
    return new


@register_method("memo")
class MEMO(TestTimeMethod):
    """Zhang, Levine & Finn, "MEMO: Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022
    (zhangmarvin/memo ``cifar-10-exps/test_calls/test_adapt.py`` and ``imagenet-exps/utils/adapt_helpers.py``;
    mariodoebler/test-time-adaptation ``classification/methods/memo.py``).

    Episodic and per test point: from the source weights, ``n_augmentations`` :class:`AugMix` copies of the
    point, the entropy of the model's mean prediction over them (:func:`marginal_entropy`), one SGD step
    on all parameters (``lr``, no momentum or weight decay), then the prediction of the point itself with
    the adapted weights. The points of a batch are adapted independently: ``torch.func`` maps
    (``vmap``) one functional step per point, from per-point gradients to per-point weights to its
    prediction, so nothing is copied per point and the student is never changed (``chunk_size`` bounds the
    points mapped at once; 0 maps the whole batch). ``backward_samples`` is the batch size.

    Defaults: 32 copies and lr 0.005, the official CIFAR-10 script's (its ``--batch_size`` is the number of
    copies; the ImageNet script uses 64 and 2.5e-4). BatchNorm: the official ImageNet runs normalise with
    ``prior = N / (N + 1)`` times the source statistics plus the rest times the statistics of the copies
    (of the single point when it is predicted), ``prior_strength`` N = 16; a negative ``prior_strength``
    uses the source statistics alone (eval mode; the CIFAR-10 network of the paper has GroupNorm, where
    the question does not arise). Only BatchNorm2d layers take the prior, as in the reference.
    """

    episodic = True

    @rules(n_augmentations=COUNT, lr=POSITIVE, chunk_size=NON_NEGATIVE, severity=POSITIVE, padding=NON_NEGATIVE)
    @dataclass
    class Config(MethodConfig):
        n_augmentations: int = 32
        lr: float = 0.005
        prior_strength: float = 16.0
        severity: float = 1.0
        padding: int = 4
        flip: bool = True
        chunk_size: int = 0

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        prior = 1.0 if cfg.prior_strength < 0 else cfg.prior_strength / (cfg.prior_strength + 1.0)
        replace_norm(student, lambda layer: _prior_bn(layer, prior), kinds=(nn.BatchNorm2d,))
        self.augment = AugMix(padding=cfg.padding, flip=cfg.flip, severity=cfg.severity)
        c = info.in_channels
        self.register_buffer("pixel_mean", torch.tensor(info.mean or (0.0,) * c).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(info.std or (1.0,) * c).view(1, -1, 1, 1), persistent=False)

    def phases(self):
        return []  # the per-point SGD steps are taken functionally inside the step

    def copies(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """``[B, n_augmentations, C, H, W]`` engine-normalised AugMix copies of every point of ``x``."""
        b, n = x.shape[0], self.cfg.n_augmentations
        if generator is None:  # a direct call outside the runner: a generator seeded from torch's own
            generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, ())))
        pixels = (x.float() * self.pixel_std + self.pixel_mean).clamp(0.0, 1.0)
        pixels = pixels.unsqueeze(1).expand(b, n, *x.shape[1:]).reshape(b * n, *x.shape[1:])
        views = (self.augment(pixels, generator) - self.pixel_mean) / self.pixel_std
        return views.to(x.dtype).view(b, n, *x.shape[1:])

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        copies = self.copies(x, ctx.generator)
        net = self.student
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = dict(net.named_buffers())
        lr = self.cfg.lr

        def objective(p: dict[str, Tensor], views: Tensor) -> Tensor:
            return marginal_entropy(functional_call(net, (p, buffers), (views,)))

        def one(views: Tensor, point: Tensor) -> tuple[Tensor, Tensor]:
            grads, entropy = grad_and_value(objective)(params, views)
            adapted = {k: params[k] - lr * grads[k] for k in params}
            return functional_call(net, (adapted, buffers), (point.unsqueeze(0),))[0], entropy

        logits, entropy = vmap(one, chunk_size=self.cfg.chunk_size or None)(copies, x)
        entropy = entropy.mean().detach()
        return {"logits": logits.detach(), "loss": entropy, "marginal_entropy": entropy,
                "backward_samples": torch.full((), float(x.shape[0]), device=x.device)}
