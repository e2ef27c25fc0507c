"""GITS: time schedules chosen by dynamic programming on teacher trajectories.

Implements the schedule search of "On the Trajectory Regularity of ODE-based Diffusion Sampling"
(Chen, Zhou et al., ICML 2024). A teacher solver runs on a fine grid of ``teacher_steps`` sigmas for a
few hundred noise samples; the cost of jumping from fine-grid point ``i`` to point ``j`` with one Euler
step along the teacher's direction at ``i`` is averaged over the samples; a dynamic programme picks the
``num_steps`` grid points (always the first and the last) that minimise the discounted sum of jump costs.
The result is data, a 1-D tensor of sigmas, usable by every sampler in :mod:`mentor.diffusion.samplers`.

Cost ``C[i, j]`` (``i < j``), with ``x_i`` the teacher points, ``d_i`` the teacher's direction at them and
``x_hat = x_i + (t_j - t_i) d_i``:

- ``"l1"`` / ``"l2"``: sample mean of ``||x_hat - x_j||_1`` / ``||x_hat - x_j||_2``;
- ``"dev"`` (default): sample mean of ``dev(x_hat) - dev(x_j)``, where ``dev(p)`` is the norm of the
  component of ``x_end - p`` orthogonal to the teacher's chord ``x_start -> x_end`` of the same sample
  (the paper's trajectory-deviation measure; the difference is signed, not absolute).

Dynamic programme with ``K = num_steps - 1`` jumps and discount ``coeff`` (1.15 in the paper):
``V[i][1] = C[i][last]``, ``V[j][k] = min_{j<i<last} C[j][i] + coeff * V[i][k-1]``; the path is read back
from index 0, so the total cost of a path ``0 = i_0 < i_1 < ... < i_K = last`` is
``sum_m coeff**m * C[i_m, i_{m+1}]``.

Not included: the paper's optional AFS variant that inserts one more free timestamp between the first
two chosen points by brute-force search against the teacher's final samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mentor.diffusion.samplers import SAMPLERS
from mentor.diffusion.schedules import get_schedule

METRICS = ("dev", "l1", "l2")


@dataclass
class GITSResult:
    """A GITS schedule: ``sigmas`` (float64, ``num_steps`` entries) = ``teacher_sigmas[indices]``.

    ``cost`` is the averaged cost matrix (``inf`` on and below the diagonal), ``value`` the optimum of the
    dynamic programme, ``config`` the arguments that reproduce the search.
    """

    sigmas: Tensor
    indices: list[int]
    teacher_sigmas: Tensor
    cost: Tensor
    value: float
    config: dict[str, Any] = field(default_factory=dict)


def teacher_trajectory(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    teacher: str = "ipndm",
    *,
    cond: dict | None = None,
    **teacher_opts: Any,
) -> tuple[Tensor, Tensor]:
    """Run ``teacher`` (no AFS) from ``x`` (already scaled by ``sigmas[0]``) over every sigma of ``sigmas``.

    Returns ``(points, directions)``: the ``T`` trajectory points ``(T, B, ...)`` including the start, and the
    directions ``d_i = (x_i - D(x_i, t_i)) / t_i`` at the first ``T - 1`` points ``(T-1, B, ...)``. These are
    the directions the solver itself started each step from; for UniPC, whose recorded outputs belong to the
    predictor's points, the denoiser is evaluated again at the corrected points.
    """
    cond = cond or {}
    with torch.no_grad():
        traj = SAMPLERS[teacher](denoiser, x, sigmas, afs=False, return_trajectory=True, cond=cond, **teacher_opts)
        dirs = getattr(traj, "directions", None)
        if dirs is None or teacher == "unipc":
            sig = sigmas.to(dtype=x.dtype, device=x.device)
            dirs = torch.stack([(traj.points[i] - denoiser(traj.points[i], sig[i].expand(x.shape[0]), **cond)) / sig[i]
                                for i in range(len(sig) - 1)])
    return traj.points, dirs


def _deviation(p: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Norm of the part of ``end - p`` orthogonal to the chord ``start -> end``; flattened per sample.

    ``p`` is ``(..., B, F)``, ``start``/``end`` are ``(B, F)``; returns ``(..., B)``.
    """
    chord = end - start
    unit = chord / torch.linalg.vector_norm(chord, dim=-1, keepdim=True).clamp_min(torch.finfo(chord.dtype).tiny)
    v = end - p
    perp = v - (v * unit).sum(-1, keepdim=True) * unit
    return torch.linalg.vector_norm(perp, dim=-1)


def cost_matrix(points: Tensor, directions: Tensor, sigmas: Tensor, metric: str = "dev") -> Tensor:
    """GITS cost matrix summed over the samples of one batch (divide by the sample count to average).

    ``points`` ``(T, B, ...)`` teacher points, ``directions`` ``(T-1, B, ...)`` the directions at the first
    ``T - 1`` of them, ``sigmas`` ``(T,)``. Returns a ``(T, T)`` tensor in the points' dtype with the
    per-sample costs summed in its upper triangle and zeros elsewhere. One Python loop over the start index;
    all targets ``j`` and all samples are handled at once.
    """
    if metric not in METRICS:
        raise ValueError(f"GITS metric must be one of {METRICS}, got {metric!r}")
    T, B = points.shape[0], points.shape[1]
    pts = points.reshape(T, B, -1)
    dirs = directions.reshape(T - 1, B, -1)
    t = sigmas.to(pts)
    cost = torch.zeros(T, T, dtype=pts.dtype, device=pts.device)
    if metric == "dev":
        dev_teacher = _deviation(pts, pts[0], pts[-1])  # (T, B); exactly 0 at both ends up to rounding
        dev_teacher[-1] = 0.0
    for i in range(T - 1):
        jumps = pts[i] + (t[i + 1 :] - t[i]).reshape(-1, 1, 1) * dirs[i]  # (T-i-1, B, F)
        if metric == "dev":
            per = _deviation(jumps, pts[0], pts[-1]) - dev_teacher[i + 1 :]
        else:
            per = torch.linalg.vector_norm(jumps - pts[i + 1 :], ord=1 if metric == "l1" else 2, dim=-1)
        cost[i, i + 1 :] = per.sum(-1)
    return cost


