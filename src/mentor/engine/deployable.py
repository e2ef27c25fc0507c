"""The network a run ships, rebuilt from its checkpoint: :func:`build_deployable` and :func:`load_deployable`.

A checkpoint's ``info`` names the run's zoo model (``model``, ``kwargs``, class count, input channels). For
most methods the deployable network is that model, so :func:`build_network` rebuilds it and the checkpoint's
weights load into it. A method that ships something else (SimKD: the student's backbone, a projector and
the teacher's reused classifier; NormAUG and MultiMatch: an ensemble over BatchNorm branches; ARFNet: the
fused network) records how to rebuild it in ``info["deployable"]`` (:meth:`Method.deployable_spec`), and
the method named by its ``"kind"`` builds it again (:meth:`Method.rebuild_deployable`) without its teacher
runs or data. Checkpoints written before that key existed rebuild the bare model, as they always did.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..models import strip_taps
from ..models.build import build_network
from . import checkpoint as ckpt

CHECKPOINTS = ("best", "last")
ADAPTED = "adapted.pt"  # the network `mentor adapt --save-model` writes into its run directory


def build_deployable(info: dict[str, Any]) -> nn.Module:
    """A fresh (untrained) network of the architecture a checkpoint's ``info`` describes, into which that
    checkpoint's network weights load: the model ``info["model"]`` names (:func:`build_network`) for a bare
    student, else the network rebuilt by the method that ``info["deployable"]["kind"]`` names."""
    try:
        student = build_network(info["model"], num_classes=info["num_classes"], in_channels=info["in_channels"],
                                image_size=info.get("image_size", 32), kwargs=info.get("kwargs"))
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"the checkpoint's network {info.get('model')!r} cannot be built here: "
                              f"{e.args[0] if e.args else e}") from None
    spec = info.get("deployable")
    if not spec:
        return student
    from ..methods import METHODS

    kind = spec.get("kind", "")
    if kind not in METHODS:
        raise CheckpointError(f"the checkpoint's network is a {kind!r} deployable, which no registered method "
                              f"rebuilds here (known: {', '.join(METHODS.names())}); use the mentor version that "
                              "wrote it")
    return METHODS.get(kind).rebuild_deployable(spec, student, info)


@dataclass
class Deployable:
    """A run's shipped network, loaded: ``net`` (eval mode, on the host) and where it came from."""

    net: nn.Module
    info: dict[str, Any]
    file: Path  # the checkpoint read
    run_dir: Path | None  # the folder of config.yaml and summary.json (None for a lone checkpoint)
    weights: str  # "model" or "ema": which weights of the checkpoint
    rebuilt: str  # "info" (rebuilt from the checkpoint's info) or "recipe" (the run's method rebuilt)
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. what `mentor adapt` recorded


def resolve_checkpoint(path: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file of ``path``: a run directory's ``best.pt`` (else ``last.pt``; ``checkpoint``
    picks one), a `mentor adapt` directory's ``adapted.pt``, or the file itself."""
    p = Path(path).expanduser()
    if checkpoint is not None and checkpoint not in CHECKPOINTS:
        raise CheckpointError(f"--checkpoint {checkpoint!r}: use best or last")
    if p.is_dir() and checkpoint is not None:
        file = p / f"{checkpoint}.pt"
        if not file.is_file():
            raise CheckpointError(f"{p} holds no {file.name}: it is not the run directory of a `mentor train` run "
                                  f"that saved it (choose --checkpoint {'last' if checkpoint == 'best' else 'best'}, "
                                  "or train the run first)")
        return file
    if p.is_dir() and not (p / "best.pt").exists() and not (p / "last.pt").exists() and (p / ADAPTED).is_file():
        return p / ADAPTED
    if p.is_file() and checkpoint is not None:
        raise CheckpointError(f"--checkpoint {checkpoint} chooses a file of a run directory, but {p} is a file "
                              "already; give the run directory, or leave --checkpoint out")
    return ckpt.find_checkpoint(p, "run")


