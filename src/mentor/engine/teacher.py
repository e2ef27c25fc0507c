"""Teachers: trained networks, frozen. Every family that learns from a trained network (distillation,
semi-supervised methods with a teacher, data-free distillation) loads it here; ``mentor.distill``
re-exports :func:`load_teacher`.

A teacher (``method.teacher``, each of ``method.teachers``) is written as one string, either

- the run directory (or checkpoint) of a ``mentor train`` run: the network, its classes and its data are
  the run's; or
- a network and its weights, ``MODEL@WEIGHTS``: ``MODEL`` is any ``model.name`` (a zoo name,
  ``timm:<name>``, ``torchvision:<name>``, ``path/to/file.py:build_fn``), optionally with keyword arguments
  ``MODEL(key=value, ...)`` (``model.kwargs``; Python literals), and ``WEIGHTS`` a local safetensors or torch
  state dict, e.g. ``timm:resnet18@teachers/r18.safetensors`` or ``mobilenetv2(width_mult=0.5)@mnv2.pt``.
  A ``path/to/file.py:build_fn`` alone is a teacher whose function returns it trained (it loads its own
  weights). Such a teacher has no run: it is built for the class count and input channels of *this* run's
  data and sees the inputs this run normalises with its data's mean and std, so its weights must have been
  trained for those classes, in that order, on inputs normalised that way. Data-free methods, which have no
  data of their own, need a run directory.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import TeacherError
from ..models import MODELS, build_network
from ..models.ecosystem import file_spec, is_external
from . import checkpoint as ckpt

if TYPE_CHECKING:
    from ..methods import BuildInfo

_SPEC = re.compile(r"^(?P<model>[^@()]+?)\s*(?:\((?P<kwargs>.*)\))?\s*(?:@(?P<weights>.+))?$", re.S)
_FORMS = ("the run directory of a trained teacher (mentor train), or MODEL@WEIGHTS: a model name and a local weights "
          "file, e.g. timm:resnet18@r18.safetensors or nets/teacher.py:build@teacher.pt")


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher given as a network and its weights rather than a run (see the module docstring)."""

    model: str
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_teacher(value: str | Path) -> TeacherSpec | None:
    """The :class:`TeacherSpec` a teacher string names, or None for a run directory or checkpoint.

    A string that exists as a path is a run; ``MODEL@WEIGHTS`` (and ``MODEL(k=v)@WEIGHTS``) or a bare
    ``file.py:build_fn`` is a network. Raises TeacherError for a network without weights or a bad
    ``(k=v)`` list."""
    text = str(value).strip()
    if Path(text).expanduser().exists():
        return None
    m = _SPEC.match(text)
    if m is None:
        return None
    model, weights = m["model"].strip(), m["weights"]
    if not (is_external(model) or model in MODELS):
        if weights is None:
            return None  # a run directory that does not exist: load_teacher says so
        raise TeacherError(f"teacher {text!r}: {model!r} is no model name (a zoo name, timm:NAME, torchvision:NAME or "
                           "path/to/file.py:build_fn; `mentor list models` lists the zoo) and no run directory exists "
                           f"at {text!r}")
    kwargs = _kwargs(m["kwargs"], text) if m["kwargs"] is not None else {}
    if weights is None and not file_spec(model):
        raise TeacherError(f"teacher {text!r}: a teacher needs trained weights; write {model}@FILE with a local "
                           "safetensors or torch state dict")
    return TeacherSpec(model, weights.strip() if weights else None, kwargs)


def _kwargs(text: str, spec: str) -> dict[str, Any]:
    """``k=v, k2=v2`` -> {k: v, k2: v2}, values Python literals."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        assert isinstance(call, ast.Call) and not call.args and all(k.arg for k in call.keywords)
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, AssertionError):
        raise TeacherError(f"teacher {spec!r}: the arguments ({text}) must be key=value pairs of Python literals, "
                           "e.g. mobilenetv2(width_mult=0.5)@FILE") from None


def load_teacher(path: str | Path, student: BuildInfo) -> nn.Module:
    """The teacher ``path`` names (a run, or ``MODEL@WEIGHTS``), frozen and in eval mode.

    A run's network is checked against the student's data: the number of classes, the input channels and
    the image size must match; anything else (architecture, width, dataset of origin) may differ. A
    network given with its weights is built for the student's data (see the module docstring)."""
    key = f"method.teacher={path}"
    spec = parse_teacher(path)
    if spec is not None:
        net = build_network(spec.model, student.num_classes, student.in_channels, student.image_size, spec.kwargs,
                            weights=spec.weights, where=key)
        net.requires_grad_(False)
        net.teacher_source = {"file": spec.weights, "model": spec.model, "dataset": None}  # no run, no summary
        return net.eval()
    try:
        file, info, weights = ckpt.run_info(path, "teacher")
    except ckpt.CheckpointError as e:
        hint = "" if Path(str(path)).expanduser().exists() else f". A teacher is {_FORMS}"
        raise TeacherError(f"{e}{hint}") from None
    for key_, what in (("num_classes", "classes"), ("in_channels", "input channels"), ("image_size", "image size")):
        if info[key_] != getattr(student, key_):
            raise TeacherError(
                f"teacher {file} ({info['model']} trained on {info['dataset']}) has {info[key_]} {what} but the "
                f"student's data has {getattr(student, key_)}: distil on the data the teacher was trained for")
    if info.get("deployable"):  # a run that ships another network than its student (SimKD's reused head, ...)
        from .deployable import build_deployable

        try:
            net = build_deployable(info)
        except ckpt.CheckpointError as e:
            raise TeacherError(str(e)) from None
    else:
        net = build_network(info["model"], info["num_classes"], info["in_channels"], info["image_size"],
                            info.get("kwargs", {}), where=f"the teacher {file} (model.name={info['model']})")
    try:
        ckpt.load_weights(net, weights, file, f"the teacher network {info['model']}")
    except ckpt.CheckpointError as e:
        raise TeacherError(str(e)) from None
    net.requires_grad_(False)
    # where it came from, for the run's header (mentor.engine.console): its run's summary says how good it is
    net.teacher_source = {"file": str(file), "model": info["model"], "dataset": info.get("dataset")}
    return net.eval()


def is_model_teacher(value: str | Path) -> bool:
    """Whether a teacher string names a network with its weights (not a run directory)."""
    try:
        return parse_teacher(value) is not None
    except TeacherError:
        return True


__all__ = ["TeacherError", "TeacherSpec", "is_model_teacher", "load_teacher", "parse_teacher"]
