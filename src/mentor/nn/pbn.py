"""Patch-aware batch normalisation (PBN): in training, every feature map is also cut into patches, each patch
normalised on its own with a stochastic mix of batch and running statistics; in eval, plain BatchNorm.

Qi, Zhao, Shi & Geng, "Patch-aware Batch Normalization for Improving Cross-domain Robustness" (arXiv 2304.02848),
in the form of its code (Qi5Lei/PBN ``imcls/src/layers/PBN.py``,
``block_split_random_block_bn2d_two_type_channel_fusion_close_affine``, around ``layers/stochnorm.py``).

Static shapes: a patch is a 0/1 mask over the map, and every split is four masks (unused ones empty), so one
code path serves the whole map, two patches and four patches, and the random cuts are device tensors.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

PATCHES = 4  # the most patches a split has (four quadrants)


class PatchDraw(NamedTuple):
    """The random choices of one training forward of :class:`PatchBN2d` (all device tensors).

    ``kinds`` ``[2]``: the two splits used, in order, from 0 (the whole map), 1 (two patches), 2 (four patches);
    ``by_rows``: the two-patch cut is between columns (left/right, 0) or between rows (top/bottom, 1); ``two_cut``
    ``[2]``: its row and column cut (the one of its direction is used); ``four_cut`` ``[2]``: the four-patch
    split's row and column cut; ``stoch`` ``[2, 4, C]``: per split and patch, the channels normalised with the
    batch statistics (1) rather than the running ones (0); ``mix`` ``[C]``: the channels taken from the second
    split's result (1) rather than the first's (0)."""

    kinds: Tensor
    by_rows: Tensor
    two_cut: Tensor
    four_cut: Tensor
    stoch: Tensor
    mix: Tensor


def cut_range(n: int) -> tuple[int, int]:
    """``[lo, hi)`` of a random cut of a side of ``n`` positions: the code's ``randint(n // 4, n // 4 * 3)``
    (first part ``cut`` positions long), extended to the small maps the code refuses (``n <= 4``) by keeping at
    least one position in the first part and one possible cut; a side of 1 cannot be cut (``cut = 1``: the second
    part is empty)."""
    lo = max(1, n // 4)
    return lo, max(lo + 1, (n // 4) * 3)


def split_masks(h: int, w: int, draw: PatchDraw, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[2, 4, h, w]``: the patch masks of the two splits of ``draw``. Patch order is the code's: the whole map;
    left, right (or top, bottom); top-left, top-right, bottom-left, bottom-right. Unused patches are empty, and the
    patches of a split cover the map once."""
    dev = draw.kinds.device
    rows, cols = torch.arange(h, device=dev)[:, None], torch.arange(w, device=dev)[None, :]
    empty = torch.zeros(h, w, dtype=torch.bool, device=dev)
    whole = torch.stack([~empty, empty, empty, empty])
    top2, left2 = (rows < draw.two_cut[0]).expand(h, w), (cols < draw.two_cut[1]).expand(h, w)
    first = torch.where(draw.by_rows.bool(), top2, left2)
    two = torch.stack([first, ~first, empty, empty])
    top4, left4 = rows < draw.four_cut[0], cols < draw.four_cut[1]
    four = torch.stack([top4 & left4, top4 & ~left4, ~top4 & left4, ~top4 & ~left4])
    splits = torch.stack([whole, two, four])  # [3, 4, h, w]
    return splits[draw.kinds].to(dtype)


