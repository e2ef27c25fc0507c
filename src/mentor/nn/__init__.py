"""Building blocks every family may use (temperature KL, entropy, ...)."""

from .kl import entropy, kl_div, soft_kl

__all__ = ["entropy", "kl_div", "soft_kl"]
