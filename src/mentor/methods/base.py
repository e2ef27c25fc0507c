"""The Method contract: what every teacher-student method implements, and nothing the engine owns.

Every family (distillation, semi-supervised learning, adaptation, generalisation, data-free
distillation, diffusion) writes its methods against this one page. A method is an ``nn.Module`` that
owns the student, its teacher(s) and any extra trainable parts (projectors, heads, generators) as
sub-modules, so checkpoints and optimizers see them.

**What it declares**

- ``Config``: a dataclass of hyper-parameters whose defaults are the paper's (source named in the
  class docstring), registered with ``@register_method("name")``.
- ``inputs``: an :class:`Inputs` spec of the data its step consumes; the engine produces every part on
  the device, as a pure function of (seed, step), sharded by DDP rank:

  ========================  ==============================================================================
  ``labeled=("train",)``    the labelled batch: ``x`` (the first view), ``x_<view>`` for every view, ``y``,
                            ``index`` (positions in the training split). ``"train"`` is the recipe's
                            ``data.augment``; any other name is an augmentation (``weak``, ``strong``, ``none``)
  ``unlabeled=("weak",…)``  an unlabelled batch of ``data.unlabeled_ratio * batch_size`` images:
                            ``u`` (first view), ``u_<view>``, ``u_index``. Its labels never reach the method.
                            A name listed again is another independent draw: ``("weak", "weak")`` gives
                            ``u_weak`` and ``u_weak_1`` (any part; :func:`mentor.engine.inputs.view_keys`)
  ``labeled=(), unlabeled=…`` source-free: the whole training split (the target domain) is the unlabelled
                            pool, in batches of ``data.batch_size``; the run needs ``model.init_from`` (the
                            source network); validation (labelled target) is reported as the oracle column
  ``domains=True``          the labelled batch drawn per training domain, ``batch_size`` images from each
                            domain in a fixed order, with ``batch["domain"]`` (the domain's position)
  ``data=False``            no data at all (data-free): the batch is empty; class count, image shape and
                            normalisation come from the teacher's run (:meth:`Method.data_source`)
  ========================  ==============================================================================

- Roles, declared rather than inferred: :meth:`add_teacher` for a frozen network reloaded from its own
  run (left out of checkpoints and of DDP), :meth:`add_ema_teacher` for an exponential moving average
  of one of the method's networks (trained state: checkpointed, restored exactly, updated by the
  engine after each optimizer step). Every other sub-module is trained state.
- ``select``: the validation number (a key of :meth:`score`) that picks ``best.pt``.
- State kept equal on every DDP rank by the method itself (a memory bank whose updates gather every
  rank's batch): :meth:`rank_synced_buffers`, by default the buffers of sub-modules marked
  ``rank_synced = True``; the engine keeps them out of DDP's per-step buffer broadcast.

**What it implements**

- ``training_step(batch, ctx) -> dict[str, Tensor]`` with ``"loss"`` and every term by name.
- ``predict(x)`` and ``deployable()``: the network a user ships.
- ``score(net, split, ev)``: the numbers reported on validation and test splits (top-1 ``acc``).
- ``phases()`` for several optimizers (a generator against a student, a bilevel meta-step every k
  steps): the engine builds one optimizer per phase and runs, for every phase due at a step
  (``step % phase.every == 0``), ``training_step`` with ``ctx.phase`` set, backward and that optimizer.

**Hooks** (each optional)

- :meth:`after_step` runs after every phase's optimizer step, inside the step (captured with it in a
  CUDA graph): EMA teachers (the default), queues, class statistics. No host synchronisation.
- :meth:`on_epoch` runs on the host before the first step of every epoch (step 0 included, and again
  on resume at an epoch boundary), with a :class:`Refresh` giving the training splits and the
  evaluator: pseudo-label refresh (SHOT), memory-bank rebuild. It must be a deterministic function of
  the method's state so resume stays exact.
- :meth:`before_eval` runs on the host before every evaluation (BN statistics of averaged weights).
- :meth:`reset` restores the state captured by :meth:`snapshot` (episodic test-time adaptation).

**Rules the engine checks** (a :class:`~mentor.errors.ContractError` naming the rule, at the first step):

1. ``training_step`` returns a dict with ``"loss"``; every value is a 0-d floating tensor.
2. The same keys every step of a phase (the meter sums them on the device).
3. No host synchronisation in a step (``.item()``, ``float(t)``, printing, Python ``if`` on a tensor):
   step-dependent weights use :func:`mentor.nn.ramp`, which works eagerly and in a captured step.
4. Teachers are declared with :meth:`add_teacher`; a child whose parameters are all frozen but that is
   not declared is trained state like any other.
5. Pseudo-label diagnostics go through ``ctx.pseudo_labels(pred, mask)``; they are logged, never used
   for selection.

Everything else (backward, precision, accumulation, clipping, DDP, EMA, checkpoints, logging,
evaluation) belongs to the engine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..registry import Registry
from .catalog import BUILTIN

METHODS: Registry[type[Method]] = Registry("method", lazy=BUILTIN)


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
    """Base of every method's hyper-parameter dataclass; ``name`` is the registry key.

    A method declares what its values may be with :func:`mentor.config.rules` above ``@dataclass``
    (``@rules(temperature=POSITIVE, kd_weight=NON_NEGATIVE)``); a recipe is checked against them when
    it is loaded, and a subclass adds to the rules of the class it extends."""

    name: str = ""


@dataclass
class BuildInfo:
    """Facts about the data a method may need at construction (class count, input shape, size)."""

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    train_size: int = 0
    unlabeled_size: int = 0  # images in the unlabelled pool (u_index ranges over it); 0 without one
    max_steps: int = 0
    steps_per_epoch: int = 0
    device: str = "cpu"
    mean: tuple[float, ...] = ()  # per-channel statistics the engine normalises inputs with
    std: tuple[float, ...] = ()
    num_domains: int = 0  # training domains of a per-domain run (0 otherwise)
    domain_names: tuple[str, ...] = ()  # the labelled training domains, in batch order (``domain``)
    unlabeled_domains: tuple[str, ...] = ()  # the per-domain unlabelled pools, in order (``u_domain``)
    open_set: bool = False  # test splits hold unknown classes, labelled num_classes (data.unknown_classes)


@dataclass
class Phase:
    """One optimizer and the parameters it updates, run every ``every`` steps.

    ``optim`` overrides fields of the run's optimizer config for this phase (e.g. ``{"lr": 1e-3}``) and
    ``schedule`` fields of its schedule config (``{"name": "constant"}`` for a generator whose rate the
    papers keep fixed). ``groups`` are further parameters with their own overrides in the same optimizer
    (latent codes at their own rate: ``[(codes, {"lr": 0.015})]``).

    When it runs: from step ``offset`` on, the first ``span`` steps of every ``every`` steps, i.e. due when
    ``step >= offset`` and ``(step - offset) % every < span``. DANN's alternating discriminator and
    generator are ``every=2`` with offsets 0 and 1; a data-free round of ``g`` synthesis steps followed by
    ``k`` student steps is ``Phase("synthesis", every=g + k, span=g)`` and
    ``Phase("student", every=g + k, offset=g, span=k)``. ``fresh`` clears the optimizer's state (Adam's
    moments) at the first step of every window, as a new optimizer per synthesis round would, without
    rebuilding it.
    """

    name: str
    params: list[nn.Parameter]
    every: int = 1
    optim: dict[str, Any] = field(default_factory=dict)
    offset: int = 0
    span: int = 1
    fresh: bool = False
    schedule: dict[str, Any] = field(default_factory=dict)
    groups: list[tuple[list[nn.Parameter], dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 1 or not 1 <= self.span <= self.every or self.offset < 0:
            raise ValueError(f"Phase {self.name!r}: needs every >= 1, 1 <= span <= every and offset >= 0 "
                             f"(got every={self.every}, span={self.span}, offset={self.offset})")

    def due(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.every < self.span

    def opens(self, step: int) -> bool:
        """Whether ``step`` is the first step of one of the phase's windows."""
        return step >= self.offset and (step - self.offset) % self.every == 0

    def all_params(self) -> list[nn.Parameter]:
        return [*self.params, *(p for params, _ in self.groups for p in params)]


