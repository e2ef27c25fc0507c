"""Patch-aware BatchNorm (PBN): every BatchNorm2d of the student becomes a :class:`~mentor.nn.pbn.PatchBN2d`,
trained with ERM's loss."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import PROBABILITY, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, StepContext, register_method
from ..nn.norm import replace_norm, require_bn
from ..nn.pbn import PatchBN2d
from .erm import ERM


@register_method("pbn")
class PBN(ERM):
    """Qi, Zhao, Shi & Geng, "Patch-aware Batch Normalization for Improving Cross-domain Robustness" (arXiv
    2304.02848), in the form of its code (Qi5Lei/PBN, ``imcls/src/layers/PBN.py`` and ``scripts/res18_pbn.sh``).

    At construction every ``BatchNorm2d`` of the student (the code's ``apply_layer 0,1,2,3,4``: the stem and
    every stage) becomes a :class:`~mentor.nn.pbn.PatchBN2d` with its parameters and statistics. In training each
    such layer normalises two random splits of its input (two of: the whole map, two patches, four patches, with
    random cuts), every patch on its own with a per-channel Bernoulli(``stoch_p``) choice between the batch and
    the running statistics (StochNorm), and mixes the two results per channel (Bernoulli(``mix_p``)); in eval it
    is plain BatchNorm, so the deployable is the converted student. The loss is the cross-entropy of the pooled
    per-domain batch (ERM).

    Defaults are the script's: ``stoch_p`` 0.5 (``--stoch-norm-alpha``) and the code's channel mix 0.5. The
    script trains on a single source domain (single-source generalisation); here the batch pools the training
    domains like every DG method. Maps with a side of four or less, which the code refuses to cut, are cut as
    :func:`~mentor.nn.pbn.cut_range` says (a side of 1 is not cut).
    """

    @rules(stoch_p=PROBABILITY, mix_p=PROBABILITY)
    @dataclass
    class Config(ERM.Config):
        stoch_p: float = 0.5
        mix_p: float = 0.5

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        require_bn(student, "pbn")
        try:
            replace_norm(student, lambda bn: PatchBN2d.from_bn(bn, cfg.stoch_p, cfg.mix_p), kinds=(nn.BatchNorm2d,))
        except ValueError as e:
            raise ConfigError(f"method pbn: {e}. Build the network with BatchNorm2d layers that track running "
                              "statistics (the zoo's ResNets do)") from None
        self.patch_norms = [m for m in student.modules() if isinstance(m, PatchBN2d)]
        if not self.patch_norms:
            raise ConfigError(f"method pbn normalises feature maps patch by patch and replaces the BatchNorm2d layers "
                              f"of the student, but {type(student).__name__} has none (only 1D/3D BatchNorm). Use a "
                              "convolutional network with BatchNorm2d (model.name=resnet8 or another zoo ResNet)")

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        for m in self.patch_norms:
            m.generator = ctx.generator
        try:
            return super().training_step(batch, ctx)
        finally:
            for m in self.patch_norms:
                m.generator = None


__all__ = ["PBN"]
