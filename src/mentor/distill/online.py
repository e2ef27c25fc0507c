"""Online distillation: peers trained together teach each other; there is no pre-trained teacher.

The recipe's ``model`` is the peer architecture. Each method turns it into several branches with
:class:`mentor.distill.branches.MultiBranchNet`: the recipe's network itself becomes the branch the
method ships (``self.student``, what ``deployable()`` returns; it keeps the zoo model's keys, so a run
can later serve as a teacher), the others are re-initialised copies. Every peer, and the leader or
fused teacher, is reported through ``eval_heads()`` (``val_acc_<name>``, ``test_acc_last_<name>``).

- ``dml``: Zhang et al., "Deep Mutual Learning", CVPR 2018.
- ``okddip``: Chen et al., "Online Knowledge Distillation with Diverse Peers", AAAI 2020.
- ``mbd``: Li et al., "Online Knowledge Distillation via Multi-branch Diversity Enhancement", ACCV 2020.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, POSITIVE, ConfigError, between, rules
from ..methods import BuildInfo, Method, MethodConfig, StepContext, register_method
from ..models.common import init_reference
from ..nn import conv_block, soft_kl
from .base import train_accuracy
from .branches import Head, MultiBranchNet
from .losses.online import diversity_loss, dml_loss, okddip_distillation, okddip_targets, rampup

MAX_NETS = 64  # peers or branches: each is a copy of (part of) the student, trained together


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    return sum(F.cross_entropy(z, y) for z in logits)


class _Online(Method):
    """Shared plumbing: ``self.net`` holds the branches, ``self.student`` is one of them."""

    head_prefix = "peer"

    def eval_heads(self) -> dict[str, nn.Module]:
        return {f"{self.head_prefix}{i}": net for i, net in enumerate(self.net.branches)}


@register_method("dml")
class DML(_Online):
    """Deep Mutual Learning (Zhang et al., CVPR 2018): K independent peers of the recipe's model.

    Each peer minimises CE + the mean over the other peers of KL(p_j || p_i), the other peers'
    predictions detached, at T = 1 (:func:`mentor.distill.losses.dml_loss`). Peer 0 is shipped.

    Design choice: the paper updates the peers in turn, each after recomputing the others'
    predictions; here all peers take one simultaneous step on the same batch with one optimizer (one
    forward of each peer per step instead of K), as most reimplementations do.
    """

    @rules(num_peers=between(2, MAX_NETS), temperature=POSITIVE)
    @dataclass
    class Config(MethodConfig):
        num_peers: int = 2
        temperature: float = 1.0

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if cfg.num_peers < 2:
            raise ConfigError(f"method.num_peers must be >= 2 for dml, got {cfg.num_peers}")
        self.net = MultiBranchNet(student, cfg.num_peers, branch_stages=None, keep=0)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        logits = self.net(batch["x"]).logits
        ce, kl = dml_loss(logits, batch["y"], self.cfg.temperature)
        return {"loss": ce + kl, "ce": ce, "kl": kl, "train_acc": train_accuracy(logits[0], batch["y"])}


@register_method("okddip")
class OKDDip(_Online):
    """Online Knowledge Distillation with Diverse Peers (Chen et al., AAAI 2020).

    A shared trunk and ``num_branches`` = m branches (``MultiBranchNet``, ``branch_stages`` last
    stages each): branches 0..m-2 are peers, branch m-1 the group leader, which is shipped. Each peer
    i distils from its own target t_i = sum_j alpha_ij z_j, alpha_i = softmax_j(W_q h_i . W_k h_j)
    over the peers' pooled features h (W_q, W_k: Linear C -> C/``attention_factor``, no bias, shared by
    all peers); the leader distils from the peers' mean logits. With the ramp-up
    lambda(e) = exp(-5 (1 - min(e, L)/L)^2), L = ``rampup_epochs`` (80 in the paper's 300-epoch recipe):

        L = sum_i CE(z_i) + CE(z_L) + kd_weight * lambda(e) * T^2 [sum_i KL(t_i || z_i) + KL(mean_i z_i || z_L)]

    ``detach_targets``: the official code (DefangChen/OKDDip-AAAI2020, ``train_GL.py``) detaches no
    target, so the KL terms also pull the targets towards each peer; that is the default, to match
    the published recipe. ``True`` detaches the logits inside every target (the peers' targets and
    the leader's mean) but keeps the gradient through the attention weights, so W_q/W_k still learn
    (with the whole target detached they would get no gradient at all).
    """

    @rules(num_branches=between(3, MAX_NETS).because("at least two peers and the leader"), temperature=POSITIVE,
           kd_weight=NON_NEGATIVE, rampup_epochs=NON_NEGATIVE, attention_factor=COUNT, branch_stages=COUNT)
    @dataclass
    class Config(MethodConfig):
        num_branches: int = 4
        temperature: float = 3.0
        kd_weight: float = 1.0
        rampup_epochs: float = 80.0
        attention_factor: int = 8
        detach_targets: bool = False
        branch_stages: int = 1


    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if cfg.num_branches < 3:
            raise ConfigError(f"method.num_branches must be >= 3 for okddip (at least two peers and the "
                              f"leader), got {cfg.num_branches}")
        self.net = MultiBranchNet(student, cfg.num_branches, cfg.branch_stages, keep=-1)
        width = self.net.num_features
        self.query = nn.Linear(width, max(1, width // cfg.attention_factor), bias=False)
        self.key = nn.Linear(width, max(1, width // cfg.attention_factor), bias=False)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        cfg, y = self.cfg, batch["y"]
        out = self.net(batch["x"])
        peers, leader, h = out.logits[:-1], out.logits[-1], out.features[:-1]
        targets, _ = okddip_targets(self.query(h), self.key(h), peers, cfg.detach_targets)
        kd_peers, kd_leader = okddip_distillation(peers, targets, leader, cfg.temperature, cfg.detach_targets)
        ce = _ce_sum(peers, y) + F.cross_entropy(leader, y)
        weight = cfg.kd_weight * rampup(ctx.epoch, cfg.rampup_epochs)
        loss = ce + weight * (kd_peers + kd_leader)
        return {"loss": loss, "ce": ce, "kd_peers": kd_peers, "kd_leader": kd_leader,
                "train_acc": train_accuracy(leader, y)}

    def eval_heads(self) -> dict[str, nn.Module]:
        heads = super().eval_heads()
        heads["leader"] = heads.pop(f"peer{len(self.net) - 1}")
        # The peers' mean logits: the leader's teacher, and the official code's "ensemble" accuracy.
        heads["ensemble"] = Head(lambda x: self.net(x).logits[:-1].mean(0))
        return heads


class FeatureFusion(nn.Module):
    """The feature fusion module (FFM): the branches' last feature maps -> one fused classifier.

    Concatenate the K maps along channels, mix them with a depthwise 3x3 conv and a pointwise 1x1
    conv back to C channels (each followed by BN and ReLU), then pool and classify. Design choice: the
    MBD paper's FFM layout could not be read (only its abstract is available); this is the
    depthwise-separable fusion of Kim et al., "Feature Fusion for Online Mutual Knowledge
    Distillation" (ICPR 2020), which the MBD abstract's description ("integrating rich semantic
    information contained in the last block of multiple student models") matches.
    """

    def __init__(self, channels: int, num_branches: int, num_classes: int):
        super().__init__()
        wide = channels * num_branches
        self.mix = nn.Sequential(*conv_block(wide, wide, 3, groups=wide), *conv_block(wide, channels, 1))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(channels, num_classes)
        init_reference(self)

    def forward(self, maps: list[Tensor]) -> Tensor:
        return self.fc(self.pool(self.mix(torch.cat(maps, 1))))


@register_method("mbd")
class MBD(_Online):
    """Multi-branch diversity enhancement (Li, Huang, Chen, Luo, Cai & Pan, "Online Knowledge
    Distillation via Multi-branch Diversity Enhancement", ACCV 2020, arXiv 2010.00795).

    A shared trunk and ``num_branches`` branches (as in OKDDip); a :class:`FeatureFusion` module fuses
    the branches' last feature maps into a fused teacher branch z_F; a classifier-diversification
    loss (:func:`mentor.distill.losses.diversity_loss`) pushes the branches' classifiers apart:

        L = sum_i CE(z_i) + CE(z_F) + kd_weight * lambda(e) * T^2 sum_i KL(z_F || z_i)
            + diversity_weight * CD(W_1, .., W_K)

    Branch 0 is shipped (it keeps the recipe model's shape; the fused teacher needs every branch and
    is reported as ``fused``).

    Sources. The full text could not be read: the arXiv abstract page (2010.00795 v3), the CVF open
    access page and their mirrors give the abstract only, and the authors published no code. From the
    abstract: several student models (branches, per the title) are trained online and their ensembled
    prediction is the soft target of each; a Feature Fusion Module (FFM) integrates the semantic
    information of the students' *last blocks*; a Classifier Diversification (CD) loss strengthens
    the differences between the students. Everything else is a design choice:

    - Design choice: the FFM layout (see :class:`FeatureFusion`) and its role as the online teacher.
      The abstract says the FFM "improves the performance of the attention mechanism"; this class
      has no separate attention/gate over the branches, the fused branch is the teacher.
    - Design choice: the CD formula (mean squared cosine between corresponding class vectors).
    - Design choice: the fused teacher is detached in the KL (it learns from the labels and, through
      its input maps, shapes the branches' features; detaching keeps it from being pulled towards the
      weaker branches).
    - Design choice: the shared trunk / branch split (the last stage, ``branch_stages`` = 1) and the
      defaults K = 3 branches, T = 3, kd_weight = 1, diversity_weight = 1 and the OKDDip ramp-up
      lambda(e) over ``rampup_epochs`` = 80 (the two papers share an author, Defang Chen).

    Not adopted, for the record: two third-party reimplementations found in the public code index
    (neither by the authors) weight their CD term by 5e-8; one computes it as
    ``sum_{i<j} ||W_i^T W_j||_F`` on *detached* classifier weights (so it trains nothing) and distils
    every branch (T = 3) from ``sum_k softmax(z_k) * z_k``, each branch's logits weighted elementwise
    by its own probabilities; the other computes the mean ``|cos|`` between corresponding class
    vectors.
    The recurring 5e-8 hints at a published weight for an unnormalised CD term, but neither formula
    can be traced to the paper.
    """

    @rules(num_branches=between(2, MAX_NETS), temperature=POSITIVE, kd_weight=NON_NEGATIVE,
           diversity_weight=NON_NEGATIVE,
           rampup_epochs=NON_NEGATIVE, branch_stages=COUNT)
    @dataclass
    class Config(MethodConfig):
        num_branches: int = 3
        temperature: float = 3.0
        kd_weight: float = 1.0
        diversity_weight: float = 1.0
        rampup_epochs: float = 80.0
        branch_stages: int = 1

    head_prefix = "branch"

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if cfg.num_branches < 2:
            raise ConfigError(f"method.num_branches must be >= 2 for mbd, got {cfg.num_branches}")
        self.net = MultiBranchNet(student, cfg.num_branches, cfg.branch_stages, keep=0)
        self.fusion = FeatureFusion(self.net.num_features, cfg.num_branches, info.num_classes)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        cfg, y = self.cfg, batch["y"]
        out = self.net(batch["x"])
        fused = self.fusion(out.maps)
        ce = _ce_sum(out.logits, y) + F.cross_entropy(fused, y)
        teacher = fused.detach()
        kd = sum(soft_kl(z, teacher, cfg.temperature) for z in out.logits)
        cd = diversity_loss([net.fc.weight for net in self.net.branches])
        loss = ce + cfg.kd_weight * rampup(ctx.epoch, cfg.rampup_epochs) * kd + cfg.diversity_weight * cd
        return {"loss": loss, "ce": ce, "kd": kd, "cd": cd, "train_acc": train_accuracy(out.logits[0], y)}

    def eval_heads(self) -> dict[str, nn.Module]:
        heads = super().eval_heads()
        heads["fused"] = Head(lambda x: self.fusion(self.net(x).maps))
        return heads


__all__ = ["DML", "MBD", "OKDDip", "FeatureFusion"]
