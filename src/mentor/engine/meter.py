"""Loss terms summed on the device between log steps, and non-finite values recorded there too.

A training step never waits for the host: each term is added to a device tensor, and the first step
at which a term became NaN/inf is kept on the device. Both are read (one synchronisation) every
``log_every`` steps and before every checkpoint. Each optimizer phase has its own set of terms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ContractError
from ..errors import NonFiniteLossError as NonFiniteLossError
from .distributed import Dist, all_reduce_max, all_reduce_sum


class _Terms:
    def __init__(self, names: list[str], like: Tensor):
        self.names = names
        self.sum = torch.zeros(len(names), dtype=torch.float32, device=like.device)
        self.bad_step = torch.full((len(names),), -1, dtype=torch.long, device=like.device)
        self.count = 0


class Meter:
    """Per-phase running sums of named loss terms, without host synchronisation per step."""

    def __init__(self, dist: Dist, prefix_phases: bool):
        self.dist = dist
        self.prefix = prefix_phases
        self.phases: dict[str, _Terms] = {}

    def add(self, phase: str, out: dict[str, Tensor], step: int | Tensor) -> None:
        """Add one step's terms; ``step`` may be a device tensor (a captured step)."""
        terms = self.phases.get(phase)
        first = next(iter(out.values()))
        if terms is None:
            terms = self.phases[phase] = _Terms(list(out), first)
        elif list(out) != terms.names:
            raise ContractError(f"training_step returned the terms {sorted(out)} in phase {phase!r}, earlier "
                                f"steps {sorted(terms.names)}: a method returns the same terms every step (rule 2 "
                                "of mentor.methods.base); return 0 for a term not due")
        values = torch.stack([out[k].detach().float().reshape(()) for k in terms.names])
        terms.sum += values
        terms.bad_step.copy_(torch.where(~torch.isfinite(values) & (terms.bad_step < 0), step, terms.bad_step))
        terms.count += 1

    def tick(self, phase: str) -> None:
        """Count one more step of ``phase`` whose sums a replayed CUDA graph added on the device."""
        self.phases[phase].count += 1

    def _name(self, phase: str, term: str) -> str:
        return f"{phase}/{term}" if self.prefix else term

    def first_nonfinite(self) -> tuple[str, int] | None:
        """(term, step) of the earliest NaN/inf recorded on any rank, or None."""
        found = None
        for phase, terms in self.phases.items():
            bad = all_reduce_max(terms.bad_step.clone(), self.dist).tolist()
            for name, step in zip(terms.names, bad):
                if step >= 0 and (found is None or step < found[1]):
                    found = (self._name(phase, name), step)
        return found

    def read(self) -> dict[str, float]:
        """Means since the last read, averaged over ranks; resets the sums."""
        out: dict[str, float] = {}
        for phase, terms in self.phases.items():
            if not terms.count:
                continue
            total = all_reduce_sum(terms.sum.clone(), self.dist) / (self.dist.world_size * terms.count)
            out.update({self._name(phase, n): v for n, v in zip(terms.names, total.tolist())})
            terms.sum.zero_()
            terms.count = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {p: {"names": t.names, "sum": t.sum.clone(), "count": t.count} for p, t in self.phases.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for phase, s in state.items():
            terms = self.phases[phase] = _Terms(list(s["names"]), s["sum"])
            terms.sum.copy_(s["sum"])
            terms.count = s["count"]


class PhaseClock:
    """Seconds spent in each optimizer phase (a data-free method's synthesis and student time, apart).

    On the CPU each phase is timed with the host clock. On a GPU the work is asynchronous, so a pair of
    CUDA events brackets each phase and the elapsed times are read only when :meth:`seconds` is called
    (after the engine's periodic synchronisation), never per step. The engine enables it only for a method
    with several phases and without a captured step (a graph's phases run as one launch, and no event may be
    recorded while it is captured)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.total: dict[str, float] = {}
        self._open: dict[str, Any] = {}
        self._pending: list[tuple[str, Any, Any]] = []

    def start(self, phase: str) -> None:
        import time

        if not self.enabled:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open[phase] = ev
        else:
            self._open[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        import time

        begin = self._open.pop(phase, None)
        if begin is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((phase, begin, end))
        else:
            self.total[phase] = self.total.get(phase, 0.0) + time.perf_counter() - begin

    def seconds(self) -> dict[str, float]:
        for phase, begin, end in self._pending:
            end.synchronize()
            self.total[phase] = self.total.get(phase, 0.0) + begin.elapsed_time(end) / 1000.0
        self._pending.clear()
        return dict(self.total)

    def state_dict(self) -> dict[str, float]:
        return self.seconds()

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total = {k: float(v) for k, v in state.items()}
