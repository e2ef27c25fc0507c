"""Connectors between a student's and a teacher's features, sized from the shapes a dry run observes.

Nothing here knows a network pair: :func:`probe_shapes` runs a network once on a real batch and
reports the shapes of the tapped features, and each connector is built from those shapes, so any
two zoo (or hookable) networks can be paired without per-pair code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import FeatureTap
from ..nn.projectors import conv_block, conv_projector

__all__ = ["ConvRegressor", "EmbedHead", "bottleneck_projector", "probe_shapes"]


@torch.no_grad()
def probe_shapes(model: nn.Module, tap: FeatureTap, x: Tensor) -> dict[str, torch.Size]:
    """The shape of every feature ``tap`` records when ``model`` sees ``x`` (two samples of it).

    The model runs in eval mode without gradients and gets its mode back, so the dry run leaves BN
    running statistics and every parameter untouched.
    """
    mode = model.training
    model.eval()
    try:
        model(x[:2])
        return {name: tap[name].shape for name in tap.names}
    finally:
        model.train(mode)


class ConvRegressor(nn.Sequential):
    """FitNets' convolutional regressor: a student map ``[C_s, H_s, W_s]`` onto the teacher's
    channels (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), conv -> BN -> ReLU.

    Sized as RepDistiller's ``ConvReg`` where the resolutions differ by a factor of two (a 3x3
    stride-2 conv down, a 4x4 stride-2 transposed conv up); at equal resolution a 1x1 conv. Other
    ratios get a 1x1 conv too and the hint loss pools the larger map to the smaller
    (:func:`mentor.nn.align_spatial`) instead of the reference's ``(1 + H_s - H_t)``-wide valid
    conv. ``relu=True`` as the reference's hint regressor: the teacher's stage outputs it regresses
    onto are post-ReLU. The convs have a bias, as the reference's.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], relu: bool = True):
        (c_s, h_s, w_s), (c_t, h_t, w_t) = tuple(student_shape[-3:]), tuple(teacher_shape[-3:])
        if (h_t, w_t) == ((h_s + 1) // 2, (w_s + 1) // 2) and h_s > 1:
            layers = conv_block(c_s, c_t, 3, stride=2, bias=True, act=relu)
        elif (h_t, w_t) == (2 * h_s, 2 * w_s):
            layers = conv_block(c_s, c_t, 4, stride=2, bias=True, act=relu, transposed=True)
        else:
            layers = conv_block(c_s, c_t, 1, bias=True, act=relu)
        super().__init__(*layers)


class EmbedHead(nn.Module):
    """A feature (flattened) -> Linear -> L2-normalised ``out_features`` vector: CRD's embedding head
    (Tian et al., "Contrastive Representation Distillation", ICLR 2020; 128 dimensions there)."""

    def __init__(self, in_features: int, out_features: int = 128):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


def bottleneck_projector(c_in: int, c_out: int, factor: int = 2) -> nn.Sequential:
    """SimKD's projector (Chen et al., CVPR 2022): :func:`mentor.nn.conv_projector`'s bottleneck
    conv1x1 -> conv3x3 -> conv1x1, each with BN and ReLU, through ``c_out // factor`` channels."""
    return conv_projector(c_in, c_out, max(1, c_out // factor))
