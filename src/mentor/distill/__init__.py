"""Knowledge distillation: offline, cross-layer, multi-teacher and online (``mentor.distill``).

Importing this package registers every distillation method with :data:`mentor.methods.METHODS`.
"""

from . import dkd, kd, losses, mmkd, multi_teacher, online, rld  # noqa: F401  (importing registers the methods)
from .base import DistillConfig, Distiller, MultiTeacherConfig, MultiTeacherDistiller
from .teacher import TeacherError, load_teacher

__all__ = ["DistillConfig", "Distiller", "MultiTeacherConfig", "MultiTeacherDistiller", "TeacherError",
           "load_teacher", "losses"]
