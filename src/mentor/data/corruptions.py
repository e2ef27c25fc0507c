"""Common corruptions for small images, and the corrupted test sets adaptation is measured on.

The fifteen corruptions of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR 2019), at severities 1..5, written from their definitions for
batched tensors: every corruption runs on the images' device, without a Python loop over images or
pixels, and is deterministic from a seed (random numbers are drawn on the CPU from one seeded
generator and moved to the device, so a seed gives the same corruption on every device, up to
floating-point rounding).

The severity parameters start from the CIFAR-10-C rows of the paper's released generator;
:data:`PARAMS` holds them, one row per corruption, with a comment at every value adapted to 28x28
images. Spatial parameters in pixels (blur sigmas, motion lengths) are scaled by 28/32; parameters
relative to the image (zoom factors, the pixelation ratio, the elastic table, which is written in
multiples of the image size) are kept. Where the released generator needs something this module
does not have, a stated design choice replaces it:

* frost blends in random crops of a few photographs of frost: here random crops of a few procedural
  frost tiles, made once from a fixed seed (see :func:`frost_tiles`);
* motion blur and the snow streaks use ImageMagick's motion blur: here the same one-sided Gaussian
  line kernel, sampled with bilinear interpolation at a random angle per image;
* glass blur swaps pixels in a sequential loop: here a vectorised local shuffle of disjoint
  neighbour pairs (see :func:`local_shuffle`);
* JPEG uses Pillow: here JPEG's lossy step itself (8x8 block DCT, IJG quantisation tables scaled by
  quality as libjpeg does).

Outputs are rounded to the nearest grey level (the released files truncate, which removes half a grey
level on average).

Domain sets (registered with :func:`mentor.data.domains.register_domains`):

* ``fmnist_c``: Fashion-MNIST's 10,000 test images under each corruption and severity, generated once
  and cached in CIFAR-10-C's layout (``<corruption>.npy`` uint8 [5 * 10000, 28, 28], severities 1..5
  stacked in order, and ``labels.npy``) with a ``manifest.json`` of SHA-256 checksums;
* ``cifar10_c`` / ``cifar100_c``: readers for users' CIFAR-10-C / CIFAR-100-C folders (Hendrycks &
  Dietterich's released ``.npy`` files, uint8 [50000, 32, 32, 3] per corruption).

Domains are named ``<corruption>-<severity>``, corruption-major, in the paper's order.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mentor.data.domains import DomainSet, register_domains
from mentor.data.errors import DataError
from mentor.data.readers import ArrayDataset
from mentor.data.sources import default_fetch_dir, get_source, load_dataset
from mentor.fileio import atomic_write_bytes
from mentor.registry import suggest

log = logging.getLogger(__name__)

# The paper's order (its Figure 1 and the released generator's): noise, blur, weather, digital.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)

# Bump when any corruption's output changes: cached fmnist_c files of another version are regenerated.
GENERATOR_VERSION = "1"

# ------------------------------------------------------------------------------- the parameter table
#
# One row per corruption, severities 1..5, from the CIFAR-10-C rows of the released generator.
# "x0.875" marks a pixel quantity scaled from 32 to 28 pixels (then rounded).

PARAMS: dict[str, tuple[Any, ...]] = {
    # sigma of additive noise on the [0, 1] scale
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    # photons per unit intensity: x -> Poisson(x * c) / c
    "shot_noise": (500, 250, 100, 75, 50),
    # fraction of values replaced by salt or pepper
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    # (disk radius, sigma of the 3x3 Gaussian that anti-aliases the disk). Kept: a disk on the pixel
    # lattice only changes at radii 1, sqrt(2), 2, ..., and x0.875 would turn severity 4's radius-1 disk
    # into a single pixel (no blur at all).
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    # (Gaussian sigma, largest pixel displacement, shuffle iterations); sigma x0.875 (0.05, 0.25, 0.4),
    # the displacement stays 1, the smallest there is. The distance from the clean image is set by the
    # iterations (1, 1, 1, 2, 2); within them the blur sigma moves it by a few percent either way.
    "glass_blur": ((0.044, 1, 1), (0.22, 1, 1), (0.35, 1, 1), (0.22, 1, 2), (0.35, 1, 2)),
    # (kernel radius, Gaussian sigma along the line), both x0.875 from (6, 1), (6, 1.5), (6, 2), (8, 2),
    # (9, 2.5). As in the released table, severities 3 and 4 differ only in the radius, which cuts
    # the Gaussian where it is already below 1e-4: the two severities are the same corruption.
    "motion_blur": ((5, 0.875), (5, 1.3125), (5, 1.75), (7, 1.75), (8, 2.1875)),
    # largest zoom factor; factors run from 1.00 in steps of 0.01 (relative to the image: kept)
    "zoom_blur": (1.05, 1.10, 1.15, 1.20, 1.25),
    # (flake mean, flake std, zoom, threshold, streak radius, streak sigma, image weight); the streak
    # radius and sigma x0.875 from (8, 3), (10, 4), (10, 4), (12, 6), (14, 12).
    "snow": (
        (0.10, 0.20, 1.00, 0.60, 7, 2.625, 0.95),
        (0.10, 0.20, 1.00, 0.50, 9, 3.5, 0.90),
        (0.15, 0.30, 1.75, 0.55, 9, 3.5, 0.90),
        (0.25, 0.30, 2.25, 0.60, 11, 5.25, 0.85),
        (0.30, 0.30, 1.25, 0.65, 12, 10.5, 0.80),
    ),
    # (image weight, frost weight): x -> a * x + b * frost. Severity 4 only lowers the image weight, which
    # on bright garments over a black background brings the image slightly closer to the clean one.
    "frost": ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    # (fog strength, plasma-fractal wibble decay). Kept: the fractal is made on a 32x32 map, as for
    # CIFAR, and cropped to the image, so its blobs have the same size in pixels.
    "fog": ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)),
    # added to HSV value (the grey level itself for grayscale images)
    "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
    # factor on each channel's deviation from its mean
    "contrast": (0.75, 0.50, 0.40, 0.30, 0.15),
    # (elastic alpha, elastic sigma, affine jitter) as fractions of the image size; the released code
    # multiplies them by 32, here by the image size (28). As released, the affine jitter (up to 2.2
    # pixels at severity 1, 0.8 at 5) shrinks with severity while the elastic field (rms 0 to 0.8 pixels)
    # grows: the jitter dominates, so the distance from the clean image falls from severity 1 to 5.
    "elastic_transform": ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)),
    # side of the down-sampled image relative to the original (28 -> 26, 25, 23, 21, 18 pixels)
    "pixelate": (0.95, 0.90, 0.85, 0.75, 0.65),
    # JPEG quality (libjpeg's 1..100 scale)
    "jpeg_compression": (80, 65, 58, 50, 40),
}


# ------------------------------------------------------------------------------------- public API


def check_corruption(name: Any) -> str:
    """``name`` if it is one of :data:`CORRUPTIONS`, else a DataError with a near match."""
    name = str(name)
    if name not in CORRUPTIONS:
        raise DataError(f"unknown corruption {name!r}.{suggest(name, CORRUPTIONS)} "
                        f"Known: {', '.join(CORRUPTIONS)}")
    return name


def check_severity(severity: Any) -> int:
    """``severity`` as an int if it is one of 1..5, else a DataError."""
    try:
        value = operator.index(severity)
    except TypeError:
        value = None
    if isinstance(severity, bool) or value not in SEVERITIES:
        hint = suggest(str(severity), [str(s) for s in SEVERITIES])
        raise DataError(f"severity {severity!r} is not one of 1, 2, 3, 4, 5 (1 is the mildest, 5 the "
                        f"strongest).{hint}")
    return int(value)  # type: ignore[arg-type]


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``images`` (uint8 [N, C, H, W], C = 1 or 3) under corruption ``name`` at ``severity`` (1..5).

    Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
    Perturbations" (ICLR 2019). Runs on the images' device; the same ``seed`` gives the same output.
    """
    name, severity = check_corruption(name), check_severity(severity)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"corrupt expects uint8 images [N, 1 or 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if images.shape[0] == 0:
        return images.clone()
    x = images.float() / 255
    y = _FUNCTIONS[name](x, PARAMS[name][severity - 1], _Rng(seed, images.device))
    return _to_uint8(y)


