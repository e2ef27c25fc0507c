"""The training engine: one loop for every method (see :mod:`mentor.engine.trainer`)."""

from .checkpoint import CheckpointError
from .trainer import CheckpointMismatchError, NonFiniteLossError, Trainer, train

__all__ = ["CheckpointError", "CheckpointMismatchError", "NonFiniteLossError", "Trainer", "train"]
