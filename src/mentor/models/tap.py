"""Intermediate features of any ``nn.Module`` by sub-module name, taken with forward hooks.

Distillation methods read a teacher's and a student's features without a special ``forward``
signature: they tap named sub-modules (``layer1``, ``blocks.3``, ``0``, ...) of plain modules.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mentor.registry import suggest

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)


def final_activation(module: nn.Module) -> nn.Module | None:
    """The activation module whose *input* is ``module``'s pre-activation output, or ``None``.

    The convention, which zoo blocks follow and any module may adopt:

    1. a module with a ``final_activation()`` method answers for itself; ``None`` means its output
       already is a pre-activation map (WRN's pre-activation blocks, MobileNetV2's linear
       bottlenecks);
    2. an activation module (``nn.ReLU``, ``nn.GELU``, ...) is its own final activation;
    3. an ``nn.Sequential`` defers to its last child;
    4. anything else has none.
    """
    method = getattr(module, "final_activation", None)
    if callable(method):
        return method()
    if isinstance(module, ACTIVATIONS):
        return module
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return final_activation(module[-1])
    return None


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class FeatureTap:
    """Collect the outputs of named sub-modules of ``model`` on every forward pass.

    ``names`` are names as in ``model.named_modules()`` (``"layer2"``, ``"layer2.0.conv1"``, ``"0"``).
    After ``model(x)``, ``tap.features[name]`` (or ``tap[name]``) holds that module's output from this
    forward pass; each forward of ``model`` starts from an empty dict, so nothing stale survives.
    The tensors keep their autograd graph, so a feature loss backpropagates into the model; run a
    teacher under ``torch.no_grad()`` to get graph-free features.

    ``pre_activation=True`` returns, instead of the output, the *input of the module's final
    activation* as found by :func:`final_activation`: for zoo stages, the map before the last ReLU
    (RepDistiller's ``preact`` features, which OFD-style losses need). Where no final activation is
    found (WRN's ``layer1``/``layer2``, MobileNetV2's stages, any module that applies its activation
    functionally), the output itself is returned; for zoo stages it already is pre-activation, for
    other modules check ``tap.sources``, which says what each name records. An in-place activation's
    input is cloned before the activation overwrites it.

    Use it as a context manager (hooks and features go on exit, so read features inside the block)
    or keep it for the whole run and call ``remove()`` when done (dropping the last reference to the
    tap removes its hooks as well)::

        with FeatureTap(student, ["layer1", "layer2"]) as tap:
            logits = student(x)
            loss = feature_loss(tap["layer2"], target)

    A module called several times in one forward pass records its last call.
    """

    def __init__(self, model: nn.Module, names: str | Iterable[str], pre_activation: bool = False):
        self.model = model
        self.names: tuple[str, ...] = (names,) if isinstance(names, str) else tuple(dict.fromkeys(names))
        self.pre_activation = pre_activation
        self.features: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self._handles: list[RemovableHandle] = []
        # Hooks hold only a weak reference to the tap, and the finaliser removes them when the tap is
        # garbage-collected, so a forgotten tap does not keep hooks or tensors on the model.
        self._finalizer = weakref.finalize(self, _remove_all, self._handles)

        modules = dict(model.named_modules())
        for name in self.names:
            if name not in modules:
                raise KeyError(self._unknown(name, modules))
        module_names = {id(m): n for n, m in modules.items()}
        ref = weakref.ref(self)
        self._handles.append(model.register_forward_pre_hook(_clear_hook(ref)))
        for name in self.names:
            module = modules[name]
            act = final_activation(module) if pre_activation else None
            if act is None:
                self._handles.append(module.register_forward_hook(_output_hook(ref, name)))
                self.sources[name] = f"output of {name!r}"
            else:
                clone = bool(getattr(act, "inplace", False))
                self._handles.append(act.register_forward_pre_hook(_input_hook(ref, name, clone)))
                self.sources[name] = f"input of {module_names.get(id(act), repr(act))!r}"

    def _unknown(self, name: str, modules: dict[str, nn.Module]) -> str:
        known = getattr(self.model, "stage_names", None) or [n for n, _ in self.model.named_children()]
        return (
            f"FeatureTap: {type(self.model).__name__} has no sub-module {name!r}."
            f"{suggest(name, [n for n in modules if n])} Top-level names: {', '.join(known)}"
        )

    def __getitem__(self, name: str) -> Any:
        try:
            return self.features[name]
        except KeyError:
            reason = "is not tapped" if name not in self.names else "was not reached by a forward pass"
            raise KeyError(f"FeatureTap: {name!r} {reason} (features held: {list(self.features)})") from None

    def clear(self) -> None:
        """Drop the stored features (the hooks stay)."""
        self.features.clear()

    def remove(self) -> None:
        """Remove every hook this tap registered and drop the stored features."""
        self._finalizer()
        self.features.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._handles else "removed"
        return f"FeatureTap({type(self.model).__name__}, {list(self.names)}, {state})"


def _mark(hook):
    hook._mentor_tap = True  # found again by strip_taps
    return hook


def strip_taps(model: nn.Module) -> nn.Module:
    """Remove every :class:`FeatureTap` hook from ``model`` and its sub-modules; returns ``model``.

    ``copy.deepcopy`` of a tapped network copies its hooks, which still write into the original tap:
    a copy used on its own (an EMA network, a restored best checkpoint) should call this first.
    """
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "_mentor_tap", False)]:
                del hooks[key]
    return model


def _clear_hook(ref: weakref.ref[FeatureTap]):
    def hook(module: nn.Module, args: Any) -> None:
        tap = ref()
        if tap is not None:
            tap.features.clear()

    return _mark(hook)


def _output_hook(ref: weakref.ref[FeatureTap], name: str):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        tap = ref()
        if tap is not None:
            tap.features[name] = output

    return _mark(hook)


def _input_hook(ref: weakref.ref[FeatureTap], name: str, clone: bool):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        tap = ref()
        if tap is not None:
            tap.features[name] = args[0].clone() if clone else args[0]

    return _mark(hook)
