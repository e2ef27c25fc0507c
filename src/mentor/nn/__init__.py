"""Building blocks every family may use (temperature KL, entropy, ramps, BN controls, ...)."""

from .kl import entropy, kl_div, soft_kl
from .norm import bn_layers, frozen_bn_stats, use_batch_stats
from .ramp import ramp

__all__ = ["bn_layers", "entropy", "frozen_bn_stats", "kl_div", "ramp", "soft_kl", "use_batch_stats"]
