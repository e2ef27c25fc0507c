"""Synchronised BatchNorm for data-parallel training on any device, CPU (gloo) included.

Batch normalisation ("Batch Normalization: Accelerating Deep Network Training by Reducing Internal
Covariate Shift", Ioffe & Szegedy, 2015) normalises with the statistics of the batch. Under DDP each
process sees only its share, so a run with W processes of batch B normalises with other statistics
than one process with batch B*W. The layers here normalise, in training mode, with the statistics of
the global batch, and update the running statistics as one process with the global batch would.

Why not ``torch.nn.SyncBatchNorm``: it refuses CPU tensors (only CUDA, XPU, HPU and private-use
devices), so it cannot run the gloo/CPU runs this library tests and users debug with; for
``momentum=None`` it reads a counter back to the host; and it is no ``nn.BatchNorm2d``, so code that
asks ``isinstance(m, nn.BatchNorm2d)`` misses it. The layers here subclass ``nn.BatchNorm1d/2d/3d``,
keep their state_dict keys, and in eval mode, or without a process group of more than one process,
run exactly ``nn.BatchNorm``'s forward.

The statistics are computed in (at least) float32 in two passes over the global batch (the global
mean, then the global mean of squared deviations from it, which does not cancel as E[x^2] - E[x]^2
does), each one ``all_reduce``; nothing is read back to the host. The ``all_reduce`` is
differentiable: its backward sums the upstream gradients of all ranks, so each rank's input gradient
carries every rank's loss through the shared statistics; DDP then averages the parameter gradients,
which together give the gradient of one process on the global batch (whose loss is the mean of the
ranks' mean losses). It runs as a few elementwise ops, not a fused kernel, so on a GPU it may be
slower than ``nn.SyncBatchNorm`` (not timed).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d", "convert_sync_bn"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the default process group; the gradient of each input is the sum of all ranks' output
    gradients (the output is the same tensor on every rank, so every rank's loss depends on it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def _synchronised() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SyncBatchNorm:
    """The forward shared by the three layers (mixed in before ``nn.BatchNormNd``)."""

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _synchronised()):
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)
        return _global_batch_norm(self, input)


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = (1, c) + (1,) * (x.dim() - 2)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision: statistics in float32
    # The element count of each rank travels with its sums, so ranks may hold batches of different sizes.
    local = torch.cat([xf.sum(dims), xf.new_full((1,), float(x.numel() // c))])
    total = _AllReduceSum.apply(local)
    n = total[c]
    mean = total[:c] / n
    centred = xf - mean.view(shape)
    squares = _AllReduceSum.apply((centred * centred).sum(dims))
    var = squares / n  # biased: what normalises the batch
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        out = out * bn.weight.view(shape)
    if bn.bias is not None:
        out = out + bn.bias.view(shape)
    if bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), squares.detach(), n.detach())
    return out.to(x.dtype)


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, squares: Tensor, n: Tensor) -> None:
    """``nn.BatchNorm``'s update with the global batch: ``r = f * stat + (1 - f) * r`` with the unbiased
    variance; ``f`` is ``momentum``, or ``1 / num_batches_tracked`` (a cumulative average) for
    ``momentum=None``, kept as a device tensor where BatchNorm reads the counter back to the host."""
    factor: float | Tensor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / bn.num_batches_tracked.to(mean.dtype)
    assert bn.running_mean is not None and bn.running_var is not None
    unbiased = squares / (n - 1)
    bn.running_mean.copy_(factor * mean + (1 - factor) * bn.running_mean)
    bn.running_var.copy_(factor * unbiased + (1 - factor) * bn.running_var)


class SyncBatchNorm1d(_SyncBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training-mode statistics are those of the global batch."""


class SyncBatchNorm2d(_SyncBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of the global batch."""


class SyncBatchNorm3d(_SyncBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose training-mode statistics are those of the global batch."""


_SYNC: dict[type, type] = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d,
                           nn.BatchNorm3d: SyncBatchNorm3d}


def convert_sync_bn(module: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """Make every ``nn.BatchNorm1d/2d/3d`` layer of ``module`` synchronised, in place; returns ``module``.

    ``skip`` names sub-modules (as in ``named_modules``: a method's frozen teachers) whose layers stay
    plain, also where a layer of theirs is reachable under another name too.

    Each layer changes class where it is (as torch's lazy modules become their final class): it keeps
    its Parameter objects, buffers, hooks (a ``FeatureTap`` set on it) and attributes (``training``,
    ``qconfig``, ...), and every reference to it, inside or outside the module tree, sees the change.
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` builds new layers instead, and carries over the
    parameters, buffers, ``training`` and ``qconfig`` only. Another subclass of BatchNorm is refused
    with a ``TypeError`` naming it: its own forward would be lost. ``nn.SyncBatchNorm`` is left as it is.
    """
    named = dict(module.named_modules(remove_duplicate=False))
    kept = {id(m) for name in skip if name in named for m in named[name].modules()}
    for name, m in module.named_modules():
        if id(m) in kept or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(m, (_SyncBatchNorm, nn.SyncBatchNorm)):
            continue  # already synchronised (torch's own layer, on the devices it supports)
        cls = _SYNC.get(type(m))
        if cls is None:
            raise TypeError(f"trainer.sync_bn: cannot synchronise {name or 'the module'} ({type(m).__name__}): "
                            "only nn.BatchNorm1d/2d/3d layers can be; build the network with those or set "
                            "trainer.sync_bn=false")
        m.__class__ = cls
    return module
