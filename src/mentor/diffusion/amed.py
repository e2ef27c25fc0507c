"""AMED: a small learned predictor of intermediate times for few-step diffusion sampling.

Implements "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps" (Zhou, Chen et al., CVPR 2024).
Each sampling interval ``[t_cur, t_next]`` gets a learned intermediate time
``t_mid = t_next**r * t_cur**(1 - r)`` (``r`` in (0, 1)) and, optionally, a direction scale ``c`` and a time
scale ``a`` in ``[1 - s, 1 + s]``, all predicted per sample by :class:`AMEDPredictor` from the two times and
a small feature of the current evaluation.

- :func:`amed_solver` (AMED-Solver): ``x_mid = x + (t_mid - t_cur) d(x, t_cur)``, then
  ``x_next = x + c (t_next - t_cur) d_mid`` with ``d_mid = (x_mid - D(x_mid, a t_mid)) / t_mid``: a
  learned-midpoint step that approximates the mean direction over the interval (2 NFE per interval).
- :func:`amed_plugin` (AMED-Plugin): the base solver (iPNDM, DPM-Solver++ or Euler) takes two sub-steps per
  interval, ``t_cur -> t_mid`` and ``t_mid -> t_next``; the second evaluates the denoiser at ``a t_mid`` and
  its increment is multiplied by ``c``. Both evaluations enter the multistep history. As in the reference
  implementation, iPNDM keeps its *fixed-step* Adams-Bashforth coefficients although the sub-steps are
  uneven; DPM-Solver++ uses its usual variable-step multistep formulas in ``lambda = -log sigma`` with
  ``c`` scaling the data-prediction term, and the "lower order final" rule over the ``2(N-1)`` sub-steps;
  its 3M form is the published one by default, as in the reference implementation.

Both are the solvers of :mod:`mentor.diffusion.samplers` (:func:`~mentor.diffusion.samplers.dpm_solver_2`'s
midpoint rule, :func:`~mentor.diffusion.samplers.ipndm`, :func:`~mentor.diffusion.samplers.dpm_solver_pp`,
:func:`~mentor.diffusion.samplers.euler`) with the predictor's decisions as per-step data
(:func:`amed_intermediate`, an :class:`~mentor.diffusion.samplers.Intermediate` per step); this module has no
update rule of its own. One exception to the reference's orders: with a single interval (``N = 2``) and 3M,
DPM-Solver++'s last sub-step is first order here (the solvers' lower-order-final rule), second order there.

NFE: ``2(N - 1)`` for ``N`` timestamps, minus one with AFS (the analytic first step replaces the first
evaluation by ``d = x / sqrt(1 + t_cur**2)``).

Predictor features. In the paper the feature is the U-Net bottleneck of the evaluation at ``x_i``, averaged
over channels to ``8 x 8`` and taken by a forward hook (zeros on an AFS step, where nothing is evaluated);
:class:`FeatureHook` does that for any ``nn.Module`` denoiser by module name. Closed-form denoisers have no
hidden layer, so :class:`InputFeature` (the default) uses ``x`` itself, scaled by
``1 / sqrt(sigma**2 + sigma_data**2)`` and average-pooled to 64 numbers (channel mean and 8 x 8 adaptive
pooling for images; 1-D adaptive pooling of the flattened sample otherwise).

Training is the ``amed`` method on the engine (:mod:`mentor.diffusion.amed_method`; ``mentor train
recipes/diffusion/digits_amed.yaml``), and :func:`train_amed` its Python form: the teacher runs on
``(M + 1)(N - 1) + 1`` timestamps of the same schedule and its trajectory is sliced every ``M + 1`` points; the
student is stepped one interval at a time with an optimizer step after each (squared error summed over
elements, divided by the batch size). Single-step students (AMED-Solver, the Euler plugin) restart each
interval from the teacher's point (teacher forcing); multistep students continue from their own (detached)
output and history.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mentor.diffusion.samplers import (
    Callback,
    History,
    Intermediate,
    IntermediateFn,
    Trajectory,
    dpm_solver_2,
    dpm_solver_pp,
    euler,
    ipndm,
    third_order_weight,
)
from mentor.diffusion.schedules import get_schedule
from mentor.fileio import atomic_write

PLUGIN_BASES = ("ipndm", "dpm_solver_pp", "euler")

# --------------------------------------------------------------------------------------------------
# Features


class InputFeature:
    """Feature of the current sample for denoisers without hidden layers (closed-form oracles).

    ``x * c_in`` with ``c_in = 1 / sqrt(sigma**2 + sigma_data**2)`` (EDM's input scaling, so the feature
    stays O(1) at every noise level), pooled to ``size * size`` numbers: images ``(B, C, H, W)`` are
    averaged over channels and adaptively average-pooled to ``size x size``; anything else is flattened and
    adaptively pooled in 1-D (which repeats entries when the sample has fewer than ``size**2`` numbers).
    """

    def __init__(self, size: int = 8, sigma_data: float = 0.5):
        self.size = size
        self.sigma_data = sigma_data

    @property
    def dim(self) -> int:
        return self.size * self.size

    def clear(self) -> None:
        """Nothing is cached (present for the feature-source interface)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        scaled = x / torch.sqrt(torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2 + self.sigma_data**2)
        return _pool(scaled, self.size)

    def describe(self) -> dict[str, Any]:
        return {"kind": "input", "size": self.size, "sigma_data": self.sigma_data}


