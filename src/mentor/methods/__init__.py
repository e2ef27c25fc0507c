"""The Method contract and the registry of methods, filled from the explicit list in
:mod:`mentor.methods.catalog` (a method's module is imported when its name is first used)."""

from .base import (
    METHODS,
    NO_DATA,
    BuildInfo,
    Inputs,
    Method,
    MethodConfig,
    Phase,
    Refresh,
    StepContext,
    create_method,
    register_method,
)
from .catalog import BUILTIN


def load_builtin_methods() -> None:
    """Import every built-in method's module (for code that walks the registered classes)."""
    import importlib

    for module in sorted(set(BUILTIN.values())):
        importlib.import_module(module)


__all__ = [
    "BUILTIN",
    "METHODS",
    "NO_DATA",
    "BuildInfo",
    "Inputs",
    "Method",
    "MethodConfig",
    "Phase",
    "Refresh",
    "StepContext",
    "create_method",
    "load_builtin_methods",
    "register_method",
]
