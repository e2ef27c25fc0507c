"""Batch-normalisation controls shared by the families: freezing running statistics for a forward
pass, and normalising with the statistics of the batch at hand (test-time)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, BN_TYPES)]


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """A forward pass in training mode whose batch statistics normalise the batch but do not enter the
    running statistics (USB's ``bn_controller`` freeze for unlabelled forwards). Momentum 0 leaves the
    running mean and variance as they are without a host-side copy, so it works in a captured step."""
    layers = [m for m in bn_layers(module) if m.track_running_stats and m.momentum is not None]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(layers, saved):
            m.momentum = mom


def use_batch_stats(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode except its BN layers, which then normalise with the statistics of
    each batch (test-batch normalisation: Schneider et al., "Improving robustness against common
    corruptions by covariate shift adaptation", NeurIPS 2020; Nado et al., 2020)."""
    module.eval()
    for m in bn_layers(module):
        m.train()
    return module
