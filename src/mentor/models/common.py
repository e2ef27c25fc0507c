"""Pieces every zoo network shares: the staged skeleton, conv-BN-ReLU and the reference weight init."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class StagedNet(nn.Module):
    """Skeleton of every zoo classifier: ``stem -> layer1 .. layerK -> [head] -> pool -> fc``.

    The stages are direct children with fixed names so that recipes can name feature layers
    (``feature_layers: [layer1, layer2]``) and :class:`mentor.models.tap.FeatureTap` can hook them;
    ``forward`` returns logits only.

    Attributes:
        stage_names: the hookable feature stages in order, ``("stem", "layer1", ...)``. They are the
            feature maps the KD literature distils (RepDistiller's ``feats[:-1]``). ``head``, the 1x1
            conv some nets apply before pooling, is hookable by name but is not a stage.
        num_features: width of the pooled vector, i.e. the input width of ``fc``.
    """

    def __init__(
        self,
        stem: nn.Module,
        layers: Sequence[nn.Module],
        num_features: int,
        num_classes: int,
        head: nn.Module | None = None,
    ):
        super().__init__()
        self.stem = stem
        for i, layer in enumerate(layers, start=1):
            self.add_module(f"layer{i}", layer)
        if head is not None:
            self.head = head
        # Flatten inside `pool` so that hooking it yields the (N, num_features) vector CRD/RKD use.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(num_features, num_classes)
        self.stage_names: tuple[str, ...] = ("stem",) + tuple(f"layer{i}" for i in range(1, len(layers) + 1))
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The stages run in the order they were registered (stem, layer1 .. layerK). Iterating the children,
        # rather than looking each stage up by a computed name, lets ``torch.jit.script`` compile the network.
        for name, module in self.named_children():
            if name in self.stage_names:
                x = module(x)
        if hasattr(self, "head"):
            x = self.head(x)
        return self.fc(self.pool(x))


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, BN follows) -> BN -> ReLU.

    The ReLU is not in-place: it ends a stem or head, and ``FeatureTap(pre_activation=True)`` reads
    its input.
    """
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


def init_reference(model: nn.Module, linear_std: float | None = None) -> None:
    """The initialisation of the CIFAR KD zoo (RepDistiller): He-normal (fan-out) convs, BN = identity.

    ``linear_std`` draws the classifier from N(0, std) with zero bias (the VGG/MobileNetV2 files);
    ``None`` keeps PyTorch's default Linear init (the ResNet/WRN files).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
