"""Exponential moving average of a network's weights, kept on the device and updated without sync."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.tap import strip_taps


class EMA(nn.Module):
    """A frozen copy of ``model`` whose parameters track ``decay * ema + (1 - decay) * model``.

    Buffers (BN running statistics) are copied, not averaged, as in timm's ModelEmaV2 and
    FixMatch's EMA model: averaging running variances of different weights has no meaning.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        # The copy must not write into the live network's feature taps (deepcopy copies hooks).
        self.module = strip_taps(copy.deepcopy(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.module.parameters())
        src_p = list(model.parameters())
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
