"""The names of a network's stages, which methods read to decide what to tap, project or split.

Every zoo network (:class:`mentor.models.StagedNet`) names its feature stages ``stem``, ``layer1`` ..
``layerK`` in ``stage_names``, may apply a ``head`` (the 1x1 conv of MobileNetV2/ShuffleNet) before
pooling, and ends with ``pool`` and ``fc``. Any other module that follows the same naming works with
the methods that use these helpers; one that does not is refused with :class:`StageError`. Networks from
outside the zoo (``timm:``, ``torchvision:``, ``file.py:fn``) get ``stage_names`` found from their module
tree when a run builds them (:mod:`mentor.models.discover`); a stage may then be a dotted path.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError


class StageError(ConfigError, TypeError):
    """A network does not follow the zoo's stage naming that a method needs.

    A :class:`~mentor.errors.ConfigError` (the recipe picked a network the method cannot use) and a
    ``TypeError`` (a network of the wrong kind passed through the Python API)."""


def _has(model: nn.Module, name: str) -> bool:
    """Whether ``name`` (a child, or a dotted path such as timm's ``stages.0``) is a sub-module."""
    try:
        return isinstance(model.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def stage_names(model: nn.Module, role: str = "network", parts: Sequence[str] = ()) -> tuple[str, ...]:
    """``model``'s feature stages in order (``("stem", "layer1", ...)``), checked.

    ``role`` names the network in the error (``"student"``, ``"teacher"``); ``parts`` are further
    sub-modules the caller needs (e.g. ``("pool", "fc")``). Raises :class:`StageError` when the
    network has no ``stage_names``, or a stage or a part is not a sub-module.
    """
    names = tuple(getattr(model, "stage_names", None) or ())
    missing = [n for n in (*names, *parts) if not _has(model, n)]
    if not names or missing:
        raise StageError(f"the {role} ({type(model).__name__}) is not a staged network: this method needs "
                         f"`stage_names`{''.join(f', `{p}`' for p in parts)} sub-modules (missing: "
                         f"{missing or ['stage_names']}); use a mentor.models zoo network (see "
                         "mentor.models.StagedNet) or name the layers to tap in the method config")
    return names


def prepool_names(model: nn.Module, role: str = "network") -> tuple[str, ...]:
    """The modules that compute the last feature map before ``pool``: the stages, then ``head`` where
    the network has one. Needs ``pool`` and ``fc`` too (methods that use this reuse or bypass them)."""
    names = stage_names(model, role, ("pool", "fc"))
    return (*names, "head") if _has(model, "head") else names


def last_map_name(model: nn.Module, role: str = "network") -> str:
    """The module whose output is the last feature map, the input of ``pool``: ``head`` where the
    network has one, else its last stage."""
    return "head" if _has(model, "head") else stage_names(model, role)[-1]


__all__ = ["StageError", "last_map_name", "prepool_names", "stage_names"]
