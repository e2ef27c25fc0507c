"""``mentor bench diffusion --geometry``: the trajectory geometry of the benchmark's oracles as figures and numbers.

For each oracle of :mod:`mentor.diffusion.bench` (``gaussian``, ``digits``) and each trained EDM run
(``--run-dir``), a few dozen trajectories of one solver (Euler by default, the papers' choice) on the
polynomial schedule are measured with :func:`mentor.diffusion.geometry.trajectory_geometry`; the output
folder receives one PNG per oracle (``<name>.png``: deviation from the chord, denoising cosines, the 3-D
boomerang view, explained variance, and the mean-shift weights for the empirical optimal denoiser) and
``geometry.json`` / ``geometry.md`` with the numbers behind them. Figures are drawn with matplotlib's Agg
canvas, imported only here.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mentor.diffusion import samplers
from mentor.diffusion.denoisers import EmpiricalDenoiser
from mentor.diffusion.geometry import Geometry, trajectory_geometry
from mentor.diffusion.schedules import get_schedule
from mentor.errors import ConfigError, ReportError
from mentor.fileio import atomic_write_bytes, atomic_write_text

DPI = 80
DEFAULT_OUT = "runs/diffusion-geometry"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("mentor bench diffusion --geometry draws its figures with matplotlib, which is not "
                          "installed: pip install 'mentor[plots]' (or pip install matplotlib), then run it "
                          "again.") from None


def oracle_geometry(oracle: Any, *, solver: str = "euler", steps: int = 20, n: int = 32, seed: int = 0,
                    k: int = 3) -> Geometry:
    """The geometry of ``n`` trajectories of ``solver`` with ``steps`` steps (``steps + 1`` polynomial
    timestamps over the oracle's sigma range) from seeded noise.

    ``oracle`` is a :class:`~mentor.diffusion.bench.Oracle`.
    """
    sigmas = get_schedule("polynomial", steps + 1, **oracle.schedule_kw())
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *oracle.shape), generator=g, dtype=torch.float64).to(oracle.dtype).to(oracle.device)
    cond = oracle.make_cond(n, g)
    opts: dict[str, Any] = {}
    if solver == "deis":
        opts.update(vp_sigma_min=oracle.sigma_min, vp_sigma_max=oracle.sigma_max)
    if solver in getattr(samplers, "STOCHASTIC", ()):  # a stochastic sampler's noise follows the seed too
        opts["generator"] = torch.Generator().manual_seed(seed + 1)
    return trajectory_geometry(oracle.denoiser, noise * sigmas[0].to(noise), sigmas, solver=solver, cond=cond, k=k,
                               **opts)


# ---------------------------------------------------------------------------------------------------- figure


def _sigma_axis(ax, log_y: bool = False) -> None:
    ax.set_xscale("log")
    ax.invert_xaxis()  # sampling runs from sigma_max (left) to sigma_min (right)
    ax.set_xlabel("sigma")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _band(ax, s, t: torch.Tensor, color: str, label: str, lo: float | None = None, hi: float | None = None) -> None:
    """The mean over trajectories (axis 1) with a +- one standard deviation band clipped to ``[lo, hi]``."""
    mean, std = t.mean(1).cpu().numpy(), t.std(1).cpu().numpy()
    ax.plot(s, mean, color=color, marker="o", markersize=3, label=label)
    ax.fill_between(s, (mean - std).clip(lo, hi), (mean + std).clip(lo, hi), color=color, alpha=0.2)


def geometry_figure(geo: Geometry, title: str) -> bytes:
    """The six panels of one oracle's geometry as PNG bytes (Agg canvas, no pyplot)."""
    _require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 8.6), dpi=DPI)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.3, hspace=0.4)
    fig.suptitle(title, fontsize=11)
    s = geo.sigmas.cpu().numpy()
    dev = geo.deviation
    inner = slice(1, len(s) - 1)

    ax = fig.add_subplot(2, 3, 1)
    floor = float(dev.deviation[inner].min()) / 10 if len(s) > 2 else None
    _band(ax, s[inner], dev.deviation[inner], "tab:red", "deviation from the chord", lo=floor)
    _band(ax, s[:-1], dev.distance_to_end[:-1], "tab:blue", "||x_t - x_end||", lo=floor)
    _sigma_axis(ax, log_y=True)
    ax.set_title(f"L2 deviation (max / chord = {float(dev.max_relative.mean()):.2e})", fontsize=10)
    ax.legend(fontsize=8)

    ax = fig.add_subplot(2, 3, 2)
    _band(ax, s[:-1], geo.cosines, "tab:green", "mean +- sd", hi=1.0)
    ax.plot(s[:-1], geo.cosines.amin(1).cpu().numpy(), color="tab:green", linestyle=":", label="min")
    _sigma_axis(ax)
    ax.set_title("cos(D(x_t) - x_t, x_end - x_t)", fontsize=10)
    ax.legend(fontsize=8)

    ax = fig.add_subplot(2, 3, 3, projection="3d")
    c = geo.boomerang.cpu().numpy()
    for b in range(c.shape[1]):
        ax.plot(c[:, b, 0], c[:, b, 1], c[:, b, 2], linewidth=0.8)
    ax.set_xlabel("along x_start - x_end", fontsize=8)
    ax.set_ylabel("PC1 off chord", fontsize=8)
    ax.set_zlabel("PC2 off chord", fontsize=8)
    ax.tick_params(labelsize=7, pad=0)
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(3))
    ax.view_init(elev=15, azim=-55)
    ax.set_box_aspect((2.2, 1.4, 1.0), zoom=1.15)
    ax.set_title("trajectories in 3-D (the boomerang)", fontsize=10)

    ax = fig.add_subplot(2, 3, 4)
    k = geo.pca.explained.shape[-1]
    groups = [("per trajectory", geo.pca.explained.mean(0)), ("off the chord (top 2)", geo.boomerang_explained.mean(0)),
              ("all states", geo.joint_pca.explained)]
    width = 0.8 / len(groups)
    for j, (name, vals) in enumerate(groups):
        v = vals.cpu().numpy()
        ax.bar([i + (j - 1) * width for i in range(len(v))], [max(x, 1e-12) for x in v], width=width, label=name)
    ax.set_xticks(range(k), [f"PC{i + 1}" for i in range(k)])
    ax.set_yscale("log")
    ax.set_ylim(1e-8, 1.5)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("explained variance ratio", fontsize=10)
    ax.legend(fontsize=8)

    ms = geo.mean_shift
    if ms is not None:
        ax = fig.add_subplot(2, 3, 5)
        _band(ax, s, ms.effective, "tab:purple", "1 / sum w^2", lo=1.0)
        ax.plot(s, ms.perplexity.mean(1).cpu().numpy(), color="tab:orange", label="exp(entropy)")
        _sigma_axis(ax, log_y=True)
        ax.set_title(f"mean shift: effective data points (of {ms.n})", fontsize=10)
        ax.legend(fontsize=8)

        ax = fig.add_subplot(2, 3, 6)
        _band(ax, s, ms.final_weight, "tab:brown", "weight of the final nearest point", lo=0.0, hi=1.0)
        ax.plot(s, ms.max_weight.mean(1).cpu().numpy(), color="tab:gray", linestyle="--", label="largest weight")
        _sigma_axis(ax)
        ax.set_title("attraction to the data point reached", fontsize=10)
        ax.legend(fontsize=8)
    else:
        ax = fig.add_subplot(2, 3, 5)
        r = dev.relative.cpu().numpy()
        for b in range(r.shape[1]):
            ax.plot(s, r[:, b], linewidth=0.6, alpha=0.6)
        _sigma_axis(ax)
        ax.set_title("deviation / chord length, per trajectory", fontsize=10)

        ax = fig.add_subplot(2, 3, 6)
        for b in range(c.shape[1]):
            ax.plot(c[:, b, 0], c[:, b, 1], linewidth=0.8)
        ax.set_xlabel("along x_start - x_end")
        ax.set_ylabel("PC1 off chord")
        ax.grid(alpha=0.3)
        ax.set_title("trajectories in 2-D (chord, PC1 off chord)", fontsize=10)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- tables


