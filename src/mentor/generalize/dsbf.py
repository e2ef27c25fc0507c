"""DSBF: domain-specific bias filtering for single-labelled-domain generalisation (one labelled source domain,
the other sources unlabelled)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..config import NON_NEGATIVE, PROBABILITY, between, rules
from ..errors import ConfigError
from ..methods import BuildInfo, Inputs, MethodConfig, Refresh, StepContext, register_method
from ..models.penultimate import swap_classifier
from ..nn import train_accuracy
from ..nn.masking import all_gather_cat, step_tensor
from ..nn.pseudo import centroid_pseudo_labels, im_loss
from .erm import ERM


class BottleneckHead(nn.Module):
    """DSBF's (and SHOT's) head in place of the student's classifier: ``B`` (``bottleneck``, a linear layer to
    ``bottleneck_dim`` followed by tanh: DSBF's ``FeatBootleneck`` of type ``"wn"``) and ``C`` (``classifier``, a
    weight-normalised linear layer: its ``Classifier``). ``forward(f) = C(B(f))``. ``B`` is Xavier-normal with a
    zero bias (DSBF's ``init_weights``); ``C`` keeps PyTorch's initialisation with a zero bias, as in DSBF, whose
    Xavier call on the weight-normalised layer's derived weight leaves its magnitude and direction untouched."""

    def __init__(self, in_features: int, bottleneck_dim: int, num_classes: int):
        super().__init__()
        self.in_features, self.out_features = in_features, num_classes
        self.bottleneck = projector(in_features, bottleneck_dim)
        linear = nn.Linear(bottleneck_dim, num_classes)
        nn.init.zeros_(linear.bias)
        self.classifier = weight_norm(linear, name="weight")

    def embed(self, f: Tensor) -> Tensor:
        """``B(f)``: the bottleneck features (the classifier's input)."""
        return torch.tanh(self.bottleneck(f))

    def forward(self, f: Tensor) -> Tensor:
        return self.classifier(self.embed(f))

    def frozen_classifier(self, b: Tensor) -> Tensor:
        """``C(b)`` with ``C``'s weights detached: a loss through it trains only what produced ``b``."""
        return F.linear(b, self.classifier.weight.detach(), self.classifier.bias.detach())


def _swap_head(student: nn.Module, bottleneck_dim: int, num_classes: int) -> int:
    """Put a :class:`BottleneckHead` in place of the student's linear classifier (in place); returns the
    classifier's input width."""
    def build(old: nn.Linear) -> nn.Module:
        return BottleneckHead(old.in_features, bottleneck_dim, num_classes).to(old.weight.device, old.weight.dtype)

    return swap_classifier(student, build, "dsbf", "puts a bottleneck and a classifier in place of").in_features


def projector(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer initialised as DSBF's ``init_weights`` (Xavier-normal weight, zero bias); used with tanh."""
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DomainAttention(nn.Module):
    """DSBF's ``DGAttention`` over the ``U`` unlabelled domains' projected features of one batch of class-aligned
    rows (``[U, N, D]``: row ``n`` of every domain is an image of the same class).

    For key domain ``i`` and every query domain ``j``, per row, a ``D x D`` attention between feature channels:
    ``A_ij[p, q] = softmax_q(Q_i(h_j)[p] K_i(h_i)[q])`` and ``o_ij[p] = sum_q A_ij[p, q] V_i(h_i)[q]``, where
    ``Q_i``, ``K_i``, ``V_i`` are linear layers followed by ReLU (DSBF's ``AEmbed``, one set per key domain).
    The output is ``h_i + gamma_i * (sum_j o_ij) / divisor`` with ``gamma_i`` a learned scalar starting at 0, so
    the calibration starts from the projected features themselves."""

    def __init__(self, num_domains: int, dim: int, divisor: float):
        super().__init__()

        def embed() -> nn.ModuleList:
            return nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(num_domains))

        self.query, self.key, self.value = embed(), embed(), embed()
        self.gamma = nn.Parameter(torch.zeros(num_domains))
        self.divisor = divisor

    def forward(self, h: Tensor) -> Tensor:
        out = []
        for i in range(h.shape[0]):
            k, v = self.key[i](h[i]), self.value[i](h[i])  # [N, D]
            q = self.query[i](h)  # [U, N, D]: each query domain j through domain i's query map
            att = (q[..., :, None] * k[None, :, None, :]).softmax(-1)  # [U, N, D(p), D(q)]
            mixed = torch.einsum("jnpq,nq->np", att, v)  # sum over q and over the query domains j
            out.append(h[i] + self.gamma[i] * mixed / self.divisor)
        return torch.stack(out)


@torch.no_grad()
def grouped_pseudo_labels(features: Tensor, probs: Tensor, group: Tensor) -> Tensor:
    """DSBF's ``obtain_label`` per group of the pool (a domain): SHOT's centroid pseudo-labels
    (:func:`mentor.adapt.sfda.centroid_pseudo_labels`, one refinement, every class allowed: DSBF keeps no class
    threshold) over the images of each group ``g >= 0`` separately. Images of group ``-1`` (not known) take the
    labels of the clustering of the whole pool."""
    labels = centroid_pseudo_labels(features, probs, rounds=1, threshold=-1)
    for g in torch.unique(group[group >= 0]).tolist():
        idx = torch.nonzero(group == g).flatten()
        labels[idx] = centroid_pseudo_labels(features[idx], probs[idx], rounds=1, threshold=-1)
    return labels


@register_method("dsbf")
class DSBF(ERM):
    """Yuan, Ma, Chen, Kuang, Wu & Lin, "Domain-Specific Bias Filtering for Single Labeled Domain Generalization",
    IJCV 2022 (arXiv 2110.00726), in the form of its code (junkunyuan/DSBF ``main.py``, ``loss.py``,
    ``models/dg_network.py``, ``models/attentions_new.py``). The labelled training domain(s) give ``x``, ``y``; the
    domains of ``data.unlabeled_domains`` give the unlabelled stream (``u``, one block per domain, ``u_domain``).

    **Network.** The student's classifier becomes a :class:`BottleneckHead`: the backbone ``F`` (the student
    below its classifier), ``B`` (linear to ``bottleneck_dim`` + tanh) and a weight-normalised classifier ``C``.
    Beside it: one projector ``IV_u`` per unlabelled domain (linear + tanh from ``F``'s features, DSBF's
    ``netIV1``, ``netIV2``) and the attention ``A`` (:class:`DomainAttention`).

    **Initialisation.** DSBF first trains ``F``, ``B``, ``C`` with cross-entropy on the labelled domain (its
    ``pre_train``: ``1.5 * max_epoch`` epochs, 30 against 20 for the filtering stage). Here this is a warm-up of
    the same run: the first ``warmup`` share of ``trainer.max_steps`` (0.6 = 30 / (30 + 20)), rounded up to the
    next epoch start, so the first filtering epoch's pseudo-labels come from the warmed-up network. With
    ``warmup: 0`` the filtering starts at step 0 with ``B`` and ``C`` untrained (``model.init_from`` loads a
    backbone, but the head is new), which serves short tests and ablations.

    **Pseudo-labels** (every epoch start once the warm-up is over, :meth:`on_epoch`): DSBF's ``obtain_label`` on
    ``B``'s features of each unlabelled domain, in eval mode: SHOT's centroids from the softmax-weighted features
    (a 1 appended, L2-normalised), nearest centroid by cosine distance, one refinement with hard labels
    (:func:`grouped_pseudo_labels`).

    **Each step after the warm-up** (one backward; detached inputs keep each loss on the parameters DSBF's own
    optimizer for it updates):

    1. feature-extractor debiasing, per unlabelled domain ``u``: ``lambda * [CE(C(B(F(x_u))), pl_u) + IM_u]``
       with ``IM = mean_i H(p_i) - H(mean_i p_i)`` (``eps`` 1e-5 inside the logs, DSBF's ``Lim``) over the
       domain's batch; through ``C`` with its weights detached, so it trains ``F`` and ``B``. DSBF takes one
       optimizer step per domain; here their sum is one step;
    2. projection: each labelled image of class ``c`` is paired, in every unlabelled domain, with a random image
       of that domain's batch whose pseudo-label is ``c`` (DSBF's ``DgAlighDataset`` draws class-aligned images
       from the whole domain; here they come from the step's batch, and a row without such an image in a domain
       is left out of that domain's term): ``gamma * mean_u MSE(B(F(x)), IV_u(F(x_u)))`` with ``B(F(x))`` and
       ``F(x_u)`` detached (trains the projectors only);
    3. classifier calibrating: the rows paired in every domain, ``o = A(IV_u(F(x_u)))`` (projections detached),
       ``gamma * mean_u CE(C(o_u), c)`` (trains ``A`` and ``C``).

    **Defaults**: ``lambda`` (``lambda_``) 1 and ``gamma`` 1 (DSBF's), ``bottleneck_dim`` 256. DSBF's optimizer
    (SGD, momentum 0.9, weight decay 5e-4, lr 0.01 with the ImageNet backbone at 0.1x, StepLR) is the recipe's;
    one learning rate applies to every part.

    **Design choices** (the code is silent or does not apply): the warm-up in place of a separate pre-training
    run; the attention's divisor is ``U + 1`` for ``U`` unlabelled domains (DSBF divides by 3, the number of
    domains in its triplets, with two unlabelled domains); with one domain per projector and per attention key,
    any number of unlabelled domains is supported; one forward of ``cat(x, u)`` in training mode gives every
    feature (DSBF reads the projection targets with ``F`` and ``B`` in eval mode). The engine does not tell a
    method which pool images belong to which domain, so the domain of each pool image is recorded from the
    batches' ``u_domain`` as it is drawn (:attr:`pool_domain`); the pseudo-labels are then computed per domain,
    and an image not yet drawn takes the label of the clustering over the whole pool (at a warm-up of at least
    one epoch every pool image has usually been drawn before the first filtering epoch).
    """

    inputs = Inputs(labeled=("train",), unlabeled=("train",), domains=True)

    @rules(lambda_=NON_NEGATIVE, gamma=NON_NEGATIVE, warmup=PROBABILITY,
           bottleneck_dim=between(1, 1 << 16).because("the width of the bottleneck features"))
    @dataclass
    class Config(ERM.Config):
        lambda_: float = 1.0
        gamma: float = 1.0
        bottleneck_dim: int = 256
        warmup: float = 0.6

    def __init__(self, cfg: MethodConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        c = self.cfg
        self.num_pools = len(info.unlabeled_domains)
        if info.num_domains and not self.num_pools:
            raise ConfigError(
                "method dsbf filters the bias of the labelled domain with unlabelled training domains, but this run "
                "has none: list them with data.unlabeled_domains=[...] (training domains whose labels are dropped), "
                "keeping one labelled domain")
        width = _swap_head(student, c.bottleneck_dim, info.num_classes)
        pools = max(1, self.num_pools)
        self.projectors = nn.ModuleList(projector(width, c.bottleneck_dim) for _ in range(pools))
        self.attention = DomainAttention(pools, c.bottleneck_dim, divisor=pools + 1)
        self.register_buffer("pseudo", torch.zeros(max(1, info.unlabeled_size), dtype=torch.long))
        self.register_buffer("pool_domain", torch.full((max(1, info.unlabeled_size),), -1, dtype=torch.long))
        spe = max(1, info.steps_per_epoch)
        self.warmup_steps = math.ceil(c.warmup * info.max_steps / spe) * spe if c.warmup > 0 else 0
        if c.warmup > 0 and info.max_steps and self.warmup_steps >= info.max_steps:
            raise ConfigError(
                f"method dsbf warms up on the labelled domain for method.warmup={c.warmup} of trainer.max_steps="
                f"{info.max_steps}, rounded up to an epoch start ({spe} steps an epoch): {self.warmup_steps} steps, "
                "which leaves no step for the filtering stage. Lower method.warmup, raise trainer.max_steps, or "
                "shorten the epoch (data.domain_limit)")

    @property
    def head(self) -> BottleneckHead:
        return self.classifier_head  # type: ignore[return-value]

    # -- pseudo-labels ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_pool(self, split, refresh: Refresh) -> tuple[Tensor, Tensor]:
        """``(B(F(x)) [N, bottleneck_dim], softmax(C(.)) [N, K])`` of every pool image in pool order, in eval
        mode, float32; every process reads the whole pool."""
        ev = refresh.evaluator.local()
        was = self.training
        self.eval()
        feats, probs = [], []
        try:
            for x, _ in ev.batches(split):
                f, _ = ev.run(self.features, x)
                b = self.head.embed(f)
                feats.append(b.float())
                probs.append(self.head.classifier(b).float().softmax(1))
        finally:
            self.train(was)
        return torch.cat(feats), torch.cat(probs)

    def on_epoch(self, epoch: int, refresh: Refresh) -> None:
        if epoch * max(1, self.info.steps_per_epoch) < self.warmup_steps or refresh.unlabeled is None:
            return
        feats, probs = self.embed_pool(refresh.unlabeled, refresh)
        self.pseudo.copy_(grouped_pseudo_labels(feats, probs, self.pool_domain[: feats.shape[0]]))

    # -- the step ------------------------------------------------------------------------------------------
    def pair(self, y: Tensor, pseudo: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(pick [U, N], found [U, N])``: for each labelled row ``n`` and unlabelled domain ``u``, a uniformly
        drawn position in that domain's block of the batch whose pseudo-label is ``y[n]`` (``pseudo`` is
        ``[U, M]``), and 1 where there is one."""
        match = pseudo[:, None, :] == y[None, :, None]  # [U, N, M]
        key = torch.rand(match.shape, generator=generator, device=y.device)
        pick = torch.where(match, key, torch.full_like(key, -1.0)).argmax(2)
        return pick, match.any(2).float()

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        x, y, u, ui = batch["x"], batch["y"], batch["u"], batch["u_index"]
        n, pools = x.shape[0], self.num_pools
        with torch.no_grad():  # where each pool image comes from (gathered over the ranks)
            self.pool_domain.index_copy_(0, all_gather_cat(ui), all_gather_cat(batch["u_domain"]))
        f, _ = self.features(torch.cat([x, u]))
        b = self.head.embed(f)
        z_x = self.head.classifier(b[:n])
        sup = F.cross_entropy(z_x.float(), y, label_smoothing=c.label_smoothing)

        pl = self.pseudo[ui]
        ctx.pseudo_labels(pl)
        # 1. debiasing F and B on each unlabelled domain's block (C frozen)
        z_u = self.head.frozen_classifier(b[n:]).float().unflatten(0, (pools, -1))  # [U, M, K]
        pl_u = pl.view(pools, -1)
        ce_u = torch.stack([F.cross_entropy(z_u[k], pl_u[k]) for k in range(pools)])
        im = torch.stack([im_loss(z_u[k]) for k in range(pools)])
        debias = (ce_u + im).sum()
        # 2. projection of each domain's class-aligned images onto the labelled image's bottleneck features
        pick, found = self.pair(y, pl_u, ctx.generator)
        f_u = f[n:].detach().unflatten(0, (pools, -1))  # [U, M, d]
        aligned = f_u.gather(1, pick[..., None].expand(-1, -1, f_u.shape[2]))  # [U, N, d]
        proj = torch.stack([torch.tanh(self.projectors[k](aligned[k])) for k in range(pools)])
        mse = (proj.float() - b[:n].detach().float()[None]).pow(2).mean(2)  # [U, N]
        iv = ((mse * found).sum(1) / found.sum(1).clamp(min=1.0)).mean()
        # 3. calibrating C (and training A) on the attended projections of the rows found in every domain
        rows = found.prod(0)
        z_c = self.head.classifier(self.attention(proj.detach())).float()  # [U, N, K]
        ce_c = F.cross_entropy(z_c.flatten(0, 1), y.repeat(pools), reduction="none").view(pools, n)
        cal = ((ce_c * rows).sum(1) / rows.sum().clamp(min=1.0)).mean()

        warm = (step_tensor(ctx.step, x.device) < self.warmup_steps).float()
        filtering = c.lambda_ * debias + c.gamma * (iv + cal)
        loss = warm * sup + (1.0 - warm) * filtering
        return {"loss": loss, "sup": sup.detach(), "debias_ce": ce_u.mean().detach(), "im": im.mean().detach(),
                "iv": iv.detach(), "cal": cal.detach(), "paired": rows.mean(), "warmup": warm,
                "train_acc": train_accuracy(z_x, y)}

    def deployable_spec(self) -> dict[str, Any] | None:
        """The student with its :class:`BottleneckHead` (of ``bottleneck_dim``) in place of the classifier."""
        return {"kind": self.method_name, "bottleneck_dim": int(self.cfg.bottleneck_dim)}

    @classmethod
    def rebuild_deployable(cls, spec: dict[str, Any], student: nn.Module, info: dict[str, Any]) -> nn.Module:
        _swap_head(student, int(spec["bottleneck_dim"]), int(info["num_classes"]))
        return student


__all__ = ["DSBF", "BottleneckHead", "DomainAttention", "grouped_pseudo_labels", "projector"]
