"""T3A: test-time templates from the classifier's weights and the test stream's most confident features
(Iwasawa & Matsuo, "Test-Time Classifier Adjustment Module for Model-Agnostic Domain Generalization",
NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, rules
from ..errors import ConfigError
from ..methods import MethodConfig, StepContext, register_method
from ..models.penultimate import PenultimateTap
from ..nn import entropy
from .base import TestTimeMethod


@register_method("t3a")
class T3A(TestTimeMethod):
    """Iwasawa & Matsuo, "Test-Time Classifier Adjustment Module for Model-Agnostic Domain Generalization",
    NeurIPS 2021 (matsuolab/T3A ``domainbed/adapt_algorithms.py: T3A``).

    No backpropagation; the network runs in eval mode. Each class keeps a support set of penultimate
    features (the input of the linear classifier ``fc``), started with the classifier's weight rows
    (each row joins the class the classifier gives it, with that output's entropy). For each test batch,
    every feature ``z`` joins the support set of its pseudo-label ``argmax fc(z)`` with the entropy of
    ``softmax(fc(z))``; each class then keeps its ``filter_k`` (100) lowest-entropy supports, and the
    batch is predicted with ``z . c_k``, ``c_k`` the normalised sum of the class's L2-normalised supports
    (the classifier's bias is not used; a class without supports scores 0).

    The reference prunes its support set to ``filter_k`` per class after every batch, so the state is
    bounded: fixed-size tensors ``[classes, filter_k, features]`` on the device with the entropies
    (``inf`` marks an empty slot) hold it exactly. Each batch selects per class from its kept supports and
    the batch's features of that class with a stable sort (ties keep the older support first). The
    reference's ``filter_K = -1`` (no filtering, an unbounded set) is not offered.
    """

    @rules(filter_k=COUNT)
    @dataclass
    class Config(MethodConfig):
        filter_k: int = 100

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        student.requires_grad_(False)
        self.tap = PenultimateTap(student)
        head = self.tap.head
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"method t3a builds its templates from a linear classifier; the classifier "
                              f"{self.tap.path!r} of {type(student).__name__} is a {type(head).__name__}")
        k, d = head.out_features, head.in_features
        weight = head.weight.detach().float()
        self.register_buffer("supports", torch.zeros(k, cfg.filter_k, d, device=weight.device))
        self.register_buffer("support_entropy", torch.full((k, cfg.filter_k), float("inf"), device=weight.device))
        with torch.no_grad():
            warmup = head(head.weight.detach()).float()
            self.select(weight, warmup.argmax(1), entropy(warmup))

    def phases(self):
        return []

    @torch.no_grad()
    def select(self, z: Tensor, label: Tensor, ent: Tensor) -> None:
        """Add features ``z`` [N, D] to the support sets of ``label`` and keep, per class, the ``filter_k``
        lowest-entropy supports."""
        k, f, d = self.supports.shape
        n = z.shape[0]
        classes = torch.arange(k, device=z.device)
        fresh = torch.where(label.view(1, n) == classes.view(k, 1), ent.float().view(1, n), float("inf"))
        keys = torch.cat([self.support_entropy, fresh], 1)  # [K, F + N]: kept supports first
        order = keys.sort(dim=1, stable=True).indices[:, :f]
        pool = torch.cat([self.supports.reshape(k * f, d), z.float()])
        index = torch.where(order < f, classes.view(k, 1) * f + order, k * f + order - f)
        self.supports.copy_(pool[index])
        self.support_entropy.copy_(keys.gather(1, order))

    def templates(self) -> Tensor:
        """``[K, D]``: per class the normalised sum of its normalised supports."""
        valid = torch.isfinite(self.support_entropy).unsqueeze(-1)
        return F.normalize((F.normalize(self.supports, dim=-1) * valid).sum(1), dim=-1)

    @torch.no_grad()
    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        z, logits = self.tap(batch["x"])
        z = z.float().flatten(1)
        self.select(z, logits.argmax(1), entropy(logits))
        return {"logits": z @ self.templates().T}