@dataclass(frozen=True)
class Inputs:
    """The data a method's step consumes (see the module docstring for the batch keys of each part)."""

    labeled: tuple[str, ...] = ("train",)
    unlabeled: tuple[str, ...] = ()
    domains: bool = False
    data: bool = True

    def __post_init__(self) -> None:
        if not self.data and (self.labeled or self.unlabeled or self.domains):
            raise ValueError("Inputs(data=False) consumes no labelled, unlabelled or domain batches")
        if self.data and not (self.labeled or self.unlabeled):
            raise ValueError("Inputs needs labelled or unlabelled views, or data=False")


NO_DATA = Inputs(labeled=(), data=False)


@dataclass
class StepContext:
    """What a training step may know besides its batch.

    In a step captured as a CUDA graph (``trainer.cuda_graph``) ``step`` (and so ``epoch``) is a 0-d
    device tensor that changes between replays; :func:`mentor.nn.ramp` takes either form, so no method
    tests which it is.
    """

    step: int | Tensor
    max_steps: int
    phase: str = "main"
    steps_per_epoch: int = 1
    generator: torch.Generator | None = None
    lrs: dict[str, float] = field(default_factory=dict)  # each phase's current learning rate
    unlabeled_targets: Tensor | None = None  # the unlabelled batch's true labels: diagnostics only
    diagnostics: dict[str, Tensor] = field(default_factory=dict)

    @property
    def epoch(self) -> float | Tensor:
        return self.step / max(1, self.steps_per_epoch)

    def pseudo_labels(self, pred: Tensor, mask: Tensor | None = None) -> None:
        """Record the step's pseudo-labels of the unlabelled batch (and the 0/1 or soft mask weighting
        them) for the logged diagnostics ``mask_rate`` and, where the true labels are known,
        ``pl_acc`` (accuracy of the pseudo-labels the mask keeps). Never used for model selection."""
        mask = torch.ones_like(pred, dtype=torch.float32) if mask is None else mask.detach().float()
        self.diagnostics["mask_rate"] = mask.mean()
        if self.unlabeled_targets is not None:
            hit = (pred.detach() == self.unlabeled_targets).float()
            self.diagnostics["pl_acc"] = (hit * mask).sum() / mask.sum().clamp(min=1e-8)


