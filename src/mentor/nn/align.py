"""Spatial alignment of feature maps: bring two ``[B, C, H, W]`` maps (or one map and a target size)
to a common resolution before a loss or a connector compares them.

Average pooling is the alignment of the distillation literature when a student's and a teacher's
maps differ in resolution (SimKD, SemCKD, MMKD, RepDistiller's attention transfer); CA-MKD also
upsamples (bilinear) a smaller student map to a teacher's size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Adaptive-average-pool a feature map to spatial ``size``; a map already that size is returned
    as is."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def align_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two feature maps ``[B, C, H, W]`` at a common resolution: each side is :func:`pool_to` the
    smaller height and the smaller width of the two (as SimKD, SemCKD and RepDistiller's AT compare
    maps of different resolution); a map already at that size is returned as is."""
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"align_spatial: expected two [B, C, H, W] maps, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return pool_to(a, size), pool_to(b, size)


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A map at spatial ``size``: average-pooled down (:func:`pool_to`) when its height is at least
    ``size``'s, else bilinearly upsampled; CA-MKD's alignment of the student's last map to each
    teacher's (Zhang et al., "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022)."""
    if x.shape[-2] >= size[0]:
        return pool_to(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


__all__ = ["align_spatial", "pool_to", "resize_to"]
