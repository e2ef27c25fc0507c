"""Sampling a trained denoiser with a chosen solver and budget, and writing the result as a PNG grid.

``mentor sample RUN_DIR --solver ipndm --nfe 5 --schedule polynomial --n 64 --out grid.png`` loads an
``edm`` run (:func:`~mentor.diffusion.edm.load_edm`), turns the NFE budget into a number of timestamps
for the solver (:func:`steps_for_nfe`), integrates the probability-flow ODE from seeded noise and
writes the images. With ``--predictor`` a trained AMED predictor file decides solver, schedule and
steps (its sampling configuration travels with it). ``--class-label K --guidance S`` samples class ``K``
with classifier-free guidance of scale ``S`` (:class:`~mentor.diffusion.adapters.CFGDenoiser`) from a
model trained with label dropout; each evaluation is then one call on a doubled batch.

The PNG writer needs no imaging library: it emits an 8-bit grayscale or RGB PNG with zlib.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.checkpoint import atomic_write_bytes
from ..errors import SampleError
from ..registry import suggest

# --------------------------------------------------------------------------------------------------
# budget


def steps_for_nfe(solver: str, nfe: int, afs: bool = False) -> int:
    """The number of timestamps ``N`` at which ``solver`` uses exactly ``nfe`` denoiser evaluations.

    Heun and DPM-Solver-2 spend two evaluations per step, so only even budgets (odd with AFS) are
    reachable for them; any other budget raises :class:`SampleError`.
    """
    from .samplers import SAMPLERS
    from .samplers import nfe as count

    if solver not in SAMPLERS:
        raise SampleError(f"unknown solver {solver!r}.{suggest(solver, list(SAMPLERS))} Known: {', '.join(SAMPLERS)}")
    if nfe < 1:
        raise SampleError(f"--nfe must be >= 1, got {nfe}")
    for n in range(2, 2 * nfe + 4):
        if count(solver, n, afs=afs) == nfe:
            return n
    reachable = sorted({count(solver, n, afs=afs) for n in range(2, 2 * nfe + 4)} - {0})
    near = [v for v in reachable if abs(v - nfe) <= 2]
    raise SampleError(f"{solver} cannot spend exactly {nfe} evaluations{' with AFS' if afs else ''}; "
                      f"nearby reachable NFE: {', '.join(map(str, near or reachable[:4]))}")


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard normal latents drawn on the CPU from ``seed`` (the same images on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


@torch.no_grad()
def sample_images(denoiser: nn.Module, info: dict[str, Any], *, solver: str = "ipndm", nfe: int = 5,
                  schedule: str = "polynomial", n: int = 64, seed: int = 0, class_label: int | None = None,
                  afs: bool = False, predictor: str | Path | None = None, batch_size: int = 256,
                  guidance: float | None = None, solver_opts: dict[str, Any] | None = None) -> Tensor:
    """``n`` samples in [-1, 1] (float32, on the CPU) from a denoiser loaded by ``load_edm``.

    Without ``predictor`` the run's sigma range and ``schedule`` give the timestamps; with it the AMED
    predictor file's own sampling configuration is used and ``solver``/``nfe``/``schedule`` are ignored.
    Noise is drawn once for all ``n`` samples, so the images do not depend on ``batch_size``. ``guidance``
    (with ``class_label``) applies classifier-free guidance of that scale against the "no label" class
    (-1) that label dropout trains; NFE counts the batched calls. ``solver_opts`` are the solver's own options
    (e.g. ``{"eta": 0.5}``, :func:`solver_options`). A stochastic solver's noise comes from one generator per
    sample, seeded by ``seed`` and the sample's index (:func:`per_sample_noise`), so it does not depend on
    ``batch_size`` either.
    """
    device = next(denoiser.parameters()).device
    cond_label = _labels(info, class_label)
    if guidance is not None:
        denoiser = _guided(denoiser, info, cond_label, guidance, predictor)
    noise = initial_noise(n, tuple(info["image_shape"]), seed)
    if predictor is not None:
        from .amed import amed_sample, load_predictor

        pred, config = load_predictor(predictor, map_location=device)
        pred = pred.float()
        if solver_opts:
            raise SampleError("solver options (--solver-opt) do not apply with --predictor: the predictor file "
                              "fixes the solver and its settings")
        run = lambda z, c: amed_sample(denoiser, z, pred, config, cond=c)  # noqa: E731
    else:
        from .samplers import SAMPLERS, STOCHASTIC
        from .schedules import SCHEDULES, get_schedule

        if schedule not in SCHEDULES:
            raise SampleError(f"unknown schedule {schedule!r}.{suggest(schedule, list(SCHEDULES))} "
                              f"Known: {', '.join(SCHEDULES)}")
        num_steps = steps_for_nfe(solver, nfe, afs)
        sigmas = get_schedule(schedule, num_steps, sigma_min=info["sigma_min"], sigma_max=info["sigma_max"])
        fn = SAMPLERS[solver]
        opts = solver_options(solver, solver_opts)
        first = [0]  # index of the batch's first sample: the batches come in order

        def run(z: Tensor, c: dict | None) -> Tensor:
            extra = {}
            if solver in STOCHASTIC:
                extra["noise_sampler"] = per_sample_noise(seed, first[0], z)
            first[0] += z.shape[0]
            try:
                return fn(denoiser, z * sigmas[0].to(z), sigmas, afs=afs, cond=c, **opts, **extra)
            except (TypeError, ValueError) as e:  # a bad option value: a negative eta, text for a number, ...
                if not opts:
                    raise
                raise SampleError(f"a solver option does not suit {solver} ({', '.join(map(str, opts.items()))}): "
                                  f"{e}") from e

    out = []
    for start in range(0, n, batch_size):
        z = noise[start:start + batch_size].to(device)
        c = None if cond_label is None else {"class_labels": torch.full((z.shape[0],), cond_label, device=device)}
        out.append(run(z, c).float().cpu())
    return torch.cat(out)


def _labels(info: dict[str, Any], class_label: int | None) -> int | None:
    if class_label is None:
        return None
    if not info.get("conditional"):
        raise SampleError("--class-label needs a class-conditional model (trained with method.conditional: true)")
    if not 0 <= class_label < info["num_classes"]:
        raise SampleError(f"--class-label must be in [0, {info['num_classes'] - 1}], got {class_label}")
    return class_label


def _guided(denoiser: nn.Module, info: dict[str, Any], class_label: int | None, scale: float,
            predictor: str | Path | None) -> Any:
    """The classifier-free guided denoiser, after checking the request can be served."""
    from .adapters import CFGDenoiser

    if class_label is None:
        raise SampleError("--guidance needs --class-label: guidance pushes the samples towards that class")
    if not math.isfinite(scale):
        raise SampleError(f"--guidance must be a finite number, got {scale}")
    if not info.get("label_dropout"):
        raise SampleError("--guidance needs a model trained with label dropout (method.label_dropout > 0, e.g. "
                          "0.1), which also trains the unconditional model; this run has label_dropout 0")
    if predictor is not None:
        raise SampleError("--guidance cannot be combined with --predictor: the AMED predictor reads the network's "
                          "features of an unguided batch; drop one of the two")
    return CFGDenoiser(denoiser, scale, uncond={"class_labels": -1})


# --------------------------------------------------------------------------------------------------
# solver options and noise

#: Options every sampler takes that sampling sets itself (``intermediate`` and ``history`` are AMED's).
_RESERVED = frozenset({"afs", "return_trajectory", "cond", "callback", "generator", "noise_sampler", "intermediate",
                       "history"})


def solver_options(solver: str, opts: dict[str, Any] | None) -> dict[str, Any]:
    """``opts`` checked against the keyword options of sampler ``solver`` (e.g. ``eta``, ``s_churn``,
    ``max_order``); an unknown one raises :class:`SampleError` listing those it takes."""
    import inspect

    from .samplers import SAMPLERS

    opts = dict(opts or {})
    params = inspect.signature(SAMPLERS[solver]).parameters
    known = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _RESERVED]
    for key in opts:
        if key not in known:
            raise SampleError(f"{solver} has no option {key!r} (--solver-opt {key}=...); it takes "
                              f"{', '.join(known) if known else 'none'}")
    return opts


def parse_solver_options(items: Sequence[str]) -> dict[str, Any]:
    """``["eta=0.5", "solver_type=heun", "lower_order_final=true"]`` as a dict: integers, floats (``inf``
    included), ``true``/``false``, else the text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise SampleError(f"--solver-opt expects KEY=VALUE (e.g. eta=0.5 or s_churn=40), got {item!r}")
        text = text.strip()
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        out[key.strip()] = value
    return out


