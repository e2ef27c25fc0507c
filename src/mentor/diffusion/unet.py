"""A small U-Net for EDM-style denoising of small images (28x28 Fashion-MNIST, 8x8 UCI digits).

The architecture follows the design space of Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models" (NeurIPS 2022) scaled down: residual blocks of GroupNorm + SiLU +
3x3 convolutions, a noise-level embedding (Fourier features of ``c_noise`` followed by an MLP)
injected into every block as a per-channel scale and shift, an optional class embedding, optional
self-attention at the lowest resolution, and skip connections from the encoder to the decoder.
The residual sums are scaled by ``1/sqrt(2)`` and the last convolution of every branch starts at
zero, so a fresh network is the identity on its skip path and outputs zero.

The network is the raw function ``F`` of EDM's preconditioning: ``forward(x, c_noise, class_labels)``
returns ``F``, not logits (the documented exception to the zoo's ``forward(x) -> logits``).
Wrap it in :class:`mentor.diffusion.denoisers.EDMPrecond` to get a denoiser. Its bottleneck is the
module ``mid``, so a forward hook on ``mid`` reads the lowest-resolution feature (AMED's predictor
input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import register_model


def _groups(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """The largest number of GroupNorm groups <= ``max_groups`` that divides ``channels`` with at least
    ``min_per_group`` channels each (1 for tiny widths)."""
    for g in range(min(max_groups, channels // min_per_group), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseEmbedding(nn.Module):
    """Fourier features ``[cos(2 pi f c), sin(2 pi f c)]`` of the scalar noise condition ``c`` at
    geometrically spaced frequencies ``f`` in [min_freq, max_freq] (cycles per unit of ``c``).

    EDM's ``c_noise = log(sigma) / 4`` spans about [-1.6, 1.1] for sigma in [0.002, 80]; the lowest
    frequency varies slowly over that range and the highest resolves small changes of sigma.
    """

    def __init__(self, dim: int, min_freq: float = 0.25, max_freq: float = 32.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"NoiseEmbedding: dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        angles = c.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm * (1 + scale) + shift -> SiLU -> dropout -> conv, plus a
    (1x1-projected where the width changes) skip; the sum is scaled by 1/sqrt(2) as in EDM's blocks."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0, attention: bool = False):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = SelfAttention(cout) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), scale + 1))
        h = self.conv2(self.dropout(h))
        x = (h + self.skip(x)) * (1 / math.sqrt(2))
        if self.attn is not None:
            x = self.attn(x)
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual with 1/sqrt(2) scaling."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * (1 / math.sqrt(2))


class MidBlock(nn.Module):
    """The bottleneck: residual block, optional self-attention, residual block. Its output is the
    lowest-resolution feature map (hook ``mid`` to read it)."""

    def __init__(self, channels: int, emb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.block1 = ResBlock(channels, channels, emb_dim, dropout, attention=attention)
        self.block2 = ResBlock(channels, channels, emb_dim, dropout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.block2(self.block1(x, emb), emb)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (28 -> 14 -> 7, 8 -> 4; odd sizes round up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the matching encoder resolution, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class EDMUNet(nn.Module):
    """The raw network ``F(x_in, c_noise, class_labels) -> F`` of an EDM denoiser.

    Args:
        num_classes: number of classes of the data (used only when ``conditional``).
        in_channels: image channels (output has the same).
        image_size: expected input side; checked against the number of resolution levels.
        channels: base width; level ``l`` has ``channels * channel_mult[l]`` channels.
        channel_mult: one multiplier per resolution level; each level after the first halves the side.
        num_blocks: residual blocks per level in the encoder (the decoder has one more per level).
        attention: self-attention in the blocks at the lowest resolution and in the bottleneck.
        conditional: learn a class embedding added to the noise embedding. A label of -1 (or
            ``class_labels=None``) means "no label", which classifier-free label dropout uses.
        dropout: dropout rate inside the residual blocks.
    """

    def __init__(self, num_classes: int = 0, in_channels: int = 3, image_size: int | None = None,
                 channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2), num_blocks: int = 2,
                 attention: bool = True, conditional: bool = False, dropout: float = 0.0):
        super().__init__()
        mults = tuple(int(m) for m in channel_mult)
        if not mults or num_blocks < 1 or channels < 1:
            raise ValueError("edm_unet: channel_mult must be non-empty, num_blocks and channels >= 1")
        if image_size is not None and image_size < 2 ** (len(mults) - 1):
            raise ValueError(f"edm_unet: image_size {image_size} is too small for {len(mults)} resolution levels")
        if conditional and num_classes < 1:
            raise ValueError("edm_unet: conditional=True needs num_classes >= 1")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.conditional = conditional
        emb_dim = 4 * channels
        self.noise_embed = NoiseEmbedding(channels)
        self.emb_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes, emb_dim) if conditional else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=1.0 / math.sqrt(emb_dim))

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width = [channels], channels
        last = len(mults) - 1
        for level, m in enumerate(mults):
            for _ in range(num_blocks):
                self.down.append(ResBlock(width, channels * m, emb_dim, dropout, attention and level == last))
                width = channels * m
                skips.append(width)
            if level != last:
                self.down.append(Downsample(width))
                skips.append(width)
        self.mid = MidBlock(width, emb_dim, dropout, attention)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            m = mults[level]
            for _ in range(num_blocks + 1):
                self.up.append(ResBlock(width + skips.pop(), channels * m, emb_dim, dropout,
                                        attention and level == last))
                width = channels * m
            if level != 0:
                self.up.append(Upsample(width))
        self.norm_out = _norm(width)
        self.conv_out = _zero(nn.Conv2d(width, in_channels, 3, padding=1))

    def embedding(self, c_noise: Tensor, batch: int, class_labels: Tensor | None) -> Tensor:
        """The per-sample conditioning vector (noise level, plus class when conditional)."""
        c = torch.as_tensor(c_noise, device=self.conv_in.weight.device).reshape(-1)
        if c.numel() == 1:
            c = c.expand(batch)
        emb = self.emb_mlp(self.noise_embed(c))
        if self.class_embed is not None and class_labels is not None:
            labels = class_labels.reshape(-1).long()
            keep = (labels >= 0).unsqueeze(1).to(emb.dtype)
            emb = emb + self.class_embed(labels.clamp(min=0)) * keep
        return F.silu(emb)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embedding(c_noise, x.shape[0], class_labels).to(x.dtype)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid(h, emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, hs[-1].shape[-2:])
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


@register_model("edm_unet")
def edm_unet(num_classes: int, in_channels: int = 3, image_size: int | None = None, channels: int = 64,
             channel_mult: Sequence[int] = (1, 2, 2), num_blocks: int = 2, attention: bool = True,
             conditional: bool = False, dropout: float = 0.0) -> EDMUNet:
    """Small EDM U-Net (Karras et al., 2022); ``forward(x, c_noise, class_labels=None)`` returns the raw
    network output ``F``, to be wrapped in ``EDMPrecond``. Not a classifier."""
    return EDMUNet(num_classes, in_channels, image_size, channels, channel_mult, num_blocks, attention,
                   conditional, dropout)
