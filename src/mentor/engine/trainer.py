"""The training loop every method runs on.

The engine owns everything that is not the method: device and precision, DDP, the batch pipeline,
optimizers and schedules per phase, accumulation and clipping, EMA, evaluation, checkpoints, logging.
Nothing in a step synchronises with the host: loss terms are summed on the device and read every
``log_every`` steps, and a non-finite loss is recorded on the device (step and term) and reported at
the next read, before any checkpoint is written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig, default_out_dir, to_dict
from ..errors import CheckpointMismatchError
from ..methods import METHODS, BuildInfo, Method, StepContext
from ..methods.base import Refresh
from ..models import build_network, strip_taps
from ..nn.norm import bn_layers
from ..provenance import provenance
from . import checkpoint as ckpt
from .console import run_header, start_warnings
from .contract import check_step_output
from .details import DetailsRecorder, recording
from .distributed import Dist, barrier, broadcast_from_main, init_distributed, shutdown
from .ema import EMA
from .evaluate import Evaluator
from .graph import GraphStep, check_capturable
from .inputs import Splits, TrainInputs, data_free_splits, load_splits
from .logger import RunLogger, console_logging, format_duration, log, truncate_metrics
from .loggers import check_loggers
from .meter import Meter, NonFiniteLossError, PhaseClock
from .optim import build_optimizer, build_scheduler, device_lr
from .rundir import RunDir


def resolve_device(name: str, dist: Dist | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist is not None and dist.enabled:
        name = f"cuda:{dist.local_rank}"
    return torch.device(name)


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo where there is one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto``: bf16 on a CUDA device that supports it, fp16 (with a gradient scaler) on one that does not,
    fp32 on the CPU. An explicit choice is kept."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_for(device: torch.device, precision: str, cache: bool = True):
    """A context factory: autocast to the run's half type (bf16 or fp16), or nothing for fp32.

    ``cache=False`` for a step captured in a CUDA graph (autocast's weight-cast cache must not
    outlive the capture)."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def build_info(cfg: RunConfig, splits: Splits, device: torch.device, steps_per_epoch: int) -> BuildInfo:
    """Facts about the data (class count, shape, size, normalisation) a method is built for."""
    ref = splits.reference
    channels, _, width = ref.image_shape
    pool = splits.unlabeled if splits.unlabeled is not None else splits.train  # as TrainInputs draws it
    return BuildInfo(num_classes=ref.num_classes, in_channels=channels, image_size=width,
                     train_size=len(splits.train) if splits.train is not None else 0,
                     unlabeled_size=len(pool) if pool is not None else 0,
                     max_steps=cfg.trainer.max_steps, steps_per_epoch=steps_per_epoch, device=str(device),
                     mean=tuple(float(m) for m in ref.mean), std=tuple(float(v) for v in ref.std),
                     num_domains=len(splits.domains or {}), domain_names=tuple(splits.domains or ()),
                     unlabeled_domains=tuple(splits.unlabeled_domains or ()), open_set=bool(cfg.data.unknown_classes))


def init_network(net: nn.Module, path: str, info: BuildInfo, model: str) -> None:
    """``model.init_from``: load a trained run's network (its best.pt, else last.pt) into ``net``."""
    try:
        file, src, weights = ckpt.run_info(path, "model.init_from")
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from None
    for key, what in (("num_classes", "classes"), ("in_channels", "input channels")):
        if src[key] != getattr(info, key):
            raise ConfigError(f"model.init_from={path}: {file} holds a network with {src[key]} {what} but this "
                              f"run's data has {getattr(info, key)}; start from a run trained on matching data")
    try:
        ckpt.load_weights(net, weights, file, f"model.name={model}")
    except ckpt.CheckpointError as e:
        if src.get("deployable"):
            raise ConfigError(f"model.init_from={path}: {file} holds the {src['deployable'].get('kind')} network "
                              f"built around a {src['model']} (not a bare {src['model']}), which does not load into "
                              f"model.name={model}; start from a run whose deployable network is the bare model"
                              ) from None
        raise ConfigError(f"model.init_from={path}: {file} holds a {src['model']} network: {e}; use the same "
                          "model.name as that run") from None


