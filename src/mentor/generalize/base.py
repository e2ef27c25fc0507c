"""What every domain-generalisation method shares: per-domain batches, the features below the classifier,
and the number of training domains a method needs.

The engine hands a DG method one labelled batch made of ``B`` images from each of the ``D`` training
domains, in domain order (``batch["domain"]`` holds each image's domain position), so any per-domain
tensor is a static reshape: :meth:`DomainMethod.per_domain` turns ``[D*B, ...]`` into ``[D, B, ...]``
with no host synchronisation. :meth:`DomainMethod.features` returns the penultimate features (the input
of the network's final classifier, read by a forward pre-hook, so any zoo network works) with the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..methods import BuildInfo, Inputs, MethodConfig
from ..methods.supervised import Supervised
from ..models.penultimate import PenultimateTap
from .openset import OpenSetScore


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32, or as it is when wider (half-precision logits and features are widened for the
    penalties and statistics)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class BranchEnsemble:
    """For a method whose shipped network is an ensemble over normalisation branches of its student (NormAUG's
    domain subsets, MultiMatch's tasks): ``ensemble(student, n)`` is the shipped module, ``convert(student, n)``
    turns a plain zoo student into the branched network in place, and ``branches()`` is ``n``; a checkpoint
    records ``n`` so the network is rebuilt without the data (:meth:`Method.rebuild_deployable`)."""

    ensemble: ClassVar[Callable[[nn.Module, int], nn.Module]]
    convert: ClassVar[Callable[[nn.Module, int], None]]

    def branches(self) -> int:
        raise NotImplementedError

    def deployable(self) -> nn.Module:
        return type(self).ensemble(self.student, self.branches())

    def deployable_spec(self) -> dict[str, Any] | None:
        return {"kind": self.method_name, "branches": int(self.branches())}

    @classmethod
    def rebuild_deployable(cls, spec: dict[str, Any], student: nn.Module, info: dict[str, Any]) -> nn.Module:
        n = int(spec["branches"])
        cls.convert(student, n)
        return cls.ensemble(student, n)


class DomainMethod(OpenSetScore, Supervised):
    """Base of the DG methods: cross-entropy over the pooled per-domain batch (ERM), plus helpers.

    ``min_domains``: the fewest training domains the method is defined for (a penalty across domains
    needs two); a run with fewer stops with one message naming the method and ``data.test_domains``.
    In an open-set run (``data.unknown_classes``) every DG method reports the open-set numbers (closed
    accuracy, H-score, OSCR; :class:`~mentor.generalize.openset.OpenSetScore`), with the maximum softmax
    probability as its confidence unless it overrides ``open_set_outputs``.
    """

    inputs = Inputs(labeled=("train",), domains=True)
    min_domains: ClassVar[int] = 1

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.num_domains = max(1, info.num_domains)
        if info.num_domains and info.num_domains < self.min_domains:
            name = self.method_name or type(self).__name__
            raise ConfigError(
                f"method {name} compares training domains and needs at least {self.min_domains}; this run trains on "
                f"{info.num_domains} ({', '.join(info.domain_names) or 'one'}). Hold out fewer domains with "
                "data.test_domains (or list more in data.domains), or use method.name=erm")
        self._tap: PenultimateTap | None = None

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, logits)`` of the student in one forward: the features are the input of its final
        classifier (:class:`~mentor.models.penultimate.PenultimateTap`), with their autograd graph."""
        if self._tap is None:
            self._tap = PenultimateTap(self.student)
        return self._tap(x)

    @property
    def classifier_head(self) -> nn.Module:
        """The student's final classifier (the module the features feed)."""
        if self._tap is None:
            self._tap = PenultimateTap(self.student)
        return self._tap.head

    @property
    def feature_width(self) -> int:
        """The width of the penultimate features: the input width of the student's final classifier (a sized
        linear layer; anything else is refused with a message naming it)."""
        head = self.classifier_head
        width = getattr(head, "in_features", 0)
        if not isinstance(width, int) or width < 1:
            raise ConfigError(f"method {self.method_name} sizes its extra networks by the input width of the "
                              f"student's final classifier, but {type(self.student).__name__}'s classifier is a "
                              f"{type(head).__name__}, not a linear layer; use a zoo network (`mentor list models`)")
        return width

    def per_domain(self, t: Tensor) -> Tensor:
        """``[D*B, ...] -> [D, B, ...]``: the batch's rows grouped by training domain (a view)."""
        return t.unflatten(0, (self.num_domains, -1))
