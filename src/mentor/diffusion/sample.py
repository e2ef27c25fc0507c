"""Sampling a trained denoiser with a chosen solver and budget, and writing the result as a PNG grid.

``mentor sample RUN_DIR --solver ipndm --nfe 5 --schedule polynomial --n 64 --out grid.png`` loads an
``edm`` run (:func:`~mentor.diffusion.edm.load_edm`), turns the NFE budget into a number of timestamps
for the solver (:func:`steps_for_nfe`), integrates the probability-flow ODE from seeded noise and
writes the images. With ``--predictor`` a trained AMED predictor file decides solver, schedule and
steps (its sampling configuration travels with it).

The PNG writer needs no imaging library: it emits an 8-bit grayscale or RGB PNG with zlib.
"""

from __future__ import annotations

import math
import struct
import zlib
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
                  afs: bool = False, predictor: str | Path | None = None, batch_size: int = 256) -> Tensor:
    """``n`` samples in [-1, 1] (float32, on the CPU) from a denoiser loaded by ``load_edm``.

    Without ``predictor`` the run's sigma range and ``schedule`` give the timestamps; with it the AMED
    predictor file's own sampling configuration is used and ``solver``/``nfe``/``schedule`` are ignored.
    Noise is drawn once for all ``n`` samples, so the images do not depend on ``batch_size``.
    """
    device = next(denoiser.parameters()).device
    cond_label = _labels(info, class_label)
    noise = initial_noise(n, tuple(info["image_shape"]), seed)
    if predictor is not None:
        from .amed import amed_sample, load_predictor

        pred, config = load_predictor(predictor, map_location=device)
        pred = pred.float()
        run = lambda z, c: amed_sample(denoiser, z, pred, config, cond=c)  # noqa: E731
    else:
        from .samplers import SAMPLERS
        from .schedules import SCHEDULES, get_schedule

        if schedule not in SCHEDULES:
            raise SampleError(f"unknown schedule {schedule!r}.{suggest(schedule, list(SCHEDULES))} "
                              f"Known: {', '.join(SCHEDULES)}")
        num_steps = steps_for_nfe(solver, nfe, afs)
        sigmas = get_schedule(schedule, num_steps, sigma_min=info["sigma_min"], sigma_max=info["sigma_max"])
        fn = SAMPLERS[solver]

        def run(z: Tensor, c: dict | None) -> Tensor:
            return fn(denoiser, z * sigmas[0].to(z), sigmas, afs=afs, cond=c)

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
                  nrow: int | None = None, scale: int = 1) -> dict[str, Any]:
    """Load an ``edm`` run, sample ``n`` images and write them as one PNG grid; returns what was done."""
    from .edm import load_edm, to_images

    if n < 1:
        raise SampleError(f"--n must be >= 1, got {n}")
    denoiser, info = load_edm(run_dir, ema=ema, device=device)
    x = sample_images(denoiser, info, solver=solver, nfe=nfe, schedule=schedule, n=n, seed=seed,
                      class_label=class_label, afs=afs, predictor=predictor)
    grid = image_grid(to_images(x), nrow=nrow, scale=scale)
    write_png(out, grid)
    if predictor is not None:
        from .amed import load_predictor

        config = load_predictor(predictor)[1]
        solver = config["solver"] if config.get("base") is None else f"{config['solver']}({config['base']})"
        nfe = 2 * (config["num_steps"] - 1) - int(config["afs"])  # two evaluations per AMED interval
    return {"out": str(out), "n": n, "size": [int(grid.shape[2]), int(grid.shape[1])], "checkpoint": info["checkpoint"],
            "ema": info["ema"], "solver": solver, "nfe": nfe}
