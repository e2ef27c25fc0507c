"""Test-time BatchNorm with moving statistics (``bn_ema``) and tent's entropy minimisation (``tent``).

Also the base of the entropy family (ETA/EATA, SAR, DeYO): the BN configuration tent introduced (every
BN layer normalises with the statistics of the test batch, only the BN affine parameters train). A
step that selects no sample returns ``"apply": False`` and the runner leaves parameters and optimizer
state as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import DECAY, POSITIVE, rules
from ..errors import ConfigError
from ..methods import MethodConfig, Phase, StepContext, register_method
from ..nn import bn_layers, entropy, norm_affine, use_batch_stats
from ..nn.norm import BN_TYPES
from .base import TestTimeMethod
from .tta import Source

#: tent's optimizer (DequanWang/tent ``cfgs/tent.yaml``): Adam, betas (0.9, 0.999), no weight decay. AdamW
#: with zero weight decay is Adam.
ADAM = {"name": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.0}


def affine_outside(module: nn.Module, skip: tuple[str, ...]) -> list[nn.Parameter]:
    """The BN affine parameters of ``module`` except those of layers inside a sub-module named in ``skip``
    (a dotted name matched at any depth: ``"layer4"`` skips ``layer4.0.bn1`` and ``net.layer4.1.bn2``).
    SAR's and DeYO's reference codes leave the top of the network as it is (``layer4`` of a ResNet-50,
    ``blocks.9`` to ``blocks.11`` of a ViT-B)."""
    params: list[nn.Parameter] = []
    for name, m in module.named_modules():
        if isinstance(m, BN_TYPES) and not any(f".{s}." in f".{name}." for s in skip):
            params += norm_affine(m)
    return params


def paper_optim(base: dict, lr: float | None) -> dict:
    """The phase override of a method whose paper fixes its optimizer: ``base`` at rate ``lr``, or the run's
    ``optim`` section as it is when ``lr`` is ``None``."""
    return {} if lr is None else {**base, "lr": lr}


@register_method("bn_ema")
class BNEMA(Source):
    """Test-time BN with moving statistics: for every test batch each BN layer first moves its running
    mean and variance toward the batch's statistics, ``running <- (1 - momentum) * running + momentum *
    batch`` (the unbiased batch variance, as BatchNorm's training mode does), then the batch is predicted
    in eval mode with the updated running statistics. Nothing is trained; the statistics carry over from
    batch to batch (and across streams in the ``continual`` setting).

    The ``BNEMA`` baseline of the online TTA benchmark (mariodoebler/test-time-adaptation
    ``classification/methods/bn.py: EMABatchNorm``, ``methods/norm.py: BNEMA``), which updates with the BN
    layers' own momentum, PyTorch's default 0.1; ``momentum`` sets it here for the update pass only. The
    reference runs the update pass with the whole network in training mode; here only the BN layers are
    (a dropout layer in front of a BN would otherwise perturb the statistics it records).
    """

    needs_bn = True

    @rules(momentum=DECAY)
    @dataclass
    class Config(MethodConfig):
        momentum: float = 0.1

    def prepare(self) -> None:
        self.eval()

    @torch.no_grad()
    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        self.update_statistics(x)
        return {"logits": self.student(x)}

    @torch.no_grad()
    def update_statistics(self, x: Tensor) -> None:
        """One training-mode pass of the BN layers over ``x`` at ``momentum``; the network is left in eval mode."""
        layers = bn_layers(self.student)
        saved = [m.momentum for m in layers]
        use_batch_stats(self.student)
        for m in layers:
            m.momentum = self.cfg.momentum
        try:
            self.student(x)
        finally:
            for m, mom in zip(layers, saved):
                m.momentum = mom
            self.student.eval()


@register_method("tent")
class Tent(TestTimeMethod):
    """Wang, Shelhamer, Liu, Olshausen & Darrell, "Tent: Fully Test-Time Adaptation by Entropy
    Minimization", ICLR 2021 (DequanWang/tent ``tent.py``; mariodoebler/test-time-adaptation
    ``classification/methods/tent.py``).

    Every BN layer normalises with the statistics of the test batch (``use_batch_stats``: the rest of the
    network in eval mode, as the benchmark's version), every parameter is frozen except the BN affine
    weights and biases, and each test batch takes one optimizer step on the mean softmax entropy
    ``mean_i -sum_c p_ic log p_ic`` of its predictions. The predictions scored are the logits of that
    forward, made before the update. Optimizer: Adam, ``lr`` 1e-3, betas (0.9, 0.999), no weight decay
    (``cfgs/tent.yaml``); ``lr: null`` trains with the run's ``optim`` section instead.

    The running statistics of the BN layers are not read by tent (the reference deletes them); here they
    stay and follow the test batches as in ``norm``.
    """

    needs_bn = True

    @rules(lr=POSITIVE)
    @dataclass
    class Config(MethodConfig):
        lr: float | None = 1e-3

    #: the optimizer the paper fixes (:func:`paper_optim` at ``cfg.lr``)
    paper_optimizer = ADAM

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        student.requires_grad_(False)
        params = self.adapted_parameters()
        if not params:
            name = self.method_name or type(self).__name__
            raise ConfigError(f"method {name} trains the affine parameters of BatchNorm layers, but the network "
                              f"{type(student).__name__} leaves it none to train (BatchNorm without affine "
                              "parameters, or every layer skipped by the method's settings)")
        for p in params:
            p.requires_grad_(True)

    def adapted_parameters(self) -> list[nn.Parameter]:
        """The parameters the method trains: every BN layer's affine weight and bias."""
        return norm_affine(self.student)

    def trained(self) -> list[nn.Parameter]:
        """The parameters that train, in module order (those of :meth:`adapted_parameters`)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def phases(self) -> list[Phase]:
        return [Phase("main", self.trained(), optim=paper_optim(self.paper_optimizer, self.cfg.lr))]

    def prepare(self) -> None:
        use_batch_stats(self.student)

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        logits = self.student(batch["x"])
        loss = entropy(logits).mean()
        return {"logits": logits.detach(), "loss": loss, "entropy": loss.detach()}


__all__ = ["ADAM", "BNEMA", "Tent", "affine_outside", "paper_optim"]
