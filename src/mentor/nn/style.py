"""Feature style as instance statistics: MixStyle's mixing of the per-channel mean and standard deviation of
feature maps between the images of a batch (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021).

The pieces are separate so a method can test or reuse each: :func:`instance_stats` (the "style" of every map),
:func:`mix_style` (the mixing itself, for a given partner of each image and weight), :func:`style_partners` (whom
each image mixes with: anyone, or an image of another training domain) and :class:`MixStyle`, the layer that
draws both on the device in training mode and is the identity in eval mode.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .mixing import sample_beta

Mix = Literal["random", "crossdomain"]


def instance_stats(x: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(mu, sigma)`` of every feature map of ``x`` ``[N, C, H, W]``, each ``[N, C, 1, 1]``: the mean over the
    spatial positions and ``sqrt(var + eps)`` with the unbiased variance (MixStyle's code; a 1x1 map, whose
    unbiased variance does not exist, takes the biased one, 0)."""
    correction = 1 if x.shape[2] * x.shape[3] > 1 else 0
    mu = x.mean(dim=(2, 3), keepdim=True)
    sigma = (x.var(dim=(2, 3), keepdim=True, correction=correction) + eps).sqrt()
    return mu, sigma


def mix_style(x: Tensor, partner: Tensor, lam: Tensor, eps: float = 1e-6) -> Tensor:
    """MixStyle (eq. 4-6): every map normalised by its own instance statistics, then given the mixed statistics

        ``gamma = lam sigma(x) + (1 - lam) sigma(x[partner])``,  ``beta = lam mu(x) + (1 - lam) mu(x[partner])``,
        ``out = gamma (x - mu(x)) / sigma(x) + beta``,

    ``partner`` ``[N]`` the row each row mixes with and ``lam`` ``[N]`` its weight. As in the paper's code the
    statistics are detached: the gradient reaches ``x`` through the normalised map only."""
    mu, sigma = instance_stats(x, eps)
    mu, sigma = mu.detach(), sigma.detach()
    lam = lam.to(x.dtype).view(-1, 1, 1, 1)
    mu_mix = lam * mu + (1 - lam) * mu[partner]
    sigma_mix = lam * sigma + (1 - lam) * sigma[partner]
    return (x - mu) / sigma * sigma_mix + mu_mix


def style_partners(n: int, mix: Mix, num_domains: int = 1, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """``[n]``: the row each of ``n`` rows mixes its style with, a random bijection drawn on the device.

    ``"random"``: a uniform random permutation of the batch (the paper's random shuffle). ``"crossdomain"``: the
    batch is ``num_domains`` equal blocks in domain order (a per-domain batch); the domains are put in a random
    cyclic order and every image takes a partner from the next domain in it, a random permutation of that
    domain's block, so no image mixes with its own domain. With two domains this is the paper's cross-domain
    shuffle (the two halves swapped, each shuffled). With one domain there is no other: the random shuffle."""
    if mix == "random" or num_domains < 2:
        return torch.rand(n, generator=generator, device=device).argsort()
    if mix != "crossdomain":
        raise ValueError(f"unknown MixStyle mix {mix!r}; use random or crossdomain")
    if n % num_domains:
        raise ValueError(f"crossdomain MixStyle needs a batch of {num_domains} equal per-domain blocks, got {n} rows")
    b = n // num_domains
    order = torch.rand(num_domains, generator=generator, device=device).argsort()
    target = torch.empty_like(order).scatter_(0, order, order.roll(-1))  # domain order[k] -> order[k + 1]
    within = torch.rand(num_domains, b, generator=generator, device=device).argsort(1)
    return (target[:, None] * b + within[target]).reshape(-1)


class MixStyle(nn.Module):
    """The MixStyle layer: in training mode, with probability ``p`` (one draw per call, for the whole batch),
    :func:`mix_style` with partners from :func:`style_partners` and per-image weights ``lam ~ Beta(alpha,
    alpha)``; otherwise, and always in eval mode, the identity. Every draw is a device op (``torch.where`` on the
    coin, no host synchronisation). Defaults are the paper's code's (Dassl ``MixStyle``): ``p`` 0.5, ``alpha``
    0.1, ``eps`` 1e-6, ``mix`` "random". ``num_domains`` is the number of equal per-domain blocks of the batch,
    for ``mix="crossdomain"``. ``generator`` (set by a method for its step) is the source of randomness; ``None``
    uses torch's default generator."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6, mix: Mix = "random",
                 num_domains: int = 1):
        super().__init__()
        if mix not in ("random", "crossdomain"):
            raise ValueError(f"unknown MixStyle mix {mix!r}; use random or crossdomain")
        self.p, self.alpha, self.eps, self.mix, self.num_domains = p, alpha, eps, mix, num_domains
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p <= 0:
            return x
        g, dev, n = self.generator, x.device, x.shape[0]
        partner = style_partners(n, self.mix, self.num_domains, g, dev)
        lam = sample_beta(self.alpha, n, g, dev)
        apply = torch.rand((), generator=g, device=dev) < self.p
        return torch.where(apply, mix_style(x, partner, lam, self.eps), x)

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}, eps={self.eps}, mix={self.mix}, num_domains={self.num_domains}"


__all__ = ["MixStyle", "instance_stats", "mix_style", "style_partners"]
