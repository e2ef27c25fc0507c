"""Generators of synthetic images for data-free distillation.

:class:`Generator` is the generator of DAFL / ZSKT / DFQ / CMI / Fast as the Fast-Datafree codebase
builds it (Fang et al.): ``Linear(nz -> 2*ngf*(s/4)^2)``, BN, then two stages of nearest 2x upsampling,
3x3 convolution, BN and LeakyReLU(0.2), and a 3x3 convolution to the image channels. Its output is
either an image in [0, 1] (``output="sigmoid"``, Fast-Datafree) or already normalised images
(``output="tanh_bn"``: Tanh then a BatchNorm without affine parameters, DFAD's ``GeneratorA``).

With ``num_classes > 0`` every BatchNorm is class-conditional (:class:`ConditionalBatchNorm2d`, a
per-class gain and bias looked up from an embedding, as CPSC-DFKD's ``GeneratorD``), and the generator
is called ``G(z, y)``.

:func:`dcgan_init` is the re-initialisation CMI and CSD apply to their generator at every synthesis
round (``reset_model``): weights of convolutions and linear layers from N(0, 0.02), BN gains from
N(1, 0.02), biases 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm2d without affine parameters followed by a gain and bias chosen by the class label:
    ``gamma[y] * BN(x) + beta[y]`` (de Vries et al., 2017; Miyato & Koyama, 2018). Gains start at 1 and
    biases at 0, so before training it is the plain BatchNorm."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.bn.reset_running_stats()
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.bn(x)
        return self.gamma(y)[:, :, None, None] * out + self.beta(y)[:, :, None, None]


class _Norm(nn.Module):
    """A BatchNorm2d, or its class-conditional form, behind one ``forward(x, y)``."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = ConditionalBatchNorm2d(channels, num_classes) if num_classes else nn.BatchNorm2d(channels)

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        if isinstance(self.norm, ConditionalBatchNorm2d):
            return self.norm(x, y)
        return self.norm(x)


class Generator(nn.Module):
    """``G(z[, y]) -> images`` of ``channels x size x size`` (see the module docstring)."""

    def __init__(self, nz: int = 256, ngf: int = 64, size: int = 32, channels: int = 3, num_classes: int = 0,
                 output: str = "sigmoid"):
        super().__init__()
        if output not in ("sigmoid", "tanh_bn"):
            raise ValueError(f"generator output must be 'sigmoid' or 'tanh_bn', got {output!r}")
        self.nz, self.size, self.channels, self.num_classes, self.output = nz, size, channels, num_classes, output
        self.init_size = math.ceil(size / 4)
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size ** 2)
        self.n0 = _Norm(2 * ngf, num_classes)
        self.c1 = nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1, bias=False)
        self.n1 = _Norm(2 * ngf, num_classes)
        self.c2 = nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False)
        self.n2 = _Norm(ngf, num_classes)
        self.c3 = nn.Conv2d(ngf, channels, 3, 1, 1)
        self.out_norm = nn.BatchNorm2d(channels, affine=False) if output == "tanh_bn" else None

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.num_classes and y is None:
            raise ValueError("a class-conditional generator is called G(z, y)")
        h = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        h = self.n0(h, y)
        h = F.leaky_relu(self.n1(self.c1(F.interpolate(h, scale_factor=2)), y), 0.2)
        h = F.leaky_relu(self.n2(self.c2(F.interpolate(h, scale_factor=2)), y), 0.2)
        h = self.c3(h)[:, :, : self.size, : self.size]
        if self.out_norm is not None:
            return self.out_norm(torch.tanh(h))
        return torch.sigmoid(h)


@torch.no_grad()
def dcgan_init(module: nn.Module) -> None:
    """Re-initialise ``module`` as CMI's ``reset_model`` does: convolution and linear weights ~ N(0, 0.02),
    normalisation gains ~ N(1, 0.02) (class-conditional gains 1), biases 0; running statistics reset."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
        elif isinstance(m, ConditionalBatchNorm2d):
            m.reset_parameters()
