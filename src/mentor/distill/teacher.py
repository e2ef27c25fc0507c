"""Teachers: trained networks loaded from a `mentor train` run directory or checkpoint, frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..engine import checkpoint as ckpt
from ..methods import BuildInfo
from ..models import create_model


class TeacherError(ValueError):
    """A teacher cannot be used with this student: missing, unreadable or incompatible."""


def _checkpoint_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise TeacherError(f"teacher {str(p)!r} holds no best.pt or last.pt: train it first "
                           f"(mentor train RECIPE out_dir={p})")
    if p.is_file():
        return p
    raise TeacherError(f"teacher {str(p)!r} not found: give the run directory or checkpoint of a "
                       "`mentor train` run (method.teacher=runs/...)")


def _weights(state: dict[str, Any], file: Path) -> dict[str, Any]:
    if "model" in state:  # best.pt: the deployable network alone
        return state["model"]
    if "method" in state and state.get("info", {}).get("method") == "supervised":
        prefix = "student."
        return {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
    raise TeacherError(f"{file} holds no network weights usable as a teacher (use best.pt of the run)")


def load_teacher(path: str | Path, student: BuildInfo) -> nn.Module:
    """The network saved by a run, checked against the student's data, frozen and in eval mode.

    The number of classes, the input channels and the image size must match the student's; anything
    else (architecture, width, dataset of origin) may differ.
    """
    file = _checkpoint_file(path)
    try:
        state = ckpt.load(file)
    except ckpt.CheckpointError as e:
        raise TeacherError(str(e)) from None
    info = state.get("info")
    if not info:
        raise TeacherError(f"{file} does not say which network it holds (no 'info'): retrain the teacher")
    for key, what in (("num_classes", "classes"), ("in_channels", "input channels"), ("image_size", "image size")):
        if info[key] != getattr(student, key):
            raise TeacherError(
                f"teacher {file} ({info['model']} trained on {info['dataset']}) has {info[key]} {what} but the "
                f"student's data has {getattr(student, key)}: distil on the data the teacher was trained for")
    net = create_model(info["model"], num_classes=info["num_classes"], in_channels=info["in_channels"],
                       **info.get("kwargs", {}))
    missing, unexpected = net.load_state_dict(_weights(state, file), strict=False)
    if missing or unexpected:
        raise TeacherError(f"{file} does not fit {info['model']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    net.requires_grad_(False)
    return net.eval()
