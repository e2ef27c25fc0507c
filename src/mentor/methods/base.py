"""The Method contract: what every teacher-student method implements, and nothing the engine owns.

A method is an ``nn.Module`` that owns the student, its teacher(s) and any extra trainable parts
(projectors, heads, generators) as sub-modules, so checkpoints and optimizers see them. It declares

- ``Config``: a dataclass of hyper-parameters whose defaults are the paper's;
- ``views``: the named augmentations of the labelled batch it consumes. ``"train"`` is the recipe's
  ``data.augment``; any other name is an augmentation (``weak``, ``strong``, ``none``). The engine
  delivers ``batch["x"]`` = the first view, ``batch["x_<view>"]`` for each view, ``batch["y"]``
  labels and ``batch["index"]`` the positions of the images in the training split;
- ``training_step(batch, ctx) -> dict[str, Tensor]`` with ``"loss"`` and every term by name;
- ``predict(x)`` and ``deployable()``: the network a user ships;
- ``score(net, split, ev)`` and ``select``: the numbers reported on the validation and test splits
  (top-1 accuracy as ``acc`` by default) and the one that picks ``best.pt``. A method whose networks
  are not classifiers (a diffusion denoiser) reports its own numbers here.

Methods with several optimizers or phases (a generator against a student, a bilevel meta-step every
k steps) override :meth:`Method.phases`. The engine builds one optimizer per phase, and on each step
runs, for every phase that is due (``step % phase.every == 0``), ``training_step`` with
``ctx.phase`` set to that phase's name, then backward and that phase's optimizer step. Everything else
(backward, precision, accumulation, clipping, DDP, EMA, checkpoints, logging) belongs to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Register a Method subclass under ``name`` (the ``method.name`` of recipes)."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.method_name = name
        return METHODS.register(name)(cls)

    return deco


def create_method(name: str, student: nn.Module, info: BuildInfo | None = None, **hparams: Any) -> Method:
    """Build a registered method from its name and hyper-parameter overrides (Python API)."""
    cls = METHODS.get(name)
    return cls(cls.Config(name=name, **hparams), student, info or BuildInfo())


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameter dataclass; ``name`` is the registry key."""

    name: str = ""


@dataclass
class BuildInfo:
    """Facts about the data a method may need at construction (class count, input shape, size)."""

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    train_size: int = 0
    max_steps: int = 0
    steps_per_epoch: int = 0
    device: str = "cpu"
    mean: tuple[float, ...] = ()  # per-channel statistics the engine normalises inputs with
    std: tuple[float, ...] = ()


@dataclass
class Phase:
    """One optimizer and the parameters it updates, run every ``every`` steps.

    ``optim`` overrides fields of the run's optimizer config for this phase (e.g. ``{"lr": 1e-3}``).
    """

    name: str
    params: list[nn.Parameter]
    every: int = 1
    optim: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a training step may know besides its batch.

    In a step captured as a CUDA graph (``trainer.cuda_graph``) ``step`` (and so ``epoch``) is a
    0-d device tensor that changes between replays: compute step-dependent weights with tensor
    operations (``torch.clamp``, comparisons), never with Python ``min``/``if`` on them.
    """

    step: int | Tensor
    max_steps: int
    phase: str = "main"
    steps_per_epoch: int = 1
    generator: torch.Generator | None = None
    lrs: dict[str, float] = field(default_factory=dict)  # each phase's current learning rate

    @property
    def epoch(self) -> float | Tensor:
        return self.step / max(1, self.steps_per_epoch)


class Method(nn.Module):
    """Base class of every method. Subclasses set ``Config`` and implement ``training_step``."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    views: ClassVar[tuple[str, ...]] = ("train",)
    method_name: ClassVar[str] = ""
    #: the validation number (a key of ``score``) that picks ``best.pt``, and "max" or "min"
    select: ClassVar[tuple[str, str]] = ("acc", "max")

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.info = info

    # -- the contract ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        # The engine calls the module (not training_step) so DDP's forward hooks see the step.
        return self.training_step(batch, ctx)

    def setup(self, batch: dict[str, Tensor]) -> None:
        """Called once with a real batch before optimizers exist: size connectors by a dry run."""

    def deployable(self) -> nn.Module:
        """The network a user ships (by default the student)."""
        return self.student

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.deployable()(x)

    def score(self, net: nn.Module, split, ev) -> dict[str, float]:
        """Numbers of ``net`` (the deployable, a head, or the EMA copy) on a split, read with the
        engine's :class:`~mentor.engine.evaluate.Evaluator`; reported as ``val_<key>`` and
        ``test_<key>_last`` / ``test_<key>_best``. By default top-1 accuracy."""
        return {"acc": ev.accuracy(net, split)}

    def eval_heads(self) -> dict[str, nn.Module]:
        """Networks evaluated beside ``predict`` and reported as ``val_acc_<name>`` (e.g. every peer
        of an online method, or a branch of a multi-branch student)."""
        return {}

    def phases(self) -> list[Phase]:
        return [Phase("main", [p for p in self.parameters() if p.requires_grad])]

    # -- helpers -----------------------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Direct children with parameters, none trainable (teachers): never wrapped in DDP."""
        out = {}
        for name, m in self.named_children():
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                out[name] = m
        return out

    def trained_state(self) -> dict[str, Tensor]:
        """``state_dict`` without the frozen modules (teachers): what a checkpoint must keep, since a
        resumed run loads its teachers again from their own run directories."""
        frozen = tuple(f"{name}." for name in self.frozen_modules())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def load_trained_state(self, state: dict[str, Tensor]) -> None:
        """Load a :meth:`trained_state` (or a full ``state_dict``); only frozen modules may be absent."""
        frozen = tuple(f"{name}." for name in self.frozen_modules())
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(frozen)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit {type(self).__name__}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for m in self.frozen_modules().values():
            m.eval()  # frozen teachers keep their BN statistics and run without dropout
        return self