def _to_uint8(y: Tensor) -> Tensor:
    return torch.round(y.clamp(0, 1) * 255).to(torch.uint8)


class _Rng:
    """Random numbers from one seeded CPU generator, handed over on the images' device."""

    def __init__(self, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.device = device

    def uniform(self, shape: Sequence[int], low: float = 0.0, high: float = 1.0, cpu: bool = False) -> Tensor:
        u = low + (high - low) * torch.rand(tuple(shape), generator=self.gen)
        return u if cpu else u.to(self.device)

    def normal(self, shape: Sequence[int], mean: float = 0.0, std: float = 1.0) -> Tensor:
        return (mean + std * torch.randn(tuple(shape), generator=self.gen)).to(self.device)

    def integers(self, shape: Sequence[int], high: int) -> Tensor:
        return torch.randint(0, high, tuple(shape), generator=self.gen).to(self.device)

    def poisson(self, rates: Tensor) -> Tensor:
        return torch.poisson(rates.cpu(), generator=self.gen).to(rates.device)


# ------------------------------------------------------------------------------ shared image ops


def _pad_index(length: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """Source indices of a padded axis. ``replicate`` repeats the edge pixel; ``reflect`` mirrors about
    the edge pixel (OpenCV's BORDER_REFLECT_101); ``symmetric`` mirrors about the edge itself
    (SciPy's and scikit-image's ``reflect``)."""
    i = torch.arange(-before, length + after, device=device)
    if mode == "replicate" or length == 1:
        return i.clamp(0, length - 1)
    if mode == "reflect":
        i = i % (2 * length - 2)
        return torch.where(i < length, i, 2 * length - 2 - i)
    if mode == "symmetric":
        i = i % (2 * length)
        return torch.where(i < length, i, 2 * length - 1 - i)
    raise ValueError(f"unknown padding mode {mode!r}")


def _pad(x: Tensor, ph: int, pw: int, mode: str) -> Tensor:
    """``x`` [N, C, H, W] padded by ``ph`` rows and ``pw`` columns on each side (any width)."""
    h, w = x.shape[-2:]
    if mode == "constant":
        return F.pad(x, (pw, pw, ph, ph))
    x = x.index_select(-2, _pad_index(h, ph, ph, mode, x.device))
    return x.index_select(-1, _pad_index(w, pw, pw, mode, x.device))


def _correlate(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Each channel of ``x`` [N, C, H, W] correlated with one small 2-D ``kernel`` (as OpenCV's filter2D):
    out[p] = sum_q K[q] x[p + q - centre].

    A sum of shifted views: for one-channel batches of tiny images and kernels of a few taps this is
    many times faster on CPUs than a convolution call."""
    h, w = x.shape[-2:]
    kh, kw = kernel.shape
    y = _pad(x, kh // 2, kw // 2, mode)
    out = torch.zeros_like(x)
    for (i, j), k in zip(np.ndindex(kh, kw), kernel.flatten().tolist()):
        if k:
            out += k * y[..., i:i + h, j:j + w]
    return out


def _separable(x: Tensor, rows: Tensor, cols: Tensor, between: Callable[[Tensor], Tensor] | None = None
               ) -> Tensor:
    """``rows @ x @ cols.T`` for every channel of ``x`` [N, C, H, W] (rows [H', H], cols [W', W]), as two
    plain matrix products over the flattened batch (much faster than batches of 28 x 28 products);
    ``between`` is applied after the column pass."""
    n, c, h, w = x.shape
    y = (x.reshape(-1, w) @ cols.to(x).T).reshape(n, c, h, -1)
    if between is not None:
        y = between(y)
    y = (y.transpose(-1, -2).reshape(-1, h) @ rows.to(x).T).reshape(n, c, -1, rows.shape[0])
    return y.transpose(-1, -2)


def _blur_matrix(size: int, sigma: float, truncate: float, mode: str) -> Tensor:
    """[size, size] matrix of a 1-D Gaussian blur (radius int(truncate * sigma + 0.5), as scikit-image)
    with the border handling ``mode`` folded in: padded positions add their weight to the pixel they copy."""
    radius = int(truncate * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    source = _pad_index(size, radius, radius, mode, torch.device("cpu"))
    window = source[torch.arange(size)[:, None] + torch.arange(2 * radius + 1)[None, :]]
    return torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, window, (k / k.sum()).expand(size, -1))


def _gaussian_blur(x: Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate") -> Tensor:
    """Separable Gaussian blur of [N, C, H, W] with scikit-image's kernel radius int(truncate * sigma + 0.5)
    (its default border, ``nearest``, is ``replicate`` here)."""
    if int(truncate * sigma + 0.5) == 0:
        return x
    h, w = x.shape[-2:]
    return _separable(x, _blur_matrix(h, sigma, truncate, mode), _blur_matrix(w, sigma, truncate, mode))


def _sample(x: Tensor, px: Tensor, py: Tensor, padding: str, align_corners: bool = True) -> Tensor:
    """Bilinear samples of ``x`` [N, C, H, W] at pixel coordinates ``px`` (column), ``py`` (row), each
    [N, H', W']. With ``align_corners`` pixel i sits at i; otherwise pixel i covers [i, i + 1) and its
    centre is at i + 0.5 (which is how ``symmetric`` reflection about the edge is obtained)."""
    h, w = x.shape[-2:]
    if align_corners:
        gx, gy = 2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1
    else:
        gx, gy = (2 * px + 1) / w - 1, (2 * py + 1) / h - 1
    grid = torch.stack([gx, gy], -1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=align_corners)


def _pixel_grid(n: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Column and row coordinates of every pixel, [n, h, w] each."""
    py, px = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    return px.expand(n, h, w), py.expand(n, h, w)


def _zooms(x: Tensor, factors: Sequence[float]) -> Tensor:
    """``x`` [N, C, H, W] magnified by each of ``factors`` (>= 1) about its centre and cropped back to
    H x W: output pixel p samples the input at c + (p - c) / factor, bilinearly. [N, C, len(factors), H, W].

    All images share the sampling grid, so they travel as channels of one image: one grid for all."""
    n, c, h, w = x.shape
    px, py = _pixel_grid(1, h, w, x.device)
    z = torch.tensor(factors, dtype=torch.float32, device=x.device)[:, None, None]
    sx = ((w - 1) / 2 + (px - (w - 1) / 2) / z).reshape(1, -1, w)
    sy = ((h - 1) / 2 + (py - (h - 1) / 2) / z).reshape(1, -1, w)
    out = _sample(x.reshape(1, n * c, h, w), sx, sy, "border")
    return out.reshape(n, c, len(factors), h, w)


# --------------------------------------------------------------------------- kernels and textures


def disk_kernel(radius: float, alias_sigma: float) -> Tensor:
    """The defocus kernel: a disk of ``radius`` on the pixel lattice (x^2 + y^2 <= r^2), normalised,
    then smoothed by a 3x3 Gaussian of sigma ``alias_sigma`` (the released generator's anti-aliasing)."""
    r = int(math.floor(radius)) + 1  # one zero ring around the disk for the 3x3 smoothing
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((k[:, None] ** 2 + k[None, :] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / alias_sigma) ** 2)
    g /= g.sum()
    smoothed = _correlate(disk[None, None], g[:, None] * g[None, :], "constant")
    return smoothed[0, 0].float()


_MIN_TAP = 1e-4  # line-kernel taps lighter than this move no output by as much as 0.03 grey levels


def motion_taps(radius: float, sigma: float) -> tuple[Tensor, Tensor]:
    """Distances (pixels along the blur direction) and weights of the motion-blur line kernel.

    ImageMagick's motion blur, which the released generator calls: 2 * ceil(radius) + 1 taps at
    distances 0, 1, 2, ... on one side of the pixel, weighted by a half Gaussian exp(-d^2 / 2 sigma^2)
    and normalised to sum to 1. Taps lighter than 1e-4 are dropped (and the rest renormalised).
    """
    d = torch.arange(2 * math.ceil(radius) + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (d / sigma) ** 2)
    w /= w.sum()
    keep = w >= _MIN_TAP
    return d[keep].float(), (w[keep] / w[keep].sum()).float()


def motion_kernels(angles: Tensor, radius: float, sigma: float) -> Tensor:
    """The 2-D kernels [N, K, K] of :func:`motion_taps` at ``angles`` [N] degrees (0 = along +x, positive
    angles turn towards +y, i.e. down the image), centred at [K // 2, K // 2]: each tap at d (cos a,
    sin a) is spread bilinearly over its four nearest pixels. The blurred image is the correlation
    out[p] = sum_q K[q] x[p + q - centre], so each output pixel averages the pixels ahead of it."""
    dist, weight = (v.double().to(angles.device) for v in motion_taps(radius, sigma))
    t = torch.deg2rad(angles.double())
    xs, ys = dist[None] * torch.cos(t)[:, None], dist[None] * torch.sin(t)[:, None]  # [N, taps]
    c = math.ceil(float(dist.max())) + 1
    size = 2 * c + 1
    fx, fy = xs.floor(), ys.floor()
    ax, ay = xs - fx, ys - fy
    kernels = torch.zeros(len(angles), size * size, dtype=torch.float64, device=angles.device)
    for oy, wy in ((0, 1 - ay), (1, ay)):
        for ox, wx in ((0, 1 - ax), (1, ax)):
            index = ((c + fy + oy) * size + (c + fx + ox)).long()
            kernels.scatter_add_(1, index, weight[None] * wy * wx)
    return kernels.reshape(-1, size, size).float()


def line_blur(x: Tensor, angles: Tensor, radius: float, sigma: float) -> Tensor:
    """``x`` [N, C, H, W] (float) blurred along a line at ``angles`` [N] degrees (one per image):
    out[p] = sum_i w_i x(p + d_i u), u = (cos a, sin a), sampled bilinearly with the edge repeated
    (ImageMagick's default virtual pixels).

    Computed as a correlation with each image's kernel (:func:`motion_kernels`) through the FFT: the
    image is first padded by the kernel's reach (repeating the edge, which is what bilinear sampling
    with clamped coordinates gives), so the circular correlation never wraps into the output."""
    n, c, h, w = x.shape
    kernels = motion_kernels(angles.to(x.device), radius, sigma).to(x.dtype)
    r = kernels.shape[-1] // 2
    padded = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate").reshape(n, c, h + 2 * r, w + 2 * r)
    size = padded.shape[-2:]
    spectrum = torch.fft.rfft2(padded) * torch.fft.rfft2(kernels, s=size).conj()[:, None]
    return torch.fft.irfft2(spectrum, s=size)[..., :h, :w]


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (and >= 2)."""
    return max(2, 1 << (n - 1).bit_length())


def plasma_fractal(n: int, size: int, decay: float, seed: int = 0) -> Tensor:
    """``n`` plasma fractals [n, size, size] in [0, 1] by the diamond-square algorithm on a torus
    (what fog adds to the image), from ``seed``."""
    return _plasma(n, size, decay, _Rng(seed, torch.device("cpu")))


def _plasma(n: int, size: int, decay: float, rng: _Rng) -> Tensor:
    """Diamond-square: ``size`` is a power of two. Each level fills square centres, then diamond
    centres, with the mean of their four neighbours plus uniform noise; the released generator's noise
    is wibble * U(-wibble, wibble), so each level's noise amplitude shrinks by ``decay`` squared, as
    here. Every map of the batch is made at once (the loop is over the log2(size) levels)."""
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma fractal size must be a power of two, got {size}")
    m = torch.zeros(n, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def noisy_mean(total: Tensor) -> Tensor:
        noise = rng.uniform(total.shape, -1.0, 1.0, cpu=True).double()
        return total / 4 + wibble * wibble * noise

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        total = corners + corners.roll(-1, 1)
        m[:, half::step, half::step] = noisy_mean(total + total.roll(-1, 2))
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]
        # Edge midpoints on corner rows: the corners left and right, the centres above and below.
        m[:, 0::step, half::step] = noisy_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        # Edge midpoints on corner columns: the corners above and below, the centres left and right.
        m[:, half::step, 0::step] = noisy_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    m -= m.amin((1, 2), keepdim=True)
    return (m / m.amax((1, 2), keepdim=True).clamp_min(1e-12)).float().to(rng.device)


# The frost "photographs": a few large procedural tiles made once from a fixed seed, which every image
# crops at random, as the released generator crops one of its few frost photographs.
_FROST_TILES, _FROST_TILE_SIZE, _FROST_SEED = 6, 128, 2019


@functools.lru_cache(maxsize=1)
def frost_tiles() -> Tensor:
    """The frost tiles [6, 128, 128] in [0, 1]: a hazy ice film (a plasma fractal) under ice needles,
    which grow from sparse random nuclei along three random directions per tile, slightly blurred."""
    rng = _Rng(_FROST_SEED, torch.device("cpu"))
    n, size = _FROST_TILES, _FROST_TILE_SIZE
    film = _plasma(n, size, 2.0, rng)[:, None]
    needles = torch.zeros(n, 1, size, size)
    for _ in range(3):
        nuclei = (rng.uniform((n, 1, size, size)) < 0.03).float() * rng.uniform((n, 1, size, size), 0.4, 1.0)
        # A flat line kernel of 9 taps, times 9: every needle pixel carries its nucleus' brightness.
        needles = torch.maximum(needles, 9 * line_blur(nuclei, rng.uniform((n,), 0.0, 360.0), 4, 1e6))
    texture = (0.2 + 0.4 * film + 0.5 * needles).clamp(0, 1)
    return _gaussian_blur(texture, 0.5)[:, 0]


def _frost_texture(n: int, h: int, w: int, rng: _Rng) -> Tensor:
    """[n, 1, h, w]: for each image a random crop of a random frost tile."""
    tiles = frost_tiles().to(rng.device)
    if h > tiles.shape[-2] or w > tiles.shape[-1]:
        raise ValueError(f"frost works on images up to {tuple(tiles.shape[-2:])}, got {h}x{w}")
    which = rng.integers((n,), len(tiles))
    top = rng.integers((n,), tiles.shape[-2] - h + 1)
    left = rng.integers((n,), tiles.shape[-1] - w + 1)
    rows = (top[:, None] + torch.arange(h, device=rng.device))[:, :, None]
    cols = (left[:, None] + torch.arange(w, device=rng.device))[:, None, :]
    return tiles[which[:, None, None], rows, cols][:, None]


def local_shuffle(x: Tensor, delta: int, iterations: int, rng: _Rng) -> Tensor:
    """``x`` [N, C, H, W] with pixels swapped with neighbours ``delta`` away, a permutation per image.

    Each iteration makes six passes: pairs along rows, columns and the down-right diagonal, each at
    two parities, so every pass pairs pixels disjointly and all swaps of a pass happen at once. Each
    pair swaps with probability 1/4, so a pixel takes part in 1.5 swaps per iteration, as in the
    released generator's sequential loop (where a visited pixel swaps with itself, its upper, left or
    upper-left neighbour, uniformly, and is chosen by three neighbours' visits). That loop also carries
    a pixel it has just moved up or left onward when it visits it again, dragging pixels up and to the
    left; here every swap is symmetric and a pixel moves at most 4 * delta per axis per iteration.
    """
    n, _, h, w = x.shape
    for _ in range(iterations):
        for dy, dx in ((0, delta), (delta, 0), (delta, delta)):
            # Anchors p (partner p + d inside the image) are the top-left (h - dy) x (w - dx) pixels.
            rows = torch.arange(h - dy, device=x.device)[:, None]
            cols = torch.arange(w - dx, device=x.device)[None, :]
            along = cols if dx else rows
            for parity in (0, 1):
                # Anchors alternate with partners in blocks of delta along the pair's axis: no pixel is
                # both, so the pairs are disjoint and swap independently.
                anchor = (along // delta) % 2 == parity
                swap = anchor & (rng.uniform((n, 1, h - dy, w - dx)) < 0.25)
                here, there = x[..., :h - dy, :w - dx], x[..., dy:, dx:]
                y = x.clone()
                y[..., :h - dy, :w - dx] = torch.where(swap, there, here)
                y[..., dy:, dx:] = torch.where(swap, here, y[..., dy:, dx:])
                x = y
    return x


def _gray(x: Tensor) -> Tensor:
    """Luma [N, 1, H, W] (ITU-R BT.601, as OpenCV's RGB2GRAY) of an RGB or grayscale batch."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


# ---------------------------------------------------------------------------- the corruptions


def gaussian_noise(x: Tensor, sigma: float, rng: _Rng) -> Tensor:
    """Additive Gaussian noise: clip(x + N(0, sigma^2)), independently per pixel and channel."""
    return x + rng.normal(x.shape, 0.0, sigma)


def shot_noise(x: Tensor, photons: float, rng: _Rng) -> Tensor:
    """Poisson (shot) noise: Poisson(x * c) / c, c photons for a white pixel."""
    return rng.poisson(x * photons) / photons


def impulse_noise(x: Tensor, amount: float, rng: _Rng) -> Tensor:
    """Salt-and-pepper noise: each value is replaced w.p. ``amount``, by 1 or 0 with equal odds."""
    flipped = rng.uniform(x.shape) < amount
    salt = rng.uniform(x.shape) < 0.5
    return torch.where(flipped, salt.to(x.dtype), x)


def defocus_blur(x: Tensor, p: tuple[float, float], rng: _Rng) -> Tensor:
    """Defocus: correlation with an anti-aliased disk (:func:`disk_kernel`), borders reflected."""
    return _correlate(x, disk_kernel(*p), "reflect")


def glass_blur(x: Tensor, p: tuple[float, int, int], rng: _Rng) -> Tensor:
    """Frosted glass: Gaussian blur, local pixel shuffle (:func:`local_shuffle`), Gaussian blur again."""
    sigma, delta, iterations = p
    x = _gaussian_blur(x, sigma)
    return _gaussian_blur(local_shuffle(x, int(delta), int(iterations), rng), sigma)


def motion_blur(x: Tensor, p: tuple[float, float], rng: _Rng) -> Tensor:
    """Motion blur: a one-sided Gaussian line kernel (:func:`motion_taps`) at a random angle in
    [-45, 45) degrees per image."""
    angles = rng.uniform((x.shape[0],), -45.0, 45.0)
    return line_blur(x, angles, *p)


def zoom_blur(x: Tensor, largest: float, rng: _Rng) -> Tensor:
    """Zoom blur: the mean of the image and its centre zooms by 1.00, 1.01, ..., ``largest``."""
    factors = [1 + k / 100 for k in range(round((largest - 1) * 100) + 1)]
    return (x + _zooms(x, factors).sum(2)) / (len(factors) + 1)


def snow(x: Tensor, p: tuple[float, ...], rng: _Rng) -> Tensor:
    """Snow: Gaussian flakes, zoomed, thresholded and streaked by motion blur at an angle in
    [-135, -45) degrees, added twice (the layer and its 180-degree rotation) over an image whitened
    towards max(x, 1.5 * grey + 0.5)."""
    mean, std, zoom, threshold, radius, sigma, weight = p
    n, _, h, w = x.shape
    flakes = _zooms(rng.normal((n, 1, h, w), mean, std), [zoom])[:, :, 0]
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    flakes = line_blur(flakes, rng.uniform((n,), -135.0, -45.0), radius, sigma)
    x = weight * x + (1 - weight) * torch.maximum(x, 1.5 * _gray(x) + 0.5)
    return x + flakes + flakes.flip((-2, -1))


def frost(x: Tensor, p: tuple[float, float], rng: _Rng) -> Tensor:
    """Frost: a * x + b * frost, the frost a random crop of a procedural frost tile (:func:`frost_tiles`)."""
    a, b = p
    n, _, h, w = x.shape
    return a * x + b * _frost_texture(n, h, w, rng)


def fog(x: Tensor, p: tuple[float, float], rng: _Rng) -> Tensor:
    """Fog: (x + s * plasma) * m / (m + s), m the image's maximum, the plasma fractal made on a 32x32 map
    (the next power of two for larger images) and cropped to the image."""
    strength, decay = p
    n, _, h, w = x.shape
    size = max(32, _power_of_two(max(h, w)))
    plasma = _plasma(n, size, decay, rng)[:, None, :h, :w]
    top = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * plasma) * top / (top + strength)


def brightness(x: Tensor, c: float, rng: _Rng) -> Tensor:
    """Brightness: c added to the HSV value, hue and saturation kept (for grey images: x + c)."""
    if x.shape[1] == 1:
        return x + c
    value = x.amax(1, keepdim=True)
    brighter = (value + c).clamp(0, 1)
    # With hue and saturation fixed every channel is proportional to the value; black has no hue.
    return torch.where(value > 0, x * brighter / value.clamp_min(1e-12), brighter.expand_as(x))


def contrast(x: Tensor, c: float, rng: _Rng) -> Tensor:
    """Contrast: (x - mean) * c + mean, the mean taken per image and channel."""
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * c + mean


def elastic_transform(x: Tensor, p: tuple[float, float, float], rng: _Rng) -> Tensor:
    """Elastic transform: a random affine map (three control points jittered by up to ``jitter``
    pixels), then a smooth random displacement field (uniform noise, Gaussian-smoothed with sigma,
    scaled by alpha), both as fractions of the image size; borders reflected.

    The released generator resamples twice (after the affine map, then after the displacement); here
    the two maps are composed and the image is sampled once, out(p) = x(M^-1 (p + d(p))), which gives
    the same geometry with one interpolation blur instead of two.
    """
    n, _, h, w = x.shape
    size = min(h, w)
    alpha, sigma, jitter = (v * size for v in p)
    # The control points of the released code: the centre +-(size // 3), as (x, y).
    c, s = torch.tensor([w // 2, h // 2], dtype=torch.float64), float(size // 3)
    src = torch.stack([c + s, torch.stack([c[0] + s, c[1] - s]), c - s])             # [3, 2]
    dst = src + rng.uniform((n, 3, 2), -jitter, jitter, cpu=True).double()         # [n, 3, 2]
    # The inverse affine map sends the jittered points back: solve [dst 1] A = src for A [n, 3, 2].
    ones = torch.ones(n, 3, 1, dtype=torch.float64)
    inverse = torch.linalg.solve(torch.cat([dst, ones], 2), src.expand(n, 3, 2)).float().to(x.device)
    px, py = _pixel_grid(n, h, w, x.device)
    if alpha > 0:
        noise = rng.uniform((n, 2, h, w), -1.0, 1.0)
        field = _gaussian_blur(noise, sigma, truncate=3.0, mode="symmetric") * alpha
        px, py = px + field[:, 0], py + field[:, 1]
    a = inverse[:, :, None, None, :]  # rows: coefficient of x, of y, constant; columns: x', y'
    sx = px * a[:, 0, ..., 0] + py * a[:, 1, ..., 0] + a[:, 2, ..., 0]
    sy = px * a[:, 0, ..., 1] + py * a[:, 1, ..., 1] + a[:, 2, ..., 1]
    return _sample(x, sx, sy, "reflection", align_corners=False)


def _box_resize_matrix(size_in: int, size_out: int) -> Tensor:
    """[size_out, size_in] weights of Pillow's BOX resampling: output pixel i averages, with equal
    weights, the input pixels whose centres fall in its box [i, i + 1) * size_in / size_out (for
    enlarging, the box is one input pixel wide: the nearest pixel)."""
    scale = size_in / size_out
    support = 0.5 * max(scale, 1.0)
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):  # a loop over at most a few dozen rows, once per call
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)
        for j in range(lo, hi):
            u = (j - centre + 0.5) / max(scale, 1.0)
            m[i, j] = 1.0 if -0.5 <= u < 0.5 else 0.0
        m[i] /= m[i].sum()
    return m


def _round_half_up(v: Tensor) -> Tensor:
    return torch.floor(v + 0.5)


def _resize_box(v: Tensor, h_out: int, w_out: int) -> Tensor:
    """Grey levels [N, C, H, W] (0..255) resized with Pillow's BOX filter, columns then rows, rounding
    halves up to whole grey levels after each pass, as Pillow does for 8-bit images."""
    h, w = v.shape[-2:]
    rows, cols = _box_resize_matrix(h, h_out), _box_resize_matrix(w, w_out)
    return _round_half_up(_separable(v, rows, cols, _round_half_up))


def pixelate(x: Tensor, ratio: float, rng: _Rng) -> Tensor:
    """Pixelation: box down-sampling to int(side * ratio) pixels, then box up-sampling back."""
    h, w = x.shape[-2:]
    v = torch.round(x * 255)
    v = _resize_box(_resize_box(v, int(h * ratio), int(w * ratio)), h, w)
    return v / 255


# JPEG's standard tables (ITU-T T.81, Annex K), row-major, for quality 50.
JPEG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
JPEG_CHROMA = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    *(99,) * 32,
)


def jpeg_quant_table(quality: int, chroma: bool = False) -> Tensor:
    """The 8x8 quantisation table libjpeg uses at ``quality`` (jpeg_quality_scaling and
    jpeg_add_quant_table with baseline limits): scale = 5000 / q below 50, else 200 - 2 q; each entry
    (base * scale + 50) // 100, clamped to 1..255."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor(JPEG_CHROMA if chroma else JPEG_LUMA, dtype=torch.int64)
    return ((base * scale + 50) // 100).clamp(1, 255).reshape(8, 8).double()


def _dct_matrix(size: int = 8) -> Tensor:
    """The orthonormal DCT-II matrix: JPEG's forward DCT of a block B is D @ B @ D.T."""
    k = torch.arange(size, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / (2 * size)) * math.sqrt(2 / size)
    d[0] /= math.sqrt(2)
    return d


def _jpeg_plane(v: Tensor, table: Tensor) -> Tensor:
    """One plane [N, H, W] of samples (0..255) through JPEG's lossy step: level shift, 8x8 DCT,
    quantisation (rounding half away from zero, as libjpeg), dequantisation, inverse DCT."""
    n, h, w = v.shape
    ph, pw = -h % 8, -w % 8
    # libjpeg fills partial blocks by repeating the last row and column.
    v = F.pad(v[:, None], (0, pw, 0, ph), mode="replicate")[:, 0]
    blocks = v.reshape(n, (h + ph) // 8, 8, (w + pw) // 8, 8).transpose(2, 3).reshape(-1, 64)
    # On row-major flattened blocks, B -> D B D^T is the product with the Kronecker matrix D (x) D.
    d = _dct_matrix().to(v)
    dd, q = torch.kron(d, d), table.to(v).reshape(64)
    coef = (blocks - 128) @ dd.T
    quant = torch.sign(coef) * torch.floor(coef.abs() / q + 0.5)
    back = (quant * q) @ dd + 128
    back = back.reshape(n, (h + ph) // 8, (w + pw) // 8, 8, 8).transpose(2, 3).reshape(n, h + ph, w + pw)
    return back[:, :h, :w]


def jpeg_compression(x: Tensor, quality: int, rng: _Rng) -> Tensor:
    """JPEG compression at ``quality``, baseline: grey images as one luminance plane; RGB converted
    to YCbCr (JFIF) with chroma tables and no chroma subsampling (4:4:4), then back."""
    v = torch.round(x.double() * 255)
    if v.shape[1] == 1:
        out = torch.round(_jpeg_plane(v[:, 0], jpeg_quant_table(quality))).clamp(0, 255)[:, None]
        return (out / 255).to(x.dtype)
    r, g, b = v[:, 0], v[:, 1], v[:, 2]
    y = torch.round(0.299 * r + 0.587 * g + 0.114 * b)
    cb = torch.round(-0.168736 * r - 0.331264 * g + 0.5 * b + 128).clamp(0, 255)
    cr = torch.round(0.5 * r - 0.418688 * g - 0.081312 * b + 128).clamp(0, 255)
    y = torch.round(_jpeg_plane(y, jpeg_quant_table(quality))).clamp(0, 255)
    cb = torch.round(_jpeg_plane(cb, jpeg_quant_table(quality, chroma=True))).clamp(0, 255) - 128
    cr = torch.round(_jpeg_plane(cr, jpeg_quant_table(quality, chroma=True))).clamp(0, 255) - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (rgb / 255).to(x.dtype)


_FUNCTIONS: dict[str, Callable[[Tensor, Any, _Rng], Tensor]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur,
    "zoom_blur": zoom_blur, "snow": snow, "frost": frost, "fog": fog, "brightness": brightness,
    "contrast": contrast, "elastic_transform": elastic_transform, "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
assert tuple(_FUNCTIONS) == CORRUPTIONS == tuple(PARAMS)


# ------------------------------------------------------------------------------------ domain sets


def _check_names(corruptions: Iterable[Any] | str | None) -> list[str]:
    """The requested corruptions, checked, in the paper's order (``DomainSet.select`` reorders)."""
    if corruptions is None:
        return list(CORRUPTIONS)
    if isinstance(corruptions, str):
        corruptions = [corruptions]
    names = {check_corruption(c) for c in corruptions}
    if not names:
        raise DataError(f"corruptions is empty; leave it out for all fifteen, or name some of "
                        f"{', '.join(CORRUPTIONS)}")
    return [c for c in CORRUPTIONS if c in names]


def _check_severities(severities: Iterable[Any] | int) -> list[int]:
    """The requested severities, checked, in increasing order."""
    if isinstance(severities, int):
        severities = [severities]
    sevs = sorted({check_severity(s) for s in severities})
    if not sevs:
        raise DataError("severities is empty; name some of 1, 2, 3, 4, 5")
    return sevs


def _check_limit(limit: Any, per_severity: int) -> int:
    if limit is None:
        return per_severity
    try:
        value = operator.index(limit)
    except TypeError:
        value = 0
    if isinstance(limit, bool) or value < 1:
        raise DataError(f"limit must be a positive number of images per domain, got {limit!r}")
    return min(value, per_severity)


# --------------------------------------------------------------------------------------- fmnist_c

FMNIST_C = "fmnist_c"
FMNIST_C_IMAGES = 10_000       # Fashion-MNIST's test split
_CHUNK = 1_000                 # images drawn from one seed: a limit of N reads the first N of each stream
_MANIFEST = "manifest.json"


def stream_seed(corruption: str, severity: int, chunk: int) -> int:
    """The seed of one chunk of an fmnist_c stream: it depends on the corruption's index in the paper's
    order, the severity and the chunk only, so a stream is the same whatever else is requested."""
    return (CORRUPTIONS.index(corruption) + 1) * 1_000_000 + severity * 10_000 + chunk


def corrupt_stream(clean: Tensor, corruption: str, severity: int, count: int | None = None) -> Tensor:
    """The first ``count`` images (default: all) of ``clean`` under one corruption and severity, in
    chunks of 1,000 seeded by :func:`stream_seed` (what fmnist_c stores)."""
    count = len(clean) if count is None else min(count, len(clean))
    # Whole chunks only: a chunk's random draws depend on its size, so the first N images of a stream
    # are the first N of the full stream only if their chunks are made whole.
    chunks = [corrupt(clean[start:start + _CHUNK], corruption, severity,
                      stream_seed(corruption, severity, start // _CHUNK))
              for start in range(0, count, _CHUNK)]
    return torch.cat(chunks)[:count] if chunks else clean[:0].clone()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _read_verified(folder: Path, filename: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """``folder/filename`` if the folder's manifest vouches for it (this generator version, matching
    SHA-256) and it holds uint8 of ``shape``; else None, with a log line saying why."""
    path = folder / filename
    if not path.is_file():
        return None
    manifest = _read_manifest(folder)
    entry = manifest.get("files", {}).get(filename) if isinstance(manifest.get("files"), dict) else None
    if not manifest:
        log.warning("%s has no readable %s beside it to check it against; regenerating", path, _MANIFEST)
        return None
    if manifest.get("generator_version") != GENERATOR_VERSION:
        log.warning("%s was not made by fmnist_c generator version %s (manifest says %s); regenerating",
                    path, GENERATOR_VERSION, manifest.get("generator_version", "nothing"))
        return None
    if not isinstance(entry, dict):
        log.warning("%s is not listed in %s; regenerating", path, folder / _MANIFEST)
        return None
    data = path.read_bytes()
    if _sha256(data) != entry.get("sha256"):
        log.warning("%s fails its SHA-256 check against %s; regenerating", path, folder / _MANIFEST)
        return None
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        log.warning("%s is not a readable .npy file (%s); regenerating", path, e)
        return None
    if array.dtype != np.uint8 or array.shape != shape:
        log.warning("%s holds %s %s, expected uint8 %s; regenerating", path, array.dtype, array.shape, shape)
        return None
    return array


def _store(folder: Path, files: dict[str, np.ndarray]) -> None:
    """Write ``files`` atomically into ``folder`` and record their checksums in its manifest.

    Concurrent writers may each record only their own files; a file missing from the manifest is
    regenerated on the next read, so the cache heals itself."""
    manifest = _read_manifest(folder)
    entries = manifest.get("files") if manifest.get("generator_version") == GENERATOR_VERSION else None
    entries = dict(entries) if isinstance(entries, dict) else {}
    for filename, array in files.items():
        data = _npy_bytes(array)
        atomic_write_bytes(folder / filename, data)
        entries[filename] = {"sha256": _sha256(data), "shape": list(array.shape), "dtype": "uint8"}
    manifest = {"generator": __name__, "generator_version": GENERATOR_VERSION,
                "source": "fashion_mnist test split", "layout": "CIFAR-10-C: <corruption>.npy [5 * N, H, W], "
                "severities 1..5 stacked in order; labels.npy [5 * N]", "files": entries}
    atomic_write_bytes(folder / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def _fmnist_c_folders(root: str | Path | None) -> tuple[list[Path], Path]:
    """Folders to read from, in order, and the cache folder generated files are written to."""
    cache = default_fetch_dir(FMNIST_C)
    reads = []
    if root is not None:
        base = Path(root).expanduser()
        reads += [base, base / FMNIST_C]
    return [*reads, cache], cache


class _Clean:
    """Fashion-MNIST's test split, loaded on first use (not at all when everything is cached)."""

    def __init__(self) -> None:
        self._data: ArrayDataset | None = None

    def get(self) -> ArrayDataset:
        if self._data is None:
            self._data = load_dataset("fashion_mnist", "test")
            if len(self._data) != FMNIST_C_IMAGES:
                raise DataError(f"fashion_mnist's test split holds {len(self._data)} images, expected "
                                f"{FMNIST_C_IMAGES}; check the files `mentor data info fashion_mnist` lists")
        return self._data


def _fmnist_c_file(name: str, sevs: list[int], n: int, folders: list[Path], cache: Path, clean: _Clean
                   ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Severity -> uint8 [n, 28, 28] for one corruption, and the labels [5 * 10000] beside them."""
    rows = len(SEVERITIES) * FMNIST_C_IMAGES
    for folder in folders:
        images = _read_verified(folder, f"{name}.npy", (rows, 28, 28))
        labels = _read_verified(folder, "labels.npy", (rows,)) if images is not None else None
        if images is not None and labels is not None:
            return {s: images[(s - 1) * FMNIST_C_IMAGES:][:n] for s in sevs}, labels
    source = clean.get()
    labels = np.tile(source.labels.numpy().astype(np.uint8), len(SEVERITIES))
    if n < FMNIST_C_IMAGES:
        # A limited load makes only what it returns and caches nothing: a full file is all or nothing.
        return {s: corrupt_stream(source.images, name, s, n)[:, 0].numpy() for s in sevs}, labels
    log.info("generating %s/%s.npy (%d severities x %d images) in %s", FMNIST_C, name, len(SEVERITIES),
             FMNIST_C_IMAGES, cache)
    stack = np.concatenate([corrupt_stream(source.images, name, s)[:, 0].numpy() for s in SEVERITIES])
    _store(cache, {f"{name}.npy": stack, "labels.npy": labels})
    return {s: stack[(s - 1) * FMNIST_C_IMAGES:][:n] for s in sevs}, labels


@register_domains(FMNIST_C)
def fmnist_c(root: str | Path | None = None, corruptions: Iterable[str] | str | None = None,
             severities: Iterable[int] | int = (5,), limit: int | None = None) -> DomainSet:
    """Fashion-MNIST-C: Fashion-MNIST's test split under the fifteen corruptions of Hendrycks &
    Dietterich (ICLR 2019), domains ``<corruption>-<severity>``, corruption-major in the paper's order.

    Files are generated on first use (seeded per corruption, severity and chunk, see
    :func:`stream_seed`) into ``$MENTOR_DATA/fmnist_c``, else ``~/.cache/mentor/fmnist_c``, and read
    from ``root`` (or ``root/fmnist_c``) first when it holds them. A file failing its checksum is made
    again. ``limit`` keeps the first N images of each domain (and writes nothing when a file has to be
    made for it).
    """
    names, sevs = _check_names(corruptions), _check_severities(severities)
    n = _check_limit(limit, FMNIST_C_IMAGES)
    folders, cache = _fmnist_c_folders(root)
    source, clean = get_source("fashion_mnist"), _Clean()
    domains: dict[str, ArrayDataset] = {}
    for name in names:
        by_severity, labels = _fmnist_c_file(name, sevs, n, folders, cache, clean)
        for s in sevs:
            y = torch.from_numpy(labels[(s - 1) * FMNIST_C_IMAGES:][:n].astype(np.int64))
            x = torch.from_numpy(np.ascontiguousarray(by_severity[s])).unsqueeze(1)
            domains[f"{name}-{s}"] = ArrayDataset(x, y, source.num_classes, f"{FMNIST_C}/{name}-{s}",
                                                  list(source.classes), source.mean, source.std)
    return DomainSet(FMNIST_C, domains)


# ----------------------------------------------------------------------------- CIFAR-10-C / -100-C

_CIFAR_C = {"cifar10_c": ("cifar10", "CIFAR-10-C", "https://zenodo.org/record/2535967"),
            "cifar100_c": ("cifar100", "CIFAR-100-C", "https://zenodo.org/record/3555552")}


def _cifar_c_folder(set_name: str, root: str | Path | None) -> Path:
    title, url = _CIFAR_C[set_name][1:]
    if root is None:
        raise DataError(f"{set_name} reads the released {title} files and needs root=DIR: the folder "
                        f"holding <corruption>.npy and labels.npy (download {title}.tar from {url} and "
                        f"extract it)")
    base = Path(root).expanduser()
    for folder in (base, base / title):
        if (folder / "labels.npy").is_file():
            return folder
    if not base.is_dir():
        raise DataError(f"{set_name}: {base} does not exist; pass root= the extracted {title} folder")
    raise DataError(f"{set_name}: {base} has no labels.npy (nor has {base / title}); pass root= the "
                    f"extracted {title} folder, which holds labels.npy and one <corruption>.npy per "
                    f"corruption (download {title}.tar from {url})")


def _load_npy(path: Path, set_name: str, fix: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{set_name}: {path} is not a readable .npy file ({e}); {fix}") from None


def _cifar_c(set_name: str, root: str | Path | None, corruptions: Iterable[str] | str | None,
             severities: Iterable[int] | int, limit: int | None) -> DomainSet:
    source_name, title, url = _CIFAR_C[set_name]
    names, sevs = _check_names(corruptions), _check_severities(severities)
    folder = _cifar_c_folder(set_name, root)
    fix = f"replace it with the file from {title}.tar ({url})"
    missing = [c for c in names if not (folder / f"{c}.npy").is_file()]
    if missing:
        raise DataError(f"{set_name}: {folder} lacks {', '.join(f'{c}.npy' for c in missing)}; copy "
                        f"{'them' if len(missing) > 1 else 'it'} from {title}.tar ({url}), or pass "
                        f"corruptions= the ones present")
    source = get_source(source_name)
    labels = _load_npy(folder / "labels.npy", set_name, fix)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{set_name}: {folder / 'labels.npy'} holds {labels.dtype} {labels.shape}, expected "
                        f"integer labels [N] or [5 * N]; {fix}")
    domains: dict[str, ArrayDataset] = {}
    for name in names:
        path = folder / f"{name}.npy"
        images = _load_npy(path, set_name, fix)
        shape = tuple(images.shape)
        if images.dtype != np.uint8 or len(shape) != 4 or shape[1:] != (32, 32, 3) or shape[0] % 5 or not shape[0]:
            raise DataError(f"{set_name}: {path} holds {images.dtype} {shape}, expected uint8 "
                            f"[5 * N, 32, 32, 3] (severities 1..5 stacked, N = 10000 in the release); {fix}")
        per = shape[0] // 5
        if len(labels) not in (per, 5 * per):
            raise DataError(f"{set_name}: {folder / 'labels.npy'} holds {len(labels)} labels but {path} holds "
                            f"{per} images per severity (labels.npy must have {per} or {5 * per}); {fix}")
        n = _check_limit(limit, per)
        for s in sevs:
            start = (s - 1) * per
            y = np.asarray(labels[start % len(labels):][:n]).astype(np.int64)
            if y.size and (y.min() < 0 or y.max() >= source.num_classes):
                raise DataError(f"{set_name}: {folder / 'labels.npy'} has labels {y.min()}..{y.max()}, "
                                f"expected 0..{source.num_classes - 1}; {fix}")
            x = torch.from_numpy(np.array(images[start:start + n])).permute(0, 3, 1, 2).contiguous()
            domains[f"{name}-{s}"] = ArrayDataset(x, torch.from_numpy(y), source.num_classes,
                                                  f"{set_name}/{name}-{s}", list(source.classes),
                                                  source.mean, source.std)
    return DomainSet(set_name, domains)


@register_domains("cifar10_c")
def cifar10_c(root: str | Path | None = None, corruptions: Iterable[str] | str | None = None,
              severities: Iterable[int] | int = (5,), limit: int | None = None) -> DomainSet:
    """CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019) from a user's folder of the released files:
    ``<corruption>.npy`` (uint8 [50000, 32, 32, 3], severities 1..5 stacked) and ``labels.npy``."""
    return _cifar_c("cifar10_c", root, corruptions, severities, limit)


@register_domains("cifar100_c")
def cifar100_c(root: str | Path | None = None, corruptions: Iterable[str] | str | None = None,
               severities: Iterable[int] | int = (5,), limit: int | None = None) -> DomainSet:
    """CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019), laid out as CIFAR-10-C, fine labels."""
    return _cifar_c("cifar100_c", root, corruptions, severities, limit)
