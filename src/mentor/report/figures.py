"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas (no pyplot, no display, no
global backend change), imported only when a report is made.

Curves come from ``metrics.jsonl``; the confusion matrix and the reliability diagram from
``test_details.json`` (pooled by :func:`mentor.report.tables.pool_details`); diffusion figures sample a
trained ``edm`` run on the CPU with few images and few steps.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ..errors import ReportError
from .collect import Run

DPI = 80
SKIP = {"step", "split", "time"}


def require_matplotlib() -> None:
    """Raise :class:`ReportError` when matplotlib (the ``plots`` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("mentor report draws its figures with matplotlib, which is not installed: "
                          "pip install 'mentor[plots]' (or pip install matplotlib), then run it again.") from None


def _figure(width: float, height: float, left: float = 0.6, right: float = 0.2, bottom: float = 0.5,
            top: float = 0.45, wspace: float = 0.35, hspace: float = 0.6):
    """A figure of ``width`` x ``height`` inches with fixed margins in inches (a layout engine costs as much
    as the drawing); ``wspace``/``hspace`` are fractions of a panel's width/height."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace, hspace=hspace)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _color(i: int) -> str:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def _numeric(rec: dict[str, Any], key: str) -> float | None:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def curve_panels(runs: list[Run], domains: bool = True) -> list[tuple[str, str, list[str]]]:
    """``(title, split, keys)`` per panel: every train term, the learning rate, the throughput and every
    validation number; keys ``<base>@<domain>`` share one panel per base (left out with ``domains=False``)."""
    panels: dict[tuple[str, str], list[str]] = {}
    order = {"lr": 1, "img_s": 2}
    for split in ("train", "val"):
        keys: list[str] = []
        for r in runs:
            for rec in getattr(r, split):
                keys.extend(k for k in rec if k not in SKIP and _numeric(rec, k) is not None)
        keys = list(dict.fromkeys(keys))
        keys.sort(key=lambda k: order.get(k, 0))  # loss terms first, then lr and img/s
        for k in keys:
            base = k.split("@", 1)[0]
            if "@" in k and not domains:
                continue
            panels.setdefault((base if "@" in k else k, split), []).append(k)
    return [(title, split, keys) for (title, split), keys in panels.items()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = _numeric(rec, key)
        if v is not None and isinstance(rec.get("step"), (int, float)):
            xs.append(rec["step"])
            ys.append(v)
    return xs, ys


def _scale(ax, title: str, values: list[float]) -> None:
    """A log y-axis for a positive number spanning more than a decade and a half (loss terms falling from
    their start), except for the learning rate and accuracies."""
    if title == "lr" or "acc" in title or not values or min(values) <= 0:
        return
    if max(values) / min(values) > 30:
        ax.set_yscale("log")


def _title(title: str, split: str, many: bool) -> str:
    label = {"lr": "learning rate", "img_s": "throughput (img/s)"}.get(title, title)
    return f"{label} (@ each domain)" if many else label


def run_curves(run: Run) -> bytes | None:
    """One panel per logged number of one run (train terms, lr, img/s, validation); None without records."""
    panels = curve_panels([run])
    if not panels:
        return None
    rows, cols = _grid(len(panels))
    fig = _figure(3.6 * cols, 2.4 * rows + 0.3, top=0.65, hspace=0.7)
    for i, (title, split, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        seen: list[float] = []
        for j, k in enumerate(keys):
            xs, ys = _series(getattr(run, split), k)
            seen += ys
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, color=_color(j),
                    label=k.split("@", 1)[1] if "@" in k else None)
        _scale(ax, title, seen)
        ax.set_title(_title(title, split, len(keys) > 1 or "@" in keys[0]), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or "@" in keys[0]:
            ax.legend(fontsize=6)
    fig.suptitle(run.label, fontsize=10)
    return _png(fig)


def overlay_curves(groups) -> bytes | None:
    """Every run's curves overlaid, one colour per group, one line style per seed within a group."""
    runs = [r for g in groups for r in g.runs]
    panels = curve_panels(runs, domains=False)
    if not panels:
        return None
    rows, cols = _grid(len(panels))
    legend_rows = math.ceil(len(groups) / 3)
    fig = _figure(3.8 * cols, 2.4 * rows + 0.3 + 0.25 * legend_rows, bottom=0.55 + 0.25 * legend_rows, top=0.35,
                  hspace=0.7)
    styles = ["-", "--", ":", "-."]
    handles = {}
    for i, (title, split, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        seen: list[float] = []
        for gi, g in enumerate(groups):
            for si, r in enumerate(g.runs):
                xs, ys = _series(getattr(r, split), keys[0])
                seen += ys
                if xs:
                    (line,) = ax.plot(xs, ys, color=_color(gi), ls=styles[si % len(styles)], lw=1.2)
                    handles.setdefault(g.name, line)
        _scale(ax, title, seen)
        ax.set_title(_title(title, split, False), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=8,
               frameon=False)
    return _png(fig)


def stream_accuracy(groups) -> bytes | None:
    """Adaptation: accuracy per stream (mean over seeds), one line per group."""
    from .tables import mean_std

    streams: list[str] = []
    for g in groups:
        for r in g.finished:
            streams.extend(k.split("@", 1)[1] for k in r.summary or {} if k.startswith("acc@"))
    streams = list(dict.fromkeys(streams))
    if not streams:
        return None
    longest = max(len(s) for s in streams)
    fig = _figure(max(5.0, 0.3 * len(streams) + 1.5), 2.8 + 0.055 * longest, bottom=0.35 + 0.055 * longest,
                  top=0.2)
    ax = fig.add_subplot(1, 1, 1)
    for gi, g in enumerate(groups):
        ys = [mean_std(list(g.by_seed(f"acc@{s}").values()))[0] * 100 for s in streams]
        ax.plot(range(len(streams)), ys, marker="o", ms=3, color=_color(gi), label=g.name)
    ax.set_xticks(range(len(streams)), streams, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def confusion_figure(pooled: dict[str, Any], title: str) -> bytes:
    """The confusion matrix, each row normalised by its class count, with the counts written in the cells
    when there are at most 20 classes."""
    cm = pooled["confusion"]
    k = len(cm)
    rows = [sum(r) or 1 for r in cm]
    norm = [[v / rows[i] for v in r] for i, r in enumerate(cm)]
    longest = max(len(str(n)) for n in pooled["classes"])
    label = 0.45 + 0.065 * min(longest, 24)
    size = min(9.0, max(3.0, 0.36 * k))
    fig = _figure(size + label + 1.3, size + label + 0.6, left=label, bottom=label, right=0.2, top=0.6)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    names = pooled["classes"]
    ax.set_xticks(range(k), names, rotation=90 if k > 6 else 0, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i][j]:
                    ax.text(j, i, f"{int(cm[i][j])}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i][j] > 0.5 else "black")
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="fraction of the true class")
    bar.ax.tick_params(labelsize=7)
    ax.set_title(f"{title}\naccuracy {pooled['acc'] * 100:.2f}% over {pooled['n']} images", fontsize=9)
    return _png(fig)


def reliability_figure(pooled: dict[str, Any], title: str) -> bytes:
    """Accuracy against confidence per equal-width bin (bars), the diagonal of perfect calibration and the
    share of images per bin; the ECE in the title."""
    count = pooled["count"]
    b = len(count)
    width = 1.0 / b
    centres = [(i + 0.5) * width for i in range(b)]
    acc = [c / k if k else 0.0 for c, k in zip(pooled["correct"], count)]
    conf = [c / k if k else 0.0 for c, k in zip(pooled["confidence"], count)]
    fig = _figure(4.4, 5.0, top=0.6, hspace=0.15)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax = fig.add_subplot(grid[0])
    ax.bar(centres, acc, width=width, edgecolor="black", lw=0.5, color="#4c72b0", label="accuracy")
    ax.bar(centres, [c - a for c, a in zip(conf, acc)], bottom=acc, width=width, facecolor="none", hatch="///",
           edgecolor="#c44e52", lw=0.8, label="gap to the mean confidence")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.17)  # room for the legend above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)
    ax.set_title(f"{title}\nECE {pooled['ece'] * 100:.2f}% ({b} bins, {pooled['n']} images)", fontsize=9)
    share = fig.add_subplot(grid[1], sharex=ax)
    share.bar(centres, [k / pooled["n"] for k in count], width=width, color="gray", edgecolor="black", lw=0.5)
    share.set_ylabel("share", fontsize=8)
    share.set_xlabel("confidence (max softmax)", fontsize=8)
    share.tick_params(labelsize=7)
    return _png(fig)


# ----------------------------------------------------------------------------------------------- diffusion


def diffusion_figures(run: Run, n: int = 16, nfe: int = 8, trajectory: int = 4, seed: int = 0
                      ) -> tuple[bytes, bytes, str]:
    """A grid of ``n`` samples and a figure of ``trajectory`` sampling trajectories of an ``edm`` run (its
    best.pt, EMA weights), iPNDM with ``nfe`` evaluations on the polynomial schedule, on the CPU; and a
    caption. Raises a :class:`~mentor.errors.MentorError` when the run has no usable checkpoint."""
    import torch

    from ..diffusion.edm import load_edm, to_images
    from ..diffusion.sample import encode_png, image_grid, initial_noise, steps_for_nfe
    from ..diffusion.samplers import SAMPLERS
    from ..diffusion.schedules import get_schedule

    denoiser, info = load_edm(run.path, ema=True, device="cpu")
    steps = steps_for_nfe("ipndm", nfe)
    sigmas = get_schedule("polynomial", steps, sigma_min=info["sigma_min"], sigma_max=info["sigma_max"])
    noise = initial_noise(n, tuple(info["image_shape"]), seed)
    cond = None
    if info["conditional"]:  # one class after another, so the grid shows every class
        cond = {"class_labels": torch.arange(n) % info["num_classes"]}
    with torch.no_grad():
        traj = SAMPLERS["ipndm"](denoiser, noise * sigmas[0], sigmas, return_trajectory=True, cond=cond)
    c, h, w = info["image_shape"]
    grid = image_grid(to_images(traj.x), scale=max(1, 64 // max(h, w)))
    points = traj.points[:, :trajectory].float()  # (N, B, C, H, W)
    sig = sigmas.double().tolist()
    k = points.shape[0]
    fig = _figure(0.95 * k + 0.2, 0.95 * points.shape[1] + 0.6, left=0.1, right=0.1, bottom=0.1, top=0.5,
                  wspace=0.08, hspace=0.08)
    for j in range(k):
        scaled = (points[j] / math.sqrt(sig[j] ** 2 + info["sigma_data"] ** 2) * 0.5).clamp(-1, 1)
        for i in range(points.shape[1]):
            ax = fig.add_subplot(points.shape[1], k, i * k + j + 1)
            img = ((scaled[i] + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"σ={sig[j]:.3g}", fontsize=7)
    fig.suptitle("sampling trajectories (x / sqrt(σ² + σ_data²), left: noise, right: sample)", fontsize=8)
    what = "EMA weights" if info["ema"] else "weights"
    file = Path(info["checkpoint"]).name
    caption = (f"{n} samples of {run.label} ({file}, {what}, step {info['step']}): iPNDM, "
               f"{traj.nfe} denoiser evaluations, polynomial schedule, seed {seed}, on the CPU")
    return encode_png(grid), _png(fig), caption
