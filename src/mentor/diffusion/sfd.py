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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mentor.diffusion.amed import atomic_save, draw_noise, sampling_config
from mentor.diffusion.samplers import SAMPLERS, Trajectory, euler
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
    ``num_steps=None`` runs the wrapped denoiser unmodulated.
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
        self._handles = []
        self._current: Tensor | None = None
        for k, name in enumerate(self.module_names):
            if name not in named:
                raise KeyError(f"StepConditioned: {type(denoiser).__name__} has no sub-module {name!r}")
            width = (channels or {}).get(name) or _channels(named[name])
            if width is None:
                raise ValueError(f"StepConditioned: cannot tell the channel count of {name!r}; pass channels=")
            emb = nn.Embedding(len(self.step_counts), 2 * width)
            nn.init.zeros_(emb.weight)
            self.film.append(emb)
            self._handles.append(named[name].register_forward_hook(self._hook(k)))

    def _hook(self, k: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            if self._current is None:
                return None
            scale, shift = self.film[k](self._current).to(output.dtype).chunk(2, dim=-1)
            shape = (scale.shape[0], scale.shape[1]) + (1,) * (output.ndim - 2)
            return output * (1 + scale.reshape(shape)) + shift.reshape(shape)

        return hook

    def index(self, num_steps: int | Tensor, batch: int, device: torch.device) -> Tensor:
        """Row indices ``(B,)`` or ``(1,)`` for ``num_steps``; an unknown count is an error."""
        n = torch.as_tensor(num_steps, device=device).reshape(-1).long()
        if bool(((n < 0) | (n >= self._index.numel())).any()) or bool((self._index.to(device)[n] < 0).any()):
            raise ValueError(f"StepConditioned was built for step counts {self.step_counts}, got {n.tolist()}")
        return self._index.to(device)[n]

    def forward(self, x: Tensor, sigma: Tensor | float, num_steps: int | Tensor | None = None, **cond: Any) -> Tensor:
        if num_steps is None:
            return self.denoiser(x, sigma, **cond)
        self._current = self.index(num_steps, x.shape[0], x.device)
        try:
            return self.denoiser(x, sigma, **cond)
        finally:
            self._current = None


@dataclass
class SFDResult:
    """Losses per iteration (summed over the trained intervals) and the sampling config to store."""

    losses: list[float]
    config: dict[str, Any] = field(default_factory=dict)


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
) -> SFDResult:
    """Fine-tune ``student`` in place so that Euler on ``num_steps`` timestamps tracks ``teacher``'s solver.

    ``noise`` gives unscaled latents (``(batch, generator) -> Tensor`` or a per-sample shape drawn in
    ``dtype`` on ``device``). ``teacher_opts`` default to ``{"max_order": 3}`` for DPM-Solver++ (3M).
    With ``step_counts`` (e.g. ``(4, 5, 6, 7)``) each iteration draws its ``num_steps`` from it (with
    ``generator``) and calls ``student(x, sigma, num_steps=n)`` (wrap it in :class:`StepConditioned`).
    ``cond(batch, generator)`` may return denoiser conditioning. Returns the losses and the sampling config.
    """
    if teacher_opts is None:
        teacher_opts = {"max_order": 3} if teacher_solver == "dpm_solver_pp" else {}
    schedule_kw = dict(schedule_kw or {})
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    counts = tuple(int(n) for n in step_counts) if step_counts else None
    student.train()
    losses: list[float] = []
    dropped = False
    for it in range(iterations):
        if not dropped and it >= lr_drop_at * iterations:
            for group in opt.param_groups:
                group["lr"] = lr / 10
            dropped = True
        n = num_steps
        if counts:
            n = counts[int(torch.randint(len(counts), (1,), generator=generator))]
        z = draw_noise(noise, batch, generator, dtype, device)
        c = cond(z.shape[0], generator) if cond is not None else {}
        student_cond = dict(c, num_steps=n) if counts else c
        sig = get_schedule(schedule, n, **schedule_kw).to(z)
        fine = get_schedule(schedule, (M + 1) * (n - 1) + 1, **schedule_kw)
        with torch.no_grad():
            traj = SAMPLERS[teacher_solver](teacher, z * fine[0].to(z), fine, afs=False, return_trajectory=True,
                                            cond=c, **teacher_opts)
        targets = traj.points[:: M + 1]
        x, total = targets[0], 0.0
        for i in range(n - 1):
            t_cur, t_next = sig[i], sig[i + 1]
            if afs and i == 0:
                x = x + (t_next - t_cur) * x / torch.sqrt(1 + t_cur**2)
                continue
            out = x + (t_next - t_cur) * (x - student(x, t_cur, **student_cond)) / t_cur
            loss = (out - targets[i + 1]).abs().sum() / z.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            x = out.detach()
        losses.append(total)
        if callback is not None:
            callback(it, total)
    student.eval()
    config = sampling_config(solver="euler", num_steps=num_steps, schedule=schedule, schedule_kw=schedule_kw,
                             afs=afs, M=M, teacher=teacher_solver, teacher_opts=dict(teacher_opts),
                             step_counts=list(counts) if counts else None)
    return SFDResult(losses=losses, config=config)


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
