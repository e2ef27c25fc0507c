"""Neuron selectivity transfer: the student's neurons match the distribution of the teacher's, by MMD."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..methods import register_method
from .fitnet import FeatureKDConfig, StageMapDistiller
from .losses.distribution import nst_loss


@register_method("nst")
class NST(StageMapDistiller):
    """NST (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017):
    at every paired stage, the squared MMD with the polynomial kernel (d = 2, c = 0) between the
    student's and the teacher's channel-wise L2-normalised activation maps
    (:func:`~mentor.distill.losses.nst_loss`), summed over the stages; no connectors.

    Defaults as mdistiller's ``NST`` (``feats[1:]``, ``CFG.NST``) and RepDistiller (``-b 50``): the
    stages after the stem (``layers`` / ``teacher_layers`` name others, paired as
    :func:`~mentor.distill.fitnet.pair_stages`), CE 1, no KL, ``beta`` = 50 (the paper's ``lambda / 2``).
    """

    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 50.0
        layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)

    term = "nst"

    def feature_loss(self, fs, ft, batch):
        return nst_loss(fs, ft), {}
