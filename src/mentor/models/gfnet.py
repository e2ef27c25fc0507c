"""Small Global Filter Networks for 28x28 and 32x32 images (``gfnet_tiny``, ``gfnet_xs``).

Rao et al., "Global Filter Networks for Image Classification", NeurIPS 2021, in the isotropic form (GFNet-Ti
and -XS of the paper, scaled down): non-overlapping patches embedded by a strided convolution plus learned
position embeddings, then blocks of ``x + MLP(LN(GF(LN(x))))`` where the global filter ``GF`` takes the 2-D
real FFT of the token grid (orthonormal), multiplies it element-wise by a learnable complex weight (one per
frequency and channel) and transforms back; a final LayerNorm, the mean over tokens and a linear classifier.

The network follows the zoo's stage naming (:class:`~mentor.models.StagedNet`): ``stem`` (patch embedding and
positions, ``[B, C, H, W] -> [B, N, D]``), ``layer1`` .. ``layerK`` (one block each), ``pool`` (LayerNorm and
mean over tokens, ``[B, D]``) and ``fc``.

Hook point for spectral methods: every :class:`GlobalFilter` passes the token spectrum ``[B, h, w//2+1, D]``
(complex, before the learnable filter) through its ``spectrum`` sub-module, an ``nn.Identity`` by default;
ALOFT (:mod:`mentor.generalize.aloft`) puts its low-frequency perturbation there.

The filter and position embedding are sized at construction for ``image_size`` (default 32;
``model.kwargs: {image_size: 28}`` for Fashion-MNIST, ``{image_size: 8, patch_size: 2}`` for the 8x8 digits);
an image of another size is refused with a :class:`GFNetSizeError` naming the value to set.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .common import StagedNet
from .registry import register_model


class GFNetSizeError(ConfigError, ValueError):
    """An image whose size is not the one the network was built for, or arguments that build no GFNet."""


class GFPatchEmbed(nn.Module):
    """The stem: ``patch_size`` patches embedded by a strided convolution, plus a learned position embedding
    (one per patch of the ``grid`` x ``grid`` grid). Returns tokens ``[B, grid * grid, dim]``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, image_size: int):
        super().__init__()
        self.patch_size, self.image_size = patch_size, image_size
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise GFNetSizeError(
                f"this GFNet was built for {self.image_size}x{self.image_size} images ({self.grid}x{self.grid} "
                f"patches of {self.patch_size} pixels) but is given {h}x{w} images: set model.kwargs.image_size={h} "
                "(with a patch_size that divides it)" if h == w else
                f"this GFNet takes square images; it is given {h}x{w} ones")
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos_embed


class GlobalFilter(nn.Module):
    """``irFFT2(spectrum(rFFT2(X)) * W)`` over the ``grid`` x ``grid`` token map, orthonormal transforms, with
    ``W`` a learnable complex weight ``[grid, grid // 2 + 1, dim]``. ``spectrum`` is the hook point (identity)."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.complex_weight = nn.Parameter(torch.randn(grid, grid // 2 + 1, dim, 2) * 0.02)
        self.spectrum: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        tokens = x.view(b, self.grid, self.grid, c).float()  # the FFT in float32, also under autocast
        spec = torch.fft.rfft2(tokens, dim=(1, 2), norm="ortho")
        spec = self.spectrum(spec) * torch.view_as_complex(self.complex_weight.float())
        out = torch.fft.irfft2(spec, s=(self.grid, self.grid), dim=(1, 2), norm="ortho")
        return out.reshape(b, n, c).to(x.dtype)


class GFBlock(nn.Module):
    """``x + mlp(norm2(filter(norm1(x))))`` (GFNet's block: one residual around filter and MLP)."""

    def __init__(self, dim: int, grid: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.filter = GlobalFilter(dim, grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm2(self.filter(self.norm1(x))))


class TokenMeanPool(nn.Module):
    """``pool``: the final LayerNorm, then the mean over tokens, ``[B, N, D] -> [B, D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x).mean(1)


class GFNet(StagedNet):
    """``stem`` (patches + positions) -> ``layer1`` .. ``layer{depth}`` (global-filter blocks) -> ``pool``
    (LayerNorm, mean over tokens) -> ``fc``. Attributes besides :class:`StagedNet`'s: ``dim``, ``grid``,
    ``patch_size``, ``image_size``."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, mlp_ratio: float = 4.0):
        checks = [(image_size >= 1, "image_size must be >= 1"), (patch_size >= 1, "patch_size must be >= 1"),
                  (depth >= 1, "depth must be >= 1"), (dim >= 1, "dim must be >= 1"),
                  (mlp_ratio > 0, "mlp_ratio must be > 0")]
        for ok, why in checks:
            if not ok:
                raise GFNetSizeError(f"model.kwargs: {why}")
        if image_size % patch_size:
            raise GFNetSizeError(f"model.kwargs.patch_size={patch_size} does not divide image_size={image_size}")
        stem = GFPatchEmbed(in_channels, dim, patch_size, image_size)
        super().__init__(stem, [GFBlock(dim, stem.grid, mlp_ratio) for _ in range(depth)], dim, num_classes)
        self.pool = TokenMeanPool(dim)  # replaces StagedNet's average pooling, in the same place
        self.dim, self.grid, self.patch_size, self.image_size = dim, stem.grid, patch_size, image_size
        self.apply(_init)
        nn.init.trunc_normal_(stem.pos_embed, std=0.02)

    def filters(self) -> list[GlobalFilter]:
        """The global filters of the blocks, in order."""
        return [m for m in self.modules() if isinstance(m, GlobalFilter)]


def _init(m: nn.Module) -> None:
    """GFNet's initialisation (timm's): truncated-normal (std 0.02) linear weights, zero biases, identity LNs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register_model("gfnet_tiny")
def gfnet_tiny(num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, dim: int = 64,
               depth: int = 4, mlp_ratio: float = 4.0) -> GFNet:
    """A 0.15M-parameter GFNet for small images: width 64, 4 blocks, 4-pixel patches."""
    return GFNet(num_classes, in_channels, image_size, patch_size, dim, depth, mlp_ratio)


@register_model("gfnet_xs")
def gfnet_xs(num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, dim: int = 128,
             depth: int = 8, mlp_ratio: float = 4.0) -> GFNet:
    """A 1.1M-parameter GFNet for small images: width 128, 8 blocks, 4-pixel patches."""
    return GFNet(num_classes, in_channels, image_size, patch_size, dim, depth, mlp_ratio)


__all__ = ["GFBlock", "GFNet", "GFNetSizeError", "GFPatchEmbed", "GlobalFilter", "TokenMeanPool", "gfnet_tiny",
           "gfnet_xs"]