@dataclass
class Refresh:
    """What :meth:`Method.on_epoch` and :meth:`Method.before_eval` may read: the training splits (uint8
    tensors on the host or the device), the validation split, the engine's evaluator (normalisation,
    batches, autocast) and the device."""

    labeled: Any
    unlabeled: Any
    evaluator: Any
    device: torch.device
    val: Any = None  # the validation split (model selection; SWAD's loss valley reads its loss)


def _check_classifier(net: nn.Module, method: str) -> None:
    """A network that needs more than the images (a diffusion denoiser's ``(x, c_noise)``) is no student
    of a classification method: say so before the first step fails inside its forward."""
    import inspect

    from ..errors import ConfigError

    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(net.forward).parameters.values()
    required = [p.name for p in params if p.default is p.empty and p.kind in positional]
    if len(required) > 1:
        raise ConfigError(f"method {method} trains a classifier net(x) -> logits, but the model "
                          f"{type(net).__name__} takes ({', '.join(required)}); choose a classifier with model.name "
                          "(`mentor list models`), or method.name=edm for a diffusion denoiser")


class Method(nn.Module):
    """Base class of every method. Subclasses set ``Config`` and implement ``training_step``."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    inputs: ClassVar[Inputs] = Inputs()
    method_name: ClassVar[str] = ""
    #: the validation number (a key of ``score``) that picks ``best.pt``, and "max" or "min"
    select: ClassVar[tuple[str, str]] = ("acc", "max")
    #: the student is a classifier ``net(x) -> logits`` (False for a method that brings its own kind)
    classifier: ClassVar[bool] = True

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__()
        if self.classifier:
            _check_classifier(student, self.method_name or type(self).__name__)
        self.cfg = cfg
        self.student = student
        self.info = info
        self._teachers: list[str] = []
        self._ema: dict[str, tuple[str, float]] = {}  # EMA child -> (source child path, decay)
        self._snapshot: dict[str, Tensor] | None = None

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

    def deployable_spec(self) -> dict[str, Any] | None:
        """How to rebuild :meth:`deployable` without this method: ``None`` (the default) when it is the
        student exactly as ``create_model(model.name, **model.kwargs)`` builds it; otherwise a JSON-able dict
        whose ``"kind"`` is the registered name of the method whose :meth:`rebuild_deployable` builds it, with
        what that needs (channel counts, the teacher's architecture, ...). The engine records it in every
        checkpoint's ``info["deployable"]``; :func:`mentor.engine.deployable.build_deployable` reads it."""
        return None

    @classmethod
    def rebuild_deployable(cls, spec: dict[str, Any], student: nn.Module, info: dict[str, Any]) -> nn.Module:
        """The network :meth:`deployable_spec` describes, built around ``student`` (a fresh zoo network of the
        run's ``model.name``); its ``state_dict`` has the keys and shapes of the run's ``deployable()``, so
        the checkpoint's weights load into it. ``info`` is the checkpoint's (classes, channels, image size)."""
        raise NotImplementedError(f"{cls.__name__} records no deployable spec, so it rebuilds none")

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
        of an online method, a branch of a multi-branch student, an EMA teacher)."""
        return {}

    def report(self) -> dict[str, Any]:
        """Numbers the method adds to ``summary.json`` at the end of a run (a data-free method's count of
        synthesised images); read once, on the host."""
        return {}

    def finish(self, run_dir: Path) -> None:
        """On the main process at the end of a run, after the test pass and before ``summary.json`` is written:
        files the method adds to its run directory (SFD's student file), each written atomically. Nothing by
        default."""

    def warnings(self, max_steps: int, ema: float | None) -> list[str]:
        """Settings of this run that likely defeat its purpose, logged once when it starts (rank 0). The
        engine passes the run's length and its EMA decay (``trainer.ema``, None without EMA); by default it
        warns when the EMA copy averages over more steps (about ``1 / (1 - ema)``) than the run has. Override
        to add a method's own (call ``super().warnings``, or replace the EMA check by a stricter one)."""
        if ema is None or 1.0 / (1.0 - ema) <= max_steps:
            return []
        left = ema**max_steps
        advice = f"lower trainer.ema to about {1 - 10 / max_steps:.4g}" if max_steps > 10 else "set trainer.ema=null"
        return [f"trainer.ema={ema} averages the weights over about {1 / (1 - ema):,.0f} steps, more than the run's "
                f"{max_steps:,} (trainer.max_steps): at the end the EMA copy (the *_ema numbers) still holds "
                f"{left:.0%} of the initial weights; {advice} or train longer"]

    def phases(self) -> list[Phase]:
        return [Phase("main", [p for p in self.parameters() if p.requires_grad])]

    @classmethod
    def data_source(cls, cfg: MethodConfig) -> str | None:
        """For ``Inputs(data=False)``: the run directory whose checkpoint says the class count, image
        shape, normalisation and (for evaluation only) the real dataset. By default ``cfg.teacher``."""
        return getattr(cfg, "teacher", None) or None

    # -- hooks -------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """After every optimizer step of a training step (inside a captured step): updates the EMA
        teachers. Override to add queues or statistics; call ``super().after_step(ctx)``."""
        for name, (source, decay) in self._ema.items():
            ema, src = getattr(self, name), self.get_submodule(source)
            torch._foreach_lerp_(list(ema.parameters()), list(src.parameters()), 1.0 - decay)
            for eb, b in zip(ema.buffers(), src.buffers()):
                eb.copy_(b)

    def on_epoch(self, epoch: int, refresh: Refresh) -> None:
        """Before the first step of every epoch, on the host (pseudo-label refresh, memory banks)."""

    def before_eval(self, refresh: Refresh) -> None:
        """On the host before every evaluation (the last one included): recompute the BatchNorm statistics
        of averaged weights (SWAD, Lookahead's slow weights) on training batches. Like :meth:`on_epoch` it
        must be a deterministic function of the method's state, so a resumed run stays exact."""

    def snapshot(self) -> None:
        """Remember the current state for :meth:`reset` (the adaptation runner calls it once)."""
        self._snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def reset(self) -> None:
        """Restore the state of :meth:`snapshot` (episodic adaptation; a reset per shift)."""
        if self._snapshot is None:
            raise RuntimeError("reset() before snapshot()")
        self.load_state_dict(self._snapshot)

    # -- roles -------------------------------------------------------------------------------------
    def add_teacher(self, name: str, module: nn.Module) -> nn.Module:
        """Declare ``module`` a frozen teacher: eval mode, no gradients, not in DDP, not checkpointed
        (a resumed run loads it again from its own run directory)."""
        module.requires_grad_(False).eval()
        setattr(self, name, module)
        self._teachers.append(name)
        return module

    def add_ema_teacher(self, name: str, source: str, decay: float) -> nn.Module:
        """Declare ``name`` an exponential moving average of the sub-module at path ``source`` with
        ``decay``, updated by :meth:`after_step`. Buffers (BN statistics) are copied, not averaged
        (timm's ModelEmaV2, FixMatch's EMA). It is trained state: checkpointed and restored exactly."""
        from ..models.tap import strip_taps

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        copy_ = strip_taps(copy.deepcopy(self.get_submodule(source))).requires_grad_(False).eval()
        setattr(self, name, copy_)
        self._ema[name] = (source, decay)
        return copy_

    def teacher_names(self) -> list[str]:
        return list(self._teachers)

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The declared teachers and EMA teachers: in eval mode, never wrapped in DDP."""
        return {n: getattr(self, n) for n in [*self._teachers, *self._ema]}

    def rank_synced_buffers(self) -> list[str]:
        """Names (as ``named_buffers`` gives them) of the buffers this method keeps equal on every DDP rank
        itself: state whose every update first gathers all ranks' rows (memory banks, queues), so that each
        rank applies the same update. The engine broadcasts them from rank 0 once, when it wraps the method
        in DDP, and leaves them out of DDP's buffer broadcast, which would otherwise copy rank 0's copy (a
        whole memory bank) into every rank before every forward.

        By default the buffers of every sub-module whose class sets ``rank_synced = True`` (CRD's
        :class:`~mentor.distill.losses.MemoryBank` and ``NCE``, SimMatch's and CoMatch's memories in
        :mod:`mentor.nn.memory`); override to add a method's own. A buffer a rank updates from its own
        batch alone must not be listed: DDP's broadcast is then what keeps the ranks equal (on rank 0's)."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if getattr(type(module), "rank_synced", False):
                names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers())
        return sorted(names)

    def trained_state(self) -> dict[str, Tensor]:
        """``state_dict`` without the declared teachers: what a checkpoint must keep (EMA teachers,
        queues and banks included), since a resumed run loads its teachers from their run directories."""
        frozen = tuple(f"{name}." for name in self._teachers)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def load_trained_state(self, state: dict[str, Tensor], file: str = "the checkpoint") -> None:
        """Load a :meth:`trained_state` (or a full ``state_dict``); only teachers may be absent. A
        mismatch names the missing, unexpected and differently shaped tensors."""
        from ..engine.checkpoint import load_weights

        load_weights(self, state, file, f"method {type(self).__name__}",
                     optional=tuple(f"{name}." for name in self._teachers))

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for m in self.frozen_modules().values():
            m.eval()  # teachers keep their BN statistics and run without dropout
        return self