class FeatureHook:
    """The output of one named sub-module of a denoiser network, channel-averaged and pooled.

    Registers a forward hook on ``dict(net.named_modules())[name]`` (e.g. the 8x8 bottleneck block of an
    EDM U-Net); after each denoiser call, ``hook(x, sigma)`` returns the (detached) output of the last call,
    averaged over channels and pooled to ``size * size`` numbers as :class:`InputFeature` does. The sampler
    calls :meth:`clear` before a run and after each read; if no evaluation happened since (an AFS step), zeros
    are returned, as in the paper. Call :meth:`remove` (or use it as a context manager) when done.
    """

    def __init__(self, net: nn.Module, name: str, size: int = 8):
        modules = dict(net.named_modules())
        if name not in modules:
            known = [n for n in modules if n][:20]
            raise KeyError(f"FeatureHook: {type(net).__name__} has no sub-module {name!r}; some names: {known}")
        self.name = name
        self.size = size
        self.output: Tensor | None = None
        self._handle = modules[name].register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        self.output = (output[0] if isinstance(output, (tuple, list)) else output).detach()

    @property
    def dim(self) -> int:
        return self.size * self.size

    def clear(self) -> None:
        self.output = None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.output is None:
            return x.new_zeros(x.shape[0], self.dim)
        return _pool(self.output.to(x.dtype), self.size)

    def remove(self) -> None:
        self._handle.remove()
        self.output = None

    def __enter__(self) -> FeatureHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def describe(self) -> dict[str, Any]:
        return {"kind": "hook", "module": self.name, "size": self.size}


def _pool(t: Tensor, size: int) -> Tensor:
    if t.ndim == 4:
        return F.adaptive_avg_pool2d(t.mean(dim=1, keepdim=True), size).flatten(1)
    flat = t.reshape(t.shape[0], 1, -1)
    return F.adaptive_avg_pool1d(flat, size * size).flatten(1)


def feature_from_config(desc: dict[str, Any] | None, denoiser: Any = None) -> InputFeature | FeatureHook:
    """Rebuild the feature source a predictor was trained with from its description."""
    desc = desc or {"kind": "input"}
    if desc["kind"] == "input":
        return InputFeature(desc.get("size", 8), desc.get("sigma_data", 0.5))
    if desc["kind"] == "hook":
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"the predictor reads module {desc['module']!r} of the denoiser; pass an nn.Module")
        return FeatureHook(denoiser, desc["module"], desc.get("size", 8))
    raise ValueError(f"unknown AMED feature kind {desc['kind']!r}")


# --------------------------------------------------------------------------------------------------
# Predictor


