"""Building blocks every family may use (temperature KL, entropy, ramps, BN controls, spatial alignment,
projectors, ...)."""

from .align import align_spatial, pool_to, resize_to
from .distalign import DistAlignEMA, DistAlignQueue, reciprocal_alignment
from .kl import entropy, kl_div, soft_kl, train_accuracy
from .masking import (
    DashThreshold,
    FixedThreshold,
    FlexThreshold,
    FreeMatchThreshold,
    SoftMatchWeight,
    freematch_fairness,
    relative_threshold,
    step_tensor,
)
from .memory import EmbeddingHead, FeatureQueue, LabeledMemoryBank, similarity
from .mixing import mixup, sharpen, step_generator, vat_perturbation
from .norm import (
    NORM_TYPES,
    bn_layers,
    frozen_bn_stats,
    norm_affine,
    norm_kinds,
    replace_norm,
    require_bn,
    use_batch_stats,
)
from .projectors import conv_block, conv_projector, mlp
from .ramp import ramp
from .transitions import ClassTransitions, class_similarity, kmedoids

__all__ = ["align_spatial", "bn_layers", "conv_block", "conv_projector", "entropy", "frozen_bn_stats", "kl_div",
           "mixup", "mlp", "pool_to", "ramp", "resize_to", "sharpen", "soft_kl", "step_generator", "train_accuracy",
           "use_batch_stats", "vat_perturbation"]
__all__ += ["DashThreshold", "DistAlignEMA", "FixedThreshold", "FlexThreshold", "FreeMatchThreshold", "SoftMatchWeight",
            "freematch_fairness", "relative_threshold", "step_tensor"]
__all__ += ["ClassTransitions", "class_similarity", "kmedoids"]
__all__ += ["DistAlignQueue", "reciprocal_alignment"]
__all__ += ["EmbeddingHead", "FeatureQueue", "LabeledMemoryBank", "similarity"]
__all__ += ["NORM_TYPES", "norm_affine", "norm_kinds", "replace_norm", "require_bn"]
