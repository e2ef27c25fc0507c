"""Geometric views of a batch drawn on its device: the random resized crops (with optional flips) that
test-time and source-free methods take of images already normalised, and data-free methods (CMI's local
view) of synthetic images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def resized_crops(x: Tensor, views: int = 1, generator: torch.Generator | None = None,
                  scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  attempts: int = 10, flip: bool = False) -> Tensor:
    """``views`` random resized crops of every image of ``x`` ``[N, C, H, W]``, sample-major
    (``[N * views, C, H, W]``, the views of image 0 first), resampled bilinearly to the full size:
    torchvision's ``RandomResizedCrop(size, scale, ratio)``, after a random horizontal flip with ``flip``.

    A crop keeps a fraction ``s ~ U(scale)`` of the area at an aspect ratio log-uniform in ``ratio``; of
    ``attempts`` draws the first that fits the image is taken (the whole image when none does, as
    torchvision does for images whose aspect ratio lies in ``ratio``). Its position is uniform over the
    image; sizes and offsets are continuous, not rounded to pixels. The crops are geometric, so ``x`` may
    be normalised already. Every draw comes from ``generator`` on ``x``'s device."""
    n, c, h, w = x.shape
    m = n * views
    dev = x.device

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return torch.empty(shape, device=dev).uniform_(lo, hi, generator=generator)

    area = uniform(scale[0], scale[1], m, attempts)
    r = uniform(math.log(ratio[0]), math.log(ratio[1]), m, attempts).exp()
    fw = torch.sqrt(area * r * h / w)  # crop width / image width
    fh = torch.sqrt(area / r * w / h)
    fits = (fw <= 1.0) & (fh <= 1.0)
    first = fits.float().argmax(1, keepdim=True)
    found = fits.any(1)
    fw = torch.where(found, fw.gather(1, first).squeeze(1), 1.0)
    fh = torch.where(found, fh.gather(1, first).squeeze(1), 1.0)
    cx = (1.0 - fw) * (2.0 * uniform(0.0, 1.0, m) - 1.0)  # centre in [-1 + fw, 1 - fw]
    cy = (1.0 - fh) * (2.0 * uniform(0.0, 1.0, m) - 1.0)
    sx = torch.where(uniform(0.0, 1.0, m) < 0.5, -1.0, 1.0) * fw if flip else fw
    zero = torch.zeros_like(fw)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, fh, cy], 1)], 1)
    src = x if views == 1 else x.unsqueeze(1).expand(n, views, c, h, w).reshape(m, c, h, w)
    grid = F.affine_grid(theta.to(src.dtype), [m, c, h, w], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
