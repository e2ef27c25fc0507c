"""SFD: fine-tune a copy of a denoiser so that a few Euler steps follow a teacher solver's trajectory.

Implements "Simple and Fast Distillation of Diffusion Models" (Zhou, Chen et al., NeurIPS 2024). The
student (a trainable copy of the denoiser) samples with plain Euler on a short schedule of ``num_steps``
timestamps; the teacher (the frozen original) runs a solver (DPM-Solver++(3M) by default) on
``(M + 1)(num_steps - 1) + 1`` timestamps of the same schedule, sliced every ``M + 1`` points. The student is
stepped one interval at a time from its own previous output (the chain is detached between intervals), with
the L1 loss ``|x_student - x_teacher|`` summed over elements and divided by the batch size and one optimizer
step per interval. With AFS the first interval uses the analytic direction ``x / sqrt(1 + t**2)``: no network,
no loss, no optimizer step. Adam (lr 5e-5, betas (0.9, 0.999)); the learning rate drops tenfold at half the
iterations. The paper uses ``sigma_min = 0.006`` for EDM models (pass it in ``schedule_kw``).

SFD-v, one model for several step counts: each iteration draws ``num_steps`` from ``step_counts`` and the
student is called as ``student(x, sigma, num_steps=n)``. :class:`StepConditioned` makes any denoiser accept
that argument: it adds learned per-step-count scale/shift (FiLM) parameters to the outputs of named
sub-modules of the wrapped denoiser, through forward hooks, so the network's own ``forward`` is untouched.
The parameters start at zero, so the wrapper starts out identical to the wrapped denoiser (the paper
injects a step embedding as an extra scale/shift in every U-Net block, which is the same idea applied to
chosen modules).

Training runs on the engine as the ``sfd`` method (:mod:`mentor.diffusion.sfd_method`: ``mentor train
recipes/diffusion/digits_sfd.yaml`` fine-tunes an ``edm`` run and writes ``student.pt``); :func:`sfd_distill` is
its Python form for networks held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mentor.diffusion.amed import atomic_save
from mentor.diffusion.samplers import Trajectory, euler
from mentor.diffusion.schedules import get_schedule


def _channels(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_features", "num_channels", "embedding_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


class StepConditioned(nn.Module):
    """A denoiser conditioned on the number of sampling steps (SFD-v), wrapping any ``nn.Module`` denoiser.

    ``modules`` names sub-modules of ``denoiser`` (as in ``denoiser.named_modules()``, e.g.
    ``"net.layers.1"`` inside an :class:`~mentor.diffusion.denoisers.EDMPrecond`). For each, a table of
    ``len(step_counts)`` learned rows holds a scale and a shift per channel, and a forward hook replaces the
    module's output ``h`` by ``h * (1 + scale[n]) + shift[n]`` (channels on dimension 1, broadcast over the
    rest). The channel count is read from ``out_features``/``out_channels``/``num_features``/``num_channels``
    or given in ``channels``. The tables start at zero.

    Call as ``wrapper(x, sigma, num_steps=n, **cond)`` with ``n`` an int or a per-sample LongTensor;
    ``num_steps=None`` runs the wrapped denoiser unmodulated. The hooks are attached for the duration of a
    call only, so a ``copy.deepcopy`` of the wrapper (an EMA copy, a restored checkpoint) modulates with its
    own tables; an int ``n`` is checked on the host, with no device synchronisation.
    """

    def __init__(self, denoiser: nn.Module, modules: Sequence[str], step_counts: Sequence[int] = (4, 5, 6, 7),
                 channels: dict[str, int] | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.step_counts = tuple(int(n) for n in sorted(set(step_counts)))
        self.module_names = tuple(modules)
        table = torch.full((max(self.step_counts) + 1,), -1, dtype=torch.long)
        table[list(self.step_counts)] = torch.arange(len(self.step_counts))
        self.register_buffer("_index", table, persistent=False)
        named = dict(denoiser.named_modules())
        self.film = nn.ModuleList()
        for name in self.module_names:
            if name not in named:
                raise KeyError(f"StepConditioned: {type(denoiser).__name__} has no sub-module {name!r}")
            width = (channels or {}).get(name) or _channels(named[name])
            if width is None:
                raise ValueError(f"StepConditioned: cannot tell the channel count of {name!r}; pass channels=")
            emb = nn.Embedding(len(self.step_counts), 2 * width)
            nn.init.zeros_(emb.weight)
            self.film.append(emb)

    def _hook(self, k: int, rows: Tensor) -> Callable:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            scale, shift = self.film[k](rows).to(output.dtype).chunk(2, dim=-1)
            shape = (scale.shape[0], scale.shape[1]) + (1,) * (output.ndim - 2)
            return output * (1 + scale.reshape(shape)) + shift.reshape(shape)

        return hook

    def index(self, num_steps: int | Tensor, batch: int, device: torch.device) -> Tensor:
        """Row indices ``(B,)`` or ``(1,)`` for ``num_steps``; an unknown count is an error."""
        if isinstance(num_steps, int) and not isinstance(num_steps, bool):
            if num_steps not in self.step_counts:
                raise ValueError(f"StepConditioned was built for step counts {self.step_counts}, got [{num_steps}]")
            return torch.full((1,), self.step_counts.index(num_steps), dtype=torch.long, device=device)
        n = torch.as_tensor(num_steps, device=device).reshape(-1).long()
        if bool(((n < 0) | (n >= self._index.numel())).any()) or bool((self._index.to(device)[n] < 0).any()):
            raise ValueError(f"StepConditioned was built for step counts {self.step_counts}, got {n.tolist()}")
        return self._index.to(device)[n]

    def forward(self, x: Tensor, sigma: Tensor | float, num_steps: int | Tensor | None = None, **cond: Any) -> Tensor:
        if num_steps is None:
            return self.denoiser(x, sigma, **cond)
        rows = self.index(num_steps, x.shape[0], x.device)
        handles = [self.denoiser.get_submodule(name).register_forward_hook(self._hook(k, rows))
                   for k, name in enumerate(self.module_names)]
        try:
            return self.denoiser(x, sigma, **cond)
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class SFDResult:
    """Losses per iteration (summed over the trained intervals), the sampling config to store, and the engine
    run's ``summary.json`` (``val_rmse_last``: the student's few-step error against the teacher solver)."""

    losses: list[float]
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def sfd_distill(
    student: nn.Module,
    teacher: Callable,
    noise: Callable[..., Tensor] | Sequence[int],
    *,
    num_steps: int = 4,
    M: int = 3,
    teacher_solver: str = "dpm_solver_pp",
    teacher_opts: dict | None = None,
    schedule: str = "polynomial",
    schedule_kw: dict | None = None,
    afs: bool = True,
    iterations: int = 100,
    batch: int = 128,
    lr: float = 5e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    lr_drop_at: float = 0.5,
    step_counts: Sequence[int] | None = None,
    cond: Callable[[int, torch.Generator | None], dict] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    callback: Callable[[int, float], None] | None = None,
    seed: int = 0,
    val_size: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> SFDResult:
    """Fine-tune ``student`` in place so that Euler on ``num_steps`` timestamps tracks ``teacher``'s solver.

    The Python form of the ``sfd`` method (:class:`~mentor.diffusion.sfd_method.SFD`): it builds the method
    around these networks and trains it with the engine for ``iterations`` iterations of ``batch`` samples, each
    one optimizer step per trained interval (Adam at ``lr``, ``betas``; the rate divided by ten from iteration
    ``ceil(lr_drop_at * iterations)`` on), in fp32 on ``device`` (default: the student's). The run directory is
    ``out_dir`` (a temporary one by default); the engine's ``summary.json`` comes back in the result.

    ``noise`` gives unscaled latents (``(batch, generator) -> Tensor`` or a per-sample shape drawn in
    ``dtype``). ``teacher_opts`` default to ``{"max_order": 3}`` for DPM-Solver++ (3M); ``teacher`` is any
    denoiser, used as it is (neither moved nor frozen). With ``step_counts`` (e.g. ``(4, 5, 6, 7)``) each
    iteration's ``num_steps`` is drawn from it (all of them with ``generator``, before training) and the student
    is called as ``student(x, sigma, num_steps=n)`` (wrap it in :class:`StepConditioned`).
    ``cond(batch, generator)`` may return denoiser conditioning. ``callback(iteration, loss)`` follows each
    iteration. The final evaluation samples ``val_size`` (default ``batch``) latents drawn from a generator
    seeded with 0. The engine seeds torch's generators with ``seed``; the caller's random state is restored.
    """
    from mentor.diffusion.sfd_method import distill

    return distill(student, teacher, noise, num_steps=num_steps, M=M, teacher_solver=teacher_solver,
                   teacher_opts=teacher_opts, schedule=schedule, schedule_kw=schedule_kw, afs=afs,
                   iterations=iterations, batch=batch, lr=lr, betas=betas, lr_drop_at=lr_drop_at,
                   step_counts=step_counts, cond=cond, generator=generator, dtype=dtype, device=device,
                   callback=callback, seed=seed, val_size=val_size, out_dir=out_dir)


def sfd_sample(student: Callable, noise: Tensor, config: dict[str, Any], *, num_steps: int | None = None,
               cond: dict | None = None, return_trajectory: bool = False) -> Tensor | Trajectory:
    """Euler sampling with a distilled student and its stored ``config`` from unscaled latents ``noise``.

    ``num_steps`` overrides the stored count (for a step-conditioned student it must be one of its
    ``step_counts``; the count is passed to the student as ``num_steps``).
    """
    n = num_steps or config["num_steps"]
    sigmas = get_schedule(config["schedule"], n, **config.get("schedule_kw", {}))
    c = dict(cond or {})
    if config.get("step_counts"):
        c["num_steps"] = n
    with torch.no_grad():
        return euler(student, noise * sigmas[0].to(noise), sigmas, afs=config.get("afs", False), cond=c,
                     return_trajectory=return_trajectory)


def save_student(path: str | os.PathLike, student: nn.Module, sampling_config: dict[str, Any]) -> None:
    """Write the fine-tuned weights with their sampling config (readable with ``weights_only=True``)."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    atomic_save({"format": "mentor.sfd/1", "state_dict": state, "sampling": dict(sampling_config)}, path)


def load_student(path: str | os.PathLike, student: nn.Module, map_location: str | torch.device = "cpu"
                 ) -> dict[str, Any]:
    """Load weights written by :func:`save_student` into ``student`` (same architecture); returns the config."""
    blob = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "mentor.sfd/1":
        raise ValueError(f"{path}: not an SFD student file (expected format 'mentor.sfd/1')")
    student.load_state_dict(blob["state_dict"])
    student.eval()
    return blob["sampling"]
