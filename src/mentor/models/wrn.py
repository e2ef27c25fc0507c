"""Wide residual networks for small images: the distillation zoo's (wrn_16_1, wrn_16_2, wrn_40_1,
wrn_40_2) and the semi-supervised benchmarks' (wrn_28_2, wrn_28_8).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation basic blocks, depth
6n+4, stage widths 16k/32k/64k after a 16-channel stem. The first four are the WRN teachers and
students of the CIFAR distillation benchmarks (CRD, 2020). WRN-28-2 and WRN-28-8 are the networks of
the semi-supervised literature (MixMatch, FixMatch, USB's classic-CV tables: WRN-28-2 on CIFAR-10/SVHN,
WRN-28-8 on CIFAR-100) in that literature's form, :data:`SSL_FORM`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .common import StagedNet, init_reference
from .registry import register_model


@dataclass(frozen=True)
class WRNForm:
    """The details in which WRN variants differ: activation slope (0 = ReLU), BatchNorm momentum (PyTorch's
    convention: the weight of the new batch) and eps, biases on the convolutions, and the initialisation
    (``"reference"``: :func:`~mentor.models.common.init_reference`; ``"ssl"``: He-normal fan-out convs
    with their default bias init, Xavier-normal classifier with zero bias)."""

    slope: float = 0.0
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    conv_bias: bool = False
    init: str = "reference"


#: The distillation zoo's WRN (RepDistiller): ReLU, PyTorch's BN defaults, no conv biases.
KD_FORM = WRNForm()
#: The semi-supervised literature's WRN (the FixMatch/MixMatch TensorFlow code, USB's ``wrn_28_k``):
#: leaky ReLU of slope 0.1, BN momentum 0.001 (TensorFlow's decay 0.999) and eps 0.001, biases on every
#: convolution, He-normal/Xavier-normal initialisation.
SSL_FORM = WRNForm(slope=0.1, bn_momentum=0.001, bn_eps=1e-3, conv_bias=True, init="ssl")


def _act(form: WRNForm, inplace: bool) -> nn.Module:
    return nn.LeakyReLU(form.slope, inplace=inplace) if form.slope else nn.ReLU(inplace=inplace)


def _bn(channels: int, form: WRNForm) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=form.bn_eps, momentum=form.bn_momentum)


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a shortcut (no final ReLU); a leaky
    ReLU and the BN settings of ``form`` in the semi-supervised WRN, whose blocks (USB's ``BasicBlock``)
    are otherwise the same."""

    def __init__(self, cin: int, cout: int, stride: int = 1, form: WRNForm = KD_FORM):
        super().__init__()
        bias = form.conv_bias
        self.bn1 = _bn(cin, form)
        self.act1 = _act(form, inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = _bn(cout, form)
        self.act2 = _act(form, inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.project = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=bias) if self.project else nn.Identity()

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

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, form: WRNForm = KD_FORM):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=form.conv_bias)
        layers = []
        cin = 16
        for i, width in enumerate(widths):
            first_stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = [
                WideBasicBlock(cin if j == 0 else width, width, first_stride if j == 0 else 1, form)
                for j in range(n)
            ]
            layers.append(nn.Sequential(*blocks))
            cin = width
        layers[-1].append(_bn(cin, form))
        layers[-1].append(_act(form, inplace=False))
        super().__init__(stem, layers, cin, num_classes)
        if form.init == "ssl":
            _init_ssl(self)
        else:
            init_reference(self)
        nn.init.zeros_(self.fc.bias)


def _init_ssl(model: nn.Module) -> None:
    """The initialisation of the FixMatch/USB WRN: He-normal (fan-out) conv weights with their biases
    left at PyTorch's default, BN = identity, Xavier-normal classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # The gain of a leaky ReLU of slope 0 (the reference's call), i.e. He's sqrt(2).
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)


def _register(depth: int, widen: int, form: WRNForm = KD_FORM, doc: str = "") -> None:
    def factory(num_classes: int, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels, form)

    factory.__doc__ = f"WRN-{depth}-{widen} (Zagoruyko & Komodakis 2016){doc}."
    register_model(f"wrn_{depth}_{widen}")(factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
# 4 blocks per stage at widths 32/64/128 (wrn_28_2: 1.47M parameters at 10 classes) and 128/256/512
# (wrn_28_8: 23.4M at 100 classes), in the semi-supervised form.
for _widen in (2, 8):
    _register(28, _widen, SSL_FORM, " in the form of FixMatch/USB: leaky ReLU 0.1, BN momentum 0.001")
