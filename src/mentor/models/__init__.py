"""The model zoo: CIFAR-style networks of the distillation literature, and feature taps.

``create_model(name, num_classes, in_channels=3)`` builds any registered network; every zoo network
names its stages ``stem``, ``layer1`` .. ``layerK`` (``stage_names``), then ``pool`` and ``fc``, and
returns logits only. Features are taken with :class:`FeatureTap` (forward hooks by module name).
"""

from . import mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (importing registers the models)
from .common import StagedNet
from .registry import MODELS, create_model, list_models, model_info, register_model
from .tap import FeatureTap, final_activation, strip_taps

__all__ = [
    "MODELS",
    "FeatureTap",
    "strip_taps",
    "StagedNet",
    "create_model",
    "final_activation",
    "list_models",
    "model_info",
    "register_model",
]