def per_sample_noise(seed: int, first: int, like: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """A noise sampler for a batch shaped like ``like`` whose samples are ``first, first + 1, ...`` of a run:
    each sample's noise comes from its own CPU generator seeded by ``seed`` and its index, so the samples do
    not depend on how the run is split into batches (nor on the device)."""
    base = (int(seed) % 2**31) * 2**32 + 1  # never ``seed`` itself, which draws the initial noise
    gens = [torch.Generator().manual_seed(base + first + k) for k in range(like.shape[0])]
    shape = tuple(like.shape[1:])

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=like.device, dtype=like.dtype)

    return draw


# --------------------------------------------------------------------------------------------------
# PNG


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 1, scale: int = 1) -> Tensor:
    """uint8 images (N, C, H, W) tiled into one (C, H', W') image, ``nrow`` images per row (default
    ``ceil(sqrt(N))``), ``padding`` black pixels around each tile, each pixel repeated ``scale`` times."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("image_grid: expected uint8 images of shape (N, C, H, W)")
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = torch.zeros((c, rows * (h + padding) + padding, cols * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def encode_png(image: Tensor) -> bytes:
    """An 8-bit PNG of a uint8 image (C, H, W) with C = 1 (grayscale) or 3 (RGB); filter 0 on every row."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError("encode_png: expected a uint8 image of shape (1 or 3, H, W)")
    c, h, w = image.shape
    rows = image.permute(1, 2, 0).reshape(h, w * c).contiguous()
    raw = torch.cat([torch.zeros((h, 1), dtype=torch.uint8), rows], dim=1).numpy().tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_png(path: str | Path, image: Tensor) -> None:
    """Write :func:`encode_png` of ``image`` to ``path`` atomically."""
    atomic_write_bytes(path, encode_png(image))


