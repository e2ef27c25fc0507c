"""Batched data augmentation on the device: weak (crop + flip) and strong (RandAugment + Cutout) views.

Semi-supervised methods in the FixMatch family ("FixMatch: Simplifying Semi-Supervised Learning with
Consistency and Confidence", Sohn et al., 2020) feed the model two views of each unlabelled image: a
*weak* one (random crop with padding, horizontal flip) and a *strong* one (RandAugment, "RandAugment:
Practical automated data augmentation with a reduced search space", Cubuk et al., 2020, as FixMatch
modifies it: ops drawn per image with random magnitudes, then Cutout). The reference code does this
per image in PIL inside DataLoader workers; here it runs on a whole batch at once, on the batch's
device, so that a training step can be compiled and captured in a CUDA graph.

The protocol: an augmentation is a callable ``aug(x, generator) -> x'`` on a float batch
``x`` of shape ``[B, C, H, W]`` (C = 1 or 3, values in [0, 1]); ``generator`` is a
``torch.Generator`` on x's device and is the only source of randomness, so the same (seed, step,
rank) gives the same batch. Every random choice is drawn per image. Randomised augmentations also
split into ``sample_params(batch, generator) -> dict[str, Tensor]`` (eager, cheap) and
``apply(x, params) -> x'`` (no randomness, static shapes, no host synchronisation, no data-dependent
Python control flow), so ``apply`` can be given to ``torch.compile(fullgraph=True)`` and tests can
inspect the drawn parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..registry import Registry

__all__ = [
    "AUGMENTS",
    "OPS",
    "OP_RANGES",
    "Augment",
    "NoAugment",
    "Normalize",
    "StrongAugment",
    "WeakAugment",
    "benchmark",
    "build_augment",
]


class Augment(Protocol):
    """A batched augmentation: ``aug(x, generator)`` returns a batch of the same shape and dtype."""

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor: ...


def _check_batch(x: Tensor) -> None:
    # Shapes are static, so these checks cost nothing at run time and do not break a compiled graph.
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected an image batch [B, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a float batch with values in [0, 1], got dtype {x.dtype}")


# --------------------------------------------------------------------------------------------------
# Plain transforms


@dataclass(frozen=True)
class NoAugment:
    """The identity view (``"none"``): returns the batch unchanged, for recipes that name views."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x

    def sample_params(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {}

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return x


@dataclass(frozen=True)
class Normalize:
    """Per-channel standardisation ``(x - mean) / std``, the last step of every view.

    Accepts (and ignores) a generator so it fits the augmentation protocol. A single mean/std value
    is broadcast over all channels.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in _as_tuple(self.mean))
        std = tuple(float(s) for s in _as_tuple(self.std))
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} values but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if len(self.mean) not in (1, x.shape[1]):
            raise ValueError(f"Normalize has {len(self.mean)} channels, the batch has {x.shape[1]}")
        mean = _constant(self.mean, x.device, x.dtype).view(1, -1, 1, 1)
        std = _constant(self.std, x.device, x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor on ``device``, copied from the host once and then reused.

    A blocking host-to-device copy waits for the GPU stream, so eager steady-state calls (and a CUDA
    graph capture after warm-up) must not make one. Inside ``torch.compile`` the tensor is simply a
    constant of the graph.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, torch.device(device), dtype)
    if key not in _CONSTANTS:
        # Made outside inference mode, so a first call under evaluation cannot leave an inference
        # tensor that a later differentiable call (Normalize on generated images) would have to save.
        with torch.inference_mode(False):
            _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


# --------------------------------------------------------------------------------------------------
# Weak view: random crop with padding + horizontal flip

_PADDING_MODES = ("reflect", "replicate", "zeros")


def _source_index(i: Tensor, n: int, mode: str) -> tuple[Tensor, Tensor]:
    """Map (possibly out-of-range) source indices into [0, n) the way padding would; also say which
    indices were inside the image (only the "zeros" mode needs that)."""
    inside = (i >= 0) & (i < n)
    if mode == "reflect":
        # Reflection without repeating the edge pixel (numpy/torch "reflect"); valid while pad < n.
        i = torch.where(i < 0, -i, i)
        i = torch.where(i > n - 1, 2 * (n - 1) - i, i)
    return i.clamp(0, n - 1), inside


@dataclass(frozen=True)
class WeakAugment:
    """FixMatch's weak view: a random crop of the padded image plus a horizontal flip with p = 0.5.

    "Flip-and-shift" from FixMatch (Sohn et al., 2020): the image is padded by ``padding`` pixels on
    each side (``reflect`` as USB does, ``replicate`` or ``zeros``) and a window of the original size
    is cut at a per-image random integer offset, i.e. a per-image translation by up to ``padding``
    pixels. Turn ``flip`` off for digits and text, where a mirror image is another class or none.
    Scaling ``padding`` to the image size (USB uses 12.5 % of the side) is the caller's choice.

    Crop and flip are a single gather of source pixels, so there is no padded copy and no loop.
    """

    padding: int = 4
    flip: bool = True
    padding_mode: str = "reflect"

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ValueError(f"WeakAugment: padding must be >= 0, got {self.padding}")
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"WeakAugment: padding_mode must be one of {', '.join(_PADDING_MODES)}, "
                f"got {self.padding_mode!r}"
            )

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.sample_params(x.shape[0], generator))

    def sample_params(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Per image: ``offset`` [B, 2] (x, y) in 0..2*padding (the crop corner in the padded image)
        and ``flip`` [B] bool."""
        dev = generator.device
        offset = torch.randint(0, 2 * self.padding + 1, (batch, 2), generator=generator, device=dev)
        # Draw the coin even when flipping is off, so the stream of later draws does not depend on it.
        coin = torch.rand(batch, generator=generator, device=dev)
        return {"offset": offset, "flip": (coin < 0.5) & self.flip}

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        _check_batch(x)
        b, c, h, w = x.shape
        if self.padding_mode == "reflect" and self.padding >= min(h, w):
            raise ValueError(f"WeakAugment: reflect padding {self.padding} needs an image side > padding")
        offset = params["offset"] - self.padding  # shift of the window relative to the unpadded image
        rows = torch.arange(h, device=x.device) + offset[:, 1:2]  # [B, H]
        cols = torch.arange(w, device=x.device).expand(b, w)
        # Flipping the crop reads its columns right to left, so it folds into the same gather.
        cols = torch.where(params["flip"][:, None], w - 1 - cols, cols) + offset[:, 0:1]  # [B, W]
        rows, row_in = _source_index(rows, h, self.padding_mode)
        cols, col_in = _source_index(cols, w, self.padding_mode)
        index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
        if self.padding_mode == "zeros":
            out = out * (row_in[:, :, None] & col_in[:, None, :])[:, None].to(x.dtype)
        return out


# --------------------------------------------------------------------------------------------------
# Strong view: RandAugment as FixMatch defines it, + Cutout

#: The 14 RandAugment ops of FixMatch (Sohn et al., 2020, appendix table of RandAugment ops).
OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Rotate",
    "Solarize",
    "Color",
    "Posterize",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)