def _g(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def to_markdown(results: dict[str, dict[str, Any]], argv: Sequence[str] | None = None) -> str:
    """The summary table over oracles and one profile table per oracle."""
    lines = ["## Diffusion sampling: trajectory geometry", ""]
    if argv is not None:
        lines += ["Command: `mentor bench diffusion " + " ".join(argv) + "`", ""]
    lines += ["Deviation: distance of x_t to the chord x_start -> x_end (max over the path; / chord: divided by "
              "its length). cos: between D(x_t) - x_t and x_end - x_t. PCs: variance share of the top "
              "principal directions of each trajectory (per trajectory), of its part off the chord, and of "
              "all states together. Effective points: 1 / sum w_i^2 of the optimal denoiser's weights.", "",
              "| oracle | solver, steps | max deviation | max / chord | sigma at max | min cos | PC1 per traj. | "
              "PC1+PC2 off chord | top-3 all states | effective points (first, last) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        d, p = r["deviation"], r["pca"]
        ms = r["mean_shift"]
        eff = "-" if ms is None else f"{_g(ms['effective'][0])}, {_g(ms['effective'][-1])} (n = {ms['n_data']})"
        lines.append(f"| {name} | {r['solver']}, {len(r['sigmas']) - 1} | {_g(d['max']['mean'])} +- "
                     f"{_g(d['max']['std'])} | {_g(d['max_relative']['mean'])} | {_g(d['sigma_at_max_median'])} | "
                     f"{r['cosine']['min']:.4f} | {p['per_trajectory'][0]:.6f} | {sum(p['off_chord'][:2]):.4f} | "
                     f"{sum(p['joint'][:3]):.3f} | {eff} |")
    for name, r in results.items():
        lines += ["", f"### {name}", "", r["description"] + f" {r['trajectories']} trajectories, seed {r['seed']}, "
                  f"{r['seconds']:.1f} s.", ""]
        ms = r["mean_shift"]
        head = "| sigma | deviation | / chord | cos | angle (deg) |"
        head += " effective points | final weight |" if ms else ""
        lines += [head, "|---|---|---|---|---|" + ("---|---|" if ms else "")]
        n = len(r["sigmas"])
        for i in range(n):
            cos = r["cosine"]["profile"][i] if i < n - 1 else None
            ang = r["cosine"]["angle_deg"][i] if i < n - 1 else None
            row = (f"| {_g(r['sigmas'][i])} | {_g(r['deviation']['profile'][i])} | "
                   f"{_g(r['deviation']['relative_profile'][i])} | {'-' if cos is None else f'{cos:.5f}'} | "
                   f"{'-' if ang is None else f'{ang:.2f}'} |")
            if ms:
                row += f" {_g(ms['effective'][i])} | {ms['final_weight'][i]:.3f} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- driver


def run_geometry(oracles: Sequence[str] = ("gaussian", "digits"), run_dirs: Sequence[str] = (), *,
                 out: str | os.PathLike = DEFAULT_OUT, solver: str = "euler", steps: int = 20, n: int = 32,
                 seed: int = 0, n_data: int = 500, device: str = "auto", argv: Sequence[str] | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[dict[str, dict[str, Any]], str]:
    """Measure and draw every oracle and run; write ``<name>.png``, ``geometry.json`` and ``geometry.md`` into
    ``out``. Returns ``(results, markdown)``; ``results[name]`` is :meth:`Geometry.summary` plus the settings."""
    from mentor.diffusion import bench
    from mentor.diffusion.samplers import SAMPLERS

    if solver not in SAMPLERS:
        raise ConfigError(f"--geometry-solver {solver!r} is not a sampler; choose one of {', '.join(SAMPLERS)}.")
    if steps < 2:
        raise ConfigError(f"--geometry-steps must be at least 2 (one intermediate state to measure), got {steps}.")
    if n < 2:
        raise ConfigError(f"--geometry-n must be at least 2 trajectories, got {n}.")
    folder = os.fspath(out)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"--out {folder} is a file; with --geometry it names a folder for the figures and numbers: "
                          "give a folder path (it is created when missing).")
    _require_matplotlib()
    say = log or (lambda s: None)
    builders: dict[str, Callable[[], Any]] = {"gaussian": bench.gaussian_oracle,
                                              "digits": lambda: bench.digits_oracle(n_data)}
    targets: list[Callable[[], Any]] = []
    for name in oracles:
        if name not in builders:
            raise ConfigError(f"unknown oracle {name!r} for --oracles; known: {', '.join(builders)}.")
        targets.append(builders[name])
    for rd in run_dirs:
        targets.append(lambda rd=rd: bench.model_oracle(rd, device=device))
    built = []
    for build in targets:  # every oracle and run is loaded before anything is written
        start = time.time()
        built.append((build(), time.time() - start))
    os.makedirs(folder, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for oracle, load_seconds in built:
        start = time.time() - load_seconds
        geo = oracle_geometry(oracle, solver=solver, steps=steps, n=n, seed=seed)
        summary = geo.summary()
        summary.update(description=oracle.description.split("; reference")[0] + ".", solver=solver, seed=seed,
                       seconds=time.time() - start, empirical=isinstance(oracle.denoiser, EmpiricalDenoiser))
        name = oracle.name if oracle.name not in results else f"{oracle.name}-{len(results)}"
        png = geometry_figure(geo, f"{name}: {solver}, {steps} steps, {n} trajectories, seed {seed}")
        atomic_write_bytes(os.path.join(folder, f"{name}.png"), png)
        summary["figure"] = f"{name}.png"
        results[name] = summary
        say(f"{name}: geometry done ({summary['seconds']:.1f} s)")
    text = to_markdown(results, argv)
    payload = {"command": None if argv is None else ["mentor", "bench", "diffusion", *argv],
               "settings": {"solver": solver, "steps": steps, "trajectories": n, "seed": seed, "n_data": n_data,
                            "schedule": "polynomial"},
               "oracles": results}
    atomic_write_text(os.path.join(folder, "geometry.json"), json.dumps(_finite(payload), indent=1, allow_nan=False)
                      + "\n")
    atomic_write_text(os.path.join(folder, "geometry.md"), text)
    return results, text


def _finite(v: Any) -> Any:
    """``v`` with every non-finite float (a NaN cosine of a degenerate path) replaced by ``None``."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(args: Any, argv: Sequence[str]) -> int:
    """The ``--geometry`` branch of ``mentor bench diffusion`` (``args`` from its parser): print the markdown."""
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    _, text = run_geometry(args.oracles, args.run_dir, out=args.out or DEFAULT_OUT, solver=args.geometry_solver,
                           steps=args.geometry_steps, n=args.geometry_n, seed=args.seed, n_data=args.n_data,
                           device=args.device, argv=argv, log=log)
    print(text)
    return 0
