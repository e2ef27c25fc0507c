"""Empirical risk minimisation over pooled per-domain batches: the domain-generalisation baseline."""

from __future__ import annotations

from ..methods import register_method
from .base import DomainMethod


@register_method("erm")
class ERM(DomainMethod):
    """Vapnik, "Statistical Learning Theory" (1998), as DomainBed runs it (Gulrajani & Lopez-Paz, "In
    Search of Lost Domain Generalization", ICLR 2021): cross-entropy on the concatenation of one
    minibatch from every training domain, so each domain weighs the same whatever its size."""
