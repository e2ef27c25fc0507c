"""AMED on the engine: the ``amed`` method trains an AMED predictor for an ``edm`` run's denoiser, without data.

Zhou, Chen et al., "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps" (CVPR 2024); the loop as the
official code (``amed-solver-main/training/loss.py``, ``training_loop.py``) runs it. One AMED *iteration* draws
a batch of noise, runs the frozen teacher's solver (Heun by default) on ``(M + 1)(N - 1) + 1`` timestamps of the
student's schedule and keeps every ``M + 1``-th point, then steps the student (the teacher denoiser with the
predictor's intermediate times: AMED-Solver, or AMED-Plugin on iPNDM, DPM-Solver++ or Euler) one interval at a
time, with the loss ``(x_student - x_teacher)^2`` summed over elements and divided by the batch size and one
optimizer step per interval (gradients passed through ``nan_to_num(nan=0, posinf=1e5, neginf=-1e5)``). Single-step
students (AMED-Solver, the Euler plugin) restart each interval from the teacher's point; multistep ones continue
from their own output and history, detached. An iteration is ``N - 1`` engine steps: engine step ``s`` trains
interval ``s mod (N - 1)``.

The student's steps are the solvers of :mod:`mentor.diffusion.samplers` with the predictor's per-step data
(:func:`~mentor.diffusion.amed.amed_intermediate`), one interval per call, the multistep history carried in a
:class:`~mentor.diffusion.samplers.History`. The published optimiser is the recipe's ``optim``: Adam (AdamW with
``weight_decay: 0``) at 5e-3, betas (0.9, 0.999), constant.

The model is the predictor: ``model: {name: amed_predictor, kwargs: {scale_dir: 0.01, scale_time: 0.0}}``
(:class:`~mentor.diffusion.amed.AMEDPredictor`'s arguments). At its end a run writes ``amed.pt``
(:func:`~mentor.diffusion.amed.save_predictor`, the weights ``best.pt`` selected), which ``mentor sample
TEACHER_RUN --predictor RUN/amed.pt`` reads. :func:`~mentor.diffusion.amed.train_amed` is the Python form: it
builds this method around a denoiser held in memory and trains it with the engine.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import MAX_BATCH, PATH, SEED, ConfigError, between, rules
from ..errors import GraphCaptureError, MentorError, SampleError, TeacherError
from ..methods.base import NO_DATA, BuildInfo, Method, MethodConfig, StepContext, register_method
from ..models import register_model
from .amed import (
    PLUGIN_BASES,
    AMEDOutput,
    AMEDPredictor,
    AMEDTrainResult,
    FeatureHook,
    InputFeature,
    amed_intermediate,
    amed_solve,
    draw_noise,
    sampling_config,
    save_predictor,
    selected_weights,
    validation_batches,
)
from .samplers import SAMPLERS, STOCHASTIC, History, Intermediate, nfe
from .schedules import SCHEDULES, get_schedule

#: The predictor file an ``amed`` run writes at its end (:func:`~mentor.diffusion.amed.save_predictor`'s format).
PREDICTOR_FILE = "amed.pt"

NOT_CAPTURABLE = (
    "method amed cannot run as a captured CUDA graph (trainer.cuda_graph): an AMED iteration is several optimizer "
    "steps that share one teacher trajectory, computed at the first of them, and the steps differ by their place "
    "in the iteration (the analytic first step, the multistep history's length and order), while a captured graph "
    "replays the same work every step. Set trainer.cuda_graph=false")


@register_model("amed_predictor")
def amed_predictor(num_classes: int = 0, in_channels: int = 1, feature_dim: int = 64, hidden: int = 128,
                   bottleneck: int = 4, embed_dim: int = 8, scale_dir: float = 0.01,
                   scale_time: float = 0.0) -> AMEDPredictor:
    """The AMED predictor (:class:`~mentor.diffusion.amed.AMEDPredictor`, about 9 k parameters): the trainable part
    of method ``amed``. The data's class count and channels are not used (the predictor reads a pooled feature and
    two noise levels). Not a classifier."""
    return AMEDPredictor(feature_dim=feature_dim, hidden=hidden, bottleneck=bottleneck, embed_dim=embed_dim,
                         scale_dir=scale_dir, scale_time=scale_time)


@rules(teacher=PATH, num_steps=between(2, 1000), M=between(0, 1000), max_order=between(1, 4),
       batch_size=between(1, MAX_BATCH), feature_size=between(1, 64), val_size=between(1, 1 << 20), val_seed=SEED)
@dataclass
class AMEDConfig(MethodConfig):
    """``teacher``: an ``edm`` run directory (its selected weights, the EMA copy with ``teacher_ema``).
    ``solver``: ``amed`` (AMED-Solver) or the AMED-Plugin's base ``ipndm``, ``dpm_solver_pp``, ``euler``;
    ``max_order`` the base's (default 4 for iPNDM, 3 for DPM-Solver++). ``num_steps``: the student's timestamps
    ``N`` (NFE ``2(N - 1)``, one fewer with ``afs``); ``M``: teacher points between two of the student's;
    ``teacher_solver``/``teacher_opts``: the teacher's ODE solver and its options; ``schedule``/``schedule_kw``:
    both grids' schedule (``sigma_min``/``sigma_max`` default to the teacher run's). ``batch_size``: noise samples
    per iteration (64 in the official scripts for 32-pixel data). ``feature``: the sub-module of the teacher
    denoiser whose output feeds the predictor (the paper: the U-Net bottleneck, ``net.mid`` for ``edm_unet``),
    pooled to ``feature_size**2`` numbers; unset, the scaled sample itself (:class:`~mentor.diffusion.amed.
    InputFeature`). ``val_size``/``val_seed``: the fixed validation noise of ``score``. The defaults are the
    paper's AMED-Solver setting (N = 4, M = 1, Heun teacher, time-uniform schedule, AFS: NFE 5)."""

    teacher: str = ""
    teacher_ema: bool = True
    solver: Literal["amed", "ipndm", "dpm_solver_pp", "euler"] = "amed"
    max_order: int | None = None
    num_steps: int = 4
    M: int = 1
    teacher_solver: str = "heun"
    teacher_opts: dict[str, Any] = field(default_factory=dict)
    schedule: str = "time_uniform"
    schedule_kw: dict[str, Any] = field(default_factory=dict)
    afs: bool = True
    batch_size: int = 64
    feature: str | None = None
    feature_size: int = 8
    val_size: int = 256
    val_seed: int = 0


