"""The whole training step captured once as a CUDA graph and replayed (``trainer.cuda_graph``).

At batch 64 the small networks of distillation are bound by kernel launches, not by arithmetic: a
step of a few hundred small kernels spends most of its time in the host's launch path. Capturing
the step (every phase's forward, backward, clipping and optimizer update, the loss meter and the
EMA) replaces those launches by one graph launch.

What makes a step capturable is what the engine already asks of every method: no host
synchronisation, fixed shapes, no Python branching on tensor values. Between replays only device
memory changes: the batch is drawn eagerly (it is a pure function of the step) and copied into the
graph's static input tensors, the step counter is written into a device tensor (``ctx.step`` is that
tensor inside a captured step, so warm-ups and ramps are computed on the device), and the schedules
write each optimizer's learning rate into a device tensor. The first ``warmup`` steps run eagerly on a
side stream (they lazily create optimizer state and compile kernels); capture follows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import GraphCaptureError


def check_capturable(device: torch.device, distributed: bool, accumulate: int, phases: list[Any]) -> None:
    """Refuse, with the reason, set-ups a captured step does not support."""
    problems = []
    if device.type != "cuda":
        problems.append(f"it needs a CUDA device (the run uses {device.type})")
    if distributed:
        problems.append("it does not run under DDP")
    if accumulate != 1:
        problems.append("it needs trainer.accumulate=1")
    skipping = [p.name for p in phases if p.every != 1]
    if skipping:
        problems.append(f"every phase must run every step ({', '.join(skipping)} do not)")
    if problems:
        raise GraphCaptureError("trainer.cuda_graph: " + "; ".join(problems) + ". Set trainer.cuda_graph=false.")


class GraphStep:
    """Runs training steps: ``warmup`` eager steps on a side stream, then capture, then replays.

    ``body(step, batch)`` runs every phase of one step on a batch (``step`` is an int in the eager
    warm-up and the device counter while capturing); ``draw(step)`` gives the batch of a step;
    ``after(step, replayed)`` does the host-side work of a finished step (schedules, counters);
    ``replayed`` is False where the Python body ran for this step (warm-up, and the capture, whose
    replay is the step's only execution).
    """

    def __init__(self, body: Callable[[Any, dict[str, Tensor]], None], draw: Callable[[int], dict[str, Tensor]],
                 after: Callable[[int, bool], None], device: torch.device, warmup: int = 3, name: str = "method"):
        self.body, self.draw, self.after = body, draw, after
        self.device, self.warmup, self.name = device, warmup, name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Tensor] = {}
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.eager_done = 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, step: int) -> None:
        batch = self.draw(step)
        if self.graph is None and self.eager_done < self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.body(step, batch)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.eager_done += 1
            self.after(step, False)
            return
        captured_now = self.graph is None
        if captured_now:
            self._capture(batch)
        else:
            self._load(batch)
        self.step_t.fill_(step)
        self.graph.replay()
        self.after(step, not captured_now)

    def _load(self, batch: dict[str, Tensor]) -> None:
        for key, value in batch.items():
            self.static[key].copy_(value, non_blocking=True)

    def _capture(self, batch: dict[str, Tensor]) -> None:
        clones: dict[int, Tensor] = {}  # keep aliases (batch["x"] is the first view) aliased
        self.static = {k: clones.setdefault(id(v), v.clone()) for k, v in batch.items()}
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.body(self.step_t, self.static)
        except RuntimeError as e:
            raise GraphCaptureError(
                f"the training step of {self.name!r} could not be captured as a CUDA graph: {e}\n"
                "A captured step must not read values back to the host (.item(), printing, Python "
                "branching on tensor values) and must keep every shape fixed. Set "
                "trainer.cuda_graph=false to run it eagerly.") from e
        self.graph = graph
