"""Teachers: trained networks loaded from a `mentor train` run directory or checkpoint, frozen.

The loader lives in :mod:`mentor.engine.teacher` (semi-supervised methods load teachers too); it is
re-exported here, where the distillation family and its users have always imported it."""

from __future__ import annotations

from ..engine.teacher import load_teacher
from ..errors import TeacherError

__all__ = ["TeacherError", "load_teacher"]
