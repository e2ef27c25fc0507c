"""VGG with batch norm for small images (vgg8, vgg11, vgg13, vgg16, vgg19).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR
2015, in the CIFAR form of the distillation literature (CRD, 2020): five conv groups, BN after
every conv, no fully-connected layers except the classifier, global pooling before it.
"""

from __future__ import annotations

from torch import nn

from .common import StagedNet, init_reference
from .registry import register_model

# Channel widths of the five conv groups. "S" is the 8-layer net the KD papers add to VGG's A/B/D/E.
CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _group(cin: int, widths: list[int], pool: bool) -> nn.Sequential:
    mods: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
    for width in widths:
        # Conv keeps its bias, as in the reference CIFAR VGG (the published parameter counts include it).
        mods += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        cin = width
    # The group's last ReLU is not in-place: FeatureTap(pre_activation=True) reads its input.
    mods[-1] = nn.ReLU()
    return nn.Sequential(*mods)


class VGG(StagedNet):
    """CIFAR VGG-BN. ``stem`` is conv group 0; ``layer1..layer4`` are groups 1-4, each opening with
    the 2x2 max-pool that follows the previous group.

    Only three max-pools are used (32 -> 16 -> 8 -> 4; 28 -> 14 -> 7 -> 3), as the reference code
    does at 32x32: a fourth would shrink 28x28 inputs to 1x1 before the last group.
    """

    def __init__(self, groups: list[list[int]], num_classes: int, in_channels: int = 3):
        stem = _group(in_channels, groups[0], pool=False)
        layers = [_group(groups[i - 1][-1], groups[i], pool=i < 4) for i in range(1, 5)]
        super().__init__(stem, layers, groups[-1][-1], num_classes)
        init_reference(self, linear_std=0.01)


def _register(name: str) -> None:
    def factory(num_classes: int, in_channels: int = 3) -> VGG:
        return VGG(CONFIGS[name], num_classes, in_channels)

    factory.__doc__ = f"{name.upper()} with batch norm, CIFAR form (Simonyan & Zisserman 2015)."
    register_model(name)(factory)


for _name in CONFIGS:
    _register(_name)