def dp_schedule(cost: Tensor, num_steps: int, coeff: float = 1.15) -> tuple[list[int], float]:
    """Pick ``num_steps`` indices ``0 = i_0 < ... < i_K = T-1`` minimising ``sum_m coeff**m C[i_m, i_{m+1}]``.

    The dynamic programme of GITS (``V[i][1] = C[i][last]``; ``V[j][k] = min_{j<i<last} C[j][i] +
    coeff * V[i][k-1]``), vectorised over ``j`` and ``i``; ties go to the smaller index. Returns the index
    list and the optimal value ``V[0][K]``.
    """
    T = cost.shape[0]
    K = num_steps - 1
    if K < 1 or num_steps > T:
        raise ValueError(f"num_steps must be in [2, {T}] for a teacher grid of {T} points, got {num_steps}")
    c = cost.detach().to(torch.float64).cpu()
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    c = torch.where(upper, c, torch.full_like(c, float("inf")))
    V = torch.full((T, K + 1), float("inf"), dtype=torch.float64)
    arg = torch.full((T, K + 1), -1, dtype=torch.long)
    V[:, 1] = c[:, -1]
    arg[:, 1] = T - 1
    inner = torch.zeros(T, dtype=torch.bool)
    inner[1:-1] = True  # intermediate points exclude the ends
    for k in range(2, K + 1):
        total = c + coeff * V[:, k - 1].unsqueeze(0)  # total[j, i] = C[j, i] + coeff V[i, k-1]
        total[:, ~inner] = float("inf")
        V[:, k], arg[:, k] = total.min(dim=1)
    if not torch.isfinite(V[0, K]):
        raise ValueError("GITS dynamic programme found no finite path (non-finite costs?)")
    path, j = [0], 0
    for k in range(K, 0, -1):
        j = int(arg[j, k])
        path.append(j)
    return path, float(V[0, K])


def _noise(noise: Tensor | Sequence[int], num_samples: int, generator: torch.Generator | None,
           dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    if isinstance(noise, Tensor):
        return noise
    shape = (num_samples, *tuple(int(s) for s in noise))
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def gits_schedule(
    denoiser: Callable,
    noise: Tensor | Sequence[int],
    num_steps: int,
    *,
    teacher: str = "ipndm",
    teacher_steps: int = 61,
    schedule: str = "polynomial",
    coeff: float = 1.15,
    metric: str = "dev",
    num_samples: int = 256,
    batch: int = 256,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    cond: dict | None = None,
    teacher_opts: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **schedule_kw: Any,
) -> GITSResult:
    """Search a ``num_steps``-timestamp GITS schedule for ``denoiser`` (GITS, ICML 2024).

    ``noise`` is either a tensor of unscaled Gaussian latents ``(n, ...)`` (all ``n`` are used) or the
    per-sample shape, in which case ``num_samples`` latents are drawn from ``generator`` (or ``seed``) in
    ``dtype`` on ``device``. The teacher (``teacher`` with ``teacher_opts``, e.g. ``max_order``) runs on
    ``get_schedule(schedule, teacher_steps, **schedule_kw)`` in chunks of ``batch`` samples; the cost is
    averaged over all samples. ``cond`` is passed to the denoiser; tensors in it whose first dimension is the
    sample count are split with the chunks (e.g. ``class_labels``).

    Returns a :class:`GITSResult`; ``result.sigmas`` is the schedule, ``result.indices`` the chosen points.
    """
    if generator is None and seed is not None:
        generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    latents = _noise(noise, num_samples, generator, dtype, device)
    n = latents.shape[0]
    fine = get_schedule(schedule, teacher_steps, **schedule_kw)
    cond = cond or {}
    total = None
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        chunk_cond = {k: (v[lo:hi] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v)
                      for k, v in cond.items()}
        x = latents[lo:hi] * fine[0].to(latents)
        points, dirs = teacher_trajectory(denoiser, x, fine, teacher, cond=chunk_cond, **(teacher_opts or {}))
        part = cost_matrix(points, dirs, fine, metric).to(torch.float64).cpu()
        total = part if total is None else total + part
    cost = total / n
    indices, value = dp_schedule(cost, num_steps, coeff)
    upper = torch.ones_like(cost, dtype=torch.bool).triu(1)
    cost = torch.where(upper, cost, torch.full_like(cost, float("inf")))
    config = dict(num_steps=num_steps, teacher=teacher, teacher_steps=teacher_steps, schedule=schedule,
                  schedule_kw=dict(schedule_kw), coeff=coeff, metric=metric, num_samples=n,
                  teacher_opts=dict(teacher_opts or {}))
    return GITSResult(sigmas=fine[indices].clone(), indices=indices, teacher_sigmas=fine, cost=cost, value=value,
                      config=config)