class PatchBN2d(nn.BatchNorm2d):
    """BatchNorm2d whose training forward is PBN's; eval is plain BatchNorm with the running statistics.

    Training forward of ``x`` ``[N, C, H, W]`` (with the random choices of :meth:`draw`):

    1. two different splits of the map, in random order, from {the whole map, two patches (a random left/right
       or top/bottom cut, :func:`cut_range`), four patches (a random row and column cut)};
    2. every patch ``P`` of a split is normalised on its own, StochNorm-style: per channel, with probability
       ``stoch_p`` by the patch's batch statistics (mean and biased variance over the batch and the patch's
       positions, gradient through them as in BatchNorm), else by the running statistics (no gradient through
       them); then the layer's affine ``weight, bias``. The patches of the *first* split update the running
       statistics one after the other, in patch order, each with the layer's momentum and the patch's unbiased
       variance, and each patch's running branch reads the statistics as they were before its own update (the
       code's sequence of StochNorm calls); the second split reads the updated statistics and changes nothing
       (the code's ``close_affine``);
    3. the two results are mixed per channel: each channel from the second with probability ``mix_p``.

    The gradient is that of this forward. (In the code, the running branch's backward reads the statistics
    after its patch's update, since BatchNorm's training call changes the tensors it saved in place.)

    Defaults are the code's: ``stoch_p`` 0.5 (``--stoch-norm-alpha``), ``mix_p`` 0.5. The running statistics
    must be tracked (the running branch needs them). ``num_batches_tracked`` counts every patch update, so
    ``momentum=None`` (a cumulative average) weighs each patch as a batch. ``generator`` (set by a method for its
    step) is the source of randomness; ``None`` uses torch's default generator.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 stoch_p: float = 0.5, mix_p: float = 0.5, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.stoch_p, self.mix_p = stoch_p, mix_p
        self.generator: torch.Generator | None = None

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, stoch_p: float = 0.5, mix_p: float = 0.5) -> "PatchBN2d":
        """A PatchBN2d with ``bn``'s settings, parameters and statistics (for :func:`~mentor.nn.norm.replace_norm`)."""
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(f"PatchBN2d needs running statistics; {bn} does not track them")
        ref = bn.running_mean
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, stoch_p, mix_p, device=ref.device, dtype=ref.dtype)
        new.load_state_dict(bn.state_dict())
        return new

    def draw(self, x: Tensor) -> PatchDraw:
        """The random choices of a training forward of ``x``, drawn on its device."""
        g, dev, c = self.generator, x.device, x.shape[1]
        h, w = x.shape[2], x.shape[3]
        kinds = torch.rand(3, generator=g, device=dev).argsort()[:2]
        by_rows = torch.randint(2, (), generator=g, device=dev)
        (hl, hh), (wl, wh) = cut_range(h), cut_range(w)
        # [[two-patch row cut, column cut], [four-patch row cut, column cut]]
        cuts = torch.stack([torch.randint(hl, hh, (2,), generator=g, device=dev),
                            torch.randint(wl, wh, (2,), generator=g, device=dev)], 1)
        stoch = (torch.rand(2, PATCHES, c, generator=g, device=dev) < self.stoch_p).to(x.dtype)
        mix = (torch.rand(c, generator=g, device=dev) < self.mix_p).to(x.dtype)
        return PatchDraw(kinds, by_rows, cuts[0], cuts[1], stoch, mix)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"PatchBN2d expects a 4D input [N, C, H, W], got {x.dim()}D")
        return self.train_forward(x, self.draw(x))

    def train_forward(self, x: Tensor, draw: PatchDraw) -> Tensor:
        """The training output of ``x`` for the given random choices; updates the running statistics. Computed
        in float32 at least (as BatchNorm under autocast) and returned in ``x``'s dtype."""
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(dt)
            masks = split_masks(x.shape[2], x.shape[3], draw, dt)
            first = self._normalise(xf, masks[0], draw.stoch[0].to(dt), update=True)
            second = self._normalise(xf, masks[1], draw.stoch[1].to(dt), update=False)
            mix = draw.mix.to(dt).view(1, -1, 1, 1)
            out = (1 - mix) * first + mix * second
            if self.affine:
                out = out * self.weight.to(dt).view(1, -1, 1, 1) + self.bias.to(dt).view(1, -1, 1, 1)
        return out.to(x.dtype)

    def _normalise(self, x: Tensor, masks: Tensor, stoch: Tensor, update: bool) -> Tensor:
        """Every patch of ``masks`` ``[4, H, W]`` normalised on its own (without the affine), assembled into one
        map; ``stoch`` ``[4, C]`` picks batch (1) or running (0) statistics per patch and channel. The patches
        cover the map once, so each patch's statistics are spread over its positions (``[C, H, W]`` maps) and
        the whole map is normalised in one pass."""
        n = x.shape[0]
        count = masks.sum((1, 2)) * n  # values per channel in each patch
        valid = count > 0
        denom = count.clamp(min=1)[:, None]

        def spread(per_patch: Tensor) -> Tensor:  # [4, C] -> [C, H, W]
            return torch.einsum("kc,khw->chw", per_patch, masks)

        mean = torch.einsum("nchw,khw->kc", x, masks) / denom  # [4, C]
        centred = x - spread(mean)
        var = torch.einsum("nchw,khw->kc", centred * centred, masks) / denom  # biased, as BatchNorm normalises
        batch_norm = centred * spread(torch.rsqrt(var + self.eps))
        running_mean, running_var = self._running_before(mean.detach(), var.detach(), count, valid, update)
        running_norm = (x - spread(running_mean)) * spread(torch.rsqrt(running_var + self.eps))
        s = spread(stoch)
        return s * batch_norm + (1 - s) * running_norm

    def _running_before(self, mean: Tensor, var: Tensor, count: Tensor, valid: Tensor,
                        update: bool) -> tuple[Tensor, Tensor]:
        """``[4, C]`` running mean and variance each patch reads. With ``update`` the patches move the running
        statistics in order (``running <- running + f (stat - running)``, ``f`` the momentum, the unbiased
        variance), each reading them before its own update; without, every patch reads the current ones."""
        rm, rv = self.running_mean, self.running_var
        if not update:
            return rm.expand_as(mean), rv.expand_as(var)
        unbiased = var * (count / (count - 1).clamp(min=1))[:, None]
        seen_mean, seen_var = [], []
        with torch.no_grad():
            cur_m, cur_v = rm.clone(), rv.clone()
            for k in range(PATCHES):
                seen_mean.append(cur_m)
                seen_var.append(cur_v)
                ok = valid[k].to(mean.dtype)
                self.num_batches_tracked.add_(valid[k].to(self.num_batches_tracked.dtype))
                f = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.clamp(min=1)
                cur_m = cur_m + ok * f * (mean[k] - cur_m)
                cur_v = cur_v + ok * f * (unbiased[k] - cur_v)
            rm.copy_(cur_m)
            rv.copy_(cur_v)
        return torch.stack(seen_mean), torch.stack(seen_var)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stoch_p={self.stoch_p}, mix_p={self.mix_p}"


__all__ = ["PATCHES", "PatchBN2d", "PatchDraw", "cut_range", "split_masks"]
