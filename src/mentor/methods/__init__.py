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

__all__ = ["METHODS", "BuildInfo", "Method", "MethodConfig", "Phase", "StepContext", "create_method",
           "register_method"]
