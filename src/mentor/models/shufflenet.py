"""ShuffleNetV1 and ShuffleNetV2 for small images, as the distillation literature uses them.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices",
CVPR 2018 (groups g=3, stage widths 240/480/960, 4/8/4 units) and Ma et al., "ShuffleNet V2:
Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018 (1x: widths 116/232/464,
3/7/3 units plus a 1024-channel 1x1 conv). The CIFAR form of CRD (2020) replaces the ImageNet stem
by a stride-1 1x1 conv to 24 channels and drops the max-pool, so the three stages run at 1/2, 1/4
and 1/8 of the input size.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import StagedNet, conv_bn_relu
from .registry import register_model


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` channel groups so the next grouped conv sees every group (Zhang et al.)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet unit: grouped 1x1 - BN - ReLU - shuffle - 3x3 depthwise - BN - grouped 1x1 - BN,
    added to the input (stride 1) or concatenated with its 3x3 average pool (stride 2), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, group_first_conv: bool = True):
        super().__init__()
        # A stride-2 unit concatenates the pooled input, so its residual branch makes only cout - cin.
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        # The paper does not group the very first pointwise conv: its 24 input channels are too few.
        g1 = groups if group_first_conv else 1
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(g1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.stride = stride
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.act_out = nn.ReLU()  # not in-place: FeatureTap(pre_activation=True) reads its input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle(self.act1(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        res = self.shortcut(x)
        return self.act_out(torch.cat([out, res], 1) if self.stride == 2 else out + res)

    def final_activation(self) -> nn.Module:
        return self.act_out


class ShuffleNetV1(StagedNet):
    """ShuffleNetV1 with a 1x1 stem and three stages; the default widths are the paper's for g=3."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, ...] = (240, 480, 960),
        units: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
    ):
        layers = []
        cin = 24
        for i, (width, n) in enumerate(zip(widths, units)):
            blocks = [
                ShuffleV1Unit(cin if j == 0 else width, width, 2 if j == 0 else 1, groups, i > 0 or j > 0)
                for j in range(n)
            ]
            layers.append(nn.Sequential(*blocks))
            cin = width
        super().__init__(conv_bn_relu(in_channels, 24, 1), layers, cin, num_classes)


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 basic unit: split channels in half, transform one half with 1x1 - BN - ReLU -
    3x3 depthwise - BN - 1x1 - BN, concatenate, shuffle, ReLU.

    The reference applies the ReLU to the transformed half before concatenating and shuffling. The
    untouched half is the output of an earlier ReLU, hence non-negative, and shuffling is a
    permutation, so ReLU-ing the whole shuffled tensor gives the same values and gradients; doing it
    last makes ``relu(pre-activation) == output`` hold channel for channel.
    """

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)
        self.act_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, x2 = x.chunk(2, dim=1)
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x2)))))))
        return self.act_out(self.shuffle(torch.cat([keep, out], 1)))

    def final_activation(self) -> nn.Module:
        return self.act_out


class ShuffleV2Down(nn.Module):
    """ShuffleNetV2 down-sampling unit: two stride-2 branches (3x3 depthwise - BN - 1x1 - BN and
    1x1 - BN - ReLU - 3x3 depthwise - BN - 1x1 - BN), concatenated, shuffled, ReLU (applied once,
    after the shuffle, which equals the reference's per-branch ReLU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
        )
        self.right = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
        )
        self.shuffle = ChannelShuffle(2)
        self.act_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_out(self.shuffle(torch.cat([self.left(x), self.right(x)], 1)))

    def final_activation(self) -> nn.Module:
        return self.act_out


# Stage widths (three stages + the final 1x1 conv) and units per stage for each net size.
V2_SIZES: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(StagedNet):
    """ShuffleNetV2 with a 1x1 stem, three stages (a down-sampling unit, then basic units) and a
    1x1 ``head`` conv to ``num_features`` channels."""

    def __init__(self, num_classes: int, in_channels: int = 3, net_size: float = 1.0):
        if net_size not in V2_SIZES:
            raise ValueError(f"ShuffleNetV2 net_size must be one of {sorted(V2_SIZES)}, got {net_size}")
        widths, units = V2_SIZES[net_size]
        layers = []
        cin = 24
        for width, n in zip(widths[:3], units):
            layers.append(nn.Sequential(ShuffleV2Down(cin, width), *[ShuffleV2Unit(width) for _ in range(n)]))
            cin = width
        head = conv_bn_relu(cin, widths[3], 1)
        super().__init__(conv_bn_relu(in_channels, 24, 1), layers, widths[3], num_classes, head=head)


@register_model("shufflenetv1")
def shufflenetv1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1 g=3, CIFAR form of the KD literature (Zhang et al. 2018; CRD 2020's ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes, in_channels)


@register_model("shufflenetv2")
def shufflenetv2(num_classes: int, in_channels: int = 3, net_size: float = 1.0) -> ShuffleNetV2:
    """ShuffleNetV2 1x (``net_size`` 0.5/1/1.5/2), CIFAR form of the KD literature (Ma et al. 2018;
    CRD 2020's ``ShuffleV2``; SimKD uses ``net_size=1.5``)."""
    return ShuffleNetV2(num_classes, in_channels, net_size)