def build_method(cfg: RunConfig, splits: Splits, device: torch.device, steps_per_epoch: int) -> Method:
    """The student from the zoo (or from ``model.init_from``) and the registered method around it."""
    info = build_info(cfg, splits, device, steps_per_epoch)
    # zoo, timm:/torchvision:/file.py:fn networks; model.weights: a local weights file (mentor.models.build)
    student = build_network(cfg.model.name, info.num_classes, info.in_channels, info.image_size, cfg.model.kwargs,
                            weights=cfg.model.weights)
    if cfg.model.init_from:
        init_network(student, cfg.model.init_from, info, cfg.model.name)
    return METHODS.get(cfg.method.name)(cfg.method, student, info)


def source_splits(cfg: RunConfig, method_cls: type[Method]) -> Splits:
    """The run's splits; for a method that takes no data, the real splits of its source run's dataset
    (validation and test only, for reporting)."""
    if method_cls.inputs.data:
        return load_splits(cfg.data)
    source = method_cls.data_source(cfg.method)
    from .teacher import is_model_teacher

    if source and is_model_teacher(source):
        raise ConfigError(f"method.teacher={source}: method {cfg.method.name!r} trains without data, so the class "
                          "count, image shape and normalisation come from the teacher's run, and a network given "
                          "with its weights (MODEL@WEIGHTS) has none; give the run directory of a `mentor train` run "
                          "of it (model.name=MODEL model.weights=WEIGHTS on its data)")
    if not source:
        raise ConfigError(f"method {cfg.method.name!r} trains without data: it needs the run directory of a "
                          "trained network (method.teacher=runs/...) for the class count, shape and normalisation")
    try:
        _, info, _ = ckpt.run_info(source, "method.teacher")
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from None
    return data_free_splits(cfg.data, info)


