"""MobileNetV2 for small images, as the distillation literature uses it (width 0.5).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018. The KD papers'
"MobileNetV2" (CRD 2020, after RCO's ``mobile_half``) is width multiplier 0.5, expansion 6, a
stride-2 stem and no channel rounding; the expansion 1x1 conv is kept even where the expansion
factor is 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import StagedNet, conv_bn_relu, init_reference
from .registry import register_model

# (expansion, channels, repeats, first stride) per block group, from the paper's Table 2 with the
# strides of the CIFAR variant.
SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# Block groups per stage: stage boundaries are where the KD code taps features (after groups 1, 2, 4, 6).
STAGES = [(0, 1), (2,), (3, 4), (5, 6)]


class InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU - 3x3 depthwise - BN - ReLU - 1x1 project - BN (linear bottleneck)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out

    def final_activation(self) -> None:
        # Linear bottleneck: there is no final ReLU, the output is already pre-activation.
        return None


class MobileNetV2(StagedNet):
    """MobileNetV2 with ``stem``, four stages and a 1x1 ``head`` conv to ``num_features`` channels."""

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6):
        cin = int(32 * width_mult)
        stem = conv_bn_relu(in_channels, cin, 3, stride=2)
        groups = []
        for t, c, n, s in SETTINGS:
            cout = int(c * width_mult)
            t = t if t == 1 else expansion
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
            groups.append(blocks)
        layers = [nn.Sequential(*[b for g in stage for b in groups[g]]) for stage in STAGES]
        num_features = int(1280 * width_mult) if width_mult > 1.0 else 1280
        super().__init__(stem, layers, num_features, num_classes, head=conv_bn_relu(cin, num_features, 1))
        init_reference(self, linear_std=0.01)


@register_model("mobilenetv2")
def mobilenetv2(
    num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6
) -> MobileNetV2:
    """The KD literature's MobileNetV2: width 0.5, expansion 6 (Sandler et al. 2018; CRD 2020)."""
    return MobileNetV2(num_classes, in_channels, width_mult, expansion)
