"""Building blocks every family may use (temperature KL, entropy, ramps, BN controls, spatial alignment,
projectors, ...)."""

from .align import align_spatial, pool_to, resize_to
from .kl import entropy, kl_div, soft_kl, train_accuracy
from .norm import bn_layers, frozen_bn_stats, use_batch_stats
from .projectors import conv_block, conv_projector, mlp
from .ramp import ramp

__all__ = ["align_spatial", "bn_layers", "conv_block", "conv_projector", "entropy", "frozen_bn_stats", "kl_div", "mlp",
           "pool_to", "ramp", "resize_to", "soft_kl", "train_accuracy", "use_batch_stats"]
