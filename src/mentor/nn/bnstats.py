"""The BatchNorm-statistics matching term of model inversion, from forward hooks on a frozen network.

DeepInversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR
2020, eq. 3) makes synthetic images whose feature statistics match those a trained network stored in
its BatchNorm layers:

    L_BN(x) = sum_l  w_l * ( ||mu_l(x) - mu_l^run||_2 + ||var_l(x) - var_l^run||_2 )

``mu_l(x)`` and ``var_l(x)`` are the per-channel mean and biased variance of the *input* of BN layer
``l`` over the batch and every spatial position; the norms are plain (not squared) L2 norms, as the
official code and every data-free codebase built on it (CMI, Fast, CSD, DFQ) compute them. ``w_1`` is
``first_multiplier`` (DeepInversion's ``first_bn_multiplier``) and every other ``w_l`` is 1.

Fast ("Up to 100x Faster Data-free Knowledge Distillation", Fang et al., AAAI 2022) compares the running
statistics with a blend of the batch's and a moving average of earlier batches' statistics,
``(1 - m) * batch + m * ema``, the average updated once per synthesis round with :meth:`update_ema`
(``momentum`` = ``bn_mmt`` = 0.9); before the first update the batch alone is compared.

The hooks record only inside :meth:`BNStatistics.active`, so the frozen network's other forwards (the
student's distillation targets, evaluation) cost nothing and leave nothing behind.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .norm import bn_layers, norm_kinds


class BNStatisticsError(ValueError):
    """The network has no BatchNorm layer to match statistics against."""


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a BN input ``[N, C, *spatial]`` (or ``[N, C]``)."""
    dims = [0, *range(2, x.dim())]
    x = x.float()
    return x.mean(dims), x.var(dims, unbiased=False)


class BNStatistics(nn.Module):
    """``L_BN`` of the batches a frozen ``net`` sees inside :meth:`active`.

    The moving averages (``momentum > 0``) are buffers of this module, so a method that owns it
    checkpoints and restores them; the network's layers are held by reference, not as sub-modules.
    """

    def __init__(self, net: nn.Module, momentum: float = 0.0, first_multiplier: float = 1.0, what: str = "teacher"):
        super().__init__()
        layers = [m for m in bn_layers(net) if m.track_running_stats and m.running_mean is not None]
        if not layers:
            kinds = norm_kinds(net)
            has = f"its normalisation layers are {', '.join(kinds)}" if kinds else "it has no normalisation layer"
            raise BNStatisticsError(
                f"the {what} {type(net).__name__} has no BatchNorm layer with running statistics (looked for "
                f"nn.BatchNorm1d/2d/3d and SyncBatchNorm with track_running_stats=True): {has}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"BN-statistics momentum must lie in [0, 1), got {momentum}")
        self.momentum, self.first_multiplier = momentum, first_multiplier
        self._layers = layers
        self._recording = False
        self._terms: list[Tensor] = [torch.zeros(())] * len(layers)
        self._moments: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
        for i, m in enumerate(layers):
            self.register_buffer(f"ema_mean_{i}", torch.zeros_like(m.running_mean, dtype=torch.float32))
            self.register_buffer(f"ema_var_{i}", torch.zeros_like(m.running_var, dtype=torch.float32))
        self.register_buffer("has_ema", torch.zeros((), dtype=torch.bool))
        ref = weakref.ref(self)
        self._handles = [m.register_forward_pre_hook(self._hook(ref, i)) for i, m in enumerate(layers)]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @staticmethod
    def _hook(ref: weakref.ref[BNStatistics], i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self = ref()
            if self is None or not self._recording:
                return
            mean, var = batch_moments(args[0])
            self._moments[i] = (mean.detach(), var.detach())
            if self.momentum > 0:
                m = self.momentum
                zero = torch.zeros((), device=mean.device)
                blend = torch.where(self.has_ema, zero + m, zero)
                mean = (1 - blend) * mean + blend * getattr(self, f"ema_mean_{i}")
                var = (1 - blend) * var + blend * getattr(self, f"ema_var_{i}")
            term = torch.linalg.vector_norm(module.running_mean.float() - mean) + \
                torch.linalg.vector_norm(module.running_var.float() - var)
            self._terms[i] = term * (self.first_multiplier if i == 0 else 1.0)

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[BNStatistics]:
        """Record the BN inputs of the forwards inside the block; read :meth:`loss` inside or after it."""
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def per_layer(self) -> list[Tensor]:
        """The weighted term of each layer from the last recorded forward."""
        return list(self._terms)

    def loss(self) -> Tensor:
        """``L_BN`` of the last forward recorded in :meth:`active` (the sum over layers)."""
        return torch.stack([t.to(self.has_ema.device) for t in self._terms]).sum()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the last recorded batch statistics into the moving averages (Fast's ``update_mmt``): the first
        call sets them, later calls ``ema <- m * ema + (1 - m) * batch``."""
        if self.momentum <= 0:
            return
        m = self.momentum
        for i, moments in enumerate(self._moments):
            if moments is None:
                continue
            mean, var = moments
            ema_mean, ema_var = getattr(self, f"ema_mean_{i}"), getattr(self, f"ema_var_{i}")
            ema_mean.copy_(torch.where(self.has_ema, m * ema_mean + (1 - m) * mean, mean))
            ema_var.copy_(torch.where(self.has_ema, m * ema_var + (1 - m) * var, var))
        self.has_ema.fill_(True)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
