"""MixStyle: the instance-level feature statistics (style) of the training images mixed between images after
chosen stages of the network, in training only."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, PROBABILITY, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from ..models.tap import _mark
from ..nn.style import Mix, MixStyle
from ..registry import suggest
from .erm import ERM


def named_layers(net: nn.Module, names: Sequence[str], method: str, key: str = "method.layers") -> list[nn.Module]:
    """The sub-modules of ``net`` called ``names`` (as in ``named_modules()``: ``layer1``, ``layer2.0``), or a
    :class:`~mentor.errors.ConfigError` naming ``key``, the unknown name and the network's stages."""
    if not names:
        raise ConfigError(f"method {method}: {key} is empty; name at least one stage of the student (e.g. layer1)")
    modules = dict(net.named_modules())
    for name in names:
        if not name or name not in modules:
            stages = getattr(net, "stage_names", None) or [n for n, _ in net.named_children()]
            raise ConfigError(f"method {method}: {key} names {name!r}, which is no sub-module of the student "
                              f"{type(net).__name__}.{suggest(name, [n for n in modules if n])} Its stages: "
                              f"{', '.join(stages)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"method {method}: {key} lists a stage twice ({', '.join(names)}); list each once")
    return [modules[n] for n in names]


def hook_outputs(owner: nn.Module, layers: Sequence[nn.Module], fn: Callable[[nn.Module, int, Tensor], Tensor]) -> list:
    """A forward hook on every module of ``layers`` that replaces its output ``y`` with ``fn(owner, i, y)`` (``i``
    the layer's position) while ``owner._armed`` is true (during the owner's training step), and leaves every other
    forward alone (evaluation, a BN-statistics pass). The hooks hold ``owner`` weakly and are marked as taps, so
    :func:`~mentor.models.tap.strip_taps` removes them from a copy of the network (an EMA or best-checkpoint
    copy). Returns the handles."""
    ref = weakref.ref(owner)

    def make(i: int):
        def hook(module: nn.Module, args, output):
            o = ref()
            if o is None or not o._armed:
                return None
            return fn(o, i, output)

        return _mark(hook)

    return [layer.register_forward_hook(make(i)) for i, layer in enumerate(layers)]


@register_method("mixstyle")
class MixStyleDG(ERM):
    """Zhou, Yang, Qiao & Xiang, "Domain Generalization with MixStyle", ICLR 2021, in the form of its code
    (KaiyangZhou/mixstyle-release ``imcls``, with Dassl's ``MixStyle`` layer).

    A :class:`~mentor.nn.style.MixStyle` layer after each stage named in ``layers`` (forward hooks on the
    student's sub-modules, so any zoo network works): in training mode, with probability ``p`` per layer and
    step, every feature map is normalised by its own instance mean and standard deviation and re-styled with a
    mix ``lam`` of its own statistics and its partner's, ``lam ~ Beta(alpha, alpha)`` per image. The loss is the
    cross-entropy of the pooled per-domain batch (ERM). At evaluation the layers are the identity, so the
    deployable is the plain student.

    ``mix``: ``"crossdomain"`` (default for DG: the batch is domain-ordered, and each image mixes with an image
    of another training domain, :func:`~mentor.nn.style.style_partners`) or ``"random"`` (any image of the
    batch). Defaults are the paper's and its code's: ``p`` 0.5, ``alpha`` 0.1, ``eps`` 1e-6, after ``layer1``
    and ``layer2`` (``resnet18_ms_l12``; ``layer3`` as well is ``resnet18_ms_l123``).

    Design choice: the code's cross-domain shuffle takes a batch of two domains (Dassl's ``RandomDomainSampler``
    with ``N_DOMAIN`` 2, then the batch reversed); here the batch holds every training domain, which are put in
    a random cyclic order, each mixing with the next (the two-domain case is the code's).
    """

    @rules(p=PROBABILITY, alpha=POSITIVE, eps=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        p: float = 0.5
        alpha: float = 0.1
        eps: float = 1e-6
        mix: Mix = "crossdomain"
        layers: list[str] = field(default_factory=lambda: ["layer1", "layer2"])

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        layers = named_layers(student, list(cfg.layers), "mixstyle")
        self.styles = nn.ModuleList(MixStyle(cfg.p, cfg.alpha, cfg.eps, cfg.mix, self.num_domains) for _ in layers)
        self._armed = False
        self._handles = hook_outputs(self, layers, lambda m, i, y: m.styles[i](y))

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        for s in self.styles:
            s.generator = ctx.generator
        self._armed = True
        try:
            return super().training_step(batch, ctx)
        finally:
            self._armed = False
            for s in self.styles:
                s.generator = None


__all__ = ["MixStyleDG", "hook_outputs", "named_layers"]
