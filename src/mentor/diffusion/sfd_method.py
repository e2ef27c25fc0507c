"""SFD on the engine: the ``sfd`` method fine-tunes a copy of an ``edm`` run's denoiser without data.

Zhou, Chen et al., "Simple and Fast Distillation of Diffusion Models" (NeurIPS 2024); the loop as the official
code (``sfd-main/training/loss.py``, ``training_loop.py``) runs it. One SFD *iteration* draws a batch of noise,
runs the frozen teacher's solver (DPM-Solver++(3M) by default) on ``(M + 1)(N - 1) + 1`` timestamps of the
student's schedule and keeps every ``M + 1``-th point, then steps the student (a trainable copy of the teacher's
network) one Euler interval at a time from its own previous output (the chain detached between intervals), with
the L1 loss ``|x_student - x_teacher|`` summed over elements and divided by the batch size and one optimizer step
per interval. With AFS the first interval is the analytic step ``x / sqrt(1 + t**2)``: no network, no loss, no
optimizer step. An iteration is therefore ``K = N - 1`` (``N - 2`` with AFS) engine steps: engine step ``s``
trains interval ``s mod K`` of iteration ``s // K`` (:class:`StepPlan`; SFD-v draws ``N`` per iteration).

The published optimiser is the recipe's ``optim``/``schedule``: Adam (AdamW with ``weight_decay: 0``) at 5e-5,
betas (0.9, 0.999), the rate divided by ten at half the iterations (``schedule: {name: multistep, milestones:
[0.5], gamma: 0.1}``, at an iteration boundary when ``trainer.max_steps`` is a multiple of ``2K``).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import COUNT, MAX_BATCH, PATH, SEED, ConfigError, between, each, rules
from ..errors import CheckpointError, GraphCaptureError, SampleError, TeacherError
from ..methods.base import NO_DATA, BuildInfo, Method, MethodConfig, StepContext, register_method
from .amed import draw_noise, sampling_config, selected_weights, validation_batches
from .samplers import SAMPLERS, STOCHASTIC, nfe
from .schedules import SCHEDULES, get_schedule
from .sfd import SFDResult, StepConditioned, load_student, save_student, sfd_sample

#: The student file an ``sfd`` run writes at its end (:func:`~mentor.diffusion.sfd.save_student`'s format).
STUDENT_FILE = "student.pt"

NOT_CAPTURABLE = (
    "method sfd cannot run as a captured CUDA graph (trainer.cuda_graph): an SFD iteration is several optimizer "
    "steps that share one teacher trajectory, computed at the first of them, so what a step runs depends on its "
    "place in the iteration (and with method.step_counts the shapes change between iterations), while a captured "
    "graph replays the same work every step. Set trainer.cuda_graph=false")


class StepPlan:
    """Which iteration, step count ``N`` and interval each engine step trains: a pure function of the step.

    With one step count every iteration has ``K = N - 1 - afs`` steps. With several (SFD-v) the counts are drawn
    one per iteration, in order, from a CPU generator seeded by ``seed`` (or given as ``preset``), so a resumed run
    rebuilds the same plan without storing it.
    """

    def __init__(self, num_steps: int, afs: bool, counts: Sequence[int] | None = None, seed: int = 0,
                 preset: Sequence[int] | None = None):
        self.first = int(afs)
        self.num_steps = int(num_steps)
        self.counts = tuple(int(n) for n in counts) if counts else None
        for n in (*(self.counts or ()), self.num_steps):
            if self.intervals(n) < 1:
                raise ValueError(f"SFD with {n} timestamps{' and AFS' if afs else ''} trains no interval; "
                                 f"use at least {2 + self.first}")
        self._preset = list(preset) if preset is not None else None
        self._gen = torch.Generator().manual_seed(int(seed))
        self._n: list[int] = []
        self._starts: list[int] = [0]  # _starts[i]: the first step of iteration i (one more than _n)

    def intervals(self, n: int) -> int:
        """Trained intervals (optimizer steps) of an iteration with ``n`` timestamps."""
        return n - 1 - self.first

    def _extend(self) -> None:
        if self._preset is not None:
            if len(self._n) >= len(self._preset):
                raise IndexError(f"the step plan holds {len(self._preset)} iterations only")
            n = self._preset[len(self._n)]
        elif self.counts:
            n = self.counts[int(torch.randint(len(self.counts), (1,), generator=self._gen))]
        else:
            n = self.num_steps
        self._n.append(n)
        self._starts.append(self._starts[-1] + self.intervals(n))

    def start(self, iteration: int) -> int:
        """The first engine step of ``iteration`` (the total step count of the iterations before it)."""
        if not self.counts:
            return iteration * self.intervals(self.num_steps)
        while len(self._starts) <= iteration:
            self._extend()
        return self._starts[iteration]

    def locate(self, step: int) -> tuple[int, int, int]:
        """``(iteration, N, position)`` of engine step ``step``; position 0 starts the iteration."""
        if not self.counts:
            k = self.intervals(self.num_steps)
            return step // k, self.num_steps, step % k
        while self._starts[-1] <= step:
            self._extend()
        it = bisect.bisect_right(self._starts, step) - 1
        return it, self._n[it], step - self._starts[it]


@rules(teacher=PATH, num_steps=between(2, 1000), M=between(0, 1000), batch_size=between(1, MAX_BATCH),
       step_counts=each(between(2, 1000)), val_size=COUNT, val_seed=SEED, plan_seed=SEED)
@dataclass
class SFDConfig(MethodConfig):
    """``teacher``: an ``edm`` run directory (its selected weights, the EMA copy with ``teacher_ema``).
    ``num_steps``: the student's timestamps ``N`` (NFE ``N - 1``, one fewer with ``afs``); ``M``: teacher points
    between two of the student's; ``teacher_solver``/``teacher_opts``: the teacher's solver and its options
    (default DPM-Solver++(3M), ``{"max_order": 3}``); ``schedule``/``schedule_kw``: both grids' schedule
    (``sigma_min``/``sigma_max`` default to the teacher run's; the paper uses ``sigma_min: 0.006`` for EDM models).
    ``batch_size``: noise samples per iteration (128 in the paper). ``step_counts``: SFD-v, one student for several
    ``N`` drawn per iteration (seeded by ``plan_seed``), conditioned through
    :class:`~mentor.diffusion.sfd.StepConditioned` on ``step_modules`` (default: the second GroupNorm of every
    residual block of an ``edm_unet``). ``val_size``/``val_seed``: the fixed validation noise of ``score``."""

    teacher: str = ""
    teacher_ema: bool = True
    num_steps: int = 4
    M: int = 3
    teacher_solver: str = "dpm_solver_pp"
    teacher_opts: dict[str, Any] | None = None
    schedule: str = "polynomial"
    schedule_kw: dict[str, Any] = field(default_factory=dict)
    afs: bool = True
    batch_size: int = 128
    step_counts: list[int] | None = None
    step_modules: list[str] | None = None
    plan_seed: int = 0
    val_size: int = 256
    val_seed: int = 0


def _teacher_opts(cfg: SFDConfig) -> dict[str, Any]:
    if cfg.teacher_opts is None:
        return {"max_order": 3} if cfg.teacher_solver == "dpm_solver_pp" else {}
    return dict(cfg.teacher_opts)


def _config(cfg: SFDConfig, schedule_kw: dict[str, Any]) -> dict[str, Any]:
    """The sampling configuration a student file stores (the keys :func:`~mentor.diffusion.sfd.sfd_sample` reads)."""
    return sampling_config(solver="euler", num_steps=cfg.num_steps, schedule=cfg.schedule, schedule_kw=schedule_kw,
                           afs=cfg.afs, M=cfg.M, teacher=cfg.teacher_solver, teacher_opts=_teacher_opts(cfg),
                           step_counts=list(cfg.step_counts) if cfg.step_counts else None)


def _check_config(cfg: SFDConfig) -> None:
    from .sample import solver_options

    if cfg.teacher_solver not in SAMPLERS or cfg.teacher_solver in STOCHASTIC:
        known = ", ".join(k for k in SAMPLERS if k not in STOCHASTIC)
        raise ConfigError(f"method.teacher_solver={cfg.teacher_solver!r} is not an ODE solver; one of {known}")
    try:
        solver_options(cfg.teacher_solver, _teacher_opts(cfg))
    except SampleError as e:
        raise ConfigError(f"method.teacher_opts: {e}") from None
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"method.schedule={cfg.schedule!r} is unknown; one of {', '.join(SCHEDULES)}")
    least = 2 + int(cfg.afs)
    for n in (cfg.num_steps, *(cfg.step_counts or ())):
        if n < least:
            raise ConfigError(f"method.num_steps/step_counts: {n} timestamps{' with AFS' if cfg.afs else ''} leave no "
                              f"interval to train; use at least {least}")
    if cfg.step_counts and cfg.num_steps not in cfg.step_counts:
        raise ConfigError(f"method.num_steps={cfg.num_steps} must be one of method.step_counts={cfg.step_counts}: "
                          "it is the count the student file samples with by default and the one `rmse` is read at")


def _load_teacher(cfg: SFDConfig, device: str) -> tuple[nn.Module, dict[str, Any]]:
    from .edm import load_edm

    if not cfg.teacher:
        raise ConfigError("method.teacher is required for sfd: the run directory of a trained edm model, e.g. "
                          "method.teacher=runs/diffusion/digits_edm (train it with recipes/diffusion/digits_edm.yaml)")
    try:
        return load_edm(cfg.teacher, ema=cfg.teacher_ema, device=device)
    except CheckpointError as e:
        raise TeacherError(f"method.teacher={cfg.teacher}: {e}. SFD fine-tunes the denoiser of an edm run: point "
                           "method.teacher at one, e.g. runs/diffusion/digits_edm") from None


def _same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def default_step_modules(denoiser: nn.Module) -> list[str]:
    """The sub-modules SFD-v modulates by default: the second GroupNorm of every residual block of an
    ``edm_unet`` (where the block applies its noise-level scale/shift; the paper adds the step's there)."""
    from .unet import ResBlock

    return [f"{name}.norm2" for name, m in denoiser.named_modules() if isinstance(m, ResBlock)]


@register_method("sfd")
class SFD(Method):
    """SFD (Zhou, Chen et al., NeurIPS 2024): a trainable copy of an ``edm`` run's denoiser fine-tuned so that
    Euler on ``num_steps`` timestamps follows the teacher solver's trajectory (see the module docstring).

    Trains without data (``Inputs(data=False)``): shapes, classes and the sigma range come from the teacher run;
    a class-conditional teacher gets uniformly drawn labels. ``model.name``/``model.kwargs`` must build the
    teacher's network (they are what the run records); the student starts as a copy of the teacher's weights.
    The iteration's teacher points, the chain's current point (and labels) are trained state: a run stopped
    between two intervals resumes exactly. Under DDP each rank draws its own noise and keeps its own chain (these
    buffers are left out of DDP's broadcast); the checkpoint keeps rank 0's, so resume exactly at an iteration
    boundary there (``trainer.ckpt_every`` a multiple of the iteration's steps).

    Reports ``rmse``: the RMSE of the student's Euler sample (:func:`~mentor.diffusion.sfd.sfd_sample`) against
    the teacher solver's sample from a fixed noise batch (``val_size``, seeded by ``val_seed``; the same batch
    on every split, whose images are never read); SFD-v adds ``rmse_<N>`` for its other step counts. Lower is
    better; it picks ``best.pt``, whose weights the run's ``student.pt`` holds at its end.

    CUDA graph: not capturable (:data:`NOT_CAPTURABLE`): the first step of an iteration runs the teacher's whole
    solver and the others do not, and SFD-v changes shapes between iterations; a captured graph replays one
    fixed step. The eager step reads nothing back to the host except the solver's one check that the sigmas are
    positive per iteration (a step count passed to ``StepConditioned`` as an int is checked on the host).
    """

    Config = SFDConfig
    inputs = NO_DATA
    select = ("rmse", "min")
    classifier = False

    def __init__(self, cfg: SFDConfig, student: nn.Module, info: BuildInfo, *, teacher: Callable | None = None,
                 noise: Callable[[int], Tensor] | None = None, cond: Callable[[int], dict] | None = None,
                 val_batch: Callable[[], tuple[Tensor, dict]] | None = None, plan: StepPlan | None = None):
        """A recipe run passes ``cfg``, the zoo network and ``info``; :func:`~mentor.diffusion.sfd.sfd_distill`
        passes its own ``student`` (trained in place), ``teacher`` (any denoiser), ``noise(batch)``, ``cond(batch)``
        and ``val_batch() -> (noise, cond)``, and ``plan``."""
        _check_config(cfg)
        kw = dict(cfg.schedule_kw)
        shape: tuple[int, ...] | None = None
        self_teacher: nn.Module | None = None
        num_labels = 0
        teacher_info: dict[str, Any] = {}
        if teacher is None:  # a recipe run: the teacher from its run directory, the student a copy of it
            self_teacher, teacher_info = _load_teacher(cfg, info.device)
            inner = getattr(self_teacher, "net", self_teacher)
            if not _same_architecture(student, inner):
                _architecture_error(cfg, student)
            student = copy.deepcopy(self_teacher).requires_grad_(True)
            if cfg.step_counts:
                student = _step_conditioned(student, cfg)
            shape = tuple(teacher_info["image_shape"])
            kw = {"sigma_min": teacher_info["sigma_min"], "sigma_max": teacher_info["sigma_max"], **kw}
            num_labels = teacher_info["num_classes"] if teacher_info["conditional"] else 0
        try:
            get_schedule(cfg.schedule, cfg.num_steps, **kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method.schedule_kw={cfg.schedule_kw} does not suit schedule {cfg.schedule!r} (with the "
                              f"teacher's sigma range {kw}): {e}") from None
        super().__init__(cfg, student, info)
        if self_teacher is not None:
            self.add_teacher("teacher", self_teacher)
        else:
            self.__dict__["_teacher_fn"] = teacher  # the caller's denoiser: not a sub-module, never moved or frozen
        self.teacher_info = teacher_info
        self.schedule_kw = kw
        self.teacher_opts = _teacher_opts(cfg)
        self.counts = tuple(cfg.step_counts) if cfg.step_counts else None
        self.plan = plan or StepPlan(cfg.num_steps, cfg.afs, self.counts, cfg.plan_seed)
        self.num_labels = num_labels
        self._noise_fn, self._cond_fn, self._val_batch = noise, cond, val_batch
        self._cond: dict = {}
        self._cache: dict[Any, Any] = {}
        self.observer: Callable[[int, int, bool, Tensor], None] | None = None  # (iteration, position, last, loss)
        n_max = max(self.counts or (cfg.num_steps,))
        b = cfg.batch_size
        # the iteration's teacher points on the student grid and the chain's current point: trained state
        self.register_buffer("points", torch.zeros(n_max, b, *(shape or ())))
        self.register_buffer("x", torch.zeros(b, *(shape or ())))
        if num_labels:
            self.register_buffer("labels", torch.zeros(b, dtype=torch.long))

    # -- pieces ------------------------------------------------------------------------------------
    def denoise_teacher(self) -> Callable:
        """The frozen teacher denoiser."""
        return self.teacher if "teacher" in self._modules else self.__dict__["_teacher_fn"]

    def sampling_config(self) -> dict[str, Any]:
        """The student's sampling configuration (what :func:`~mentor.diffusion.sfd.save_student` stores)."""
        return _config(self.cfg, self.schedule_kw)

    def draw(self, batch: int) -> Tensor:
        """Unscaled latents of one iteration (from the run's random stream, or the caller's ``noise``)."""
        if self._noise_fn is not None:
            return self._noise_fn(batch)
        return torch.randn((batch, *self.x.shape[1:]), device=self.x.device, dtype=self.x.dtype)

    def _sigmas(self, n: int, like: Tensor) -> Tensor:
        key = ("student", n, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = get_schedule(self.cfg.schedule, n, **self.schedule_kw).to(like)
        return self._cache[key]

    def _fine(self, n: int) -> Tensor:
        key = ("teacher", n)
        if key not in self._cache:
            self._cache[key] = get_schedule(self.cfg.schedule, (self.cfg.M + 1) * (n - 1) + 1, **self.schedule_kw)
        return self._cache[key]

    def _teacher_sample(self, z: Tensor, n: int, cond: dict, trajectory: bool) -> Any:
        fine = self._fine(n)
        return SAMPLERS[self.cfg.teacher_solver](self.denoise_teacher(), z * fine[0].to(z), fine, afs=False,
                                                 return_trajectory=trajectory, cond=cond, **self.teacher_opts)

    def _begin(self, n: int) -> None:
        """Start an iteration: noise (and labels), the teacher's trajectory sliced onto the student's grid, and the
        chain's first point (after the analytic first step with AFS)."""
        b = self.cfg.batch_size
        z = self.draw(b)
        if self._cond_fn is not None:
            self._cond = self._cond_fn(z.shape[0])
        elif self.num_labels:
            self.labels.copy_(torch.randint(self.num_labels, (b,), device=self.labels.device))
        cond = self.cond()
        with torch.no_grad():
            targets = self._teacher_sample(z, n, cond, True).points[:: self.cfg.M + 1]
            if self.points.shape[1:] != targets.shape[1:] or self.points.dtype != targets.dtype:
                self.points = targets.new_zeros((self.points.shape[0], *targets.shape[1:]))  # a caller's own shape
                self.x = targets.new_zeros(targets.shape[1:])
            self.points[:n].copy_(targets)
            x = targets[0]
            if self.cfg.afs:
                sig = self._sigmas(n, x)
                x = x + (sig[1] - sig[0]) * x / torch.sqrt(1 + sig[0] ** 2)
            self.x.copy_(x)

    def cond(self) -> dict:
        """The conditioning of the current iteration (class labels of a conditional teacher)."""
        if self._cond_fn is not None:
            return self._cond
        return {"class_labels": self.labels} if self.num_labels else {}

    # -- the contract ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if isinstance(ctx.step, Tensor):
            raise GraphCaptureError(NOT_CAPTURABLE)
        it, n, pos = self.plan.locate(ctx.step)
        if pos == 0:
            self._begin(n)
        i = pos + self.plan.first
        sig = self._sigmas(n, self.x)
        cond = self.cond()
        student_cond = dict(cond, num_steps=n) if self.counts else cond
        t_cur, t_next = sig[i], sig[i + 1]
        x = self.x.clone()  # the buffer takes this step's output before the backward pass
        out = x + (t_next - t_cur) * (x - self.student(x, t_cur, **student_cond)) / t_cur
        loss = (out - self.points[i + 1]).abs().sum() / x.shape[0]
        with torch.no_grad():
            self.x.copy_(out)
        if self.observer is not None:
            self.observer(it, pos, pos == self.plan.intervals(n) - 1, loss.detach())
        return {"loss": loss}

    def rank_synced_buffers(self) -> list[str]:
        # Each rank's own trajectory and chain: listed so that DDP's per-forward broadcast leaves them alone.
        own = [name for name in ("points", "x", "labels") if name in self._buffers]
        return sorted({*super().rank_synced_buffers(), *own})

    @torch.no_grad()
    def score(self, net: nn.Module, split, ev) -> dict[str, float]:
        cfg = self.cfg
        autocast = ev.autocast or contextlib.nullcontext
        out: dict[str, float] = {}
        counts = [cfg.num_steps] + [n for n in (self.counts or ()) if n != cfg.num_steps]
        for n in counts:
            total, count = 0.0, 0
            for z, cond, ref in self._references(n, ev.device, autocast):
                with autocast():
                    got = sfd_sample(net, z, self.sampling_config(), num_steps=n, cond=cond)
                total += float((got.double() - ref.double()).square().sum())
                count += ref.numel()
            out["rmse" if n == cfg.num_steps else f"rmse_{n}"] = math.sqrt(total / max(count, 1))
        return out

    def _references(self, n: int, device: torch.device, autocast) -> list[tuple[Tensor, dict, Tensor]]:
        """The validation noise in batches with its conditioning and the teacher's samples (computed once)."""
        key = ("val", n, str(device))
        if key in self._cache:
            return self._cache[key]
        parts = []
        for z, cond in validation_batches(self.cfg.val_size, self.cfg.val_seed, self.x.shape[1:], self.num_labels,
                                          self.cfg.batch_size, device, self._val_batch):
            with autocast():
                ref = self._teacher_sample(z, n, cond, False)
            parts.append((z, cond, ref))
        self._cache[key] = parts
        return parts

    def report(self) -> dict[str, Any]:
        return {"student_file": STUDENT_FILE, "nfe": nfe("euler", self.cfg.num_steps, afs=self.cfg.afs),
                "iterations": self.plan.locate(max(self.info.max_steps - 1, 0))[0] + 1}

    def finish(self, run_dir: Path) -> None:
        """Write ``student.pt`` (:func:`~mentor.diffusion.sfd.save_student`): the weights ``best.pt`` selected, or
        the last ones where no evaluation was finite."""
        save_student(Path(run_dir) / STUDENT_FILE, selected_weights(self.student, run_dir, "the SFD student"),
                     self.sampling_config())

    def warnings(self, max_steps: int, ema: float | None) -> list[str]:
        out = super().warnings(max_steps, ema)
        it, n, pos = self.plan.locate(max(max_steps - 1, 0))
        if pos != self.plan.intervals(n) - 1:
            out.append(f"trainer.max_steps={max_steps} ends inside SFD iteration {it} (its {pos + 1} of "
                       f"{self.plan.intervals(n)} intervals): set it to a multiple of {self.plan.intervals(n)} steps "
                       "(an iteration is one optimizer step per trained interval)")
        return out

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        raise NotImplementedError("sfd: the deployable is a denoiser D(x, sigma); sample with "
                                  "mentor.diffusion.sfd.sfd_sample and the run's student.pt (load_sfd)")


def _architecture_error(cfg: SFDConfig, student: nn.Module) -> None:
    import json

    from ..engine import checkpoint as ckpt

    _, run, _ = ckpt.run_info(cfg.teacher, "method.teacher")
    raise ConfigError(f"method sfd fine-tunes a copy of the teacher's network, but model.name/model.kwargs build "
                      f"another {type(student).__name__}: set model: {{name: {run.get('model')}, kwargs: "
                      f"{json.dumps(run.get('kwargs', {}))}}} as the teacher run {cfg.teacher} has it")


def _step_conditioned(student: nn.Module, cfg: SFDConfig) -> StepConditioned:
    modules = list(cfg.step_modules) if cfg.step_modules else default_step_modules(student)
    if not modules:
        raise ConfigError(f"method.step_counts needs method.step_modules: the sub-modules of the "
                          f"{type(student).__name__} denoiser whose outputs the step count scales and shifts (names "
                          "as in named_modules(), e.g. net.down.0.norm2)")
    try:
        return StepConditioned(student, modules, cfg.step_counts)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"method.step_modules: {e}") from None


# --------------------------------------------------------------------------------------------------
# trained students


def load_sfd(run_dir: str | os.PathLike, device: str = "auto") -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The student of an ``sfd`` run (``student.pt`` read with :func:`~mentor.diffusion.sfd.load_student`, else
    the selected weights of ``best.pt``), its sampling configuration and the teacher run's information
    (``image_shape``, ``num_classes``, ``conditional``, ...). Sample with
    ``sfd_sample(student, noise, config)``."""
    from ..engine.run import load_run

    cfg, method, _, file, _ = load_run(run_dir, device=device)
    if not isinstance(method, SFD):
        raise CheckpointError(f"{file} was trained with method {cfg.method.name!r}, not 'sfd'")
    student = method.deployable()
    config = method.sampling_config()
    path = Path(file).parent / STUDENT_FILE
    if path.exists():
        config = load_student(path, student, map_location=next(student.parameters()).device)
    student.eval().requires_grad_(False)
    return student, config, dict(method.teacher_info)


# --------------------------------------------------------------------------------------------------
# the Python API: sfd_distill runs this method on the engine


def distill(student: nn.Module, teacher: Callable, noise: Callable[..., Tensor] | Sequence[int], *, num_steps: int,
            M: int, teacher_solver: str, teacher_opts: dict | None, schedule: str, schedule_kw: dict | None,
            afs: bool, iterations: int, batch: int, lr: float, betas: tuple[float, float], lr_drop_at: float,
            step_counts: Sequence[int] | None, cond: Callable | None, generator: torch.Generator | None,
            dtype: torch.dtype, device: torch.device | str | None, callback: Callable[[int, float], None] | None,
            seed: int = 0, val_size: int | None = None, out_dir: str | os.PathLike | None = None) -> SFDResult:
    """:func:`~mentor.diffusion.sfd.sfd_distill`: build the ``sfd`` method around in-memory networks and train it
    with the engine (one run in ``out_dir``, a temporary directory by default)."""
    from ..config import OptimConfig, RunConfig, ScheduleConfig, TrainerConfig
    from ..data.readers import ArrayDataset
    from ..engine.inputs import Splits
    from ..engine.trainer import Trainer

    counts = [int(n) for n in step_counts] if step_counts else None
    hp = SFDConfig(name="sfd", num_steps=num_steps, M=M, teacher_solver=teacher_solver, teacher_opts=teacher_opts,
                   schedule=schedule, schedule_kw=dict(schedule_kw or {}), afs=afs, batch_size=batch,
                   step_counts=counts, val_size=val_size or batch)
    _check_config(hp)
    dev = torch.device(device) if device is not None else next(student.parameters()).device
    preset = [counts[int(torch.randint(len(counts), (1,), generator=generator))] for _ in range(iterations)] \
        if counts else None
    plan = StepPlan(num_steps, afs, counts, preset=preset)
    steps = plan.start(iterations)
    drop = math.ceil(lr_drop_at * iterations)  # the first iteration at the lower rate, as `it >= lr_drop_at * its`
    if steps == 0:
        return SFDResult(losses=[], config=_config(hp, hp.schedule_kw))

    def val_batch() -> tuple[Tensor, dict]:  # the same noise for every step count scored
        g = torch.Generator(device=generator.device if generator is not None else dev).manual_seed(hp.val_seed)
        z = draw_noise(noise, hp.val_size, g, dtype, dev)
        return z, (cond(z.shape[0], g) if cond is not None else {})

    method = SFD(hp, student, BuildInfo(max_steps=steps, device=str(dev)), teacher=teacher,
                 noise=lambda b: draw_noise(noise, b, generator, dtype, dev),
                 cond=(lambda b: cond(b, generator)) if cond is not None else None, val_batch=val_batch, plan=plan)
    losses: list[float] = []
    running = [0.0]

    def observe(it: int, pos: int, last: bool, loss: Tensor) -> None:
        running[0] += float(loss)
        if last:
            losses.append(running[0])
            if callback is not None:
                callback(it, running[0])
            running[0] = 0.0

    method.observer = observe
    one = ArrayDataset(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), 1, "noise",
                       mean=(0.0,), std=(1.0,))
    splits = Splits(train=None, val=one, test=one, train_index=torch.arange(0))
    with contextlib.ExitStack() as stack:
        out = Path(out_dir) if out_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="mentor-sfd-")))
        cfg = RunConfig(method=hp, optim=OptimConfig(name="adamw", lr=lr, betas=tuple(betas), weight_decay=0.0),
                        schedule=ScheduleConfig(name="multistep", milestones=[plan.start(drop)] if drop < iterations
                                                else [], gamma=0.1),
                        trainer=TrainerConfig(max_steps=steps, eval_every=steps, ckpt_every=steps, log_every=steps,
                                              seed=seed, device=str(dev), precision="fp32", progress=False),
                        out_dir=str(out), resume=False)
        cfg.model.name = type(student).__name__
        cfg.data.name, cfg.data.batch_size = "noise", batch  # what the run header reports
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the engine seeds torch's generators: leave the caller's be
            summary = Trainer(cfg, splits, method=method).fit(force=True)
    return SFDResult(losses=losses, config=method.sampling_config(), summary=summary)
