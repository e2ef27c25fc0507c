"""The Method contract's rules on a step's output, checked once on the first step with a clear error.

The rules are stated in :mod:`mentor.methods.base`; breaking one would otherwise surface far from its
cause (in the meter's sums, a DDP reduction or a CUDA-graph capture).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ContractError


def check_step_output(method: str, phase: str, out: Any, earlier: list[str] | None = None) -> None:
    """Refuse a step output that breaks rule 1 (a dict with ``loss``, 0-d floating tensors) or rule 2
    (the same keys as the phase's earlier steps)."""
    where = f"{method}.training_step (phase {phase!r})"
    if not isinstance(out, dict):
        raise ContractError(f"{where} returned {type(out).__name__}; it must return a dict of named 0-d tensors "
                            "with the key 'loss' (see mentor.methods.base, rule 1)")
    if "loss" not in out:
        raise ContractError(f"{where} returned the terms {sorted(out)} without 'loss' (rule 1)")
    for key, value in out.items():
        if not isinstance(value, torch.Tensor):
            raise ContractError(f"{where}: term {key!r} is a {type(value).__name__}, not a tensor; return a 0-d "
                                "tensor (a Python number would need a host synchronisation) (rule 1)")
        if value.dim() != 0 or not value.is_floating_point():
            raise ContractError(f"{where}: term {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}; "
                                "every term is a 0-d floating tensor: reduce it (mean) or log it elsewhere (rule 1)")
    if not out["loss"].requires_grad:
        raise ContractError(f"{where}: 'loss' does not depend on any trainable parameter (rule 1)")
    if earlier is not None and list(out) != earlier:
        raise ContractError(f"{where} returned the terms {sorted(out)}, earlier steps {sorted(earlier)}: a "
                            "method returns the same terms every step (rule 2); return 0 for a term not due")
