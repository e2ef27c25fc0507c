"""CIFAR ResNets of the distillation literature (resnet8 ... resnet110, resnet8x4, resnet32x4).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3 stem and
three stages of basic blocks at widths 16/32/64, depth 6n+2. The "x4" variants of CRD/RepDistiller
(Tian et al., "Contrastive Representation Distillation", ICLR 2020) widen stem/stages to
32/64/128/256 and are the standard resnet32x4 -> resnet8x4 teacher/student pair.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import StagedNet, conv_bn_relu, init_reference
from .registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a shortcut, then ReLU (He et al. 2016).

    The shortcut is a 1x1 conv + BN when the shape changes (option B), as in RepDistiller.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()
        # Not in-place: its input is the block's pre-activation feature (RepDistiller's `preact`).
        self.act_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act_out(out + self.shortcut(x))

    def final_activation(self) -> nn.Module:
        return self.act_out


class CifarResNet(StagedNet):
    """3-stage basic-block ResNet for small images; ``widths`` = (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        layers = []
        cin = widths[0]
        for i, width in enumerate(widths[1:]):
            first_stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(cin if j == 0 else width, width, first_stride if j == 0 else 1) for j in range(n)
            ]
            layers.append(nn.Sequential(*blocks))
            cin = width
        super().__init__(conv_bn_relu(in_channels, widths[0]), layers, widths[-1], num_classes)
        init_reference(self)


def _register(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def factory(num_classes: int, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, in_channels)

    factory.__doc__ = f"ResNet-{depth} for small images, widths {widths} (He et al. 2016; CRD 2020 for x4)."
    register_model(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
