"""Knowledge distillation: offline, cross-layer, multi-teacher and online (``mentor.distill``).

Importing this package registers every distillation method with :data:`mentor.methods.METHODS`.
"""

from . import (  # noqa: F401  (importing registers the methods)
    at,
    crd,
    dkd,
    dskd,
    fitnet,
    kd,
    kdsvd,
    losses,
    mmkd,
    multi_teacher,
    nst,
    ofd,
    online,
    pkt,
    reviewkd,
    rkd,
    rld,
    semckd,
    simkd,
    sp,
    vid,
)
from .base import DistillConfig, Distiller, MultiTeacherConfig, MultiTeacherDistiller
from .teacher import TeacherError, load_teacher

__all__ = ["DistillConfig", "Distiller", "MultiTeacherConfig", "MultiTeacherDistiller", "TeacherError",
           "load_teacher", "losses"]