# --------------------------------------------------------------------------------------------------
# the command


def sample_to_png(run_dir: str | Path, out: str | Path, *, solver: str = "ipndm", nfe: int = 5,
                  schedule: str = "polynomial", n: int = 64, seed: int = 0, class_label: int | None = None,
                  afs: bool = False, predictor: str | Path | None = None, ema: bool = True, device: str = "auto",
                  nrow: int | None = None, scale: int = 1, guidance: float | None = None,
                  solver_opts: dict[str, Any] | Sequence[str] | None = None) -> dict[str, Any]:
    """Load an ``edm`` run, sample ``n`` images and write them as one PNG grid; returns what was done.

    ``solver_opts`` is a dict of the solver's options or ``KEY=VALUE`` strings (``--solver-opt``).
    """
    from .edm import load_edm, to_images

    if n < 1:
        raise SampleError(f"--n must be >= 1, got {n}")
    if _method_of(run_dir) == "sfd":
        return _sfd_to_png(run_dir, out, n=n, seed=seed, class_label=class_label, device=device, nrow=nrow,
                           scale=scale)
    denoiser, info = load_edm(run_dir, ema=ema, device=device)
    opts = parse_solver_options(solver_opts) if solver_opts is not None and not isinstance(solver_opts, dict) \
        else solver_opts
    x = sample_images(denoiser, info, solver=solver, nfe=nfe, schedule=schedule, n=n, seed=seed,
                      class_label=class_label, afs=afs, predictor=predictor, guidance=guidance, solver_opts=opts)
    grid = image_grid(to_images(x), nrow=nrow, scale=scale)
    write_png(out, grid)
    if predictor is not None:
        from .amed import load_predictor

        config = load_predictor(predictor)[1]
        solver = config["solver"] if config.get("base") is None else f"{config['solver']}({config['base']})"
        nfe = 2 * (config["num_steps"] - 1) - int(config["afs"])  # two evaluations per AMED interval
    return {"out": str(out), "n": n, "size": [int(grid.shape[2]), int(grid.shape[1])], "checkpoint": info["checkpoint"],
            "ema": info["ema"], "solver": solver, "nfe": nfe, **({} if guidance is None else {"guidance": guidance}),
            **({"solver_opts": opts} if opts else {})}


def _method_of(run_dir: str | Path) -> str | None:
    """The method named in a run directory's ``config.yaml`` (None when there is none to read)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        return ((yaml.safe_load(path.read_text()) or {}).get("method") or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _sfd_to_png(run_dir: str | Path, out: str | Path, *, n: int, seed: int, class_label: int | None, device: str,
                nrow: int | None, scale: int) -> dict[str, Any]:
    """An ``sfd`` run's student sampled with its own stored configuration (Euler, its step count) into a grid."""
    from .edm import to_images
    from .sfd import sfd_sample
    from .sfd_method import load_sfd

    student, config, info = load_sfd(run_dir, device=device)
    dev = next(student.parameters()).device
    noise = initial_noise(n, tuple(info["image_shape"]), seed).to(dev)
    cond = {}
    labels = _labels({"num_classes": info.get("num_classes"), "conditional": info.get("conditional")}, class_label)
    if info.get("conditional"):
        cond["class_labels"] = torch.full((n,), labels, device=dev) if labels is not None else \
            torch.arange(n, device=dev) % info["num_classes"]
    x = sfd_sample(student, noise, config, cond=cond).float().cpu()
    grid = image_grid(to_images(x), nrow=nrow, scale=scale)
    write_png(out, grid)
    nfe = config["num_steps"] - 1 - int(bool(config.get("afs")))
    return {"out": str(out), "n": n, "size": [int(grid.shape[2]), int(grid.shape[1])], "checkpoint": str(run_dir),
            "solver": "sfd (euler)", "nfe": nfe}
