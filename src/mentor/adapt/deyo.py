"""DeYO: destroy your object — entropy and pseudo-label probability difference (PLPD) for sample selection
and weighting (Lee, Jung, Lee, Park, Shin, Kim & Lee, "Entropy is not Enough for Test-Time Adaptation:
From the Perspective of Disentangled Factors", ICLR 2024)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..methods import StepContext, register_method
from ..nn import bn_layers, entropy, frozen_bn_stats
from .tent import Tent, affine_outside


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)


def _resize(x: Tensor, size: int) -> Tensor:
    """torchvision's ``Resize((size, size))`` of a tensor batch: bilinear with antialiasing."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).to(x.dtype)


def patch_shuffle(x: Tensor, grid: int, generator: torch.Generator | None = None) -> Tensor:
    """Cut every image into ``grid x grid`` patches and put them back in a random order, one permutation
    per image (DeYO's ``aug_type='patch'``; ``grid`` is its ``patch_len``). An image whose side is not a
    multiple of ``grid`` is resized to the nearest multiple below and back, as the reference does (which
    takes every image square, of side ``x.shape[-1]``)."""
    b, c, _, side = x.shape
    size = side // grid * grid
    if size == 0:
        raise ValueError(f"patch_shuffle: {grid} patches per side do not fit an image of side {side}")
    y = _resize(x, size)
    ph = size // grid
    patches = y.reshape(b, c, grid, ph, grid, ph).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, ph)
    order = _rand((b, grid * grid), generator, x.device).argsort(1)
    patches = patches[torch.arange(b, device=x.device).unsqueeze(1), order]
    y = patches.reshape(b, grid, grid, c, ph, ph).permute(0, 3, 1, 4, 2, 5).reshape(b, c, size, size)
    return _resize(y, side)