def _kind(cfg: AMEDConfig) -> str:
    return "solver" if cfg.solver == "amed" else cfg.solver


def _order(cfg: AMEDConfig) -> int | None:
    """The plugin base's order (None for the single-step students)."""
    if cfg.solver not in ("ipndm", "dpm_solver_pp"):
        return None
    return cfg.max_order or (3 if cfg.solver == "dpm_solver_pp" else 4)


def _check_config(cfg: AMEDConfig) -> None:
    from .sample import solver_options

    if cfg.solver != "amed" and cfg.solver not in PLUGIN_BASES:
        raise ConfigError(f"method.solver={cfg.solver!r}: one of amed, {', '.join(PLUGIN_BASES)}")
    if cfg.solver == "dpm_solver_pp" and cfg.max_order is not None and cfg.max_order > 3:
        raise ConfigError(f"method.max_order={cfg.max_order}: DPM-Solver++ goes up to order 3")
    if cfg.teacher_solver not in SAMPLERS or cfg.teacher_solver in STOCHASTIC:
        known = ", ".join(k for k in SAMPLERS if k not in STOCHASTIC)
        raise ConfigError(f"method.teacher_solver={cfg.teacher_solver!r} is not an ODE solver; one of {known}")
    try:
        solver_options(cfg.teacher_solver, cfg.teacher_opts)
        # the option values, on a throw-away problem (a bad order is refused here, not at the first step)
        SAMPLERS[cfg.teacher_solver](lambda x, s, **c: torch.zeros_like(x), torch.ones(1, 1), [1.0, 0.5],
                                     **cfg.teacher_opts)
    except (SampleError, TypeError, ValueError) as e:
        raise ConfigError(f"method.teacher_opts={cfg.teacher_opts}: {e}") from None
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"method.schedule={cfg.schedule!r} is unknown; one of {', '.join(SCHEDULES)}")