#: Magnitude range of each op, drawn uniformly per image and per op (FixMatch appendix; USB's
#: ``fixmatch_augment_pool``). Units: Rotate in degrees (counter-clockwise); Solarize threshold on
#: the [0, 1] scale; Posterize bits (floored, so 4..7 as in USB); enhancement factors where 0 is the
#: degenerate image and 1 the original; Shear as the affine coefficient; Translate as a fraction of
#: the image side. Ops without a magnitude have (0, 0).
OP_RANGES: dict[str, tuple[float, float]] = {
    "Identity": (0.0, 0.0),
    "AutoContrast": (0.0, 0.0),
    "Equalize": (0.0, 0.0),
    "Rotate": (-30.0, 30.0),
    "Solarize": (0.0, 1.0),
    "Color": (0.05, 0.95),
    "Posterize": (4.0, 8.0),
    "Contrast": (0.05, 0.95),
    "Brightness": (0.05, 0.95),
    "Sharpness": (0.05, 0.95),
    "ShearX": (-0.3, 0.3),
    "ShearY": (-0.3, 0.3),
    "TranslateX": (-0.3, 0.3),
    "TranslateY": (-0.3, 0.3),
}

_OP = {name: k for k, name in enumerate(OPS)}

# ITU-R 601-2 luma, the weights of PIL's convert("L"), which Color and Contrast use as their gray.
_LUMA = (0.299, 0.587, 0.114)