def _strip_module(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The EMA copy's weights as the network's (``last.pt`` keeps the EMA module's, under ``module.``)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _selects_ema(info: dict[str, Any]) -> bool:
    from ..methods import METHODS

    name = info.get("method", "")
    return name in METHODS and METHODS.get(name).select[0].endswith("_ema")


def load_deployable(path: str | Path, checkpoint: str | None = None, ema: bool = False) -> Deployable:
    """The deployable network of a run directory, a checkpoint, or a `mentor adapt` directory that saved its
    adapted network, with its weights, in eval mode on the host.

    ``best.pt`` (and ``adapted.pt``) hold the deployable network's weights: they load into
    :func:`build_deployable` of the checkpoint's info. ``last.pt`` holds the whole method's state: a
    supervised run's student is read from it directly, any other method is rebuilt from the run's
    ``config.yaml`` (which needs its data and teacher runs, as ``mentor eval`` does). ``ema`` takes the
    run's EMA copy (``trainer.ema``); by default a run that selects on its EMA copy gives that one, as
    ``mentor eval`` scores it."""
    file = resolve_checkpoint(path, checkpoint)
    run_dir = file.parent if (file.parent / "config.yaml").is_file() else None
    state = ckpt.load(file)
    info = state.get("info")
    if not info:
        raise CheckpointError(f"{file} does not say which network it holds (no 'info'); point to best.pt or last.pt "
                              "of a `mentor train` run")
    extra = {"adapted": state["adapted"]} if "adapted" in state else {}
    if ema and state.get("ema") is None:
        raise CheckpointError(f"--ema: {file} holds no EMA copy of the network (the run did not set trainer.ema); "
                              "leave --ema out")
    use_ema = ema or (_selects_ema(info) and state.get("ema") is not None)
    if "model" in state:
        weights = _strip_module(state["ema"]) if use_ema else state["model"]
        try:
            net = build_deployable(info)
            ckpt.load_weights(net, weights, file, f"the {info['model']} network its info describes")
        except CheckpointError:
            if run_dir is None or info.get("deployable"):
                raise
            # a method that ships another network than its student and records no spec: rebuild the method
            return _through_recipe(file, run_dir, info, use_ema, extra)
        return Deployable(net.eval(), info, file, run_dir, "ema" if use_ema else "model", "info", state.get("step"),
                          extra)
    if "method" not in state:
        raise CheckpointError(f"{file} holds neither 'model' nor 'method' weights: it is not a mentor checkpoint")
    if not use_ema and info.get("method") == "supervised":
        net = build_deployable(info)
        ckpt.load_weights(net, ckpt.network_state(state, file), file, f"the {info['model']} student")
        return Deployable(net.eval(), info, file, run_dir, "model", "info", state.get("step"), extra)
    if use_ema:
        net = build_deployable(info)
        ckpt.load_weights(net, _strip_module(state["ema"]), file, f"the EMA copy of the {info['model']} network")
        return Deployable(net.eval(), info, file, run_dir, "ema", "info", state.get("step"), extra)
    if run_dir is None:
        raise CheckpointError(f"{file} holds the whole state of a {info.get('method')} run, whose network is "
                              "rebuilt through the run's config.yaml, which is not beside it; use best.pt, or keep "
                              "the checkpoint in its run directory")
    return _through_recipe(file, run_dir, info, False, extra)


def _through_recipe(file: Path, run_dir: Path, info: dict[str, Any], ema: bool, extra: dict[str, Any]) -> Deployable:
    """The deployable of the run's method, rebuilt from its ``config.yaml`` with the checkpoint's weights."""
    from .run import ema_network, load_run

    _, method, _, _, step = load_run(file, "cpu")
    net = ema_network(method) if ema else method.deployable()
    net = strip_taps(copy.deepcopy(net))
    return Deployable(net.eval(), info, file, run_dir, "ema" if ema else "model", "recipe", step, extra)


__all__ = ["ADAPTED", "Deployable", "build_deployable", "load_deployable", "resolve_checkpoint"]
