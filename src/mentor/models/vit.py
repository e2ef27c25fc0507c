"""Small Vision Transformers for 28x28 and 32x32 images (``vit_tiny``, ``vit_small``).

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021, in the pre-norm form of timm's ``vision_transformer.py`` and DeiT (Touvron et al., ICML 2021):
non-overlapping patches embedded by a strided convolution, a class token, learned position embeddings,
then blocks of ``x + MHSA(LN(x))`` and ``x + MLP(LN(x))`` (MLP ratio 4, GELU), a final LayerNorm and a
linear classifier on the class token.

The network follows the zoo's stage naming (:class:`~mentor.models.StagedNet`): ``stem`` (patch embedding,
class token and position embedding: ``[B, C, H, W] -> [B, 1 + N, D]``), ``layer1`` .. ``layerK`` (one
transformer block each, ``[B, 1 + N, D] -> [B, 1 + N, D]``), ``pool`` (the final LayerNorm of the class
token, ``[B, D]``) and ``fc``. Feature taps, :class:`~mentor.models.PenultimateTap` (the input of ``fc`` is
the normalised class token) and the stage helpers work unchanged; the stages' outputs are token sequences,
not maps.

The position embedding is sized at construction for ``image_size`` (a model argument, default 32;
``model.kwargs: {image_size: 28}`` for Fashion-MNIST, ``{image_size: 8, patch_size: 2}`` for the 8x8 UCI
digits): an image of another size is refused with a :class:`ViTSizeError` that says which value to set,
rather than interpolating the embedding silently.

Attention maps: every block's attention (``layer{i}.attn``, an :class:`Attention`) computes its softmax
map explicitly and passes it through its ``map`` sub-module (an ``nn.Identity``) when asked, so a forward
hook or a :class:`~mentor.models.FeatureTap` on ``layer{i}.attn.map`` reads the ``[B, heads, T, T]`` map
with its autograd graph; with :func:`keep_attention` each module also keeps its last map, detached, in
``attention``. Otherwise the fused ``scaled_dot_product_attention`` runs and no map is formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .common import StagedNet
from .registry import register_model


class ViTSizeError(ConfigError, ValueError):
    """An image whose size does not give the patch grid the position embedding was built for; or a
    model argument that cannot build a Vision Transformer."""


class PatchEmbed(nn.Module):
    """The stem: ``patch_size`` x ``patch_size`` patches embedded by a strided convolution, a class
    token prepended, and learned position embeddings (one per token, for a ``grid`` x ``grid`` patch grid)
    added."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, image_size: int):
        super().__init__()
        self.patch_size, self.image_size = patch_size, image_size
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise ViTSizeError(
                f"this Vision Transformer was built for {self.image_size}x{self.image_size} images "
                f"({self.grid}x{self.grid} patches of {self.patch_size} pixels) but is given {h}x{w} images: "
                f"set model.kwargs.image_size={h} (with a patch_size that divides it)" if h == w else
                f"this Vision Transformer takes square images; it is given {h}x{w} ones")
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, tokens], 1) + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(softmax(q k^T / sqrt(d)) v)`` over ``heads`` heads.

    With ``keep`` set (see :func:`keep_attention`) or a hook on ``map``, the softmax map ``[B, heads, T, T]``
    is computed explicitly and passed through ``map``; ``keep`` also stores it, detached, in
    ``attention`` (the last forward's). Otherwise the fused kernel runs and no map is formed."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.map = nn.Identity()
        self.keep = False
        self.attention: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v) if torch.jit.is_scripting() else self._attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    @torch.jit.unused
    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The explicit map when it is kept or hooked, else the fused kernel (a scripted network runs the
        fused kernel: it keeps no map and runs no hooks)."""
        if self.keep or self.map._forward_hooks or self.map._forward_pre_hooks:
            attn = self.map(((q * self.scale) @ k.transpose(-2, -1)).softmax(-1))
            if self.keep:
                self.attention = attn.detach()
            return attn @ v
        return F.scaled_dot_product_attention(q, k, v)


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassTokenPool(nn.Module):
    """``pool``: the final LayerNorm applied to the class token, ``[B, 1 + N, D] -> [B, D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x[:, 0])