def _blend(image: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    # PIL ImageEnhance: factor 0 gives the degenerate image, 1 the original, and the result is clipped.
    return (degenerate + factor * (image - degenerate)).clamp(0.0, 1.0)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _quantize(x: Tensor) -> Tensor:
    """The uint8 level (as int64) of each value, for the ops that PIL defines on 256 levels."""
    return (x * 255.0).round().clamp(0, 255).long()


def _autocontrast(x: Tensor) -> Tensor:
    # Per image and channel, stretch [min, max] to [0, 1]; a constant channel stays as it is (PIL).
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    stretched = (x - lo) / (hi - lo).clamp_min(1e-12)
    return torch.where(hi > lo, stretched, x)


def _equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per image and channel with PIL's ImageOps.equalize look-up table."""
    b, c, h, w = x.shape
    q = _quantize(x).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    # PIL leaves out the count of the brightest level present, so that level maps to the top.
    top = hist.gather(1, q.amax(dim=1, keepdim=True))
    step = (h * w - top) // 255
    before = hist.cumsum(1) - hist
    lut = ((before + step // 2) // step.clamp_min(1)).clamp(max=255)
    out = (lut.gather(1, q).to(x.dtype) / 255.0).view(b, c, h, w)
    # step == 0 (under 255 pixels below the brightest level) leaves the image unchanged, as in PIL.
    return torch.where((step > 0).view(b, c, 1, 1), out, x)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    # Keep the top `bits` bits of each 8-bit level (PIL ImageOps.posterize). Flooring the level over
    # 2**(8 - bits) is the same bit mask, and float arithmetic is faster than int64 shifts on CPU.
    step = torch.exp2(8 - bits.floor().clamp(1, 8)).to(x.dtype)
    level = (x * 255.0).round().clamp(0, 255)
    return (level / step).floor() * step / 255.0


def _smooth(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, others 1, /13), the degenerate image of Sharpness.

    PIL leaves the one-pixel border unfiltered, so the border is copied from the original. The 3x3
    box sum is two 1-D sums of shifted views: a single-channel conv2d is several times slower on CPU.
    """
    rows = x[:, :, :, :-2] + x[:, :, :, 1:-1] + x[:, :, :, 2:]
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = (box + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0
    return out


def _colour_slot(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    """Apply each image's colour op for one RandAugment slot.

    Every colour op is computed on the whole batch and each image keeps the result of its own op
    (selected with ``torch.where``), which keeps shapes static and avoids host synchronisation;
    geometric ops and Identity leave the image unchanged here (they act later, in the one warp).
    """
    op = op.view(-1, 1, 1, 1)
    m = mag.view(-1, 1, 1, 1).to(x.dtype)
    # PIL's four enhancers are one blend, degenerate + m * (x - degenerate), that differ only in the
    # degenerate image: black (Brightness), the luma gray (Color), the mean luma (Contrast), the
    # smoothed image (Sharpness). Each image picks its degenerate image and the batch blends once.
    # On a one-channel batch the gray is the image itself, so Color is the identity there.
    gray = _gray(x)
    degenerate = torch.where(op == _OP["Sharpness"], _smooth(x), torch.zeros_like(x))
    degenerate = torch.where(op == _OP["Color"], gray, degenerate)
    degenerate = torch.where(op == _OP["Contrast"], gray.mean(dim=(1, 2, 3), keepdim=True), degenerate)
    enhancer = (op == _OP["Brightness"]) | (op == _OP["Color"]) | (op == _OP["Contrast"])
    out = torch.where(enhancer | (op == _OP["Sharpness"]), _blend(x, degenerate, m), x)
    others = {
        "AutoContrast": lambda: _autocontrast(x),
        "Equalize": lambda: _equalize(x),
        "Solarize": lambda: torch.where(x >= m, 1.0 - x, x),
        "Posterize": lambda: _posterize(x, m),
    }
    for name, make in others.items():
        out = torch.where(op == _OP[name], make(), out)
    return out


def _affine(mat: list[list[Tensor]]) -> Tensor:
    return torch.stack([torch.stack(row, dim=-1) for row in mat], dim=-2)


def _sampling_matrix(op: Tensor, mag: Tensor, h: int, w: int) -> Tensor:
    """Per image [B, 3, 3] map from output pixel (x, y, 1) to the input pixel it is read from.

    Conventions follow PIL, which the reference RandAugment uses: Rotate turns the content
    counter-clockwise about the image centre; ShearX reads x + s * y and ShearY reads y + s * x with y
    and x measured from the top-left corner; TranslateX/Y read x + t * W (y + t * H), so a positive
    t moves the content left (up). Each slot holds one op, so the other factors are identities.
    """
    mag = mag.float()
    zero, one = torch.zeros_like(mag), torch.ones_like(mag)
    theta = torch.where(op == _OP["Rotate"], mag, zero) * (math.pi / 180.0)
    shx = torch.where(op == _OP["ShearX"], mag, zero)
    shy = torch.where(op == _OP["ShearY"], mag, zero)
    tx = torch.where(op == _OP["TranslateX"], mag * w, zero)
    ty = torch.where(op == _OP["TranslateY"], mag * h, zero)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Pixel centres sit at integer indices here and at index + 0.5 in PIL's continuous coordinates,
    # hence the centre (W - 1) / 2 and the half-pixel terms of the shears.
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    rotate = _affine(
        [[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy], [zero, zero, one]]
    )
    shear = _affine([[one, shx, 0.5 * shx], [shy, one, 0.5 * shy], [zero, zero, one]])
    shift = _affine([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
    return rotate @ shear @ shift


def _warp_nearest(x: Tensor, matrix: Tensor, fill: float) -> Tensor:
    """Resample every image through its own affine sampling matrix with nearest-neighbour lookup
    (PIL's default for rotate/transform, which the reference uses); pixels read from outside the
    image get ``fill``. One gather for the whole batch."""
    b, c, h, w = x.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=torch.float32),
        torch.arange(w, device=x.device, dtype=torch.float32),
        indexing="ij",
    )
    points = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(h * w, device=x.device)])  # [3, HW]
    # Coordinates stay in float32 even for half-precision batches: bf16 cannot hold 224 exactly.
    src = (matrix[:, :2].float() @ points).round()  # [B, 2, HW]
    sx, sy = src[:, 0], src[:, 1]
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).long()
    out = x.reshape(b, c, h * w).gather(2, index[:, None].expand(b, c, h * w))
    out = torch.where(inside[:, None], out, torch.full_like(out, fill))
    return out.view(b, c, h, w)


def _cutout(x: Tensor, size: Tensor, center: Tensor, fill: float) -> Tensor:
    """Fill one square per image: side ``round(size * W)`` pixels, centred at ``center * (W, H)``,
    clipped at the image border (FixMatch's Cutout, as USB applies it after RandAugment)."""
    b, c, h, w = x.shape
    side = (size.float() * w).round().view(b, 1, 1)
    x0 = (center[:, 0].float() * w).view(b, 1, 1) - side / 2
    y0 = (center[:, 1].float() * h).view(b, 1, 1) - side / 2
    x0, y0 = x0.floor(), y0.floor()
    xs = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w)
    ys = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1)
    square = (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
    return torch.where(square[:, None], torch.full_like(x, fill), x)


@dataclass(frozen=True)
class StrongAugment:
    """FixMatch's strong view: RandAugment with per-image random ops and magnitudes, then Cutout.

    As FixMatch (Sohn et al., 2020) modifies RandAugment (Cubuk et al., 2020): for every image,
    ``num_ops`` ops are drawn uniformly with replacement from the 14 of :data:`OPS`, each with its
    own magnitude drawn uniformly in its range (:data:`OP_RANGES`); then a square of side
    ``v * W``, ``v ~ U(0, cutout)``, centred at a uniform random point, is filled with gray ``fill``.
    ``weak`` optionally applies a crop + flip first (USB's strong view is weak + RandAugment).

    Design for the device, without host synchronisation or per-image Python:
    the colour ops of each slot are all computed on the batch and each image keeps its own op's
    result; the geometric ops (Rotate, ShearX/Y, TranslateX/Y; Identity) of all slots compose into
    one affine matrix per image, applied with one nearest-neighbour warp after the colour slots.
    Where the reference applies a geometric op *before* a colour op, it would also recolour the
    exposed fill area (and Equalize/AutoContrast/Contrast would count it); here the fill stays
    ``warp_fill``. On a one-channel batch, Color is the identity (the image is its own gray).

    ``warp_fill`` is the value of pixels a geometric op exposes (default: ``fill``). USB/TorchSSL's
    PIL code leaves them black (pass ``warp_fill=0.0``); kekmodel-style FixMatch code fills gray.
    """

    num_ops: int = 2
    cutout: float = 0.5
    fill: float = 0.5
    warp_fill: float | None = None
    weak: WeakAugment | None = None

    def __post_init__(self) -> None:
        if self.num_ops < 0:
            raise ValueError(f"StrongAugment: num_ops must be >= 0, got {self.num_ops}")
        if not 0.0 <= self.cutout <= 1.0:
            raise ValueError(
                f"StrongAugment: cutout is a fraction of the image side in [0, 1], got {self.cutout}"
            )

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.sample_params(x.shape[0], generator))

    def sample_params(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Draw every random choice for ``batch`` images.

        Returns ``ops`` [B, num_ops] (indices into :data:`OPS`), ``magnitudes`` [B, num_ops] (in each
        op's units, see :data:`OP_RANGES`), ``cutout_size`` [B] (fraction of the side),
        ``cutout_center`` [B, 2] ((x, y) as fractions of (W, H)) and, with ``weak``,
        ``weak_offset`` / ``weak_flip``.
        """
        dev = generator.device
        params: dict[str, Tensor] = {}
        if self.weak is not None:
            params.update({f"weak_{k}": v for k, v in self.weak.sample_params(batch, generator).items()})
        ops = torch.randint(0, len(OPS), (batch, self.num_ops), generator=generator, device=dev)
        u = torch.rand((batch, self.num_ops), generator=generator, device=dev)
        lo = _constant(tuple(OP_RANGES[n][0] for n in OPS), dev, torch.float32)
        hi = _constant(tuple(OP_RANGES[n][1] for n in OPS), dev, torch.float32)
        params["ops"] = ops
        params["magnitudes"] = lo[ops] + (hi[ops] - lo[ops]) * u
        params["cutout_size"] = self.cutout * torch.rand(batch, generator=generator, device=dev)
        params["cutout_center"] = torch.rand((batch, 2), generator=generator, device=dev)
        return params

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply drawn parameters: (weak,) colour slots in drawn order, one warp, Cutout."""
        _check_batch(x)
        _, _, h, w = x.shape
        if self.weak is not None:
            x = self.weak.apply(x, {"offset": params["weak_offset"], "flip": params["weak_flip"]})
        ops, mags = params["ops"], params["magnitudes"]
        matrix = torch.eye(3, device=x.device).expand(x.shape[0], 3, 3)
        for j in range(ops.shape[1]):  # over the num_ops slots (static), never over images
            x = _colour_slot(x, ops[:, j], mags[:, j])
            matrix = matrix @ _sampling_matrix(ops[:, j], mags[:, j], h, w)
        x = _warp_nearest(x, matrix, self.fill if self.warp_fill is None else self.warp_fill)
        return _cutout(x, params["cutout_size"], params["cutout_center"], self.fill)


# --------------------------------------------------------------------------------------------------
# Registry

#: Named views a recipe can ask for: ``"none"``, ``"weak"``, ``"strong"``.
AUGMENTS: Registry[Callable[..., Any]] = Registry("augmentation")
AUGMENTS.register("none")(NoAugment)
AUGMENTS.register("weak")(WeakAugment)
AUGMENTS.register("strong")(StrongAugment)


def build_augment(name: str, **kw: Any) -> Augment:
    """Build a named augmentation from recipe values.

    For ``"strong"``, ``weak`` may be ``True`` (default crop + flip), ``False``/``None`` (none) or a
    dict of :class:`WeakAugment` arguments, so a YAML recipe can spell the whole view.
    """
    if name == "strong" and "weak" in kw and not isinstance(kw["weak"], WeakAugment):
        weak = kw["weak"]
        if weak is True:
            kw["weak"] = WeakAugment()
        elif weak is False or weak is None:
            kw["weak"] = None
        elif isinstance(weak, dict):
            kw["weak"] = WeakAugment(**weak)
        else:
            raise ValueError(f"augmentation 'strong': weak must be a bool or a dict, got {weak!r}")
    factory = AUGMENTS.get(name)
    try:
        return factory(**kw)
    except TypeError as err:
        raise ValueError(f"augmentation {name!r}: bad arguments {sorted(kw)} ({err})") from None


# --------------------------------------------------------------------------------------------------
# Speed


def benchmark(
    batch: int = 256,
    size: int = 32,
    channels: int = 3,
    device: str = "cpu",
    repeats: int = 10,
    compile: bool = False,
) -> dict[str, float]:
    """Images per second of the weak and strong views on random data (median of ``repeats``).

    ``compile=True`` times ``torch.compile(apply)`` with parameters drawn eagerly, as a compiled
    training step would run it. For the benchmark suite; tests never assert on it.
    """
    dev = torch.device(device)
    x = torch.rand(batch, channels, size, size, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    views = {"weak": WeakAugment(padding=max(1, size // 8)), "strong": StrongAugment(num_ops=2)}
    result = {}
    for name, aug in views.items():
        apply = torch.compile(aug.apply, fullgraph=True) if compile else aug.apply
        times = []
        for i in range(repeats + 2):  # the first two calls warm up (and compile)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            apply(x, aug.sample_params(batch, gen))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        result[name] = batch / sorted(times)[len(times) // 2]
    return result
