"""Method contract and the registry of methods; importing this registers every built-in method."""

from . import supervised  # noqa: F401  (registers)
from .base import (
    METHODS,
    BuildInfo,
    Method,
    MethodConfig,
    Phase,
    StepContext,
    create_method,
    register_method,
)

FAMILIES = ("mentor.distill", "mentor.diffusion")


def load_builtin_methods() -> None:
    """Import every method family so its methods are registered (families import this package, not
    the reverse, so the registry is filled on demand)."""
    import importlib

    for name in FAMILIES:
        importlib.import_module(name)


__all__ = [
    "FAMILIES",
    "METHODS",
    "load_builtin_methods",
    "BuildInfo",
    "Method",
    "MethodConfig",
    "Phase",
    "StepContext",
    "create_method",
    "register_method",
]
