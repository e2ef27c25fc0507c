"""Step-dependent weights (warm-ups, ramps) that work eagerly and inside a captured CUDA-graph step.

``ctx.step`` is a Python int in an eager step and a 0-d device tensor in a captured one. :func:`ramp`
computes with tensor operations in both cases (an int becomes a 0-d CPU tensor, which multiplies a
loss on any device), so a method writes one expression and never tests the type of the step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _progress(step: int | Tensor, start: float, length: float, offset: float) -> Tensor:
    t = torch.as_tensor(step, dtype=torch.float32) if not isinstance(step, Tensor) else step.float()
    if length <= 0:
        return torch.ones_like(t)
    return ((t + offset - start) / length).clamp(0.0, 1.0)


def ramp(step: int | Tensor, length: float, start: float = 0.0, shape: str = "linear",
         offset: float = 1.0) -> Tensor:
    """A weight rising from 0 to 1 over ``length`` steps starting at ``start``, as a 0-d tensor.

    The progress is ``t = clamp((step + offset - start) / length, 0, 1)``; ``offset=1`` counts steps
    from 1 so the first step's weight is not 0 (the convention of the linear warm-ups of DKD and
    USB's ``unsup_warmup``). ``length <= 0`` gives 1. Shapes:

    - ``linear``: ``t``;
    - ``sigmoid``: ``exp(-5 (1 - t)^2)``, the ramp-up of Laine & Aila, "Temporal Ensembling for
      Semi-Supervised Learning" (ICLR 2017), used by the Pi-model and Mean Teacher;
    - ``cosine``: ``(1 - cos(pi t)) / 2``.
    """
    t = _progress(step, start, length, offset)
    if shape == "linear":
        return t
    if shape == "sigmoid":
        return torch.exp(-5.0 * (1.0 - t) ** 2)
    if shape == "cosine":
        return (1.0 - torch.cos(math.pi * t)) / 2.0
    raise ValueError(f"unknown ramp shape {shape!r}; use linear, sigmoid or cosine")