def _schedule(cfg: AMEDConfig, n: int, kw: dict[str, Any]) -> Tensor:
    try:
        sig = get_schedule(cfg.schedule, n, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method.schedule_kw={cfg.schedule_kw}: the {cfg.schedule} schedule refuses them ({e}); "
                          "it takes sigma_min, sigma_max (and rho for polynomial and time_uniform)") from None
    if not (bool(torch.isfinite(sig).all()) and bool((sig > 0).all()) and bool((sig[1:] < sig[:-1]).all())):
        raise ConfigError(f"method.schedule={cfg.schedule} with method.schedule_kw={cfg.schedule_kw} gives noise "
                          f"levels that are not positive and decreasing ({[round(float(v), 4) for v in sig[:4]]}, "
                          "...); check sigma_min < sigma_max and rho")
    return sig


def _load_teacher(cfg: AMEDConfig, device: str) -> tuple[nn.Module, dict[str, Any]]:
    from .edm import load_edm

    if not cfg.teacher:
        raise ConfigError("method.teacher is required for amed: the run directory of a trained edm model, e.g. "
                          "method.teacher=runs/diffusion/digits_edm (train it with recipes/diffusion/digits_edm.yaml)")
    try:
        return load_edm(cfg.teacher, ema=cfg.teacher_ema, device=device)
    except MentorError as e:  # not a run directory, no config.yaml, another method's run, ...
        raise TeacherError(f"method.teacher={cfg.teacher}: {e}. AMED trains a predictor for the denoiser of an edm "
                           "run: point method.teacher at one, e.g. runs/diffusion/digits_edm") from None


def _feature(cfg: AMEDConfig, teacher: nn.Module, sigma_data: float) -> InputFeature | FeatureHook:
    if cfg.feature is None:
        return InputFeature(cfg.feature_size, sigma_data)
    try:
        return FeatureHook(teacher, cfg.feature, cfg.feature_size)
    except KeyError as e:
        raise ConfigError(f"method.feature={cfg.feature!r}: {e.args[0]} (the paper reads the U-Net bottleneck: "
                          "net.mid for edm_unet), or leave it unset to read the sample itself") from None


