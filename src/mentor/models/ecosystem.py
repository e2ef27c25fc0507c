"""Networks from outside the zoo: ``timm:<name>``, ``torchvision:<name>`` and ``path/to/file.py:build_fn``.

Any ``model.name`` (and any teacher's model) may be one of these forms beside a zoo name;
:func:`mentor.models.create_model` resolves them here:

- ``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``;
- ``torchvision:<name>``: ``torchvision.models.get_model(name, weights=None, num_classes=..., **kwargs)``;
  torchvision builds 3-channel networks, so for other input channels the first ``nn.Conv2d`` is rebuilt
  with ``in_channels`` (freshly initialised, everything else the same);
- ``path/to/file.py:build_fn``: the function ``build_fn`` of a user's Python file (the path is relative
  to the current directory), called as ``build_fn(num_classes=..., in_channels=..., **kwargs)``; it
  returns any ``nn.Module`` whose ``forward(x)`` gives logits.

Weights never come from a hub: timm is always asked for ``pretrained=False`` and torchvision for
``weights=None``; pretrained weights are a local file (``model.weights``). timm and torchvision are the
``zoo`` extra (``pip install 'mentor[zoo]'``) and are imported only when such a name is built, so a
missing or broken installation is an error naming the extra, never a failure at import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import suggest

PREFIXES = ("timm:", "torchvision:")
_FILE_SPEC = re.compile(r"^(?P<file>.+\.py):(?P<fn>[A-Za-z_]\w*)$")
# Keyword arguments that would fetch weights or contradict what the run decides.
_RESERVED = {"pretrained", "weights", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "num_classes",
             "in_chans", "in_channels"}
_ZOO_EXTRA = "pip install 'mentor[zoo]'"


class ModelSpecError(ConfigError):
    """A ``timm:``/``torchvision:``/``file.py:fn`` model cannot be built (the message says why and the fix)."""


def file_spec(name: str) -> tuple[Path, str] | None:
    """``(file, function)`` of a ``path/to/file.py:build_fn`` name, or None for any other name."""
    m = _FILE_SPEC.match(name)
    return (Path(m["file"]), m["fn"]) if m else None


def is_external(name: str) -> bool:
    """Whether ``name`` is a ``timm:``, ``torchvision:`` or ``file.py:fn`` model rather than a zoo name."""
    return isinstance(name, str) and (name.startswith(PREFIXES) or file_spec(name) is not None)


def create_external(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the external model ``name`` for ``num_classes`` classes and ``in_channels``-channel inputs.

    Raises :class:`ModelSpecError` for a missing package, an unknown name, a missing file or function,
    a reserved keyword (``pretrained``, ``weights``, ...) or a result that is not an ``nn.Module``."""
    reserved = sorted(_RESERVED & set(kwargs))
    if reserved:
        raise ModelSpecError(f"{name}: model.kwargs may not set {', '.join(reserved)}: the class count and the "
                             "input channels come from the data, and weights are never downloaded (give a local "
                             "file with model.weights=FILE)")
    if name.startswith("timm:"):
        return _timm(name[len("timm:"):], num_classes, in_channels, kwargs)
    if name.startswith("torchvision:"):
        return _torchvision(name[len("torchvision:"):], num_classes, in_channels, kwargs)
    spec = file_spec(name)
    if spec is None:
        raise ModelSpecError(f"{name!r} is neither timm:NAME, torchvision:NAME nor path/to/file.py:build_fn")
    return _from_file(spec[0], spec[1], num_classes, in_channels, kwargs)


# --------------------------------------------------------------------------------------------------
# timm and torchvision


