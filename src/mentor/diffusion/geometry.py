"""The geometry of probability-flow sampling trajectories, as measured in the papers that found it.

Chen et al., "A Geometric Perspective on Diffusion Models" (arXiv 2305.19947) observe a *quasi-linear*
sampling trajectory and an implicit *denoising* trajectory, and relate optimal ODE sampling to annealed
mean shift; Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling" (GITS, ICML 2024,
arXiv 2405.11326; extended as "Geometric Regularity in Deterministic Sampling of Diffusion-based Generative
Models", arXiv 2506.10177) find that every trajectory lies in an extremely low-dimensional subspace with an
almost identical "boomerang" shape. The definitions follow the authors' analysis code (``diff-analyzer`` in
``zju-pi/diff-sampler``); the trajectory ``x_0, ..., x_{N-1}`` runs from the noise ``x_start`` at
``sigma_max`` to the sample ``x_end`` at ``sigma_min`` (``Trajectory.points`` of any sampler in
:mod:`mentor.diffusion.samplers`):

- :func:`deviation_stats`: "the perpendicular L2 distance of the intermediate samples x_t to the line
  (x_T - x_0)", i.e. the norm of the component of ``x_end - x_i`` orthogonal to the chord
  ``x_start -> x_end`` (0 at both ends; the same measure GITS' ``"dev"`` cost uses). The authors plot it
  next to the distance to the final sample ``||x_i - x_end||``; both are kept, and ``relative`` divides
  the deviation by the chord length ``||x_start - x_end||`` (our normalisation, a scale-free number).
- :func:`denoising_cosines`: the authors' "cosine similarity between the intermediate gradients
  (epsilon_t) and the line (x_0 - x_t)", ``cos(x_i - D(x_i, s_i), x_i - x_end)``, which equals
  ``cos(D(x_i, s_i) - x_i, x_end - x_i)``: the angle between the denoising output direction and the final
  sample, seen from the current point. 1 means the denoiser points straight at where the path ends (so
  with Euler the last cosine is 1 by construction: its last step moves along ``D - x``).
- :func:`trajectory_pca`: principal directions of a trajectory's states (each trajectory centred on its
  own mean, or all states stacked) and the share of variance the top ``k`` explain;
  :func:`boomerang_coordinates`: the papers' 3-D view, the coordinate of ``x_i - x_end`` along the chord
  and along the top two principal directions of the trajectory projected off the chord.
- :func:`mean_shift_weights` / :func:`mean_shift_profile`: for the optimal denoiser of a dataset
  (:class:`~mentor.diffusion.denoisers.EmpiricalDenoiser`), ``D(x, s) = sum_i w_i y_i`` with
  ``w = softmax(-||x - y_i||^2 / 2 s^2)`` is one mean-shift step with a Gaussian kernel of bandwidth
  ``s``; an Euler step is ``x' = (s'/s) x + (1 - s'/s) m_s(x)`` ("annealed mean shift"). As ``s``
  shrinks the weights concentrate on the data point the trajectory is attracted to: the effective number
  of contributing points ``1 / sum_i w_i^2`` falls from ``n`` towards 1.

:func:`trajectory_geometry` runs a solver and measures everything at once; ``mentor bench diffusion
--geometry`` draws it (:mod:`mentor.diffusion.geometry_report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .denoisers import EmpiricalDenoiser, as_sigma
from .samplers import SAMPLERS


def _flat(points: Tensor) -> Tensor:
    """``(N, B, ...)`` trajectory states as ``(N, B, F)``; checks there are at least two."""
    if points.ndim < 3 or points.shape[0] < 2:
        raise ValueError(f"points must be (N, B, ...) with N >= 2 states per trajectory, got {tuple(points.shape)}")
    return points.reshape(points.shape[0], points.shape[1], -1)


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


# ---------------------------------------------------------------------------------------------------- deviation


@dataclass
class DeviationStats:
    """How far each trajectory strays from the straight line between its endpoints.

    ``deviation`` ``(N, B)``: distance of every state to the line through ``x_start`` and ``x_end`` (exactly
    0 at both ends); ``relative`` the same divided by the chord length; ``distance_to_end`` ``(N, B)``:
    ``||x_i - x_end||``; ``chord`` ``(B,)``: ``||x_start - x_end||``.
    """

    deviation: Tensor
    relative: Tensor
    distance_to_end: Tensor
    chord: Tensor

    @property
    def max_deviation(self) -> Tensor:
        """``(B,)`` the largest deviation along each trajectory."""
        return self.deviation.amax(0)

    @property
    def max_relative(self) -> Tensor:
        """``(B,)`` the largest deviation along each trajectory over its chord length."""
        return self.relative.amax(0)

    @property
    def argmax(self) -> Tensor:
        """``(B,)`` the index of the state of largest deviation."""
        return self.deviation.argmax(0)


def deviation_stats(points: Tensor) -> DeviationStats:
    """Deviation of every state of ``points`` ``(N, B, ...)`` from its trajectory's chord ``x_0 -> x_{N-1}``.

    The deviation of ``x_i`` is ``||v - (v . e) e||`` with ``v = x_end - x_i`` and ``e`` the unit chord (the
    authors' ``cal_deviation``); a trajectory whose ends coincide has chord 0 and is measured from its end.
    """
    p = _flat(points)
    start, end = p[0], p[-1]
    chord_vec = end - start
    chord = torch.linalg.vector_norm(chord_vec, dim=-1)  # (B,)
    unit = chord_vec / chord.clamp_min(_tiny(chord)).unsqueeze(-1)
    v = end - p  # (N, B, F)
    perp = v - (v * unit).sum(-1, keepdim=True) * unit
    dev = torch.linalg.vector_norm(perp, dim=-1)
    dev[0] = 0.0
    dev[-1] = 0.0  # both ends lie on the chord by definition; remove the rounding error
    return DeviationStats(deviation=dev, relative=dev / chord.clamp_min(_tiny(chord)),
                          distance_to_end=torch.linalg.vector_norm(v, dim=-1), chord=chord)


# ---------------------------------------------------------------------------------------------------- angles


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of the angle between ``a`` and ``b`` ``(..., F)`` along the last axis (0 where either is 0)."""
    na = torch.linalg.vector_norm(a, dim=-1)
    nb = torch.linalg.vector_norm(b, dim=-1)
    return (a * b).sum(-1) / (na * nb).clamp_min(_tiny(a))


def denoised_outputs(denoiser: Callable[..., Tensor], points: Tensor, sigmas: Tensor | Sequence[float],
                     cond: dict | None = None) -> Tensor:
    """``D(x_i, sigma_i)`` at every state but the last: ``(N - 1, B, ...)`` (the denoising trajectory).

    ``sigmas`` is ``(N,)`` or ``(N, B)``; the denoiser is called once per state, without gradients.
    """
    sig = torch.as_tensor(sigmas, dtype=points.dtype, device=points.device)
    if sig.shape[0] != points.shape[0]:
        raise ValueError(f"{sig.shape[0]} sigmas for {points.shape[0]} trajectory states")
    out = []
    with torch.no_grad():
        for i in range(points.shape[0] - 1):
            s = as_sigma(sig[i], points[i]).reshape(-1)
            out.append(denoiser(points[i], s, **(cond or {})).to(points.dtype))
    return torch.stack(out)


def denoising_cosines(points: Tensor, denoised: Tensor) -> Tensor:
    """``cos(D_i - x_i, x_end - x_i)`` for the first ``N - 1`` states: ``(N - 1, B)``.

    ``denoised`` is :func:`denoised_outputs` (``(N - 1, B, ...)``). Equal to the authors'
    ``cos(eps_i, x_i - x_end)`` with ``eps_i = (x_i - D_i) / sigma_i``.
    """
    p = _flat(points)
    d = denoised.reshape(p.shape[0] - 1, p.shape[1], -1).to(p.dtype)
    return cosine(d - p[:-1], p[-1] - p[:-1])


# ---------------------------------------------------------------------------------------------------- PCA


@dataclass
class TrajectoryPCA:
    """Principal directions of trajectory states.

    ``explained`` ``(..., k)``: the share of the variance of the centred states each of the top ``k``
    directions explains (per trajectory ``(B, k)``, or ``(k,)`` for the stacked states); ``cumulative`` its
    running sum; ``coords`` ``(N, B, k)``: the centred states in those directions; ``components``
    ``(..., k, F)`` the unit directions; ``mean`` ``(..., F)`` the centre.
    """

    explained: Tensor
    coords: Tensor
    components: Tensor
    mean: Tensor

    @property
    def cumulative(self) -> Tensor:
        return self.explained.cumsum(-1)


def _pca_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PCA of the rows of ``x`` ``(..., M, F)``: ratios ``(..., k)``, scores ``(..., M, k)``, directions
    ``(..., k, F)`` and means ``(..., F)``; signs make the first row's score non-negative."""
    mean = x.mean(-2)
    c = x - mean.unsqueeze(-2)
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    var = s.square()
    total = var.sum(-1, keepdim=True)
    kk = min(k, s.shape[-1])
    ratio = var[..., :kk] / total.clamp_min(_tiny(total))
    scores = u[..., :kk] * s[..., None, :kk]
    comps = vh[..., :kk, :]
    sign = torch.where(scores[..., 0, :] < 0, -1.0, 1.0).to(x.dtype)  # (..., k)
    scores = scores * sign.unsqueeze(-2)
    comps = comps * sign.unsqueeze(-1)
    if kk < k:  # fewer states than k: pad with zero-variance directions
        pad = k - kk
        ratio = torch.cat([ratio, ratio.new_zeros(*ratio.shape[:-1], pad)], -1)
        scores = torch.cat([scores, scores.new_zeros(*scores.shape[:-1], pad)], -1)
        comps = torch.cat([comps, comps.new_zeros(*comps.shape[:-2], pad, comps.shape[-1])], -2)
    return ratio, scores, comps, mean


def trajectory_pca(points: Tensor, k: int = 3, joint: bool = False) -> TrajectoryPCA:
    """PCA of the states of trajectories ``points`` ``(N, B, ...)`` and the variance share of the top ``k``.

    ``joint=False``: one PCA per trajectory over its ``N`` states centred on their mean (the papers'
    "each trajectory lies in a low-dimensional subspace"); ``joint=True``: one PCA of all ``N * B`` states.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = _flat(points)
    n, b, f = p.shape
    if joint:
        ratio, scores, comps, mean = _pca_rows(p.reshape(n * b, f), k)
        return TrajectoryPCA(explained=ratio, coords=scores.reshape(n, b, k), components=comps, mean=mean)
    ratio, scores, comps, mean = _pca_rows(p.transpose(0, 1), k)  # (B, N, F)
    return TrajectoryPCA(explained=ratio, coords=scores.transpose(0, 1), components=comps, mean=mean)


def boomerang_coordinates(points: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """The papers' 3-D view of each trajectory: ``x_i - x_end`` along the chord and along the top ``k``
    principal directions of the trajectory projected off the chord.

    Returns ``(coords, explained)``: ``coords`` ``(N, B, 1 + k)``, column 0 the chord coordinate
    ``(x_i - x_end) . e`` with ``e`` the unit vector from ``x_end`` to ``x_start`` (the chord length at the
    start, 0 at the end), columns 1.. the off-chord principal coordinates (0 at both ends; their squares
    sum to the squared deviation when ``k`` spans the off-chord part); ``explained`` ``(B, k)`` the share of
    the off-chord (centred) variance of each direction. Signs make the middle state's coordinates >= 0.
    """
    p = _flat(points)
    n = p.shape[0]
    end = p[-1]
    chord_vec = p[0] - end
    e = chord_vec / torch.linalg.vector_norm(chord_vec, dim=-1, keepdim=True).clamp_min(_tiny(p))
    rel = p - end  # (N, B, F)
    along = (rel * e).sum(-1)  # (N, B)
    off = rel - along.unsqueeze(-1) * e
    ratio, _, comps, _ = _pca_rows(off.transpose(0, 1), k)  # directions (B, k, F), orthogonal to e
    coords = torch.einsum("nbf,bkf->nbk", off, comps)
    sign = torch.where(coords[n // 2] < 0, -1.0, 1.0).to(p.dtype)  # (B, k)
    return torch.cat([along.unsqueeze(-1), coords * sign], -1), ratio


# ---------------------------------------------------------------------------------------------------- mean shift


def _data_of(data: Tensor | EmpiricalDenoiser) -> tuple[Tensor, Tensor | None]:
    if isinstance(data, EmpiricalDenoiser):
        return data.data, data.labels
    return data, None


def mean_shift_log_weights(data: Tensor | EmpiricalDenoiser, x: Tensor, sigma: Tensor | float,
                           class_labels: Tensor | None = None) -> Tensor:
    """``log w`` ``(B, n)``: the log-softmax over the data of ``-||x - y_i||^2 / (2 sigma^2)``.

    ``data`` is ``(n, ...)`` or an :class:`EmpiricalDenoiser` (whose ``labels`` with ``class_labels``
    ``(B,)`` restrict each row to its class, like the denoiser does: the other points get ``-inf``).
    ``sigma`` is a float, 0-d or ``(B,)``. Computed in ``x``'s dtype from centred data; memory ``O(B n)``.
    """
    ys, labels = _data_of(data)
    if x.shape[1:] != ys.shape[1:]:
        raise ValueError(f"x has sample shape {tuple(x.shape[1:])}, data {tuple(ys.shape[1:])}")
    flat = ys.reshape(ys.shape[0], -1).to(device=x.device, dtype=x.dtype)
    mean = flat.mean(0)
    yc = flat - mean
    xc = x.reshape(x.shape[0], -1) - mean
    # -||x - y||^2 / 2s^2 = (x.y - |y|^2/2 - |x|^2/2) / s^2; the |x|^2 term is constant per row.
    logits = (xc @ yc.T - 0.5 * yc.square().sum(1)) / as_sigma(sigma, xc).square()
    if class_labels is not None and labels is not None:
        mask = labels.to(x.device).reshape(1, -1) != class_labels.to(x.device).reshape(-1, 1)
        logits = logits.masked_fill(mask, float("-inf"))
    return torch.log_softmax(logits, dim=1)


def mean_shift_weights(data: Tensor | EmpiricalDenoiser, x: Tensor, sigma: Tensor | float,
                       class_labels: Tensor | None = None) -> Tensor:
    """The weights ``w`` ``(B, n)`` of the optimal denoiser ``D(x, s) = sum_i w_i y_i`` (one mean-shift step
    of bandwidth ``sigma``); see :func:`mean_shift_log_weights` for the arguments."""
    return mean_shift_log_weights(data, x, sigma, class_labels).exp()


def effective_count(weights: Tensor) -> Tensor:
    """Effective number of data points a weight vector averages over, ``1 / sum_i w_i^2`` (Kish), on the
    last axis: ``n`` for uniform weights, 1 for a single point."""
    return 1.0 / weights.square().sum(-1)


def perplexity(weights: Tensor) -> Tensor:
    """``exp(H(w))`` of weight vectors on the last axis (another effective count: ``n`` uniform, 1 one-hot)."""
    logw = torch.where(weights > 0, weights.log(), torch.zeros_like(weights))
    return torch.exp(-(weights * logw).sum(-1))


@dataclass
class MeanShiftProfile:
    """Where the optimal denoiser's weights go along trajectories (the "attraction" picture).

    All ``(N, B)`` over the states: ``effective`` (``1 / sum w^2``), ``perplexity``, ``max_weight`` and
    ``top_index`` (the most weighted data point), and ``final_weight``: the weight of ``final_index``
    ``(B,)``, the data point nearest to each trajectory's end (its attractor). ``n`` data points.
    """

    effective: Tensor
    perplexity: Tensor
    max_weight: Tensor
    top_index: Tensor
    final_weight: Tensor
    final_index: Tensor
    n: int


def mean_shift_profile(data: Tensor | EmpiricalDenoiser, points: Tensor, sigmas: Tensor | Sequence[float],
                       class_labels: Tensor | None = None) -> MeanShiftProfile:
    """The mean-shift weights at every state ``points[i]`` ``(N, B, ...)`` with bandwidth ``sigmas[i]``."""
    sig = torch.as_tensor(sigmas, dtype=points.dtype, device=points.device)
    if sig.shape[0] != points.shape[0]:
        raise ValueError(f"{sig.shape[0]} sigmas for {points.shape[0]} trajectory states")
    ys, _ = _data_of(data)
    flat = ys.reshape(ys.shape[0], -1).to(device=points.device, dtype=points.dtype)
    end = points[-1].reshape(points.shape[1], -1)
    d2 = torch.cdist(end, flat).square()
    if class_labels is not None and isinstance(data, EmpiricalDenoiser) and data.labels is not None:
        mask = data.labels.to(points.device).reshape(1, -1) != class_labels.to(points.device).reshape(-1, 1)
        d2 = d2.masked_fill(mask, float("inf"))
    final_index = d2.argmin(1)
    eff, ppl, mx, top, fin = [], [], [], [], []
    rows = torch.arange(points.shape[1], device=points.device)
    for i in range(points.shape[0]):
        w = mean_shift_weights(data, points[i], sig[i], class_labels)
        eff.append(effective_count(w))
        ppl.append(perplexity(w))
        m, t = w.max(1)
        mx.append(m)
        top.append(t)
        fin.append(w[rows, final_index])
    return MeanShiftProfile(effective=torch.stack(eff), perplexity=torch.stack(ppl), max_weight=torch.stack(mx),
                            top_index=torch.stack(top), final_weight=torch.stack(fin), final_index=final_index,
                            n=int(ys.shape[0]))


# ---------------------------------------------------------------------------------------------------- all at once


@dataclass
class Geometry:
    """Everything :func:`trajectory_geometry` measures on one batch of trajectories."""

    sigmas: Tensor
    points: Tensor
    denoised: Tensor
    deviation: DeviationStats
    cosines: Tensor
    pca: TrajectoryPCA
    joint_pca: TrajectoryPCA
    boomerang: Tensor
    boomerang_explained: Tensor
    mean_shift: MeanShiftProfile | None = None

    def summary(self) -> dict[str, Any]:
        """The numbers behind the figures as plain python (JSON-ready): profiles are means over trajectories."""
        dev, cos = self.deviation, self.cosines

        def mean_std(t: Tensor) -> dict[str, float]:
            return {"mean": float(t.mean()), "std": float(t.std()) if t.numel() > 1 else 0.0}

        def prof(t: Tensor) -> list[float]:
            return [float(v) for v in t.mean(1)]

        out: dict[str, Any] = {
            "sigmas": [float(s) for s in self.sigmas],
            "trajectories": int(self.points.shape[1]),
            "deviation": {
                "max": mean_std(dev.max_deviation), "max_relative": mean_std(dev.max_relative),
                "sigma_at_max_median": float(self.sigmas[dev.argmax.cpu()].median()),
                "chord": mean_std(dev.chord),
                "profile": prof(dev.deviation), "profile_std": [float(v) for v in dev.deviation.std(1)],
                "relative_profile": prof(dev.relative), "distance_to_end": prof(dev.distance_to_end),
            },
            "cosine": {
                "profile": prof(cos), "profile_std": [float(v) for v in cos.std(1)],
                "profile_min": [float(v) for v in cos.amin(1)],
                "angle_deg": [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in prof(cos)],
                "min": float(cos.min()),
            },
            "pca": {
                "per_trajectory": [float(v) for v in self.pca.explained.mean(0)],
                "per_trajectory_cumulative": [float(v) for v in self.pca.cumulative.mean(0)],
                "joint": [float(v) for v in self.joint_pca.explained],
                "off_chord": [float(v) for v in self.boomerang_explained.mean(0)],
            },
            "mean_shift": None,
        }
        if self.mean_shift is not None:
            ms = self.mean_shift
            out["mean_shift"] = {"n_data": ms.n, "effective": prof(ms.effective), "perplexity": prof(ms.perplexity),
                                 "max_weight": prof(ms.max_weight), "final_weight": prof(ms.final_weight),
                                 "top_is_final": prof((ms.top_index == ms.final_index).to(ms.max_weight.dtype))}
        return out


def trajectory_geometry(denoiser: Callable[..., Tensor], x: Tensor, sigmas: Tensor | Sequence[float], *,
                        solver: str = "euler", cond: dict | None = None, k: int = 3,
                        data: Tensor | EmpiricalDenoiser | None = None, **solver_opts: Any) -> Geometry:
    """Run ``solver`` from ``x`` (already ``noise * sigmas[0]``) over ``sigmas`` (``(N,)``) and measure it.

    Deviation from the chord, the denoising cosines (``D`` evaluated again at every state, so the angle
    belongs to the state whatever the solver), per-trajectory and joint PCA (top ``k``), the boomerang
    coordinates, and the mean-shift profile when ``data`` is given or ``denoiser`` is an
    :class:`EmpiricalDenoiser` (class-conditional when ``cond`` has ``class_labels``).
    """
    if solver not in SAMPLERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SAMPLERS)}")
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    if sig.ndim != 1 or sig.shape[0] < 3:
        raise ValueError(f"sigmas must be 1-D with at least 3 timestamps (one intermediate state), got "
                         f"shape {tuple(sig.shape)}")
    cond = dict(cond or {})
    with torch.no_grad():
        traj = SAMPLERS[solver](denoiser, x, sig, return_trajectory=True, cond=cond, **solver_opts)
    points = traj.points
    den = denoised_outputs(denoiser, points, sig, cond)
    if data is None and isinstance(denoiser, EmpiricalDenoiser):
        data = denoiser
    ms = None if data is None else mean_shift_profile(data, points, sig, cond.get("class_labels"))
    coords, off = boomerang_coordinates(points)
    return Geometry(sigmas=sig, points=points, denoised=den, deviation=deviation_stats(points),
                    cosines=denoising_cosines(points, den), pca=trajectory_pca(points, k),
                    joint_pca=trajectory_pca(points, k, joint=True), boomerang=coords, boomerang_explained=off,
                    mean_shift=ms)
