"""The model zoo: CIFAR-style networks of the distillation literature, and feature taps.

``create_model(name, num_classes, in_channels=3)`` builds any registered network; every zoo network
names its stages ``stem``, ``layer1`` .. ``layerK`` (``stage_names``), then ``pool`` and ``fc``, and
returns logits only. Features are taken with :class:`FeatureTap` (forward hooks by module name);
:mod:`mentor.models.stages` reads the stage names that methods tap, project or split.
"""

from . import gfnet, mobilenetv2, resnet, shufflenet, vgg, vit, wrn  # noqa: F401  (importing registers the models)
from .common import StagedNet
from .penultimate import PenultimateTap, classifier_path
from .registry import MODELS, create_model, list_models, model_info, register_model
from .stages import StageError, last_map_name, prepool_names, stage_names
from .tap import FeatureTap, final_activation, strip_taps

__all__ = [
    "MODELS",
    "FeatureTap",
    "PenultimateTap",
    "classifier_path",
    "strip_taps",
    "StagedNet",
    "StageError",
    "create_model",
    "final_activation",
    "last_map_name",
    "list_models",
    "model_info",
    "prepool_names",
    "register_model",
    "stage_names",
]