class VisionTransformer(StagedNet):
    """``stem`` (patches + class token + positions) -> ``layer1`` .. ``layer{depth}`` (blocks) -> ``pool``
    (LayerNorm of the class token) -> ``fc``.

    Attributes besides :class:`StagedNet`'s: ``dim``, ``heads``, ``patch_size``, ``image_size`` and
    ``grid`` (patches per side, so ``grid ** 2`` patch tokens follow the class token)."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0):
        checks = [(image_size >= 1, "image_size must be >= 1"), (patch_size >= 1, "patch_size must be >= 1"),
                  (depth >= 1, "depth must be >= 1"), (heads >= 1, "heads must be >= 1"),
                  (dim >= 1, "dim must be >= 1"), (mlp_ratio > 0, "mlp_ratio must be > 0")]
        for ok, why in checks:
            if not ok:
                raise ViTSizeError(f"model.kwargs: {why}")
        if image_size % patch_size:
            raise ViTSizeError(f"model.kwargs.patch_size={patch_size} does not divide image_size={image_size}")
        if dim % heads:
            raise ViTSizeError(f"model.kwargs.dim={dim} is not a multiple of heads={heads}")
        stem = PatchEmbed(in_channels, dim, patch_size, image_size)
        super().__init__(stem, [Block(dim, heads, mlp_ratio) for _ in range(depth)], dim, num_classes)
        self.pool = ClassTokenPool(dim)  # replaces StagedNet's average pooling, in the same place
        self.dim, self.heads, self.grid = dim, heads, stem.grid
        self.patch_size, self.image_size = patch_size, image_size
        self.apply(_init)
        nn.init.trunc_normal_(stem.pos_embed, std=0.02)
        nn.init.trunc_normal_(stem.cls_token, std=0.02)

    def blocks(self) -> list[Block]:
        """The transformer blocks in order (``layer1`` ..)."""
        return [getattr(self, n) for n in self.stage_names[1:]]


def _init(m: nn.Module) -> None:
    """timm's ViT initialisation: truncated-normal (std 0.02) linear weights, zero biases; LayerNorms as
    identity."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def keep_attention(model: nn.Module, on: bool = True) -> list[Attention]:
    """Make every :class:`Attention` of ``model`` keep (``on``) or stop keeping its last map; returns them
    in order. Kept maps are detached (for inspection); for a loss on a map, tap ``layer{i}.attn.map``."""
    mods = [m for m in model.modules() if isinstance(m, Attention)]
    for m in mods:
        m.keep = on
        if not on:
            m.attention = None
    return mods


def attention_maps(model: nn.Module) -> list[Tensor | None]:
    """The maps the :class:`Attention` modules of ``model`` kept at its last forward (``[B, heads, T, T]``
    each, in block order; ``None`` for a module that kept none)."""
    return [m.attention for m in model.modules() if isinstance(m, Attention)]


@register_model("vit_tiny")
def vit_tiny(num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, depth: int = 6,
             dim: int = 128, heads: int = 4) -> VisionTransformer:
    """A 1.2M-parameter ViT for small images: width 128, 6 blocks of 4 heads, 4-pixel patches."""
    return VisionTransformer(num_classes, in_channels, image_size, patch_size, dim, depth, heads)


@register_model("vit_small")
def vit_small(num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, depth: int = 8,
              dim: int = 256, heads: int = 8) -> VisionTransformer:
    """A 6.3M-parameter ViT for small images: width 256, 8 blocks of 8 heads, 4-pixel patches."""
    return VisionTransformer(num_classes, in_channels, image_size, patch_size, dim, depth, heads)


__all__ = ["Attention", "Block", "ClassTokenPool", "PatchEmbed", "ViTSizeError", "VisionTransformer", "attention_maps",
           "keep_attention", "vit_small", "vit_tiny"]
