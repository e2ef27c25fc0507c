"""A run's network: any model name built for the data, its stages found, its local weights loaded.

:func:`build_network` is what a run uses for its student (``model.name``, ``model.kwargs``,
``model.weights``) and for a teacher given as a model and a weights file. :func:`read_weights` reads a
local weights file, safetensors or torch (``torch.load(..., weights_only=True)``); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .discover import attach_stages
from .ecosystem import is_external
from .registry import create_model

# Where common checkpoint layouts keep the state dict (timm/torchvision training scripts, Lightning-style
# ``state_dict``, mentor's best.pt ``model``).
_NESTED = ("state_dict", "model_state_dict", "model", "module", "net")
_SAFETENSORS = (".safetensors", ".st")


def build_network(name: str, num_classes: int, in_channels: int, image_size: int,
                  kwargs: Mapping[str, Any] | None = None, weights: str | Path | None = None,
                  where: str | None = None) -> nn.Module:
    """``create_model(name, ...)`` for this data; a network from outside the zoo gets ``stage_names``
    discovered for ``(in_channels, image_size, image_size)`` inputs; ``weights`` (a local file) are loaded.

    ``where`` is the recipe setting that named them, which error messages start with (default
    ``model.name=NAME`` and ``model.weights=FILE``; ``method.teacher=...`` for a teacher).
    """
    try:
        net = create_model(name, num_classes=num_classes, in_channels=in_channels, **dict(kwargs or {}))
    except KeyError as e:  # an unknown zoo name, with the near ones
        raise ConfigError(f"{where or 'model.name'}: {e.args[0]}") from None
    except ConfigError as e:
        raise ConfigError(f"{where or f'model.name={name}'}: {e}") from None
    if is_external(name):
        attach_stages(net, (in_channels, image_size, image_size))
    if weights:
        load_weights_file(net, weights, name, num_classes, in_channels, where)
    return net


def read_weights(path: str | Path, where: str | None = None) -> dict[str, Tensor]:
    """The state dict in a local file: safetensors (``.safetensors``), else a torch file read with
    ``weights_only=True``; a checkpoint that nests it (``state_dict``, ``model``, ...) is unwrapped and a
    ``module.`` prefix (DistributedDataParallel) is removed. Raises ConfigError naming the file, after ``where``
    (the recipe setting that named it; default ``model.weights=FILE``)."""
    text = str(path)
    where = where or f"model.weights={text}"
    if "://" in text or text.startswith("hf-hub:"):
        raise ConfigError(f"{where}: weights are read from a local file, never downloaded; download the file "
                          "yourself and give its path")
    p = Path(text).expanduser()
    if not p.is_file():
        what = "a folder, not a file" if p.is_dir() else "not found"
        raise ConfigError(f"{where}: the weights file {text} is {what} (looked at {p.resolve()}); give a local "
                          "safetensors or torch weights file")
    if p.suffix in _SAFETENSORS:
        state: Any = _safetensors(p, where)
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            try:
                state = _safetensors(p, where)
            except ConfigError:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                raise ConfigError(f"{where}: {text} cannot be read as torch weights ({why}) nor as "
                                  "safetensors; save the state dict with torch.save(net.state_dict(), FILE) or "
                                  "safetensors.torch.save_file") from None
    return _state_dict(state, text, where)


def _safetensors(p: Path, where: str) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError(f"{where}: reading safetensors files ({p}) needs the safetensors package: "
                          "pip install safetensors (or save the weights with torch.save)") from None
    try:
        return load_file(str(p), device="cpu")
    except Exception as e:
        raise ConfigError(f"{where}: {p} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _state_dict(state: Any, file: str, where: str) -> dict[str, Tensor]:
    """The tensors of a state dict, unwrapped from the checkpoint layouts above."""
    for _ in range(3):
        if isinstance(state, Mapping) and state and all(isinstance(v, Tensor) for v in state.values()):
            break
        inner = next((state[k] for k in _NESTED if isinstance(state, Mapping) and isinstance(state.get(k), Mapping)),
                     None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        held = (f"a mapping with keys {sorted(map(str, state))[:6]}" if isinstance(state, Mapping)
                else f"a {type(state).__name__}")
        raise ConfigError(f"{where}: {file} holds {held}, not a state dict of tensors; save "
                          "net.state_dict() (or a checkpoint with it under 'state_dict' or 'model')")
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_file(net: nn.Module, path: str | Path, model: str, num_classes: int, in_channels: int,
                      where: str | None = None) -> None:
    """Load the state dict in ``path`` (see :func:`read_weights`) into ``net``, exactly: a missing, unexpected or
    differently shaped tensor is a ConfigError naming the file, the tensors and the fix (after ``where``, as in
    :func:`read_weights`)."""
    from ..engine.checkpoint import load_weights

    where = where or f"model.weights={path}"
    state = read_weights(path, where)
    try:
        load_weights(net, state, path, f"{model} built for {num_classes} classes and {in_channels} input channels")
    except CheckpointError as e:
        raise ConfigError(f"{where}: {e}. The file must hold the state dict of this very network: the same "
                          "model and model.kwargs, built for this run's class count and input channels") from None


__all__ = ["build_network", "load_weights_file", "read_weights"]
