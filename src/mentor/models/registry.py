"""The model registry: ``create_model`` / ``list_models`` / ``register_model`` (the timm pattern).

Every factory registered here has the signature ``factory(num_classes, in_channels=3, **kw)`` and
returns a plain ``nn.Module`` whose ``forward(x)`` gives logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mentor.registry import Registry

from .ecosystem import create_external, is_external

# Models registered by a family's package are found without importing it first.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model", lazy={"edm_unet": "mentor.diffusion.unet",
                                                                    "amed_predictor": "mentor.diffusion.amed_method"})


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``factory(num_classes, in_channels=3, **kw)`` under ``name``.

    Refuses a name that is already taken, so two files cannot silently shadow each other.
    """
    return MODELS.register(name)


def create_model(name: str, num_classes: int, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` classes and ``in_channels``-channel images.

    ``name`` is a zoo name, or a network from outside the zoo (:mod:`mentor.models.ecosystem`):
    ``timm:<name>``, ``torchvision:<name>`` (never with downloaded weights) or ``path/to/file.py:build_fn``.
    Extra keyword arguments go to the model (e.g. ``width_mult`` for ``mobilenetv2``). An unknown
    zoo name raises ``KeyError`` with the closest registered names; an external one that cannot be built
    raises :class:`~mentor.models.ecosystem.ModelSpecError`.
    """
    if is_external(name):
        return create_external(name, num_classes, in_channels, **kw)
    return MODELS.create(name, num_classes=num_classes, in_channels=in_channels, **kw)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob ``pattern``, sorted."""
    return MODELS.names(pattern)


def model_info(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
