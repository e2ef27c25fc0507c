"""Teachers: trained networks loaded from a `mentor train` run directory or checkpoint, frozen.

Every family that learns from a trained network (distillation, semi-supervised methods with a teacher)
loads it here; ``mentor.distill`` re-exports :func:`load_teacher`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..errors import TeacherError
from ..models import create_model
from . import checkpoint as ckpt

if TYPE_CHECKING:
    from ..methods import BuildInfo


def load_teacher(path: str | Path, student: BuildInfo) -> nn.Module:
    """The network saved by a run, checked against the student's data, frozen and in eval mode.

    The number of classes, the input channels and the image size must match the student's; anything
    else (architecture, width, dataset of origin) may differ.
    """
    try:
        file, info, weights = ckpt.run_info(path, "teacher")
    except ckpt.CheckpointError as e:
        raise TeacherError(str(e)) from None
    for key, what in (("num_classes", "classes"), ("in_channels", "input channels"), ("image_size", "image size")):
        if info[key] != getattr(student, key):
            raise TeacherError(
                f"teacher {file} ({info['model']} trained on {info['dataset']}) has {info[key]} {what} but the "
                f"student's data has {getattr(student, key)}: distil on the data the teacher was trained for")
    net = create_model(info["model"], num_classes=info["num_classes"], in_channels=info["in_channels"],
                       **info.get("kwargs", {}))
    try:
        ckpt.load_weights(net, weights, file, f"the teacher network {info['model']}")
    except ckpt.CheckpointError as e:
        raise TeacherError(str(e)) from None
    net.requires_grad_(False)
    return net.eval()


__all__ = ["TeacherError", "load_teacher"]
