"""PLACE dropout: progressive channel dropout after one randomly chosen stage per step, its rate rising with the
epoch along an arctangent."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, between, rules
from ..errors import ConfigError
from ..methods import BuildInfo, MethodConfig, Phase, StepContext, register_method
from ..models.stages import stage_names
from .erm import ERM
from .mixstyle import hook_outputs, named_layers


def place_rate(epoch: float | Tensor, p_max: float, velocity: float) -> Tensor:
    """The dropout rate of epoch ``epoch`` (a float or a 0-d tensor; its integer part counts):
    ``p(t) = p_max (2 / pi) arctan(t / velocity)`` with ``t = floor(epoch)``, as a float64 0-d tensor."""
    t = torch.as_tensor(epoch, dtype=torch.float64).floor()
    return p_max * (2.0 / math.pi) * torch.atan(t / velocity)


def channel_keep(scores: Tensor, rate: Tensor) -> Tensor:
    """``[N, C]`` 0/1 mask keeping all but the ``floor(C * rate)`` channels of each row with the smallest
    ``scores`` (uniform draws, so those channels are a uniform random subset of that size, per row). Ranks are
    taken with two ``argsort``: no data-dependent shape, no host synchronisation."""
    c = scores.shape[1]
    k = torch.floor(c * rate.to(scores.device, torch.float64))
    ranks = scores.argsort(1).argsort(1)
    return (ranks >= k).to(scores.dtype)


@register_method("place_dropout")
class PlaceDropout(ERM):
    """Guo, Qi, Shi & Gao, "PLACE dropout: A Progressive Layer-wise and Channel-wise Dropout for Domain
    Generalization" (arXiv 2112.03676), in the form of its code (lingeringlight/PLACEdropout
    ``models/resnet_PLACE.py``, ``train_PLACE.py`` and ``PLACE.sh``).

    Every step one stage is drawn uniformly from ``layers``; after it (a forward hook on the student's stage),
    each image loses ``floor(C p(t))`` of the stage's ``C`` output channels, a uniform random subset per image
    (zeroed), and the map is rescaled by ``1 / (1 - p(t))``. The rate rises with the epoch ``t`` (the integer
    part of ``ctx.epoch``, from 0; or of ``step / epoch_steps`` when ``epoch_steps`` is set, so that a short run
    sees the rate rise as the paper's 30 epochs do):

        ``p(t) = p_max (2 / pi) arctan(t / velocity)``.

    The loss is the cross-entropy of the pooled per-domain batch (ERM); at evaluation nothing is dropped, so the
    deployable is the plain student. The random stage is chosen on the device: every candidate computes its mask
    and a one-hot on the drawn stage selects which one acts (no host synchronisation). Logged: ``drop_rate``
    (``p(t)``) and ``layer`` (the drawn position in ``layers``).

    Defaults are ``PLACE.sh``'s: ``p_max`` 0.33 (``baseline_dropout_p``), ``velocity`` 4, channel dropout
    (``ChannelorSpatial`` 0) with rescaling (``dropout_recover_flag``), stages ``layer1``, ``layer2``,
    ``layer3`` (``--stage2_layers 1 2 3``) with one drawn per iteration (``random_dropout_layers_flag``).

    Departures from the code: it is the second stage of a two-stage scheme whose first stage (30 epochs of a
    baseline with SwapStyle feature-statistics swapping at ``layer3`` and a RandAugment view concatenated into
    every batch) is not part of this method; start from a trained run with ``model.init_from`` to reproduce the
    scheme (the epoch ``t`` then counts from 0 again, as in stage 2). The code's stage 2 steps only the
    parameters after the first candidate stage (``update_parameters_method`` 0); that is ``freeze_first: true``
    here (the stem and the stages up to and including the first candidate are left out of the optimizer; their
    BN statistics still move), off by default since a run from scratch must train them.
    """

    @rules(p_max=between(0, 1, hi_open=True), velocity=POSITIVE, epoch_steps=NON_NEGATIVE)
    @dataclass
    class Config(ERM.Config):
        p_max: float = 0.33
        velocity: float = 4.0
        layers: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
        freeze_first: bool = False
        epoch_steps: int = 0  # steps per epoch of p(t)'s clock; 0: the run's epochs

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        layers = named_layers(student, list(cfg.layers), "place_dropout")
        self._armed = False
        self._draw: tuple[Tensor, Tensor, torch.Generator | None] | None = None
        self._handles = hook_outputs(self, layers, lambda m, i, y: m.drop(i, y))
        self._frozen: tuple[str, ...] = ()
        if cfg.freeze_first:
            stages = stage_names(student, "student")
            unknown = [n for n in cfg.layers if n not in stages]
            if unknown:
                raise ConfigError(f"method place_dropout: freeze_first freezes the stages up to the first of "
                                  f"method.layers, which must then be stages of the student ({', '.join(stages)}); "
                                  f"{', '.join(unknown)} are not. Name stages, or set method.freeze_first=false")
            first = min(stages.index(n) for n in cfg.layers)
            self._frozen = stages[: first + 1]

    def phases(self) -> list[Phase]:
        if not self._frozen:
            return super().phases()
        frozen = {id(p) for n in self._frozen for p in self.student.get_submodule(n).parameters()}
        return [Phase("main", [p for p in self.parameters() if p.requires_grad and id(p) not in frozen])]

    def drop(self, i: int, y: Tensor) -> Tensor:
        """The output ``y`` of candidate ``i`` after this step's dropout: channels zeroed and the map rescaled
        where ``i`` is the drawn stage, ``y`` unchanged elsewhere (a one-hot factor)."""
        chosen, rate, g = self._draw
        scores = torch.rand(y.shape[0], y.shape[1], generator=g, device=y.device)
        keep = channel_keep(scores, rate) / (1.0 - rate.to(y.device, torch.float32))
        factor = torch.where(chosen == i, keep, torch.ones_like(keep)).to(y.dtype)
        return y * factor[:, :, None, None]

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        epoch = ctx.step / self.cfg.epoch_steps if self.cfg.epoch_steps else ctx.epoch
        rate = place_rate(epoch, self.cfg.p_max, self.cfg.velocity).to(x.device)
        chosen = torch.randint(len(self._handles), (), generator=ctx.generator, device=x.device)
        self._draw, self._armed = (chosen, rate, ctx.generator), True
        try:
            out = super().training_step(batch, ctx)
        finally:
            self._draw, self._armed = None, False
        return {**out, "drop_rate": rate.float(), "layer": chosen.float()}


__all__ = ["PlaceDropout", "channel_keep", "place_rate"]