def pixel_shuffle(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One random permutation of the pixel positions, shared by every image and channel (DeYO's
    ``aug_type='pixel'``)."""
    b, c, h, w = x.shape
    order = _rand((h * w,), generator, x.device).argsort()
    return x.reshape(b, c, h * w)[:, :, order].reshape(b, c, h, w)


def occlude(x: Tensor, size: int, row: int, column: int) -> Tensor:
    """A ``size x size`` window at (``row``, ``column``) filled with each image's per-channel mean (DeYO's
    ``aug_type='occ'``); a window past the border is cut at it."""
    out = x.clone()
    out[:, :, row:row + size, column:column + size] = x.mean((2, 3), keepdim=True)
    return out


@contextlib.contextmanager
def masked_batch_stats(module: nn.Module, weight: Tensor) -> Iterator[None]:
    """Forward passes in which every BN layer that normalises with batch statistics takes them from the
    samples with ``weight`` 1 only (``weight``: ``[B]`` of 0/1), and normalises every sample with them:
    the same outputs for those samples as a forward of the selected sub-batch, without changing shapes.
    Running statistics are left untouched. Statistics in float32 (biased variance, as BatchNorm's
    training mode normalises)."""

    def hook(layer, inputs, output):
        x = inputs[0].float()
        dims = (0, *range(2, x.dim()))
        w = weight.float().view(-1, *([1] * (x.dim() - 1)))
        per = x[0, 0].numel()
        total = (weight.float().sum() * per).clamp(min=1)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        mean = (x * w).sum(dims) / total
        var = (w * (x - mean.view(shape)).square()).sum(dims) / total
        out = F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
        return out.to(output.dtype)

    layers = [m for m in bn_layers(module) if m.training or not m.track_running_stats]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with frozen_bn_stats(module):
            yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class DeYOSelection:
    """One batch's selection: ``reliable`` (entropy filter), ``plpd``, ``kept`` (both filters) and the
    detached ``weights`` (0 off ``kept``)."""

    entropy: Tensor
    reliable: Tensor
    plpd: Tensor
    kept: Tensor
    weights: Tensor

    @property
    def count(self) -> Tensor:
        return self.kept.sum()

    def loss(self) -> Tensor:
        """The weighted entropy averaged over the kept samples (0, with a zero gradient, when none is)."""
        return (self.entropy * self.weights).sum() / self.count.clamp(min=1)


def deyo_selection(logits: Tensor, logits_shuffled: Tensor, reliable: Tensor, plpd_threshold: float, e0: float,
                   reweight_ent: bool = True, reweight_plpd: bool = True) -> DeYOSelection:
    """DeYO's PLPD filter and weights (Eqns. 7-10 of the paper; Jhyun17/DeYO ``methods/deyo.py``) given the
    entropy filter ``reliable``: ``PLPD_i = p_i[y_i] - p'_i[y_i]`` with ``y_i = argmax p_i``, ``p`` the
    softmax of ``logits`` and ``p'`` that of the shuffled images; kept are the reliable samples with
    ``PLPD > plpd_threshold``; weight ``exp(e0 - H_i) * reweight_ent + exp(PLPD_i) * reweight_plpd`` (1 when
    both are off)."""
    h = entropy(logits)
    p = logits.detach().float().softmax(1)
    q = logits_shuffled.detach().float().softmax(1)
    y = p.argmax(1, keepdim=True)
    plpd = (p.gather(1, y) - q.gather(1, y)).squeeze(1)
    kept = reliable & (plpd > plpd_threshold)
    if reweight_ent or reweight_plpd:
        coeff = float(reweight_ent) * torch.exp(e0 - h.detach()) + float(reweight_plpd) * torch.exp(plpd)
    else:
        coeff = torch.ones_like(h)
    weights = torch.where(kept, coeff, torch.zeros_like(coeff))
    return DeYOSelection(h, reliable, plpd, kept, weights)


@register_method("deyo")
class DeYO(Tent):
    """Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled
    Factors", ICLR 2024 (Jhyun17/DeYO ``methods/deyo.py``, ``config.py``; mariodoebler/test-time-adaptation
    ``classification/methods/deyo.py``).

    Tent's setting (BN layers on test-batch statistics, BN affine parameters trained except inside
    ``skip``, as SAR). Per test batch, with the predictions scored made before the update:

    1. entropy filter: ``H < e_margin * ln C`` (0.5);
    2. the images are destroyed as objects: ``aug`` ``"patch"`` shuffles a ``patch_len x patch_len`` grid
       of patches per image (:func:`patch_shuffle`), ``"pixel"`` permutes pixels, ``"occ"`` paints a
       mean-coloured square; the network predicts them (no gradient) with BN statistics of the
       entropy-filtered images only, as the reference forwards that sub-batch (:func:`masked_batch_stats`);
    3. PLPD filter and weights (:func:`deyo_selection`): ``plpd_threshold`` 0.2, weights
       ``exp(E0 - H) + exp(PLPD)`` with ``E0 = reweight_margin * ln C`` (0.4);
    4. loss: the weighted entropy averaged over the kept samples; a batch that keeps none leaves the
       parameters unchanged (the reference skips its update). ``backward_samples`` is the kept count.

    ``patch_len`` is the number of patches per side (4 on 224-pixel ImageNet images: 56-pixel patches).
    It stays 4 here: on 28-pixel images a 4 x 4 grid of 7-pixel patches keeps local strokes and texture
    while destroying the object's shape, which is the point of the augmentation, and 28 is a multiple of
    4 so nothing is resized. The occlusion window (112 at (56, 56) on 224 pixels) scales to 14 at (7, 7).
    Defaults: ``plpd_threshold`` 0.2 (``config.py`` and the benchmark; 0.3 in the paper's script for the
    mild ImageNet-C setting with a BN ResNet-50); optimizer Adam at 1e-3 as the benchmark's CIFAR-10-C
    config (the reference's ImageNet runs: SGD 0.00025, momentum 0.9); ``lr: null`` uses the run's ``optim``.
    """

    @rules(e_margin=POSITIVE, reweight_margin=POSITIVE, patch_len=COUNT, occlusion_size=NON_NEGATIVE,
           row_start=NON_NEGATIVE, column_start=NON_NEGATIVE)
    @dataclass
    class Config(Tent.Config):
        e_margin: float = 0.5
        reweight_margin: float = 0.4
        plpd_threshold: float = 0.2
        reweight_ent: bool = True
        reweight_plpd: bool = True
        aug: Literal["patch", "pixel", "occ"] = "patch"
        patch_len: int = 4
        occlusion_size: int = 14
        row_start: int = 7
        column_start: int = 7
        skip: tuple[str, ...] = ("layer4",)

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        c = info.num_classes
        self.margin = cfg.e_margin * math.log(c)
        self.e0 = cfg.reweight_margin * math.log(c)

    def adapted_parameters(self) -> list[nn.Parameter]:
        return affine_outside(self.student, tuple(self.cfg.skip))

    def destroy(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The object-destroying view of every image of ``x`` (``aug``)."""
        cfg = self.cfg
        if cfg.aug == "patch":
            return patch_shuffle(x, cfg.patch_len, generator)
        if cfg.aug == "pixel":
            return pixel_shuffle(x, generator)
        return occlude(x, cfg.occlusion_size, cfg.row_start, cfg.column_start)

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        logits = self.student(x)
        reliable = entropy(logits.detach()) < self.margin
        with torch.no_grad(), masked_batch_stats(self.student, reliable):
            shuffled = self.student(self.destroy(x.detach(), ctx.generator))
        cfg = self.cfg
        sel = deyo_selection(logits, shuffled, reliable, cfg.plpd_threshold, self.e0, cfg.reweight_ent,
                             cfg.reweight_plpd)
        n1 = reliable.sum().clamp(min=1)
        return {"logits": logits.detach(), "loss": sel.loss(), "entropy": sel.entropy.detach().mean(),
                "reliable": reliable.float().mean(), "kept": sel.kept.float().mean(),
                "plpd": torch.where(reliable, sel.plpd, torch.zeros_like(sel.plpd)).sum() / n1,
                "backward_samples": sel.count.float(), "apply": sel.count > 0}


__all__ = ["DeYO", "DeYOSelection", "deyo_selection", "masked_batch_stats", "occlude", "patch_shuffle",
           "pixel_shuffle"]