def _import(module: str, name: str) -> ModuleType:
    """The installed ``module``, or a ModelSpecError naming the extra (a missing or broken install)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a build for another torch failing at import
        raise ModelSpecError(f"model {name} needs {module.split('.')[0]}, which cannot be imported here "
                             f"({type(e).__name__}: {e}); install the zoo extra, built for this torch: "
                             f"{_ZOO_EXTRA}") from None


def _check_name(prefix: str, short: str) -> None:
    if not short or not short.strip():
        raise ModelSpecError(f"{prefix}: the model name is missing; write e.g. {prefix}resnet18")


def _timm(short: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    _check_name("timm:", short)
    timm = _import("timm", f"timm:{short}")
    try:
        net = timm.create_model(short, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except Exception as e:  # an unknown name (RuntimeError), an argument the model does not take (TypeError)
        raise ModelSpecError(f"timm cannot build {short!r} ({type(e).__name__}: {e}); timm.list_models('*name*') "
                             "lists its models, and model.kwargs are passed to timm.create_model") from None
    _check_module(net, f"timm.create_model({short!r})")
    names = timm_stage_names(net)
    if names and not getattr(net, "stage_names", None):
        net.stage_names = names
    return net


def timm_stage_names(net: nn.Module) -> tuple[str, ...]:
    """The modules of a timm network's ``feature_info`` (the stages timm's ``features_only`` taps), or ()."""
    info = getattr(net, "feature_info", None)
    names: list[str] = []
    if callable(getattr(info, "module_name", None)):  # a timm FeatureInfo object
        names = list(info.module_name())
    elif isinstance(info, (list, tuple)):
        names = [d.get("module") for d in info if isinstance(d, dict)]
    modules = dict(net.named_modules())
    if not names or not all(isinstance(n, str) and n in modules and n for n in names):
        return ()
    return tuple(dict.fromkeys(names))


def _torchvision(short: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    _check_name("torchvision:", short)
    models = _import("torchvision.models", f"torchvision:{short}")
    try:
        net = models.get_model(short, weights=None, num_classes=num_classes, **kwargs)
    except Exception as e:  # an unknown name (ValueError), an argument the builder does not take (TypeError)
        raise ModelSpecError(f"torchvision cannot build {short!r} ({type(e).__name__}: {e}); "
                             "torchvision.models.list_models() lists its models, and model.kwargs are passed to "
                             "torchvision.models.get_model") from None
    _check_module(net, f"torchvision.models.get_model({short!r})")
    if in_channels != 3:
        adapt_first_conv(net, in_channels, f"torchvision:{short}")
    return net


def adapt_first_conv(net: nn.Module, in_channels: int, name: str = "the network") -> str:
    """Rebuild the first ``nn.Conv2d`` of ``net`` (in module order) for ``in_channels`` inputs; returns its name.

    The new convolution keeps every other setting (width, kernel, stride, padding, dilation, bias) and
    has PyTorch's default initialisation; a depthwise first convolution cannot change its inputs."""
    for path, conv in net.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.in_channels == in_channels:
            return path
        if conv.groups != 1:
            raise ModelSpecError(f"{name}: its first convolution {path!r} is grouped (groups={conv.groups}), so it "
                                 f"cannot be rebuilt for {in_channels} input channels; use 3-channel images "
                                 "(data.channels=3) or another network")
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)
        parent, _, child = path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
        return path
    raise ModelSpecError(f"{name} has no nn.Conv2d to take {in_channels}-channel images; use 3-channel images "
                         "(data.channels=3)")


# --------------------------------------------------------------------------------------------------
# a user's file

_LOADED: dict[tuple[str, int, int], ModuleType] = {}


def _load_file(path: Path, name: str) -> ModuleType:
    """Execute a user's Python file once per version of it (resolved path, modification time, size)."""
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        where = "is a folder" if resolved.is_dir() else "not found"
        raise ModelSpecError(f"model {name}: the file {str(path)!r} {where} (looked at {resolved}; a relative path "
                             f"is relative to the current directory {Path.cwd()}); give the path of a Python file "
                             "that defines the function")
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key in _LOADED:
        return _LOADED[key]
    module_name = f"_mentor_model_{resolved.stem}_{hashlib.sha1(str(key).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"model {name}: {resolved} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ModelSpecError(f"model {name}: running {resolved} failed ({type(e).__name__}: {e}); fix the file "
                             "(it is imported as a module, then its function is called)") from None
    _LOADED[key] = module
    return module


def _from_file(path: Path, fn: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    name = f"{path}:{fn}"
    module = _load_file(path, name)
    build = getattr(module, fn, None)
    if not callable(build):
        functions = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                     and getattr(v, "__module__", None) == module.__name__]
        what = "is not a function" if build is not None else "is not defined there"
        raise ModelSpecError(f"model {name}: {fn!r} {what}.{suggest(fn, functions)} Functions of "
                             f"{path}: {', '.join(functions) or 'none'}")
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        lacking = [k for k in ("num_classes", "in_channels", *kwargs) if k not in params]
        if lacking:
            raise ModelSpecError(f"model {name}: {fn}() takes no argument {', '.join(map(repr, lacking))}; it is "
                                 "called as build_fn(num_classes=..., in_channels=..., **model.kwargs), so give it "
                                 "those parameters (or **kwargs)")
    try:
        net = build(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except Exception as e:
        raise ModelSpecError(f"model {name}: {fn}(num_classes={num_classes}, in_channels={in_channels}"
                             f"{''.join(f', {k}={v!r}' for k, v in kwargs.items())}) failed ({type(e).__name__}: "
                             f"{e}); fix the function in {path}") from e
    _check_module(net, f"{fn}() in {path}")
    return net


def _check_module(net: Any, what: str) -> None:
    if not isinstance(net, nn.Module):
        raise ModelSpecError(f"{what} returned a {type(net).__name__}, not a torch.nn.Module; return the network "
                             "(an nn.Module whose forward(x) gives logits)")


__all__ = ["PREFIXES", "ModelSpecError", "adapt_first_conv", "create_external", "file_spec", "is_external",
           "timm_stage_names"]