@register_method("amed")
class AMED(Method):
    """AMED (Zhou, Chen et al., CVPR 2024): a predictor of each interval's intermediate time (and direction and
    time scales) for an ``edm`` run's denoiser, trained against a finer teacher solver (see the module docstring).

    Trains without data (``Inputs(data=False)``): shapes, classes and the sigma range come from the teacher run;
    a class-conditional teacher gets uniformly drawn labels. The student is the predictor (``model.name:
    amed_predictor``); the teacher denoiser is frozen and reloaded from its run on resume. The iteration's teacher
    points, the chain's current point and multistep history (and labels) are trained state: a run stopped between
    two intervals resumes exactly. Under DDP each rank draws its own noise and keeps its own chain (these buffers
    are left out of DDP's broadcast; gradients are averaged by DDP, each rank's passed through ``nan_to_num``
    first); the checkpoint keeps rank 0's, so resume exactly at an iteration boundary there (``trainer.ckpt_every``
    a multiple of ``N - 1``). bf16 autocast (the engine's) runs the teacher network in bf16; the solvers' arithmetic
    and the loss stay in fp32.

    Reports ``rmse``: the RMSE of the AMED sample (:func:`~mentor.diffusion.amed.amed_solve` over the student's
    ``N`` timestamps) against the teacher solver's sample on the fine grid, from a fixed noise batch (``val_size``,
    seeded by ``val_seed``; the same batch on every split, whose images are never read), and ``rmse_base``: the
    same solver with the geometric midpoint ``sqrt(t_cur t_next)`` and unit scales in place of the predictor
    (DPM-Solver-2 for AMED-Solver), the number AMED improves on. Lower is better; ``rmse`` picks ``best.pt``,
    whose weights the run's ``amed.pt`` holds at its end.

    CUDA graph: not capturable (:data:`NOT_CAPTURABLE`). The teacher's solver loop itself reads nothing back from
    the device (its fixed grid is given as a list and checked on the host; the updates are tensor arithmetic), so
    it would capture with its grid tensor made before the capture; what prevents it is the step structure: the
    teacher runs on the first step of an iteration only, and the steps differ by their interval (AFS on the first,
    the history's length and the DPM-Solver++ order after it), while a captured graph replays one fixed step.
    The eager step reads nothing back to the host (``tests/test_diffusion_amed_engine.py`` runs it under a
    tripwire for host reads).
    """

    Config = AMEDConfig
    inputs = NO_DATA
    select = ("rmse", "min")
    classifier = False

    def __init__(self, cfg: AMEDConfig, student: nn.Module, info: BuildInfo, *, teacher: Callable | None = None,
                 feature: InputFeature | FeatureHook | None = None, noise: Callable[[int], Tensor] | None = None,
                 cond: Callable[[int], dict] | None = None,
                 val_batch: Callable[[], tuple[Tensor, dict]] | None = None):
        """A recipe run passes ``cfg``, the zoo network (an ``amed_predictor``) and ``info``;
        :func:`~mentor.diffusion.amed.train_amed` passes its own predictor (trained in place), ``teacher`` (any
        denoiser), ``feature``, ``noise(batch)``, ``cond(batch)`` and ``val_batch() -> (noise, cond)``."""
        _check_config(cfg)
        kw = dict(cfg.schedule_kw)
        shape: tuple[int, ...] = ()
        own_teacher: nn.Module | None = None
        num_labels = 0
        teacher_info: dict[str, Any] = {}
        if teacher is None:  # a recipe run: the teacher from its run directory
            if not isinstance(student, AMEDPredictor):
                raise ConfigError(f"method amed trains an AMED predictor, and model.name builds a "
                                  f"{type(student).__name__}: set model.name=amed_predictor (its kwargs: scale_dir, "
                                  "scale_time, hidden, feature_dim)")
            own_teacher, teacher_info = _load_teacher(cfg, info.device)
            shape = tuple(teacher_info["image_shape"])
            kw = {"sigma_min": teacher_info["sigma_min"], "sigma_max": teacher_info["sigma_max"], **kw}
            num_labels = teacher_info["num_classes"] if teacher_info["conditional"] else 0
            feature = _feature(cfg, own_teacher, teacher_info["sigma_data"])
            if feature.dim != student.feature_dim:
                raise ConfigError(f"method.feature_size={cfg.feature_size} gives {feature.dim} numbers, and the "
                                  f"predictor reads {student.feature_dim}: set model.kwargs.feature_dim: {feature.dim}")
        super().__init__(cfg, student, info)
        if own_teacher is not None:
            self.add_teacher("teacher", own_teacher)
        else:
            self.__dict__["_teacher_fn"] = teacher  # the caller's denoiser: not a sub-module, never moved or frozen
        self.teacher_info = teacher_info
        self.feature = feature or InputFeature(cfg.feature_size)
        self.schedule_kw = kw
        self.kind, self.order = _kind(cfg), _order(cfg)
        self.intervals = cfg.num_steps - 1
        self.student_grid = [float(s) for s in _schedule(cfg, cfg.num_steps, kw)]
        self.teacher_grid = _schedule(cfg, (cfg.M + 1) * self.intervals + 1, kw)
        self.teacher_list = [float(s) for s in self.teacher_grid]  # a list: checked on the host, no device read
        self.num_labels = num_labels
        self._noise_fn, self._cond_fn, self._val_batch = noise, cond, val_batch
        self._cond: dict = {}
        self._cache: dict[Any, Any] = {}
        self.observer: Callable[[int, int, Tensor], None] | None = None  # (iteration, interval, loss)
        b = cfg.batch_size
        # the iteration's teacher points on the student grid (and a multistep student's chain: its point, history
        # and the history's lambda): trained state
        self.register_buffer("points", torch.zeros(cfg.num_steps, b, *shape))
        if self.order:
            self.register_buffer("x", torch.zeros(b, *shape))
            self.register_buffer("history", torch.zeros(self.order, b, *shape))
            if self.kind == "dpm_solver_pp":
                self.register_buffer("history_lams", torch.zeros(self.order, b))
        if num_labels:
            self.register_buffer("labels", torch.zeros(b, dtype=torch.long))
        # the official loop's gradient guard, applied to each parameter's gradient once it is accumulated
        self._grad_hooks = [p.register_post_accumulate_grad_hook(_finite_grad)
                            for p in student.parameters() if p.requires_grad]

    # -- pieces ------------------------------------------------------------------------------------
    @property
    def single_step(self) -> bool:
        """AMED-Solver and the Euler plugin restart every interval from the teacher's point."""
        return self.kind in ("solver", "euler")

    def denoiser(self) -> Callable:
        """The frozen teacher denoiser."""
        return self.teacher if "teacher" in self._modules else self.__dict__["_teacher_fn"]

    def sampling_config(self) -> dict[str, Any]:
        """The sampling configuration :func:`~mentor.diffusion.amed.save_predictor` stores with the weights."""
        cfg, pred = self.cfg, self.student
        return sampling_config(
            solver="amed_solver" if self.kind == "solver" else "amed_plugin", num_steps=cfg.num_steps,
            schedule=cfg.schedule, schedule_kw=self.schedule_kw, afs=cfg.afs,
            base=None if self.kind == "solver" else self.kind, M=cfg.M, teacher=cfg.teacher_solver,
            max_order=self.order if self.kind != "solver" else None, scale_dir=getattr(pred, "scale_dir", None),
            scale_time=getattr(pred, "scale_time", None), feature=self.feature.describe())

    def remove_hooks(self) -> None:
        """Detach the gradient guard from the predictor's parameters (the Python API hands it back clean)."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []

    def draw(self, batch: int) -> Tensor:
        """Unscaled latents of one iteration (from the run's random stream, or the caller's ``noise``)."""
        if self._noise_fn is not None:
            return self._noise_fn(batch)
        return torch.randn(self.points.shape[1:], device=self.points.device, dtype=self.points.dtype)

    def cond(self) -> dict:
        """The conditioning of the current iteration (class labels of a conditional teacher)."""
        if self._cond_fn is not None:
            return self._cond
        return {"class_labels": self.labels} if self.num_labels else {}

    def teacher_sample(self, z: Tensor, cond: dict, trajectory: bool) -> Any:
        """The teacher's solver on the fine grid from unscaled latents ``z``."""
        return SAMPLERS[self.cfg.teacher_solver](self.denoiser(), z * self.teacher_grid[0].to(z),
                                                 self.teacher_list, afs=False, return_trajectory=trajectory,
                                                 cond=cond, **self.cfg.teacher_opts)

    def _begin(self) -> None:
        """Start an iteration: noise (and labels) and the teacher's trajectory sliced onto the student's grid."""
        z = self.draw(self.cfg.batch_size)
        if self._cond_fn is not None:
            self._cond = self._cond_fn(z.shape[0])
        elif self.num_labels:
            self.labels = torch.randint(self.num_labels, self.labels.shape, device=self.labels.device)
        with torch.no_grad():
            self.points = self.teacher_sample(z, self.cond(), True).points[:: self.cfg.M + 1].contiguous()

    def _history(self, i: int) -> History | None:
        """The multistep history before interval ``i`` (the ``2i`` sub-steps so far, the newest ``order`` kept)."""
        if self.order is None:
            return None
        count = min(self.order, 2 * i)
        shape = (-1, *([1] * (self.points.ndim - 2)))
        lams = [self.history_lams[k].reshape(shape) for k in range(count)] if self.kind == "dpm_solver_pp" else []
        return History(values=[self.history[k] for k in range(count)], lams=lams, done=2 * i,
                       total=2 * self.intervals)

    def _keep(self, out: Tensor, history: History | None) -> None:
        """The chain's point and history after an interval, detached, as trained state."""
        if history is None:
            return
        self.x = out.detach()
        pad = [torch.zeros_like(out)] * (self.order - len(history.values))
        self.history = torch.stack([v.detach() for v in history.values] + pad)
        if self.kind == "dpm_solver_pp":
            b = out.shape[0]
            lams = [v.detach().reshape(-1).expand(b) for v in history.lams]
            self.history_lams = torch.stack(lams + [out.new_zeros(b)] * (self.order - len(lams)))

    def interval(self, predictor: Callable[..., AMEDOutput], x: Tensor, i: int, history: History | None,
                 cond: dict, record: list[AMEDOutput] | None = None) -> Tensor:
        """The student's interval ``i`` from ``x``: one call of its solver with the predictor's per-step data."""
        self.feature.clear()
        hook = amed_intermediate(predictor, self.feature, record)
        return amed_solve(self.denoiser(), x, self.student_grid[i:i + 2], hook, kind=self.kind, max_order=self.order,
                          afs=self.cfg.afs and i == 0, cond=cond, history=history)

    # -- the contract ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if isinstance(ctx.step, Tensor):
            raise GraphCaptureError(NOT_CAPTURABLE)
        it, i = divmod(int(ctx.step), self.intervals)
        if i == 0:
            self._begin()
        x = self.points[i] if self.single_step or i == 0 else self.x
        history = self._history(i)
        record: list[AMEDOutput] = []
        out = self.interval(self.student, x, i, history, self.cond(), record)
        loss = (out - self.points[i + 1]).square().sum() / out.shape[0]
        self._keep(out, history)
        if self.observer is not None:
            self.observer(it, i, loss.detach())
        return {"loss": loss, "r": record[0].r.detach().float().mean()}

    def rank_synced_buffers(self) -> list[str]:
        # Each rank's own trajectory and chain: listed so that DDP's per-forward broadcast leaves them alone.
        return [n for n in ("points", "x", "history", "history_lams", "labels") if n in self._buffers]

    @torch.no_grad()
    def score(self, net: nn.Module, split, ev) -> dict[str, float]:
        autocast = ev.autocast or contextlib.nullcontext
        total, total_base, count = 0.0, 0.0, 0
        for z, cond, ref, base in self._references(ev.device, autocast):
            with autocast():
                got = self.sample(net, z, cond)
            total += float((got.double() - ref.double()).square().sum())
            total_base += float((base.double() - ref.double()).square().sum())
            count += ref.numel()
        return {"rmse": math.sqrt(total / max(count, 1)), "rmse_base": math.sqrt(total_base / max(count, 1))}

    def sample(self, predictor: Callable[..., AMEDOutput] | None, z: Tensor, cond: dict) -> Tensor:
        """The student's sample from unscaled latents ``z`` over all intervals; ``predictor=None`` takes the
        geometric midpoint with unit scales (the base solver)."""
        self.feature.clear()
        hook = amed_intermediate(predictor, self.feature) if predictor is not None else _geometric_midpoint
        x = z * torch.tensor(self.student_grid[0], dtype=z.dtype, device=z.device)
        return amed_solve(self.denoiser(), x, self.student_grid, hook, kind=self.kind, max_order=self.order,
                          afs=self.cfg.afs, cond=cond)

    def _references(self, device: torch.device, autocast) -> list[tuple[Tensor, dict, Tensor, Tensor]]:
        """The validation noise in batches with its conditioning, the teacher's samples and the base solver's
        (computed once)."""
        key = ("val", str(device))
        if key in self._cache:
            return self._cache[key]
        parts = []
        for z, cond in validation_batches(self.cfg.val_size, self.cfg.val_seed, self.points.shape[2:],
                                          self.num_labels, self.cfg.batch_size, device, self._val_batch):
            with autocast():
                ref = self.teacher_sample(z, cond, False)
                base = self.sample(None, z, cond)
            parts.append((z, cond, ref, base))
        self._cache[key] = parts
        return parts

    def report(self) -> dict[str, Any]:
        teacher_steps = (self.cfg.M + 1) * self.intervals + 1
        return {"predictor_file": PREDICTOR_FILE, "nfe": 2 * self.intervals - int(self.cfg.afs),
                "teacher_nfe": nfe(self.cfg.teacher_solver, teacher_steps),
                "iterations": -(-self.info.max_steps // self.intervals)}

    def finish(self, run_dir: Path) -> None:
        """Write ``amed.pt`` (:func:`~mentor.diffusion.amed.save_predictor`): the weights ``best.pt`` selected, or
        the last ones where no evaluation was finite."""
        save_predictor(Path(run_dir) / PREDICTOR_FILE, selected_weights(self.student, run_dir, "the AMED predictor"),
                       self.sampling_config())

    def warnings(self, max_steps: int, ema: float | None) -> list[str]:
        out = super().warnings(max_steps, ema)
        if max_steps % self.intervals:
            out.append(f"trainer.max_steps={max_steps} ends inside an AMED iteration: set it to a multiple of "
                       f"{self.intervals} steps (an iteration is one optimizer step per interval of the "
                       f"{self.cfg.num_steps} timestamps)")
        return out

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        raise NotImplementedError("amed: the deployable is an AMED predictor; sample with mentor.diffusion.amed_sample "
                                  "and the run's amed.pt (`mentor sample TEACHER_RUN --predictor RUN/amed.pt`)")


def _finite_grad(p: Tensor) -> None:
    torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)


def _geometric_midpoint(info: dict) -> Intermediate:
    return Intermediate((info["sigma"] * info["sigma_next"]).sqrt())


# --------------------------------------------------------------------------------------------------
# the Python API: train_amed runs this method on the engine


def train(denoiser: Callable, predictor: nn.Module, noise: Callable[..., Tensor] | Sequence[int], *, num_steps: int,
          M: int, solver: str, max_order: int | None, teacher: str, teacher_opts: dict | None, schedule: str,
          schedule_kw: dict | None, afs: bool, iterations: int, batch: int, lr: float, betas: tuple[float, float],
          feature: InputFeature | FeatureHook | None, cond: Callable | None, generator: torch.Generator | None,
          dtype: torch.dtype, device: torch.device | str | None, callback: Callable[[int, float], None] | None,
          seed: int = 0, val_size: int | None = None, out_dir: str | os.PathLike | None = None) -> AMEDTrainResult:
    """:func:`~mentor.diffusion.amed.train_amed`: build the ``amed`` method around an in-memory denoiser and
    predictor and train it with the engine (one run in ``out_dir``, a temporary directory by default)."""
    from ..config import OptimConfig, RunConfig, ScheduleConfig, TrainerConfig
    from ..data.readers import ArrayDataset
    from ..engine.inputs import Splits
    from ..engine.trainer import Trainer

    hp = AMEDConfig(name="amed", solver=solver, max_order=max_order, num_steps=num_steps, M=M, teacher_solver=teacher,
                    teacher_opts=dict(teacher_opts or {}), schedule=schedule, schedule_kw=dict(schedule_kw or {}),
                    afs=afs, batch_size=batch, val_size=val_size or batch)
    try:
        _check_config(hp)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    dev = torch.device(device) if device is not None else next(predictor.parameters()).device
    steps = iterations * (num_steps - 1)
    feature = feature or InputFeature()

    def val_batch() -> tuple[Tensor, dict]:
        g = torch.Generator(device=generator.device if generator is not None else dev).manual_seed(hp.val_seed)
        z = draw_noise(noise, hp.val_size, g, dtype, dev)
        return z, (cond(z.shape[0], g) if cond is not None else {})

    method = AMED(hp, predictor, BuildInfo(max_steps=steps, device=str(dev)), teacher=denoiser, feature=feature,
                  noise=lambda b: draw_noise(noise, b, generator, dtype, dev),
                  cond=(lambda b: cond(b, generator)) if cond is not None else None, val_batch=val_batch)
    if steps == 0:
        method.remove_hooks()
        return AMEDTrainResult(losses=[], config=method.sampling_config())
    losses: list[float] = []
    running = [0.0]

    def observe(it: int, i: int, loss: Tensor) -> None:
        running[0] += float(loss)
        if i == method.intervals - 1:
            losses.append(running[0])
            if callback is not None:
                callback(it, running[0])
            running[0] = 0.0

    method.observer = observe
    one = ArrayDataset(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), 1, "noise",
                       mean=(0.0,), std=(1.0,))
    splits = Splits(train=None, val=one, test=one, train_index=torch.arange(0))
    try:
        with contextlib.ExitStack() as stack:
            out = Path(out_dir) if out_dir is not None else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="mentor-amed-")))
            cfg = RunConfig(method=hp, optim=OptimConfig(name="adamw", lr=lr, betas=tuple(betas), weight_decay=0.0),
                            schedule=ScheduleConfig(name="constant"),
                            trainer=TrainerConfig(max_steps=steps, eval_every=steps, ckpt_every=steps,
                                                  log_every=steps, seed=seed, device=str(dev), precision="fp32",
                                                  progress=False, ema=None),
                            out_dir=str(out), resume=False)
            cfg.model.name = "amed_predictor"
            cfg.data.name, cfg.data.batch_size = "noise", batch  # what the run header reports
            devices = [dev.index or 0] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the engine seeds torch's generators: leave the caller's be
                summary = Trainer(cfg, splits, method=method).fit(force=True)
    finally:
        method.remove_hooks()
    predictor.eval()
    return AMEDTrainResult(losses=losses, config=method.sampling_config(), summary=summary)
