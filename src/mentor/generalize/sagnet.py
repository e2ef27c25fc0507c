"""Style-Agnostic Networks as DomainBed runs them: a content-biased network learns on feature maps whose style
(per-channel mean and variance) is randomised, a style-biased network on maps whose content is, and the
shared lower layers learn to leave the style network guessing."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, POSITIVE, rules
from ..errors import ConfigError
from ..methods import Phase, StepContext, register_method
from ..models.stages import prepool_names, stage_names
from ..models.tap import strip_taps
from ..nn import train_accuracy
from .base import at_least_float32
from .erm import ERM


def randomize(h: Tensor, what: str, alpha: Tensor, perm: Tensor, eps: float = 1e-5) -> Tensor:
    """SagNet's randomisation of a batch of feature maps ``h [N, C, H, W]`` (or vectors ``[N, F]``).

    Each map is normalised per channel over its positions, ``(h - mu) / sqrt(var + eps)`` (``var`` unbiased;
    a vector is one channel over its ``F`` entries, as DomainBed's featurizer output is treated). Then

    - ``"style"``: the statistics become ``alpha mu + (1 - alpha) mu[perm]`` and the same for ``var``: the
      content of sample ``n`` with a style interpolated towards that of sample ``perm[n]``
      (``alpha [N]`` in [0, 1]);
    - ``"content"``: the normalised content of sample ``perm[n]`` (no gradient through it) takes sample
      ``n``'s own statistics: a style network trained on it can only use the style.

    The statistics are computed in float32 (or wider); the result has ``h``'s dtype and shape.
    """
    if h.dim() not in (2, 4):
        raise ConfigError(f"SagNet randomises feature maps [N, C, H, W] or vectors [N, F]; the chosen stage "
                          f"gives {h.dim()}-d outputs {tuple(h.shape)}: pick a convolutional stage with method.stage")
    x = at_least_float32(h).flatten(2) if h.dim() == 4 else at_least_float32(h).unsqueeze(1)
    if x.shape[-1] < 2:
        raise ConfigError(f"SagNet's randomisation needs the variance of each channel over its positions, but the "
                          f"chosen stage gives maps of a single position {tuple(h.shape)}: pick an earlier stage "
                          "with method.stage, or use larger images")
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True)
    normed = (x - mean) / (var + eps).sqrt()
    if what == "style":
        a = alpha.to(x.dtype).view(-1, 1, 1)
        mean = a * mean + (1 - a) * mean[perm]
        var = a * var + (1 - a) * var[perm]
    elif what == "content":
        normed = normed[perm].detach()
    else:
        raise ValueError(f"randomize what={what!r}: 'style' or 'content'")
    return (normed * (var + eps).sqrt() + mean).to(h.dtype).view(h.shape)


@register_method("sagnet")
class SagNet(ERM):
    """Nam et al., "Reducing Domain Gap by Reducing Style Bias", CVPR 2021 (SagNet), in the form of DomainBed's
    ``SagNet`` (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).

    The student is split at a stage (``stage``) into the feature extractor ``f`` (the stem up to that stage)
    and the content network ``c`` (the stages above it, the pooling and the classifier); the style network
    ``s`` is a copy of ``c`` with its own parameters. Three phases, each with its own optimizer and its own
    forward, run in DomainBed's order every step (every forward draws its own randomisation: ``alpha ~ U(0,1)``
    per image and a random permutation of the pooled batch, across domains):

    - ``content`` (``f`` and ``c``): ``CE(c(SR(f(x))), y)``, SR the style randomisation of :func:`randomize`;
    - ``style`` (``s``): ``CE(s(CR(f(x))), y)``, CR the content randomisation (``f`` not trained by it);
    - ``adv`` (``f``): ``w_adv * mean_n(-mean_k log softmax(s(CR(f(x))))_nk)``, the cross-entropy of the style
      network's prediction against the uniform distribution: ``f`` learns features whose style says
      nothing of the class.

    The network shipped is the student, ``c(f(x))`` with no randomisation. Default ``sag_w_adv`` 0.1
    (``w_adv``), DomainBed's; ``eps`` 1e-5 as its ``randomize``.

    Where the randomisation applies: DomainBed applies it to the featurizer's pooled output (its ``c`` and
    ``s`` are linear classifiers), and keeps, commented out, the paper's placement: inside a ResNet-50, below
    its last stage (``f`` = stem to ``layer3``, ``c`` and ``s`` = ``layer4``, pooling and classifier), where
    the per-channel statistics of a spatial map are what the paper calls style. The zoo networks name their
    stages, so the paper's placement is the default here: ``stage: ""`` is the stage below the last one
    (``layer2`` of the three-stage CIFAR ResNets such as resnet8, ``layer3`` of a four-stage one). Any
    stage may be named, ``stem`` included; the last gives ``c`` and ``s`` of a pooling and a linear layer
    (DomainBed's form on a feature map instead of its pooled vector). The split follows the zoo's fixed
    forward (``stem -> layer1 .. layerK -> [head] -> pool -> fc``, :class:`mentor.models.StagedNet`), so
    the network must be a zoo network. The style network starts as a copy of the content network's
    initial weights (DomainBed draws its own initialisation).

    ``f`` is trained by two optimizers, one per phase (``content`` and ``adv``), each with its own state;
    DomainBed steps one Adam twice. Every phase uses the run's ``optim`` section.
    """

    @rules(w_adv=NON_NEGATIVE, eps=POSITIVE)
    @dataclass
    class Config(ERM.Config):
        w_adv: float = 0.1
        stage: str = ""
        eps: float = 1e-5

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        stages = stage_names(student, "student", ("pool", "fc"))
        stage = cfg.stage or stages[-2]
        if stage not in stages:
            raise ConfigError(f"method.stage={stage!r} is not a stage of {type(student).__name__}; its stages are "
                              f"{', '.join(stages)} (empty: {stages[-2]}, the stage below the last)")
        modules = prepool_names(student, "student")
        cut = modules.index(stage) + 1
        self.lower_names: tuple[str, ...] = modules[:cut]
        self.upper_names: tuple[str, ...] = (*modules[cut:], "pool", "fc")
        self.stage = stage
        self.style_net = nn.ModuleDict({n: strip_taps(copy.deepcopy(getattr(student, n))) for n in self.upper_names})

    # -- the three networks ------------------------------------------------------------------------------------
    def extract(self, x: Tensor) -> Tensor:
        """``f(x)``: the student's stages up to ``stage``."""
        for name in self.lower_names:
            x = getattr(self.student, name)(x)
        return x

    def content(self, h: Tensor) -> Tensor:
        """``c(h)``: the student's modules above ``stage``."""
        for name in self.upper_names:
            h = getattr(self.student, name)(h)
        return h

    def style(self, h: Tensor) -> Tensor:
        """``s(h)``: the style network."""
        for name in self.upper_names:
            h = self.style_net[name](h)
        return h

    def draw(self, n: int, ctx: StepContext, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(alpha, perm)`` of one randomisation: ``alpha ~ U(0, 1)`` per image and a random permutation."""
        alpha = torch.rand(n, generator=ctx.generator, device=device)
        perm = torch.randperm(n, generator=ctx.generator, device=device)
        return alpha, perm

    def randomized(self, h: Tensor, what: str, ctx: StepContext) -> Tensor:
        alpha, perm = self.draw(h.shape[0], ctx, h.device)
        return randomize(h, what, alpha, perm, self.cfg.eps)

    def phases(self) -> list[Phase]:
        lower = [p for n in self.lower_names for p in getattr(self.student, n).parameters()]
        seen = {id(p) for p in lower}
        upper = [p for p in self.student.parameters() if id(p) not in seen]
        return [Phase("content", lower + upper), Phase("style", list(self.style_net.parameters())),
                Phase("adv", lower)]

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = batch["x"], batch["y"]
        if ctx.phase == "content":
            logits = self.content(self.randomized(self.extract(x), "style", ctx))
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            return {"loss": loss, "train_acc": train_accuracy(logits, y)}
        if ctx.phase == "style":
            with torch.no_grad():
                h = self.extract(x)
            logits = self.style(self.randomized(h, "content", ctx))
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            return {"loss": loss, "style_acc": train_accuracy(logits, y)}
        if ctx.phase == "adv":
            logits = self.style(self.randomized(self.extract(x), "content", ctx))
            entropy_term = -F.log_softmax(at_least_float32(logits), dim=1).mean(1).mean()
            return {"loss": self.cfg.w_adv * entropy_term, "adv_ce": entropy_term.detach()}
        raise ValueError(f"SagNet has the phases content, style and adv, not {ctx.phase!r}")


__all__ = ["SagNet", "randomize"]
