"""The model zoo: CIFAR-style networks of the distillation literature, and feature taps.

``create_model(name, num_classes, in_channels=3)`` builds any registered network; every zoo network
names its stages ``stem``, ``layer1`` .. ``layerK`` (``stage_names``), then ``pool`` and ``fc``, and
returns logits only. Features are taken with :class:`FeatureTap` (forward hooks by module name);
:mod:`mentor.models.stages` reads the stage names that methods tap, project or split.

Networks from the ecosystem are built by the same ``create_model``: ``timm:<name>``, ``torchvision:<name>``
and ``path/to/file.py:build_fn`` (:mod:`mentor.models.ecosystem`); :func:`build_network` also finds their
stages (:mod:`mentor.models.discover`) and loads a local weights file.
"""

from . import gfnet, mobilenetv2, resnet, shufflenet, vgg, vit, wrn  # noqa: F401  (importing registers the models)
from .build import build_network, load_weights_file, read_weights
from .common import StagedNet
from .discover import attach_stages, discover_stages
from .ecosystem import ModelSpecError, is_external
from .penultimate import PenultimateTap, classifier_path
from .registry import MODELS, create_model, list_models, model_info, register_model
from .stages import StageError, last_map_name, prepool_names, stage_names
from .tap import FeatureTap, final_activation, strip_taps

__all__ = [
    "MODELS",
    "FeatureTap",
    "ModelSpecError",
    "attach_stages",
    "build_network",
    "discover_stages",
    "is_external",
    "load_weights_file",
    "read_weights",
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
