"""Normalisation layers whose statistics depend on where each sample comes from: BatchNorm with one branch per
subset of training domains, routed per sample, and the optimised (DSON-style) mix of batch and instance
statistics.

NormAUG (Qi et al., "NormAUG: Normalization-guided Augmentation for Domain Generalization", IEEE TIP 2024)
replaces every ``BatchNorm2d`` of a network by :class:`DomainSubsetNorm2d`: ``2^D`` BatchNorm branches, one per
subset (bit mask) of the ``D`` training domains, beside one :class:`OptimizedNorm2d` for the main path. Which
branch normalises a sample is chosen per step and per sample; here the choice is a tensor of branch indices
(the *route*), and every branch's batch statistics are computed over the samples routed to it with masks, so
shapes stay static and nothing is read back to the host. :func:`routing` sets the route of every routed module
of a network for one forward; samples past the route's length (and all samples without a route) take the main
path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class RoutedModule(nn.Module):
    """A module whose forward reads ``route``: ``None`` (every sample takes the main path) or a long tensor of
    branch indices for the first ``len(route)`` samples of the batch (the rest take the main path)."""

    route: Tensor | None = None


@contextlib.contextmanager
def routing(net: nn.Module, route: Tensor | None) -> Iterator[None]:
    """Set the ``route`` of every :class:`RoutedModule` of ``net`` for the forwards inside the block."""
    mods = [m for m in net.modules() if isinstance(m, RoutedModule)]
    for m in mods:
        m.route = route
    try:
        yield
    finally:
        for m in mods:
            m.route = None


class SubsetBatchNorm2d(nn.Module):
    """``K`` BatchNorm branches (``bns``, plain ``nn.BatchNorm2d`` modules); ``forward(x, branch)`` normalises
    sample ``i`` with the branch ``branch[i]``.

    In training mode each branch's mean and (biased) variance are taken over all samples routed to it, over
    batch and space, exactly as ``nn.BatchNorm2d`` would on the sub-batch of those samples; only the branches
    that received samples update their running statistics (momentum and the unbiased variance as
    ``nn.BatchNorm2d``). In eval mode each sample uses its branch's running statistics."""

    def __init__(self, bns: list[nn.BatchNorm2d]):
        super().__init__()
        self.bns = nn.ModuleList(bns)
        first = bns[0]
        self.num_features, self.eps, self.momentum = first.num_features, first.eps, first.momentum
        self.affine, self.track_running_stats = first.affine, first.track_running_stats

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, branches: int) -> SubsetBatchNorm2d:
        """``branches`` copies of ``bn`` (its affine parameters and running statistics)."""
        copies = []
        for _ in range(branches):
            b = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            b.load_state_dict(bn.state_dict())
            copies.append(b)
        return cls(copies)

    def _stacked(self, name: str, x: Tensor, fill: float) -> Tensor:
        tensors = [getattr(bn, name) for bn in self.bns]
        if tensors[0] is None:
            return x.new_full((len(self.bns), self.num_features), fill)
        return torch.stack(tensors)

    def forward(self, x: Tensor, branch: Tensor) -> Tensor:
        k, n, dtype = len(self.bns), x.shape[0], x.dtype
        x = x.float()  # statistics in float32, as BatchNorm under autocast
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            # [N, K, 1] membership (not F.one_hot, whose value check reads the indices back to the host); the
            # per-branch sums are broadcast products, not matmuls, so autocast keeps them in float32
            member = (branch[:, None] == torch.arange(k, device=x.device)).float()[:, :, None]
            count = member.sum(0).view(-1) * x[0, 0].numel()  # elements per channel of each branch
            denom = count.clamp(min=1)[:, None]
            mean = (member * x.sum((2, 3))[:, None]).sum(0) / denom  # [K, C]
            centred = x - mean[branch][:, :, None, None]
            var = (member * centred.pow(2).sum((2, 3))[:, None]).sum(0) / denom  # biased, as BN normalises with
            if self.training and self.track_running_stats:
                self._update_running(mean.detach(), var.detach(), count.detach())
            m, v = mean[branch], var[branch]
        else:
            m = self._stacked("running_mean", x, 0.0)[branch]
            v = self._stacked("running_var", x, 1.0)[branch]
        w = self._stacked("weight", x, 1.0)[branch]
        b = self._stacked("bias", x, 0.0)[branch]
        scale = w / torch.sqrt(v + self.eps)
        return (x * scale.view(n, -1, 1, 1) + (b - m * scale).view(n, -1, 1, 1)).to(dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        used = count > 0
        tracked = self._stacked("num_batches_tracked", mean, 0).view(-1) + used.long()
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d with momentum=None
            factor = (1.0 / tracked.clamp(min=1).to(mean.dtype))[:, None]
        else:
            factor = torch.full_like(mean[:, :1], self.momentum)
        factor = factor * used[:, None].to(mean.dtype)  # branches without samples keep their statistics
        unbiased = var * (count / (count - 1).clamp(min=1))[:, None]
        new_mean = torch.lerp(self._stacked("running_mean", mean, 0.0), mean, factor)
        new_var = torch.lerp(self._stacked("running_var", mean, 1.0), unbiased, factor)
        for name, value in (("running_mean", new_mean), ("running_var", new_var), ("num_batches_tracked", tracked)):
            torch._foreach_copy_([getattr(bn, name) for bn in self.bns], list(value.unbind(0)))


class OptimizedNorm2d(nn.Module):
    """Normalisation by a learned mix of instance and batch statistics (Seo et al., "Learning to Optimize
    Domain Specific Normalization for Domain Generalization", ECCV 2020; NormAUG's ``OptimizedNorm2d``).

    With ``mu_in, var_in`` the per-sample, per-channel statistics over space and ``mu_bn = mean_b mu_in``,
    ``var_bn = mean_b(var_in + mu_in^2) - mu_bn^2`` the batch ones (the running averages in eval mode), the layer
    computes ``mu = w_in mu_in + w_bn mu_bn``, ``var = v_in var_in + v_bn var_bn`` with ``(w_in, w_bn) =
    softmax(mean_weight)`` and ``(v_in, v_bn) = softmax(var_weight)`` (two learned scalars each, initialised
    equal), and returns ``gamma (x - mu) / sqrt(var + eps) + beta``. The running averages take ``var_bn`` itself
    with the BatchNorm momentum convention (``momentum`` is the weight of the new value).

    The instance variance is the population one (``1 / HW``, as in the DSON paper's equations); NormAUG's code
    takes the unbiased one, which is undefined on a 1x1 map."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(2))  # (instance, batch)
        self.var_weight = nn.Parameter(torch.ones(2))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> OptimizedNorm2d:
        """Takes over ``bn``'s affine parameters, running statistics, eps and momentum."""
        new = cls(bn.num_features, bn.eps, 0.1 if bn.momentum is None else bn.momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(bn, name)
                if src is not None:
                    getattr(new, name).copy_(src)
        return new

    def ratios(self) -> tuple[Tensor, Tensor]:
        """``(softmax(mean_weight), softmax(var_weight))``: the (instance, batch) weights of the mix."""
        return self.mean_weight.softmax(0), self.var_weight.softmax(0)

    def forward(self, x: Tensor) -> Tensor:
        dtype, x = x.dtype, x.float()  # statistics in float32, as BatchNorm under autocast
        mean_in = x.mean((2, 3), keepdim=True)
        var_in = x.var((2, 3), unbiased=False, keepdim=True)
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = (var_in + mean_in.pow(2)).mean(0, keepdim=True) - mean_bn.pow(2)
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn.detach().view(-1), self.momentum)
                self.running_var.lerp_(var_bn.detach().view(-1), self.momentum)
        else:
            mean_bn = self.running_mean.view(1, -1, 1, 1)
            var_bn = self.running_var.view(1, -1, 1, 1)
        wm, wv = self.ratios()
        mean = wm[0] * mean_in + wm[1] * mean_bn
        var = wv[0] * var_in + wv[1] * var_bn
        out = (x - mean) / torch.sqrt(var + self.eps)
        return (out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(dtype)


class DomainSubsetNorm2d(RoutedModule):
    """NormAUG's domain-subset BatchNorm: ``subsets`` (a :class:`SubsetBatchNorm2d` of ``2^D`` branches, branch
    ``m`` for the subset of domains whose bits are set in ``m``) and ``main`` (an :class:`OptimizedNorm2d`).

    The first ``len(route)`` samples are normalised by the subset branches ``route`` names, the others (every
    sample when ``route`` is None) by the main path, each part with its own batch statistics."""

    def __init__(self, subsets: SubsetBatchNorm2d, main: OptimizedNorm2d):
        super().__init__()
        self.subsets, self.main = subsets, main

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, num_domains: int) -> DomainSubsetNorm2d:
        """``2^num_domains`` copies of ``bn`` and an optimised norm starting from its state (for
        :func:`mentor.nn.norm.replace_norm`)."""
        return cls(SubsetBatchNorm2d.from_bn(bn, 1 << num_domains), OptimizedNorm2d.from_bn(bn))

    def forward(self, x: Tensor) -> Tensor:
        route = self.route
        if route is None:
            return self.main(x)
        n = route.shape[0]
        if n == x.shape[0]:
            return self.subsets(x, route)
        return torch.cat([self.subsets(x[:n], route), self.main(x[n:])])


__all__ = ["DomainSubsetNorm2d", "OptimizedNorm2d", "RoutedModule", "SubsetBatchNorm2d", "routing"]
