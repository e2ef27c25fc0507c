"""ARFNet: attention residual fusion, global-local contrast and dynamic centroids for source-free adaptation
(Shao, Zhang & Wang, IEEE TCSVT 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DECAY, NON_NEGATIVE, POSITIVE, between, rules
from ..errors import ConfigError
from ..methods import Inputs, Refresh, StepContext, register_method
from ..models import FeatureTap, PenultimateTap, prepool_names
from ..nn import kl_div, resize_to, step_generator
from ..nn.contrast import sup_con
from ..nn.crops import resized_crops
from ..nn.pseudo import centroid_pseudo_labels, im_terms
from .shot import SHOT


# ------------------------------------------------------------------------------------------- the losses
def global_local_contrast(global_features: Tensor, local_features: Tensor, temperature: float = 0.07,
                          base_temperature: float = 0.07) -> Tensor:
    """The unsupervised contrastive loss between a global and a local view of each image: SupCon without
    labels (Khosla et al., NeurIPS 2020), i.e. SimCLR's NT-Xent (Chen et al., ICML 2020), over ``2B``
    L2-normalised features ``z`` (both views of the ``B`` images):

        ``- (temperature / base_temperature) * mean_i log( exp(z_i . z_p(i) / t) / sum_{j != i} exp(z_i . z_j / t) )``

    where ``p(i)`` is the other view of image ``i``; every feature is an anchor once. Computed in float32.
    ARFNet's code calls SupCon with ``base_temperature`` 0.07, so the factor is 1 at its ``tau`` 0.07."""
    if global_features.shape != local_features.shape:
        raise ValueError(f"the two views' features differ in shape: {tuple(global_features.shape)} and "
                         f"{tuple(local_features.shape)}")
    views = F.normalize(torch.stack([global_features, local_features], 1).float().flatten(2), dim=2)
    own = torch.arange(views.shape[0], device=views.device)  # each image its own class: the other view is the positive
    return (temperature / base_temperature) * sup_con(views, own, temperature)


def self_distillation(head_logits: Sequence[Tensor], logits: Tensor) -> Tensor:
    """``sum_k KL(sg[softmax(z)] || softmax(y_k))``, batch-mean: the intermediate heads' logits ``y_k`` learn
    the final logits ``z``, which get no gradient (ARFNet's ``kdloss(y_k, outputs.detach())``). Float32."""
    target = F.log_softmax(logits.detach().float(), dim=1)
    total = logits.new_zeros((), dtype=torch.float32)
    for y in head_logits:
        total = total + kl_div(F.log_softmax(y.float(), dim=1), target)
    return total


