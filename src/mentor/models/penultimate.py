"""The penultimate features of any classifier ``net(x) -> fc(features)``, beside its logits, in one forward.

Semi-supervised methods that put extra heads on the student (MutexMatch's true-negative classifier, RDA's
complementary classifier, ShrinkMatch's auxiliary head) or perturb its features (UniMatch's dropout
stream) need the vector the classifier reads. Every zoo network ends with ``pool -> fc`` (its pooled
vector is ``fc``'s input), but networks outside the zoo pool functionally or have no ``pool`` at all; what
they share is a final classifier module. So the features are taken as the *input* of that module, with a
forward pre-hook: no special ``forward`` signature, and any network whose logits are ``fc(features)``
works (the test networks of ``tests/_helpers.py`` included).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import Tensor, nn

from ..errors import ConfigError
from .stages import StageError
from .tap import _mark


def classifier_path(net: nn.Module, name: str | None = None) -> str:
    """The name (as in ``net.named_modules()``) of ``net``'s final classifier: ``name`` when given, else
    ``fc``, else the one sub-module whose own name is ``fc`` (a wrapped network's ``net.fc``)."""
    modules = dict(net.named_modules())
    if name is not None:
        if name not in modules or not name:
            raise StageError(f"{type(net).__name__} has no sub-module {name!r} to read the features of")
        return name
    if isinstance(getattr(net, "fc", None), nn.Module):
        return "fc"
    found = [n for n in modules if n.rsplit(".", 1)[-1] == "fc"]
    if len(found) != 1:
        raise StageError(f"this method reads the student's penultimate features as the input of its final "
                         f"classifier, a sub-module named `fc`; {type(net).__name__} has "
                         f"{'none' if not found else 'several: ' + ', '.join(found)}. Use a zoo network "
                         "(`mentor list models`) or name the classifier `fc`")
    return found[0]


def swap_classifier(net: nn.Module, build: Callable[[nn.Linear], nn.Module], method: str, does: str) -> nn.Module:
    """Replace ``net``'s linear classifier (found by :func:`classifier_path`) in place by ``build(old)`` and return
    the new module. A classifier that is not an ``nn.Linear`` is one ConfigError: "method ``method``
    ``does`` the student's classifier ..."."""
    path = classifier_path(net)
    old = net.get_submodule(path)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"method {method} {does} the student's classifier {path!r}, which is a "
                          f"{type(old).__name__}, not a linear layer; use a zoo network (its classifier `fc` is "
                          "linear)")
    new = build(old)
    parent, _, attr = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, new)
    return new


class PenultimateTap:
    """``tap(x) -> (features, logits)`` of a classifier whose logits are ``head(features)``.

    ``head`` is the classifier module (found by :func:`classifier_path`); ``num_features`` its input width
    (a ``nn.Linear``'s ``in_features``). The features keep their autograd graph, so a loss on them trains
    the network below the classifier. The hook records only during :meth:`__call__`, so evaluation
    forwards of the network leave nothing behind; it is marked as a tap, so
    :func:`~mentor.models.tap.strip_taps` removes it from a copy (an EMA network). Forwards that do not
    go through the tap (``net(x)`` directly) are unaffected.
    """

    def __init__(self, net: nn.Module, classifier: str | None = None):
        self.net = net
        self.path = classifier_path(net, classifier)
        self.head: nn.Module = net.get_submodule(self.path)
        self._armed = False
        self._features: Tensor | None = None
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            tap = ref()
            if tap is not None and tap._armed:
                tap._features = args[0]

        handle = self.head.register_forward_pre_hook(_mark(hook))
        self._finalizer = weakref.finalize(self, handle.remove)

    @property
    def num_features(self) -> int:
        width = getattr(self.head, "in_features", 0)
        if not isinstance(width, int) or width < 1:
            raise StageError(f"the classifier {self.path!r} of {type(self.net).__name__} is not a sized linear "
                             "layer: an extra head cannot be sized from it")
        return width

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._armed, self._features = True, None
        try:
            logits = self.net(x)
        finally:
            self._armed = False
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError(f"{type(self.net).__name__}'s forward never called its classifier {self.path!r}")
        return features, logits

    def remove(self) -> None:
        """Remove the hook."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"PenultimateTap({type(self.net).__name__}, {self.path!r})"


__all__ = ["PenultimateTap", "classifier_path"]