class Trainer:
    """Runs one recipe to completion (or resumes it) and writes the run directory."""

    def __init__(self, cfg: RunConfig, splits: Splits | None = None, method: Method | None = None):
        """``splits`` replaces the recipe's dataset with tensors the caller already has; ``method`` the method the
        recipe would build (a Python API holding its networks in memory, e.g. ``mentor.diffusion.sfd_distill``)."""
        console_logging()  # progress on the console when the program has set up no logging
        self.cfg = cfg
        t = cfg.trainer
        check_loggers(t.loggers)  # a missing tensorboard/wandb package stops the run before its data loads
        if t.threads:
            torch.set_num_threads(t.threads)
        self.dist = init_distributed("cuda" if resolve_device(t.device).type == "cuda" else "cpu")
        self.device = resolve_device(t.device, self.dist)
        self.precision = resolve_precision(self.device, t.precision)
        if self.precision == "fp16" and t.cuda_graph:  # precision=auto on a GPU without bf16
            raise ConfigError(f"trainer.precision=auto means fp16 on {hardware_name(self.device)} (no bf16), and "
                              "fp16's gradient scaler cannot run in a captured step: set trainer.precision=fp32 "
                              "or trainer.cuda_graph=false")
        self.autocast = autocast_for(self.device, self.precision, cache=not t.cuda_graph)
        # fp16 overflows where bf16 does not: its gradients are scaled up and every step that produced an
        # inf/NaN gradient is skipped (the scale halves), as torch.amp prescribes.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        if cfg.out_dir is None:
            cfg.out_dir = default_out_dir(None)
        self.run_dir = Path(cfg.out_dir)
        torch.manual_seed(t.seed + self.dist.rank)

        method_cls = METHODS.get(cfg.method.name)
        self.splits = splits if splits is not None else source_splits(cfg, method_cls)
        if method_cls.inputs.unlabeled and not method_cls.inputs.labeled and not cfg.model.init_from:
            raise ConfigError(
                f"method.name={cfg.method.name} is source-free: it adapts a trained source network to unlabelled "
                f"target images, so it needs model.init_from=RUN (the source run directory, trained with the "
                f"same model.name on the source domain)")
        if method_cls.inputs.unlabeled and method_cls.inputs.labeled and self.splits.unlabeled is None:
            raise ConfigError(
                f"method.name={cfg.method.name} learns from unlabelled images, but every training image of "
                f"{cfg.data.name} is labelled (data.labels_per_class="
                f"{'not set' if cfg.data.labels_per_class is None else cfg.data.labels_per_class}): set "
                f"data.labels_per_class=N to keep N labels per class, and the training split, unlabelled, becomes "
                f"its unlabelled stream (with a domain set, or data.unlabeled_domains=[...] to drop the labels of "
                f"whole training domains); or choose a supervised method")
        self.inputs = TrainInputs(self.splits, cfg.data, method_cls.inputs, t.seed, self.dist.rank,
                                  self.dist.world_size, self.device, t.channels_last)
        # The student's initial weights depend on the seed only, not on the rank: every rank and
        # every method of a paired comparison starts from the same network.
        torch.manual_seed(t.seed)
        self.method = method if method is not None else \
            build_method(cfg, self.splits, self.device, self.inputs.steps_per_epoch)
        self.method.to(self.device)
        if t.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.method.setup(self._method_batch(self.inputs(0))[0])
        self.method.to(self.device)  # connectors created by setup()
        torch.manual_seed(t.seed + self.dist.rank)
        if t.sync_bn and self.dist.enabled:
            from ..nn.syncbn import convert_sync_bn

            # BatchNorm statistics over the global batch; frozen teachers keep their running statistics.
            convert_sync_bn(self.method, skip=set(self.method.frozen_modules()))
        elif self.dist.enabled and self.is_main and any(bn_layers(m) for n, m in self.method.named_children()
                                                        if n not in self.method.frozen_modules()):
            log.warning("the network has BatchNorm layers and trainer.sync_bn is off: each process normalises "
                        "its own share of the batch, so this run differs from one process with the global batch "
                        "(set trainer.sync_bn=true for that)")

        self.phases = self.method.phases()
        if t.cuda_graph:
            check_capturable(self.device, self.dist.enabled, t.accumulate, self.phases)
        self.optimizers = [build_optimizer(p.params, cfg.optim, p.optim, capturable=t.cuda_graph, extra=p.groups)
                           for p in self.phases]
        self.schedulers = [build_scheduler(o, cfg.schedule, t.max_steps, o.param_groups[0]["lr"], p.schedule)
                           for p, o in zip(self.phases, self.optimizers)]
        self.ema = EMA(self.method.deployable(), t.ema).to(self.device) if t.ema else None
        if t.compile:
            for _, child in self.method.named_children():
                child.compile()
        self.step_module: nn.Module = self._wrap_ddp()
        self.graph = None
        if t.cuda_graph:
            for o in self.optimizers:
                device_lr(o, self.device)
            torch.backends.cudnn.benchmark = True  # shapes are fixed: let cuDNN time its algorithms once
            self.graph = GraphStep(self._step_body, self.inputs, self._after_captured_step, self.device,
                                   name=cfg.method.name)

        self.start_step = 0
        metric, self.mode = method_cls.select
        # A method may select on its EMA copy ("<key>_ema"); without EMA the raw network's number is used.
        self.select_ema = metric.endswith("_ema") and self.ema is not None
        self.metric = metric if self.select_ema or not metric.endswith("_ema") else metric[: -len("_ema")]
        self.best = {"value": None, "step": -1}
        self.last_val: dict[str, float] = {}
        self.history_wall = 0.0
        self.train_seconds, self.train_images = 0.0, 0
        self.saved_step: int | None = None  # the step of last.pt on disk (written or resumed from)
        self.meter = Meter(self.dist, prefix_phases=len(self.phases) > 1)
        self.clock = PhaseClock(self.device, enabled=len(self.phases) > 1 and not t.cuda_graph)
        self._checked: set[str] = set()
        self.details: DetailsRecorder | None = None  # set while the end of the run records test_details.json

    # -- set-up helpers --------------------------------------------------------------------------
    def _wrap_ddp(self) -> nn.Module:
        if not self.dist.enabled:
            return self.method
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Frozen modules (teachers) stay outside DDP: no gradient buckets, no buffer broadcasts. Buffers the
        # method keeps equal on every rank itself (memory banks whose updates gather every rank's batch) are
        # broadcast once here and never by DDP, whose broadcast before each forward would copy rank 0's.
        ignore = [f"{name}.{p}" for name, m in self.method.frozen_modules().items()
                  for p, _ in list(m.named_parameters()) + list(m.named_buffers())]
        synced = self.method.rank_synced_buffers()
        DDP._set_params_and_buffers_to_ignore_for_model(self.method, ignore + synced)
        broadcast_from_main([self.method.get_buffer(n) for n in synced], self.dist)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.method, device_ids=ids, find_unused_parameters=len(self.phases) > 1)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "method": self.method.trained_state(),  # teachers reload from their own run directories
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt.rng_state(),
            "meter": self.meter.state_dict(),
            "best": dict(self.best),
            "last_val": dict(self.last_val),
            "wall": self.history_wall + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
            "throughput": {"seconds": self.train_seconds, "images": self.train_images,
                           "phases": self.clock.state_dict()},
            "config": to_dict(self.cfg),
            "info": self.network_info(),
        }

    def network_info(self) -> dict[str, Any]:
        """What a later run needs to rebuild the deployable network (e.g. to use it as a teacher)."""
        info = self.method.info
        return {"model": self.cfg.model.name, "kwargs": dict(self.cfg.model.kwargs),
                "num_classes": info.num_classes, "in_channels": info.in_channels,
                "image_size": info.image_size, "dataset": self.cfg.data.name,
                "method": self.cfg.method.name, "mean": list(info.mean), "std": list(info.std),
                "classes": list(self.splits.reference.classes),
                # a network other than the bare student (SimKD's reused head, ...): how to rebuild it
                **({"deployable": spec} if (spec := self.method.deployable_spec()) else {})}

    def save(self, step: int) -> None:
        """``last.pt`` at ``step``, after checking on the device that every loss term, parameter, buffer and
        optimizer state is finite (one read for all of them)."""
        self._check_finite()
        state = self.state_dict(step)
        self._check_state_finite({k: state[k] for k in ("method", "optimizers", "ema")}, step)
        if self.is_main:
            ckpt.atomic_save(state, self.run_dir / "last.pt")
        self.saved_step = step
        barrier(self.dist)

    def load(self, path: Path) -> None:
        state = ckpt.load(path, map_location=self.device)
        ckpt.require(state, ("step", "method", "optimizers", "schedulers", "rng", "meter", "best"), path)
        if "config" in state:
            RunDir(self.run_dir).check_recipe(self.cfg, state["config"], where=f"the recipe saved in {path.name}")
        self.method.load_trained_state(state["method"], str(path))
        if len(state["optimizers"]) != len(self.optimizers):
            raise CheckpointMismatchError(f"{path} holds {len(state['optimizers'])} optimizer state(s) but method "
                                          f"{self.cfg.method.name} trains {len(self.optimizers)} phase(s); use "
                                          "another out_dir or --force")
        for i, (o, s) in enumerate(zip(self.optimizers, state["optimizers"])):
            try:
                o.load_state_dict(s)
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointMismatchError(f"{path}: the optimizer state of phase {self.phases[i].name!r} does "
                                              f"not fit ({e}); use another out_dir or --force") from None
        saved_lr = [float(o.param_groups[0]["lr"]) for o in self.optimizers]
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        if self.ema is not None and state["ema"] is not None:
            ckpt.load_weights(self.ema, state["ema"], path, "the EMA copy")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.meter.load_state_dict(state["meter"])
        self.best = state["best"]
        self.last_val = dict(state.get("last_val", {}))
        self.history_wall = state["wall"]
        through = state.get("throughput", {})
        self.train_seconds, self.train_images = through.get("seconds", 0.0), through.get("images", 0)
        self.clock.load_state_dict(through.get("phases", {}))
        self.start_step = self.saved_step = state["step"]
        before = state.get("config", {}).get("trainer", {}).get("max_steps", self.cfg.trainer.max_steps)
        if before != self.cfg.trainer.max_steps and self.is_main:
            now_lr = float(self.optimizers[0].param_groups[0]["lr"])
            log.warning(
                f"trainer.max_steps {before} -> {self.cfg.trainer.max_steps}: the {self.cfg.schedule.name} schedule "
                f"(with warm-up, milestones given as fractions) is now laid over {self.cfg.trainer.max_steps} steps, "
                f"so the learning rate at step {self.start_step} becomes {now_lr:.4g} (the saved run ended at "
                f"{saved_lr[0]:.4g}); the result is not the run a recipe with max_steps={self.cfg.trainer.max_steps} "
                "would train from scratch")

    def _check_finite(self) -> None:
        bad = self.meter.first_nonfinite()
        if bad is not None:
            name, step = bad
            raise NonFiniteLossError(
                f"loss term {name!r} became NaN/inf at step {step}; {self._last_good()}. Lower optim.lr, set "
                "trainer.clip_grad, or check the data and the method's hyper-parameters, then train again (another "
                "out_dir, or --force).")

    def _check_state_finite(self, state: dict[str, Any], step: int) -> None:
        bad = ckpt.nonfinite(state)
        if bad:
            raise NonFiniteLossError(
                f"the trained state became non-finite by step {step}: NaN/inf in {ckpt.describe(bad)}; "
                f"{self._last_good()}. Lower optim.lr, set trainer.clip_grad, or check the method's "
                "hyper-parameters, then train again (another out_dir, or --force).")

    def _last_good(self) -> str:
        """Where the last checkpoint is: every file this engine writes or resumes from holds finite values."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"nothing was saved after step {self.saved_step}: {self.run_dir / 'last.pt'} (step " \
               f"{self.saved_step}) is the last checkpoint and holds finite values"

    def _read_meter(self) -> dict[str, float]:
        self._check_finite()
        return self.meter.read()

    # -- evaluation ------------------------------------------------------------------------------
    def _refresh(self) -> Refresh:
        pool = self.splits.unlabeled if self.splits.unlabeled is not None else self.splits.train
        unlabeled = pool if self.method.inputs.unlabeled else self.splits.unlabeled
        return Refresh(labeled=self.splits.train, unlabeled=unlabeled, evaluator=self.evaluator(),
                       device=self.device, val=self.splits.val)

    def evaluator(self) -> Evaluator:
        return Evaluator(self.inputs.mean, self.inputs.std, self.cfg.data.eval_batch_size, self.device, self.dist,
                         self.autocast, self.cfg.trainer.channels_last, self.details)

    def _score(self, net: nn.Module, split, prefix: str, suffix: str = "") -> dict[str, float]:
        """The method's numbers of ``net`` on ``split`` as ``<prefix><key><suffix>``."""
        return {f"{prefix}{k}{suffix}": v for k, v in self.method.score(net, split, self.evaluator()).items()}

    def _score_tests(self, net: nn.Module, suffix: str) -> dict[str, float]:
        """``net`` on every test split. One test split: ``test_<key><suffix>``. Held-out domains:
        ``test_<key><suffix>@<domain>`` each, their mean as ``test_<key><suffix>`` and the worst (lowest
        for a number selected by "max", else highest) as ``test_<key><suffix>@worst``."""
        if not self.splits.tests:
            return self._score(net, self.splits.test, "test_", suffix)
        return self._score_named(net, self.splits.tests, "test_", suffix)

    def _score_named(self, net: nn.Module, splits: dict, prefix: str, suffix: str = "",
                     worst: bool = True) -> dict[str, float]:
        """``net`` on named splits: ``<prefix><key><suffix>@<name>`` each, their mean as
        ``<prefix><key><suffix>`` (every domain weighs the same, as DomainBed averages its environments)
        and, with ``worst``, the worst as ``...@worst``."""
        per = {name: self._score(net, split, prefix, suffix) for name, split in splits.items()}
        out: dict[str, float] = {}
        for key in next(iter(per.values())):
            values = [per[name][key] for name in splits]
            out[key] = sum(values) / len(values)
            if worst:
                out[f"{key}@worst"] = min(values) if self.mode == "max" else max(values)
            out.update({f"{key}@{name}": per[name][key] for name in splits})
        return out

    def _score_val(self, net: nn.Module, suffix: str = "") -> dict[str, float]:
        """Validation numbers: per training domain and their mean for a domain set, else the split's."""
        parts = {n: p for n, p in (self.splits.val_parts or {}).items() if len(p)}  # a tiny domain may hold none
        if parts:
            return self._score_named(net, parts, "val_", suffix, worst=False)
        return self._score(net, self.splits.val, "val_", suffix)

    def _score_held_out(self, net: nn.Module) -> dict[str, float]:
        """At every evaluation of a run with held-out domains, each one's "in" part (``test_<key>@<domain>``)
        and "out" part (``oracle_<key>@<domain>``), as DomainBed records every environment at every
        checkpoint: the selection methods of :mod:`mentor.generalize.selection` read them afterwards. The
        engine selects on validation only."""
        out = {k: v for k, v in self._score_named(net, self.splits.tests, "test_", worst=False).items() if "@" in k}
        if self.splits.oracle:
            out.update(self._score_named(net, self.splits.oracle, "oracle_", worst=False))
        return out

    def _better(self, value: float) -> bool:
        best = self.best["value"]
        if math.isnan(value):
            return False
        return best is None or (value > best if self.mode == "max" else value < best)

    def evaluate(self, step: int, logger: RunLogger) -> None:
        self.method.eval()
        vals = self._score_val(self.method.deployable())
        for name, net in self.method.eval_heads().items():
            vals.update(self._score_val(net, f"_{name}"))
        if self.ema is not None:
            vals.update(self._score_val(self.ema.module, "_ema"))
        held_out = self._score_held_out(self.method.deployable()) if self.splits.tests else {}
        self.method.train()
        logger.eval(step, {**vals, **held_out})
        value = vals[f"val_{self.metric}"]
        if self._better(value):
            best = {"step": step, "model": self.method.deployable().state_dict(),
                    "ema": self.ema.module.state_dict() if self.ema else None, "info": self.network_info()}
            self._check_state_finite({"model": best["model"], "ema": best["ema"]}, step)
            self.best = {"value": value, "step": step}
            if self.is_main:
                ckpt.atomic_save(best, self.run_dir / "best.pt")
        self.last_val = vals

    def snapshot(self, step: int) -> None:
        """``snapshot_<step>.pt``: the deployable weights (and the EMA copy's) at ``step``, in ``best.pt``'s format,
        so ``mentor eval RUN/snapshot_<step>.pt`` reports that step's numbers."""
        state = {"step": step, "model": self.method.deployable().state_dict(),
                 "ema": self.ema.module.state_dict() if self.ema else None, "info": self.network_info()}
        self._check_state_finite({"model": state["model"], "ema": state["ema"]}, step)
        if self.is_main:
            ckpt.atomic_save(state, self.run_dir / f"snapshot_{step}.pt")

    # -- the loop --------------------------------------------------------------------------------
    def _train_step(self, step: int) -> None:
        if self.graph is not None:
            self.graph(step)
            return
        acc = self.cfg.trainer.accumulate
        self._step_body(step, lambda micro: self.inputs(step * acc + micro))
        for sched in self.schedulers:
            sched.step()  # schedules follow the global step, also for phases that skip it

    def _method_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """The batch a method sees (no unlabelled labels: they go to ``ctx`` for diagnostics only)."""
        batch = dict(batch)
        return batch, batch.pop("_u_y", None)

    def _step_body(self, step: int | Tensor, batches) -> None:
        """Every phase due at ``step``: forward, backward, clipping, optimizer step; then the method's
        ``after_step`` (EMA teachers) and the engine's EMA.

        ``batches`` is a batch (captured steps) or a function of the micro-batch index. Nothing here
        reads a value back to the host, so the body can be captured in a CUDA graph."""
        t = self.cfg.trainer
        lrs = {p.name: o.param_groups[0]["lr"] for p, o in zip(self.phases, self.optimizers)}
        ctx = StepContext(step=step, max_steps=t.max_steps, steps_per_epoch=self.inputs.steps_per_epoch, lrs=lrs)
        for phase, opt in zip(self.phases, self.optimizers):
            if isinstance(step, int) and not phase.due(step):
                continue
            ctx.phase = phase.name
            if phase.fresh and isinstance(step, int) and phase.opens(step):
                opt.state.clear()  # a new round starts from a fresh optimizer (Adam's moments at zero)
            self.clock.start(phase.name)
            opt.zero_grad(set_to_none=True)
            out: dict[str, Tensor] = {}
            for micro in range(t.accumulate):
                batch, ctx.unlabeled_targets = self._method_batch(batches(micro) if callable(batches) else batches)
                ctx.diagnostics = {}
                last = micro == t.accumulate - 1
                sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.step_module.no_sync()
                with sync:
                    with self.autocast():
                        out = self.step_module(batch, ctx)
                    if phase.name not in self._checked:
                        check_step_output(self.cfg.method.name, phase.name, out)
                        self._checked.add(phase.name)
                    loss = out["loss"] / t.accumulate
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if self.scaler is not None:
                if t.clip_grad:
                    self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(phase.all_params(), t.clip_grad, foreach=True)
                self.scaler.step(opt)  # skipped when a gradient is inf/NaN
            else:
                if t.clip_grad:
                    torch.nn.utils.clip_grad_norm_(phase.all_params(), t.clip_grad, foreach=True)
                opt.step()
            self.clock.stop(phase.name)
            self.meter.add(phase.name, {**out, **ctx.diagnostics}, step)
        if self.scaler is not None:
            self.scaler.update()  # once per step, after every phase's optimizer
        self.method.after_step(ctx)
        if self.ema is not None:
            self.ema.update(self.method.deployable())

    def _after_captured_step(self, step: int, replayed: bool) -> None:
        """Host-side end of a step run by :class:`GraphStep`: counters and schedules."""
        if replayed:
            for phase in self.phases:
                self.meter.tick(phase.name)
        for sched in self.schedulers:
            sched.step()

    def fit(self, force: bool = False) -> dict[str, Any]:
        """Train to ``trainer.max_steps``: from scratch, or resuming the run in ``out_dir`` (the same recipe),
        or nothing when that run has finished (its summary is returned). ``force`` (or ``resume: false``)
        discards what ``out_dir`` holds and starts over. Holds the directory's lock throughout."""
        rundir = RunDir(self.run_dir)
        done = False
        try:
            with rundir.locked(self.is_main):
                barrier(self.dist)
                summary = self._fit(rundir, force or not self.cfg.resume)
                done = True
                return summary
        finally:
            # The DDP wrapper's reducer holds the process group: free it while the group is alive, and let
            # no rank tear the group down while another still uses it.
            self.step_module = self.method
            shutdown(self.dist, wait=done)

    def _prior(self, rundir: RunDir, force: bool) -> tuple[str, dict[str, Any] | None]:
        """What ``out_dir`` holds for this recipe: ("fresh"|"resume"|"finished", summary)."""
        if force:
            return "fresh", None
        summary = rundir.finished(self.cfg, say=self.is_main)
        if summary is not None:
            return "finished", summary
        return ("resume" if (self.run_dir / "last.pt").exists() else "fresh"), None

    def _fit(self, rundir: RunDir, force: bool) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.trainer
        last = self.run_dir / "last.pt"
        state, summary = self._prior(rundir, force)
        barrier(self.dist)  # every rank has looked before rank 0 changes anything
        if state == "finished":
            return summary
        if state == "fresh" and self.is_main:
            rundir.start(cfg)
        barrier(self.dist)
        if state == "resume":
            self.load(last)
        if self.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.start_step)
            log.info(f"resuming {self.run_dir} at step {self.start_step}" if self.start_step
                     else f"training into {self.run_dir}")
            for line in run_header(self):
                log.info(line)
            for warning in start_warnings(self):
                log.warning(warning)
        logger = RunLogger(self.run_dir, t.max_steps, self.start_step, self.is_main, t.progress, t.loggers,
                           to_dict(cfg))
        global_batch = cfg.data.batch_size * self.dist.world_size * t.accumulate
        snapshots = snapshot_steps(t.snapshots, t.max_steps)
        self.method.train()
        self._t0 = time.perf_counter()
        t_mark, steps_mark = time.perf_counter(), self.start_step
        with _StopOnSignal() as stop, logger:  # the logger's backends close however the loop ends
            for step in range(self.start_step, t.max_steps):
                if stop.requested:
                    # Between two steps the state is consistent: keep it so the same command resumes.
                    self.save(step)
                    logger.close(failed=True)
                    log.info(f"stopped at step {step}; saved {last}, run the same command to resume")
                    raise KeyboardInterrupt
                if step % self.inputs.steps_per_epoch == 0:
                    self.method.on_epoch(step // self.inputs.steps_per_epoch, self._refresh())
                self._train_step(step)
                logger.advance()
                done = step + 1
                boundary = done % t.log_every == 0 or done == t.max_steps
                do_eval = done % t.eval_every == 0 or done == t.max_steps
                do_ckpt = done % t.ckpt_every == 0 or done == t.max_steps
                do_snap = done in snapshots
                if boundary or do_eval or do_ckpt or do_snap:
                    values = self._read_meter() if boundary else {}  # synchronises the device
                    now = time.perf_counter()
                    self.train_seconds += now - t_mark
                    self.train_images += (done - steps_mark) * global_batch
                    if boundary:
                        rate = (done - steps_mark) * global_batch / max(now - t_mark, 1e-9)
                        eta = (t.max_steps - done) * global_batch / max(rate, 1e-9)
                        lr = float(self.optimizers[0].param_groups[0]["lr"])
                        logger.train(done, values, lr, rate, eta)
                    if do_eval:
                        logger.evaluating(done)
                        self.method.before_eval(self._refresh())
                        self.evaluate(done, logger)
                    if do_snap:
                        self.snapshot(done)
                    if do_ckpt:
                        self.save(done)
                    t_mark, steps_mark = time.perf_counter(), done
            logger.close()
            # From here a signal stops at once: last.pt holds the final step, the same command writes the summary.
            stop.immediate = True
            if stop.requested:
                raise KeyboardInterrupt
            summary = self._summary()
            if self.is_main:
                self.method.finish(self.run_dir)  # the method's own files (SFD's student) before the summary
                ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _summary(self) -> dict[str, Any]:
        """Last-step and best-val-step numbers; the test set is read once per reported checkpoint."""
        self.method.eval()
        out: dict[str, Any] = {
            "method": self.cfg.method.name,
            "model": self.cfg.model.name,
            "params": sum(p.numel() for p in self.method.deployable().parameters()),
            "student_params": sum(p.numel() for p in self.method.student.parameters()),
            "trainable_params": sum(p.numel() for p in self.method.parameters() if p.requires_grad),
            "steps": self.cfg.trainer.max_steps,
            "select": f"val_{self.metric}",
            f"val_{self.metric}_last": self.last_val.get(f"val_{self.metric}"),
            f"val_{self.metric}_best": self.best["value"],
            "best_step": self.best["step"],
        }
        if self.is_main:  # reading the test set(s) is the slow part of a short run's end
            images = sum(len(split) for split in self.splits.test_splits().values())
            log.info(f"testing the last weights on {images:,} test images ...")
        with recording(self):  # the same test pass also gives test_details.json (confusion, calibration)
            out.update(self._score_tests(self.method.deployable(), "_last"))
        for name, net in self.method.eval_heads().items():
            out.update(self._score_tests(net, f"_last_{name}"))
        if self.ema is not None:
            out.update({f"{k}_last": v for k, v in self.last_val.items() if k.endswith("_ema")})
            out.update(self._score_tests(self.ema.module, "_ema_last"))
        # test_<key>_best: the selected weights (raw, or the EMA copy) at the best validation step
        best_path = self.run_dir / "best.pt"
        barrier(self.dist)
        if self.best["step"] == self.cfg.trainer.max_steps:
            tail = "_ema_last" if self.select_ema else "_last"  # the same weights: read the test set once
            for k, v in list(out.items()):
                base, at, name = k.partition("@")
                if k.startswith("test_") and base.endswith(tail) and (self.select_ema or "_ema_" not in k):
                    out[base[: -len(tail)] + "_best" + at + name] = v
        elif best_path.exists():
            if self.is_main:
                log.info(f"testing best.pt (step {self.best['step']}) ...")
            state = ckpt.load(best_path, map_location=self.device)
            net = strip_taps(copy.deepcopy(self.method.deployable()))
            net.load_state_dict(state["ema"] if self.select_ema else state["model"])
            net.eval()
            out.update(self._score_tests(net, "_best"))
        if self.method.inputs.unlabeled and not self.method.inputs.labeled:
            out["best_selected_on"] = "labelled target holdout: *_best is the oracle column, *_last the headline"
        elif self.splits.oracle:
            out.update(self._score_named(self.method.deployable(), self.splits.oracle, "oracle_", "_last", False))
            out["best_selected_on"] = ("training-domain validation (mean accuracy over the training domains' holdout "
                                       "parts): *_best is the headline; oracle_*_last is each held-out domain's "
                                       "holdout part at the last step, for oracle selection")
        out["wall_s"] = self.history_wall + (time.perf_counter() - self._t0)
        # over every session of the run (a resume that trains nothing reports the earlier sessions' rate)
        out["train_img_s"] = self.train_images / self.train_seconds if self.train_seconds > 0 else None
        out.update(self.method.report())
        if self.clock.enabled:  # seconds in each optimizer phase
            out["phase_seconds"] = {k: round(v, 3) for k, v in self.clock.seconds().items()}
        out["device"] = hardware_name(self.device)
        out["threads"] = torch.get_num_threads()
        out.update(provenance())
        out["world_size"] = self.dist.world_size
        if self.is_main:
            m = self.metric
            best_key = f"test_{m[: -len('_ema')] if self.select_ema else m}_best"
            log.info(f"done in {format_duration(out['wall_s'])}: test {m} {out[f'test_{m}_last']:.4f} (last), "
                     f"{out.get(best_key, math.nan):.4f} (best val @ {self.best['step']})")
        return out


def snapshot_steps(snapshots: list[float], max_steps: int) -> set[int]:
    """``trainer.snapshots`` as steps: a value in (0, 1) is a fraction of ``max_steps`` (rounded), others are
    steps; those beyond the run are dropped."""
    steps = {round(v * max_steps) if v < 1 else int(v) for v in snapshots}
    return {s for s in steps if 1 <= s <= max_steps}


class _StopOnSignal:
    """Turns SIGINT/SIGTERM into a request honoured between steps (a second SIGINT stops at once); after
    the loop (``immediate``) a signal stops at once, leaving no summary half-written."""

    def __enter__(self) -> _StopOnSignal:
        self.requested = False
        self.immediate = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.immediate or (self.requested and signum == signal.SIGINT):
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Train one recipe; returns the summary (also written to ``<out_dir>/summary.json``). A finished run of
    the same recipe in ``out_dir`` is returned as it is, without loading data (``force`` trains it again)."""
    console_logging()
    if not force and cfg.resume and os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        summary = RunDir(cfg.out_dir).finished(cfg)
        if summary is not None:
            return summary
    return Trainer(cfg).fit(force)
