"""Seeded, stratified index splits of a training set.

The benchmark protocol carves the validation split from the *training* data (stratified, seeded) and
draws the low-data regime as a stratified subset of what remains; the test split is never passed here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LabelsLike = torch.Tensor | np.ndarray | Sequence[int]


def _as_numpy(labels: LabelsLike) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError("labels must be non-negative integers")
    return arr.astype(np.int64)


def _count(size: int | float, n: int, what: str) -> int:
    if isinstance(size, bool):
        raise ValueError(f"{what} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0:
            raise ValueError(f"{what} as a fraction must lie in [0, 1], got {size}")
        return int(round(size * n))
    if not 0 <= size <= n:
        raise ValueError(f"{what}={size} is outside [0, {n}] (the number of labels)")
    return int(size)


def _per_class_quota(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes in proportion to `counts` (largest remainder, ties to lower class)."""
    n = counts.sum()
    exact = counts * total / n
    quota = np.floor(exact).astype(np.int64)
    short = total - int(quota.sum())
    # Stable sort on the negated remainders: the largest remainders get the leftover slots, and equal
    # remainders go to the lower class index, so the result does not depend on float noise order.
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:short]] += 1
    return quota


def _pick(labels: np.ndarray, size: int | float, seed: int, what: str) -> np.ndarray:
    """Boolean mask of a stratified random selection of `size` positions."""
    n = labels.size
    total = _count(size, n, what)
    if n == 0 or total == 0:
        return np.zeros(n, dtype=bool)
    counts = np.bincount(labels)
    return _pick_quota(labels, _per_class_quota(counts, total), seed)


def _pick_quota(labels: np.ndarray, quota: np.ndarray, seed: int) -> np.ndarray:
    """Boolean mask keeping ``quota[c]`` random positions of each class ``c``."""
    n = labels.size
    counts = np.bincount(labels, minlength=len(quota))
    # RandomState's stream is frozen by NumPy's compatibility policy (NEP 19), so a split made today
    # is the same split after any NumPy upgrade; Generator streams carry no such promise.
    perm = np.random.RandomState(seed).permutation(n)
    by_class = perm[np.argsort(labels[perm], kind="stable")]  # each class in random order
    cls = labels[by_class]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_class = np.arange(n) - starts[cls]
    mask = np.zeros(n, dtype=bool)
    mask[by_class[rank_in_class < quota[cls]]] = True
    return mask


def stratified_split(
    labels: LabelsLike, val_size: int | float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions ``0..N-1`` into (train, validation) index tensors, each sorted ascending.

    ``val_size`` is a count (int) or a fraction of N (float, rounded to the nearest count). Every
    class contributes to validation in proportion to its frequency (largest-remainder rounding), the
    draw depends only on ``(labels, val_size, seed)``, and the two parts are disjoint and together
    cover every position once.
    """
    arr = _as_numpy(labels)
    mask = _pick(arr, val_size, seed, "val_size")
    return torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask))


def stratified_subset(labels: LabelsLike, size: int | float, seed: int) -> torch.Tensor:
    """Sorted positions of a stratified random subset (the low-data regime, e.g. 5,000 images).

    Pass the labels of the training part that remains after the validation split, and index that part
    with the result.
    """
    arr = _as_numpy(labels)
    return torch.from_numpy(np.flatnonzero(_pick(arr, size, seed, "size")))


def long_tailed_subset(labels: LabelsLike, imbalance: float, seed: int) -> torch.Tensor:
    """Sorted positions of a long-tailed subset: class ``c`` (of ``C``) keeps
    ``floor(n * imbalance ** (-c / (C - 1)))`` random images, where ``n`` is the smallest class's count,
    so class 0 keeps ``n`` and the last class ``n / imbalance`` (at least one). The exponential profile
    of the class-imbalanced SSL literature (DARP, CReST, RDA's mismatched settings)."""
    arr = _as_numpy(labels)
    counts = np.bincount(arr)
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1 (largest over smallest class), got {imbalance}")
    c = np.arange(len(counts))
    quota = np.maximum(1, np.floor(counts.min() * float(imbalance) ** (-c / max(1, len(counts) - 1))))
    return torch.from_numpy(np.flatnonzero(_pick_quota(arr, quota.astype(np.int64), seed)))