def positional_embedding(t: Tensor, channels: int = 8, max_positions: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` (any shape -> ``(numel, channels)``), sine half first.

    Frequencies ``(1 / max_positions) ** (k / (channels/2 - 1))`` for ``k = 0 .. channels/2 - 1`` (the
    "endpoint" spacing, so the lowest frequency is exactly ``1 / max_positions``).
    """
    half = channels // 2
    k = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = (1.0 / max_positions) ** (k / max(half - 1, 1))
    arg = t.reshape(-1, 1) * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=1)


# The functional form keeps the field types as objects (this module's annotations are strings), so
# documentation tools resolve them.
AMEDOutput = NamedTuple("AMEDOutput", [("r", Tensor), ("scale_dir", Tensor), ("scale_time", Tensor)])  # noqa: UP014
AMEDOutput.__doc__ = "Per-sample predictions, each of shape ``(B,)``: ``r`` in (0, 1) and the two scales (1 when off)."


class AMEDPredictor(nn.Module):
    """The AMED predictor: times and a pooled feature -> ``r`` (and optional scales), about 9 k parameters.

    Both times are embedded (:func:`positional_embedding`, 8 channels) and passed through one shared
    ``Linear(8, 8)`` + SiLU; the feature (``feature_dim`` numbers, 64 = 8 x 8 by default) goes through
    ``Linear(feature_dim, hidden)`` + SiLU + ``Linear(hidden, 4)``; the concatenation (20 numbers) feeds
    ``fc_r`` (sigmoid -> ``r``) and, when ``scale_dir > 0`` / ``scale_time > 0``, heads mapped to
    ``[1 - s, 1 + s]`` by ``sigmoid * 2s + 1 - s``. Defaults follow the paper (scale_dir 0.01, no time
    scale). Linear weights are normal with std ``1/sqrt(fan_in)``, the shared time layer Xavier-uniform, biases zero.
    """

    def __init__(self, feature_dim: int = 64, hidden: int = 128, bottleneck: int = 4, embed_dim: int = 8,
                 scale_dir: float = 0.01, scale_time: float = 0.0):
        super().__init__()
        self.feature_dim, self.hidden, self.bottleneck, self.embed_dim = feature_dim, hidden, bottleneck, embed_dim
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        self.map_time = nn.Linear(embed_dim, embed_dim)
        self.enc0 = nn.Linear(feature_dim, hidden)
        self.enc1 = nn.Linear(hidden, bottleneck)
        width = 2 * embed_dim + bottleneck
        self.fc_r = nn.Linear(width, 1)
        self.fc_scale_dir = nn.Linear(width, 1) if self.scale_dir > 0 else None
        self.fc_scale_time = nn.Linear(width, 1) if self.scale_time > 0 else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if m is self.map_time:
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values), stored with the weights."""
        return dict(feature_dim=self.feature_dim, hidden=self.hidden, bottleneck=self.bottleneck,
                    embed_dim=self.embed_dim, scale_dir=self.scale_dir, scale_time=self.scale_time)

    def _embed(self, t: Tensor, batch: int) -> Tensor:
        e = positional_embedding(t.reshape(-1).to(self.fc_r.weight.dtype), self.embed_dim)
        e = F.silu(self.map_time(e))
        return e.expand(batch, -1) if e.shape[0] == 1 else e

    def forward(self, feature: Tensor, t_cur: Tensor | float, t_next: Tensor | float) -> AMEDOutput:
        dtype = self.fc_r.weight.dtype
        feature = feature.to(dtype).reshape(feature.shape[0], -1)
        b = feature.shape[0]
        t_cur = torch.as_tensor(t_cur, dtype=dtype, device=feature.device)
        t_next = torch.as_tensor(t_next, dtype=dtype, device=feature.device)
        h = self.enc1(F.silu(self.enc0(feature)))
        z = torch.cat([h, self._embed(t_cur, b), self._embed(t_next, b)], dim=1)
        r = torch.sigmoid(self.fc_r(z)).squeeze(1)
        one = torch.ones_like(r)
        c = one if self.fc_scale_dir is None else self._scaled(self.fc_scale_dir(z), self.scale_dir)
        a = one if self.fc_scale_time is None else self._scaled(self.fc_scale_time(z), self.scale_time)
        return AMEDOutput(r, c, a)

    @staticmethod
    def _scaled(logit: Tensor, s: float) -> Tensor:
        return (torch.sigmoid(logit) * (2 * s) + (1 - s)).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Sampling: the predictor's decisions as per-step data for the solvers of mentor.diffusion.samplers


def amed_intermediate(predictor: Callable[..., AMEDOutput], feature: InputFeature | FeatureHook,
                      record: list[AMEDOutput] | None = None) -> IntermediateFn:
    """The per-step hook a solver calls (``intermediate=``, :class:`~mentor.diffusion.samplers.Intermediate`):
    the predictor's ``r``, ``scale_dir`` and ``scale_time`` for the step ``t_cur -> t_next`` from the feature of
    the step's first evaluation, as ``sigma = t_next**r * t_cur**(1 - r)`` and the two scales. The feature is
    cleared once read (zeros on an AFS step, where nothing was evaluated); ``record`` collects the outputs."""

    def decide(info: dict) -> Intermediate:
        x, t_cur, t_next = info["x"], info["sigma"], info["sigma_next"]
        out = predictor(feature(x, t_cur), t_cur, t_next)
        feature.clear()
        if record is not None:
            record.append(out)
        r = out.r.to(x.dtype)
        return Intermediate(t_next**r * t_cur ** (1 - r), out.scale_dir.to(x.dtype), out.scale_time.to(x.dtype))

    return decide


def amed_solve(denoiser: Callable, x: Tensor, sigmas: Tensor | Sequence[float], intermediate: IntermediateFn, *,
               kind: str = "solver", max_order: int | None = None, afs: bool = False, cond: dict | None = None,
               history: History | None = None, thresholding: bool = False, lower_order_final: bool = True,
               third_order: str = "published", return_trajectory: bool = False,
               callback: Callback | None = None) -> Tensor | Trajectory:
    """AMED-Solver (``kind="solver"``: :func:`~mentor.diffusion.samplers.dpm_solver_2`'s midpoint rule) or
    AMED-Plugin on ``kind`` (``"ipndm"``, ``"dpm_solver_pp"``, ``"euler"``) from ``x`` over ``sigmas``, with the
    per-step data of ``intermediate`` (:func:`amed_intermediate`). ``history`` carries a multistep plugin's
    history between calls of one interval each (training). ``max_order`` defaults to 4 for iPNDM, 3 for
    DPM-Solver++; ``thresholding``, ``lower_order_final`` and ``third_order`` apply to DPM-Solver++ only;
    ``callback`` is the solvers' (:data:`~mentor.diffusion.samplers.Callback`, once per interval)."""
    common = dict(afs=afs, cond=cond, return_trajectory=return_trajectory, intermediate=intermediate,
                  callback=callback)
    if kind == "solver":
        return dpm_solver_2(denoiser, x, sigmas, **common)
    if kind == "euler":
        return euler(denoiser, x, sigmas, **common)
    if kind == "ipndm":
        return ipndm(denoiser, x, sigmas, max_order=max_order or 4, history=history, **common)
    if kind == "dpm_solver_pp":
        return dpm_solver_pp(denoiser, x, sigmas, max_order=max_order or 3, history=history,
                             thresholding=thresholding, lower_order_final=lower_order_final, third_order=third_order,
                             **common)
    raise ValueError(f"AMED kind must be 'solver' or one of {PLUGIN_BASES}, got {kind!r}")


def amed_solver(denoiser: Callable, x: Tensor, sigmas: Tensor, predictor: AMEDPredictor, *, afs: bool = False,
                feature: InputFeature | FeatureHook | None = None, cond: dict | None = None,
                return_trajectory: bool = False, callback: Callback | None = None) -> Tensor | Trajectory:
    """AMED-Solver from ``x`` (already scaled by ``sigmas[0]``) over ``sigmas``; 2 NFE per interval.

    ``feature`` is the predictor's feature source (default :class:`InputFeature`); ``cond`` goes to the
    denoiser. Returns the final sample, or a :class:`Trajectory` with ``return_trajectory=True``. The steps are
    :func:`~mentor.diffusion.samplers.dpm_solver_2`'s with the predictor's per-step data; ``callback`` is
    called once per interval, as the solvers call it.
    """
    feature = feature or InputFeature()
    feature.clear()
    return amed_solve(denoiser, x, sigmas, amed_intermediate(predictor, feature), kind="solver", afs=afs, cond=cond,
                      return_trajectory=return_trajectory, callback=callback)


def amed_plugin(denoiser: Callable, x: Tensor, sigmas: Tensor, predictor: AMEDPredictor, *, base: str = "ipndm",
                max_order: int | None = None, afs: bool = False, feature: InputFeature | FeatureHook | None = None,
                cond: dict | None = None, thresholding: bool = False, lower_order_final: bool = True,
                third_order: str = "published", return_trajectory: bool = False,
                callback: Callback | None = None) -> Tensor | Trajectory:
    """AMED-Plugin on ``base`` (``"ipndm"``, ``"dpm_solver_pp"`` or ``"euler"``); 2 NFE per interval.

    ``max_order`` defaults to 4 for iPNDM and 3 for DPM-Solver++; ``thresholding`` (dynamic thresholding of
    the denoised outputs), ``lower_order_final`` and ``third_order`` (the 3M form, ``"published"`` or
    ``"taylor"``, as in :func:`~mentor.diffusion.samplers.dpm_solver_pp`) apply to DPM-Solver++ only. The steps
    are the base solver's (:func:`~mentor.diffusion.samplers.ipndm`, ...) with the predictor's per-step data;
    ``callback`` is called once per interval, as the solvers call it.
    """
    if base not in PLUGIN_BASES:
        raise ValueError(f"AMED-Plugin base must be one of {PLUGIN_BASES}, got {base!r}")
    third_order_weight(third_order, "amed_plugin")
    feature = feature or InputFeature()
    feature.clear()
    return amed_solve(denoiser, x, sigmas, amed_intermediate(predictor, feature), kind=base, max_order=max_order,
                      afs=afs, cond=cond, thresholding=thresholding, lower_order_final=lower_order_final,
                      third_order=third_order, return_trajectory=return_trajectory, callback=callback)


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class AMEDTrainResult:
    """Losses per iteration (summed over the intervals), the sampling configuration to store, and the engine run's
    ``summary.json`` (``val_rmse_last``: the AMED sample's error against the teacher solver's)."""

    losses: list[float]
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def draw_noise(noise: Callable[..., Tensor] | Sequence[int] | Tensor, batch: int, generator: torch.Generator | None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Unscaled Gaussian latents: ``noise(batch, generator)``, a per-sample shape, or a fixed tensor."""
    if isinstance(noise, Tensor):
        return noise
    if callable(noise):
        return noise(batch, generator)
    return torch.randn((batch, *tuple(int(s) for s in noise)), generator=generator, dtype=dtype, device=device)


def validation_batches(val_size: int, val_seed: int, shape: Sequence[int], num_labels: int, batch: int,
                       device: torch.device, val_batch: Callable[[], tuple[Tensor, dict]] | None = None
                       ) -> list[tuple[Tensor, dict]]:
    """The fixed validation noise of a sampler-distillation method (AMED, SFD) in batches of ``batch`` with its
    conditioning: ``val_size`` latents of ``shape`` from ``val_seed`` and, for a class-conditional teacher, labels
    cycling through the classes; or what ``val_batch()`` returns (a caller's own latents and conditioning)."""
    if val_batch is not None:
        z_all, c_all = val_batch()
    else:
        g = torch.Generator().manual_seed(val_seed)
        z_all = torch.randn((val_size, *shape), generator=g).to(device)
        c_all = {"class_labels": torch.arange(val_size, device=device) % num_labels} if num_labels else {}
    return [(z_all[start:start + batch], {k: v[start:start + batch] if isinstance(v, Tensor) else v
                                          for k, v in c_all.items()})
            for start in range(0, z_all.shape[0], batch)]


def selected_weights(net: nn.Module, run_dir: str | os.PathLike, what: str) -> nn.Module:
    """A copy of ``net`` holding the weights the run's ``best.pt`` selected (``net`` as it is where no evaluation was
    finite and there is no ``best.pt``): what AMED's and SFD's runs write as their predictor / student file."""
    import copy

    from ..engine import checkpoint as ckpt

    out = copy.deepcopy(net)
    best = Path(run_dir) / "best.pt"
    if best.exists():
        ckpt.load_weights(out, ckpt.load(best, map_location="cpu")["model"], best, what)
    return out


def sampling_config(*, solver: str, num_steps: int, schedule: str, schedule_kw: dict | None, afs: bool,
                    **extra: Any) -> dict[str, Any]:
    """The plain-dict sampling configuration stored beside trained weights (AMED and SFD)."""
    return dict(solver=solver, num_steps=int(num_steps), schedule=schedule, schedule_kw=dict(schedule_kw or {}),
                afs=bool(afs), **extra)


def train_amed(
    denoiser: Callable,
    predictor: AMEDPredictor,
    noise: Callable[..., Tensor] | Sequence[int],
    *,
    num_steps: int = 4,
    M: int = 1,
    solver: str = "amed",
    max_order: int | None = None,
    teacher: str = "heun",
    teacher_opts: dict | None = None,
    schedule: str = "time_uniform",
    schedule_kw: dict | None = None,
    afs: bool = True,
    iterations: int = 100,
    batch: int = 64,
    lr: float = 5e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    feature: InputFeature | FeatureHook | None = None,
    cond: Callable[[int, torch.Generator | None], dict] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    callback: Callable[[int, float], None] | None = None,
    seed: int = 0,
    val_size: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> AMEDTrainResult:
    """Train ``predictor`` in place for AMED-Solver (``solver="amed"``) or AMED-Plugin (``solver`` = base).

    The Python form of the ``amed`` method (:class:`~mentor.diffusion.amed_method.AMED`; ``mentor train
    recipes/diffusion/digits_amed.yaml`` trains one for an ``edm`` run): it builds the method around
    ``denoiser`` (any denoiser, used as it is: neither moved nor frozen) and ``predictor`` and trains it with the
    engine, in fp32 on ``device`` (default: the predictor's), in ``out_dir`` (a temporary run directory by
    default). ``noise`` gives unscaled latents: a callable ``(batch, generator) -> Tensor`` or a per-sample shape
    (drawn in ``dtype``). Each iteration draws a batch, runs ``teacher`` (no AFS) on ``(M+1)(num_steps-1)+1``
    timestamps of ``schedule`` and trains interval by interval, one optimizer step each (Adam at ``lr``, the
    paper's 5e-3). ``cond(batch, generator)`` may return denoiser conditioning (e.g. labels);
    ``callback(iteration, loss)`` follows each iteration. Defaults are the paper's AMED-Solver setting (N = 4,
    M = 1, Heun teacher, time-uniform schedule, AFS: NFE 5). The final evaluation samples ``val_size`` (default
    ``batch``) latents drawn from a generator seeded with 0; the engine seeds torch's generators with ``seed``
    and the caller's random state is restored. Returns the per-iteration losses, the sampling config for
    :func:`save_predictor` and the run's summary.
    """
    from mentor.diffusion.amed_method import train

    return train(denoiser, predictor, noise, num_steps=num_steps, M=M, solver=solver, max_order=max_order,
                 teacher=teacher, teacher_opts=teacher_opts, schedule=schedule, schedule_kw=schedule_kw, afs=afs,
                 iterations=iterations, batch=batch, lr=lr, betas=betas, feature=feature, cond=cond,
                 generator=generator, dtype=dtype, device=device, callback=callback, seed=seed, val_size=val_size,
                 out_dir=out_dir)


def amed_sample(denoiser: Callable, noise: Tensor, predictor: AMEDPredictor, config: dict[str, Any], *,
                feature: InputFeature | FeatureHook | None = None, cond: dict | None = None,
                return_trajectory: bool = False) -> Tensor | Trajectory:
    """Sample with a trained predictor and its stored ``config`` from unscaled latents ``noise``."""
    sigmas = get_schedule(config["schedule"], config["num_steps"], **config.get("schedule_kw", {}))
    x = noise * sigmas[0].to(noise)
    own = feature is None
    feature = feature or feature_from_config(config.get("feature"), denoiser)
    try:
        with torch.no_grad():
            if config["solver"] == "amed_solver":
                return amed_solver(denoiser, x, sigmas, predictor, afs=config["afs"], feature=feature, cond=cond,
                                   return_trajectory=return_trajectory)
            return amed_plugin(denoiser, x, sigmas, predictor, base=config["base"], max_order=config.get("max_order"),
                               afs=config["afs"], feature=feature, cond=cond, return_trajectory=return_trajectory)
    finally:
        if own and isinstance(feature, FeatureHook):
            feature.remove()


# --------------------------------------------------------------------------------------------------
# Artifacts


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`mentor.fileio.atomic_write`: a temporary file beside ``path``, flushed, then
    renamed (nothing half-written is left; the file gets the permissions the umask gives)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_predictor(path: str | os.PathLike, predictor: AMEDPredictor, sampling_config: dict[str, Any]) -> None:
    """Write a self-describing predictor file: weights, constructor arguments and the sampling config.

    Only plain dicts, lists, numbers, strings and tensors are stored, so ``torch.load(weights_only=True)``
    reads it.
    """
    state = {k: v.detach().cpu() for k, v in predictor.state_dict().items()}
    atomic_save({"format": "mentor.amed/1", "predictor": predictor.config(), "state_dict": state,
                 "sampling": dict(sampling_config)}, path)


def load_predictor(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                   ) -> tuple[AMEDPredictor, dict[str, Any]]:
    """Read a file written by :func:`save_predictor` (or the ``amed.pt`` of an ``amed`` run directory); returns
    ``(predictor, sampling_config)``."""
    if os.path.isdir(path):
        path = os.path.join(path, "amed.pt")
    blob = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "mentor.amed/1":
        raise ValueError(f"{path}: not an AMED predictor file (expected format 'mentor.amed/1')")
    predictor = AMEDPredictor(**blob["predictor"])
    dtype = next(iter(blob["state_dict"].values())).dtype
    predictor.to(dtype).load_state_dict(blob["state_dict"])
    predictor.eval()
    return predictor, blob["sampling"]
