"""Wide residual networks for small images (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation basic blocks, depth
6n+4, stage widths 16k/32k/64k after a 16-channel stem. These are the WRN teachers and students of
the CIFAR distillation benchmarks (CRD, 2020).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import StagedNet, init_reference
from .registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a shortcut (no final ReLU)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.project = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if self.project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        # As in the WRN reference code: a projecting shortcut sees the activated input, an identity
        # shortcut the raw one.
        return out + (self.shortcut(pre) if self.project else x)

    def final_activation(self) -> None:
        # The block output is a raw residual sum: it already is a pre-activation map.
        return None


class WideResNet(StagedNet):
    """WRN-depth-k. The network's final BN-ReLU closes ``layer3``, so hooking ``layer3`` gives the
    activated map and ``pre_activation=True`` the BN output (RepDistiller's ``preact`` f3)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        layers = []
        cin = 16
        for i, width in enumerate(widths):
            first_stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = [
                WideBasicBlock(cin if j == 0 else width, width, first_stride if j == 0 else 1)
                for j in range(n)
            ]
            layers.append(nn.Sequential(*blocks))
            cin = width
        layers[-1].append(nn.BatchNorm2d(cin))
        layers[-1].append(nn.ReLU())
        super().__init__(stem, layers, cin, num_classes)
        init_reference(self)
        nn.init.zeros_(self.fc.bias)


def _register(depth: int, widen: int) -> None:
    def factory(num_classes: int, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels)

    factory.__doc__ = f"WRN-{depth}-{widen} (Zagoruyko & Komodakis 2016)."
    register_model(f"wrn_{depth}_{widen}")(factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