def local_crops(x: Tensor, generator: torch.Generator | None = None, scale: tuple[float, float] = (0.25, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Tensor:
    """The local view of ARFNet's ``TwoCropTransform``: ``RandomResizedCrop(size, scale=(0.25, 1))`` of every
    image (:func:`mentor.nn.crops.resized_crops`, no flip)."""
    return resized_crops(x, 1, generator, scale, ratio, attempts)


# ---------------------------------------------------------------------------- attention residual fusion
def _pooled(x: Tensor) -> Tensor:
    """A stage output's channel vector: the spatial mean of a map ``[B, C, H, W]``, the token mean of a
    sequence ``[B, T, D]``."""
    return x.mean((2, 3)) if x.dim() == 4 else x.mean(1)


class SpatialFusion(nn.Module):
    """The spatial-wise attention of one stage and its cross-layer residual fusion.

    ``s = sigmoid(conv7x7([mean_c x ; max_c x]))`` (a ``[B, 1, H, W]`` map; for a token sequence ``[B, T, D]``
    a linear map of the two descriptors per token, ``[B, T, 1]``); the fused attention ``a = (s + a_prev) / 2``
    averages it with the previous stage's fused attention (resized to this stage's grid), and the stage's
    output becomes ``x + gate * a * x``. ``gate`` starts at 0, so the fused network starts as the source one."""

    def __init__(self, tokens: bool, kernel: int = 7):
        super().__init__()
        self.tokens = tokens
        self.spatial: nn.Module = nn.Linear(2, 1) if tokens else nn.Conv2d(2, 1, kernel, padding=kernel // 2)
        self.gate = nn.Parameter(torch.zeros(1))

    def attention(self, x: Tensor) -> Tensor:
        if self.tokens:
            return torch.sigmoid(self.spatial(torch.stack([x.mean(-1), x.amax(-1)], -1)))
        return torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))

    def fuse(self, s: Tensor, previous: Tensor | None) -> Tensor:
        if previous is None:
            return s
        if self.tokens:
            if previous.shape[1] != s.shape[1]:
                previous = F.interpolate(previous.transpose(1, 2), size=s.shape[1], mode="linear",
                                         align_corners=False).transpose(1, 2)
        else:
            previous = resize_to(previous, tuple(s.shape[-2:]))
        return 0.5 * (s + previous)

    def forward(self, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a = self.fuse(self.attention(x), previous)
        return x + self.gate * (a * x), a


class ChannelHead(nn.Module):
    """An intermediate classifier on the channel-wise attention of one stage:
    ``fc(c * p)`` with ``p`` the stage's pooled channel vector and ``c = sigmoid(W2 relu(W1 p))``
    (squeeze-and-excitation, reduction 4)."""

    def __init__(self, channels: int, num_classes: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.excite = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        p = _pooled(x)
        return self.fc(torch.sigmoid(self.excite(p)) * p)


class FusedNet(nn.Module):
    """The network ARFNet deploys: the student's stages, each followed by its :class:`SpatialFusion`, then
    the student's ``[head] -> pool -> fc``. Its modules are the method's own (shared, not copied), so its
    ``state_dict`` (``net.*``, ``fusion.*``) holds everything inference needs."""

    def __init__(self, net: nn.Module, fusion: nn.ModuleDict):
        super().__init__()
        self.net, self.fusion = net, fusion
        self.names = prepool_names(net, "student")

    def run(self, x: Tensor, keep: Sequence[str] = ()) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """``(kept, features, logits)``: the fused outputs of the stages named in ``keep``, the input of
        ``fc`` and the logits."""
        kept: dict[str, Tensor] = {}
        attention = None
        for name in self.names:
            x = getattr(self.net, name)(x)
            if name in self.fusion:
                x, attention = self.fusion[name](x, attention)
            if name in keep:
                kept[name] = x
        features = self.net.pool(x)
        return kept, features, self.net.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[2]


# ----------------------------------------------------------------------------------------------- ARFNet
@register_method("arfnet")
class ARFNet(SHOT):
    """Shao, Zhang & Wang, "Attention Residual Fusion Network with Contrast for Source-free Domain
    Adaptation", IEEE TCSVT 2025 (arXiv 2510.22142); the review code RoryShao/ARFNet ``image_target.py``,
    ``pseudo_label.py: obtain_label_multi_centriods``, ``utils/loss.py`` (``SupConLoss``, ``kdloss``),
    ``dataloader.py`` (``TwoCropTransform``), ``script/office31/target.sh``.

    SHOT's setting (the source classifier frozen, the network below it adapted on the unlabelled target
    pool; :class:`~mentor.adapt.shot.SHOT`) with three additions. Each batch is seen in two views, a global
    one (the engine's weak view ``u_weak``) and a local one (a random resized crop, area 0.25..1, of a second
    weak view ``u_weak_1``), both through one forward:

        ``loss = cls_par * CE(z, y) + ent_par * (mean H(p) - H(mean p))
        + glcl_co * SupCon_unsup(f_global, f_local; tau) + distill_par * sum_k KL(sg[softmax(z)] || softmax(y_k))``

    over both views (:func:`global_local_contrast`, :func:`self_distillation`), with ``z`` the logits, ``f``
    the features (the input of the frozen ``fc``), ``y_k`` the logits of intermediate heads on the last
    ``distill_heads`` stages before the final one (:class:`ChannelHead`: channel-wise attention, then a linear
    classifier), and ``y`` the *dynamic-centroid* pseudo-labels of the whole pool
    (:func:`~mentor.adapt.sfda.centroid_pseudo_labels` with ``exp(logits)`` weights, ``rounds`` 5 and an EMA
    ``momentum`` 0.9 of the centroids, the classes fixed after the first assignment), refreshed every
    ``interval`` epochs in eval mode on the un-augmented pool. Logged terms: ``ent``, ``div``, ``ce``,
    ``contrast``, ``distill`` and ``gate`` (the mean fusion gate).

    Defaults are those of ``script/office31/target.sh``: ``cls_par`` 0.3, ``ent_par`` 1, ``glcl_co`` 0.1
    (Office-Home: 0.3), ``tau`` 0.07, self-distillation weight 0.1, 5 centroid rounds with EMA 0.9,
    threshold 0, local crops of area 0.25..1, and SHOT's SGD (momentum 0.9, Nesterov, weight decay 1e-3)
    at ``lr`` 3e-3 (Office-Home: 1e-3).

    **Partial**: the attention-residual-fusion network (``ARFNetBase``, ``ARFNet_ViT``) is missing from the
    published code; the paper's abstract describes it as attention features decomposed, in each block, into
    spatial-wise attentions aggregated with the original features across layers (residual fusion) and
    channel-wise attentions used for self-distillation. Design choices:

    - The fusion is added to any zoo network at adaptation time (:class:`FusedNet`): after every stage
      ``layer1`` .. ``layerK`` a CBAM-style spatial attention (7x7 conv of the channel mean and max, sigmoid),
      averaged with the previous stage's fused attention (resized), scales a residual ``x + gate * a * x``
      whose ``gate`` starts at 0: the adapted network starts exactly as the source network (the paper trains
      its fusion network on the source too; here the source run is a plain network). ``fusion: false``
      leaves the student as it is.
    - The intermediate heads are squeeze-and-excitation channel attention on the pooled stage output, then a
      linear classifier; they start untrained (the paper trains them on the source as well) and are not
      part of the deployed network. So that untrained heads learn within an adaptation run, the heads take
      the self-distillation at weight 1 while the network below them gets ``distill_par`` (0.1) of its
      gradient: the network's update is the official ``0.1 * sum_k KL``; the logged ``distill`` and the
      total ``loss`` count it at weight 1.
    - :meth:`deployable` is the fused network (``net.*`` and ``fusion.*`` weights), not a zoo network: a later
      run cannot load it with ``model.init_from`` (``fusion: false`` deploys the plain student).
    - The global view is the engine's weak view (padded random crop and flip where the recipe sets them)
      instead of resize 256 + random crop 224 + flip; the local view is :func:`local_crops` of a second weak
      view (no extra flip), drawn from a generator seeded by (run seed, step).
    - As in :class:`~mentor.adapt.shot.SHOT`: one learning rate for every trainable parameter (the official
      code trains the backbone at 0.1 lr), the run's ``schedule`` instead of ``(1 + 10 p)^-0.75``, and
      pseudo-labels refreshed every ``interval`` epochs (the official code refreshes 15 times per run:
      ``interval`` 13 of its 200 epochs).
    """

    inputs: ClassVar[Inputs] = Inputs(labeled=(), unlabeled=("weak", "weak"))

    @rules(glcl_co=NON_NEGATIVE, tau=POSITIVE, base_tau=POSITIVE, distill_par=NON_NEGATIVE, distill_heads=NON_NEGATIVE,
           rounds=NON_NEGATIVE, momentum=DECAY, crop_scale=between(0, 1, lo_open=True))
    @dataclass
    class Config(SHOT.Config):
        lr: float | None = 3e-3
        glcl_co: float = 0.1
        tau: float = 0.07
        base_tau: float = 0.07  # SupCon's base temperature: the loss is scaled by tau / base_tau
        distill_par: float = 0.1  # the self-distillation's weight in the gradient of the network below the heads
        distill_heads: int = 3  # intermediate heads on the last stages before the final one
        rounds: int = 5  # dynamic-centroid refinements
        momentum: float = 0.9  # EMA of the centroids over the refinements (the official --lamb)
        crop_scale: float = 0.25  # smallest area fraction of a local crop
        fusion: bool = True

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        names = prepool_names(student, "student")
        layers = [n for n in names if n.startswith("layer")]
        if not layers:
            raise ConfigError(f"method arfnet fuses attention after the stages layer1..layerK; the student "
                              f"{type(student).__name__} has none (stages: {', '.join(names)})")
        before = layers[:-1]
        self.head_stages = tuple(before[max(0, len(before) - cfg.distill_heads):]) if cfg.distill_heads else ()
        shapes = _probe(student, layers, info)
        for name in layers:
            if len(shapes[name]) not in (3, 4):
                raise ConfigError(f"method arfnet: stage {name} of {type(student).__name__} gives a "
                                  f"{len(shapes[name])}-d output; it needs maps [B, C, H, W] or tokens [B, T, D]")
        self.fusion = nn.ModuleDict({n: SpatialFusion(len(shapes[n]) == 3) for n in layers} if cfg.fusion else {})
        width = {n: shapes[n][-1] if len(shapes[n]) == 3 else shapes[n][1] for n in layers}
        self.heads = nn.ModuleDict({n: ChannelHead(width[n], info.num_classes) for n in self.head_stages})
        # Not a registered child: its modules are already ours, and registering them twice would store them
        # twice in every checkpoint.
        object.__setattr__(self, "_net", FusedNet(student, self.fusion))
        self.tap.remove()
        self.tap = PenultimateTap(self._net)
        # Drawn from the global generator the engine seeds with trainer.seed before building the method.
        self.seed = int(torch.randint(2**62, ()).item())

    def deployable(self) -> nn.Module:
        return self._net if self.cfg.fusion else self.student

    def deployable_spec(self) -> dict[str, Any] | None:
        """The fused network: which stages carry a :class:`SpatialFusion`, and whether each sees tokens."""
        if not self.cfg.fusion:
            return None
        return {"kind": self.method_name, "fusion": {n: bool(f.tokens) for n, f in self.fusion.items()}}

    @classmethod
    def rebuild_deployable(cls, spec: dict[str, Any], student: nn.Module, info: dict[str, Any]) -> nn.Module:
        return FusedNet(student, nn.ModuleDict({n: SpatialFusion(tokens) for n, tokens in spec["fusion"].items()}))

    @torch.no_grad()
    def embed_logits(self, split, refresh: Refresh) -> tuple[Tensor, Tensor]:
        """``(features [N, D], logits [N, C])`` of every image of ``split`` in pool order, in eval mode,
        float32: :meth:`~mentor.adapt.sfda.SourceFreeMethod.embed` with the raw logits, which the
        ``exp(logits)`` centroid weights need."""
        ev = refresh.evaluator.local()
        was = self.training
        self.eval()
        feats, logits = [], []
        try:
            for x, _ in ev.batches(split):
                f, z = ev.run(self.tap, x)
                feats.append(f.float().flatten(1))
                logits.append(z.float())
        finally:
            self.train(was)
        return torch.cat(feats), torch.cat(logits)

    @torch.no_grad()
    def refresh_labels(self, refresh: Refresh) -> None:
        """ARFNet's dynamic centroid evaluation over the whole target pool, into ``pseudo_labels``."""
        c = self.cfg
        feats, logits = self.embed_logits(refresh.unlabeled, refresh)
        labels = centroid_pseudo_labels(feats, logits, rounds=c.rounds, momentum=c.momentum, weights="exp_logits",
                                        threshold=c.threshold, recount=False)
        self.pseudo_labels.copy_(labels.to(self.pseudo_labels.device))

    def local_view(self, x: Tensor, ctx: StepContext) -> Tensor:
        gen = ctx.generator if ctx.generator is not None else step_generator(ctx.step, self.seed, x.device)
        return local_crops(x, gen, scale=(self.cfg.crop_scale, 1.0))

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        x_global = batch["u_weak"]
        x_local = self.local_view(batch["u_weak_1"], ctx)
        b = x_global.shape[0]
        kept, feats, logits = self._net.run(torch.cat([x_global, x_local]), keep=self.head_stages)
        ent, div = im_terms(logits, c.epsilon)
        loss = c.ent_par * (ent - div)
        out = {"ent": ent.detach(), "div": div.detach()}
        if c.cls_par > 0:
            target = self.pseudo_labels[batch["u_index"]]
            ce = F.cross_entropy(logits.float(), target.repeat(2))
            loss = loss + c.cls_par * ce
            out["ce"] = ce.detach()
            ctx.pseudo_labels(target)
        else:
            ctx.pseudo_labels(logits[:b].detach().argmax(1))
        contrast = global_local_contrast(feats[:b], feats[b:], c.tau, c.base_tau)
        loss = loss + c.glcl_co * contrast
        out["contrast"] = contrast.detach()
        if self.head_stages:
            # The heads learn at full weight; the network below them gets distill_par of the gradient.
            scaled = [kept[n].detach() + c.distill_par * (kept[n] - kept[n].detach()) for n in self.head_stages]
            distill = self_distillation([self.heads[n](x) for n, x in zip(self.head_stages, scaled)], logits)
            loss = loss + distill
            out["distill"] = distill.detach()
        if c.fusion:
            out["gate"] = torch.stack([f.gate.detach().abs().mean() for f in self.fusion.values()]).mean()
        return {"loss": loss, **out}


@torch.no_grad()
def _probe(net: nn.Module, names: Sequence[str], info) -> dict[str, tuple[int, ...]]:
    """The output shapes of ``names`` for a dry run of two blank images of the run's shape, in eval mode
    (BN statistics untouched)."""
    was = net.training
    net.eval()
    try:
        with FeatureTap(net, names) as tap:
            net(torch.zeros(2, info.in_channels, info.image_size, info.image_size,
                            device=next(net.parameters()).device))
            return {n: tuple(tap[n].shape) for n in names}
    finally:
        net.train(was)


__all__ = ["ARFNet", "ChannelHead", "FusedNet", "SpatialFusion", "global_local_contrast", "local_crops",
           "self_distillation"]
