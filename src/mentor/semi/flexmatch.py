"""FlexMatch: FixMatch with per-class thresholds that follow each class's learning effect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from ..errors import ConfigError
from ..methods import StepContext, register_method
from ..nn import FlexThreshold
from .fixmatch import FixMatch, Logits


@register_method("flexmatch")
class FlexMatch(FixMatch):
    """Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo Labeling",
    NeurIPS 2021, in the form of USB's ``flexmatch`` algorithm: FixMatch whose mask is
    :class:`~mentor.nn.FlexThreshold` (class ``c`` keeps ``max p >= p_cutoff * beta(c) / (2 - beta(c))``,
    ``beta`` the normalised count of confident predictions per class over the unlabelled pool, with the
    threshold warm-up). As in USB and TorchSSL, an image's recorded prediction is updated only when it
    passes the *fixed* threshold ``p_cutoff`` (``record: fixed``; ``record: flexible`` records the images
    the flexible mask keeps; see the masker). Defaults: ``p_cutoff`` 0.95, ``lambda_u`` 1, ``T`` 0.5, hard
    labels, ``thresh_warmup`` on.
    """

    @dataclass
    class Config(FixMatch.Config):
        thresh_warmup: bool = True
        record: Literal["fixed", "flexible"] = "fixed"

    def build_masker(self) -> FlexThreshold:
        if self.info.unlabeled_size < 1:
            raise ConfigError("method flexmatch keeps one prediction per unlabelled image: it needs the size of "
                              "the unlabelled pool (BuildInfo.unlabeled_size; the engine sets it)")
        return FlexThreshold(self.info.num_classes, self.info.unlabeled_size, self.cfg.p_cutoff,
                             self.cfg.thresh_warmup, self.cfg.record)

    def mask(self, probs: Tensor, z: Logits, batch: dict[str, Tensor], ctx: StepContext) -> Tensor:
        return self.masker(probs, batch["u_index"])


__all__ = ["FlexMatch"]
