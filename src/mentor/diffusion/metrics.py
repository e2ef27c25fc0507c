"""How good are samples: error against a reference solution, Fréchet distance and KID on features.

* :func:`rmse`: per-sample root-mean-square error against a reference computed from the same noise
  (the exact Gaussian flow, or a many-step solver): what AMED, GITS and SFD optimise.
* :func:`frechet_distance` between two Gaussians (Heusel et al., "GANs Trained by a Two Time-Scale
  Update Rule Converge to a Local Nash Equilibrium", 2017), in float64 with an eigendecomposition-based
  matrix square root (no scipy).
* :func:`kid`: the kernel inception distance of Bińkowski et al., "Demystifying MMD GANs" (ICLR 2018):
  the unbiased squared MMD with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged
  over random subsets.
* :class:`ClassifierFeatures`: penultimate features of a classifier trained with ``mentor train`` on
  the real data. Inception weights cannot be downloaded here, so the distances on these features are
  reported as ``FD-<dataset>`` / ``KID-<dataset>`` (e.g. ``FD-FMNIST``), never as FID: they are not
  comparable with published FID numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# Short dataset names used in metric keys.
DATASET_TAGS = {"fashion_mnist": "FMNIST", "digits": "digits", "mnist": "MNIST", "cifar10": "CIFAR10"}


def rmse(x: Tensor, ref: Tensor, reduction: str = "mean") -> Tensor:
    """Root-mean-square error over all but the batch dimension, per sample (``reduction="none"``, shape
    (B,)) or averaged over samples (``"mean"``, a 0-d tensor)."""
    if x.shape != ref.shape:
        raise ValueError(f"rmse: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    per = (x - ref).square().flatten(1).mean(1).sqrt()
    if reduction == "none":
        return per
    if reduction == "mean":
        return per.mean()
    raise ValueError(f"rmse: reduction must be 'none' or 'mean', got {reduction!r}")


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) of ``features`` (N, D)."""
    f = features.detach().double().flatten(1)
    if f.shape[0] < 2:
        raise ValueError("gaussian_stats: needs at least two feature vectors")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrt_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues from
    round-off are clipped to zero)."""
    a = (a + a.T) / 2
    lam, u = torch.linalg.eigh(a)
    return (u * lam.clamp(min=0).sqrt()) @ u.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` between two Gaussians, in float64.

    ``tr (C1 C2)^(1/2)`` equals ``tr (S C2 S)^(1/2)`` with ``S = C1^(1/2)``; the latter matrix is
    symmetric PSD, so its trace root is the sum of the square roots of its eigenvalues.
    """
    mu1, mu2, cov1, cov2 = (t.detach().double() for t in (mu1, mu2, cov1, cov2))
    s = _sqrt_psd(cov1)
    m = s @ cov2 @ s
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * lam.sqrt().sum()
    return float(value)


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased squared MMD between samples ``x`` (m, d) and ``y`` (n, d) with the cubic kernel."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2 * kxy.mean()


def kid(f1: Tensor, f2: Tensor, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel inception distance (Bińkowski et al., 2018) of two feature sets, in float64: the mean over
    ``num_subsets`` random subsets (without replacement, ``min(subset_size, len)`` points from each set)
    of the unbiased squared MMD with ``k(x, y) = (x.y / d + 1)^3``."""
    f1, f2 = f1.detach().double().flatten(1), f2.detach().double().flatten(1)
    size = min(subset_size, f1.shape[0], f2.shape[0])
    if size < 2:
        raise ValueError("kid: needs at least two feature vectors in each set")
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=f1.device)
    for _ in range(num_subsets):
        i = torch.randperm(f1.shape[0], generator=g)[:size].to(f1.device)
        j = torch.randperm(f2.shape[0], generator=g)[:size].to(f2.device)
        total += mmd2_unbiased(f1[i], f2[j])
    return float(total / num_subsets)


class ClassifierFeatures:
    """Penultimate (pooled) features of a classifier from a ``mentor train`` run directory.

    Samples in the EDM data range [-1, 1] (or uint8 images) are normalised the way the classifier was
    trained, and the input of its ``fc`` layer (for zoo networks, the output of ``pool``) is returned.
    ``tag`` names the data in metric keys (``FMNIST`` for Fashion-MNIST).
    """

    def __init__(self, run_dir: str | Path, device: str = "cpu", batch_size: int = 500):
        from ..engine.run import load_run

        cfg, method, splits, _, _ = load_run(run_dir, device=device)
        self.net: nn.Module = method.deployable().eval().requires_grad_(False)
        fc = getattr(self.net, "fc", None)
        if not isinstance(fc, nn.Module):
            raise ValueError(f"{run_dir}: the classifier {cfg.model.name!r} has no 'fc' layer to take features from")
        self.device = next(self.net.parameters()).device
        self.batch_size = batch_size
        self.splits = splits
        self.image_shape = tuple(splits.train.image_shape)
        self.dataset = cfg.data.name
        self.tag = DATASET_TAGS.get(cfg.data.name, cfg.data.name)
        self.mean = torch.tensor(splits.train.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(splits.train.std, device=self.device).view(1, -1, 1, 1)
        self._feat: Tensor | None = None
        fc.register_forward_pre_hook(self._grab)

    def _grab(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._feat = args[0]

    def images(self, split: str = "test") -> Tensor:
        """The uint8 images of one split of the classifier's own data (a reference set)."""
        return getattr(self.splits, split).images

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Features (N, D) of images in [-1, 1] (float) or [0, 255] (uint8), shape (N, C, H, W)."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"ClassifierFeatures: images of shape {tuple(images.shape[1:])}, but the classifier "
                             f"was trained on {self.image_shape} ({self.dataset})")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size].to(self.device)
            unit = x.float() / 255.0 if x.dtype == torch.uint8 else (x.float() + 1) / 2
            self.net((unit - self.mean) / self.std)
            assert self._feat is not None
            out.append(self._feat.float().flatten(1))
        return torch.cat(out)


def fd_score(samples: Tensor, reference_images: Tensor, features: ClassifierFeatures,
             kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, float]:
    """``{"FD-<tag>": ..., "KID-<tag>": ...}`` of ``samples`` ([-1, 1]) against ``reference_images``
    (uint8 or [-1, 1]) on a classifier's penultimate features. Not FID: the features are not Inception's.
    """
    fs, fr = features(samples), features(reference_images)
    fd = frechet_distance(*gaussian_stats(fs), *gaussian_stats(fr))
    k = kid(fs, fr, num_subsets=kid_subsets, subset_size=kid_subset_size)
    return {f"FD-{features.tag}": fd, f"KID-{features.tag}": k}
