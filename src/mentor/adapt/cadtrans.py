"""CADTrans: consistent assistant domains on a Vision Transformer for source-free adaptation (Shao, Zhang, Luo,
Li & Wang, 2025)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, NON_NEGATIVE, POSITIVE, between, rules
from ..errors import ConfigError
from ..methods import Refresh, StepContext, register_method
from ..models import FeatureTap
from ..models.vit import VisionTransformer
from ..nn.pseudo import im_terms
from .shot import SHOT


# --------------------------------------------------------------------------------- the assistant domain
def aggregate_attention(features: Sequence[Tensor], lam: float = 0.99) -> Tensor:
    """The EMA of attention features over layers: ``a_1 = f_1``, ``a_l = lam * f_l + (1 - lam) * a_{l-1}``
    (CADTrans's ``x_a = lam f_l + (1 - lam) f_{l-1}`` over the layers it aggregates, ``lam`` 0.99)."""
    if not features:
        raise ValueError("aggregate_attention needs at least one layer's features")
    a = features[0]
    for f in features[1:]:
        a = lam * f + (1.0 - lam) * a
    return a


def tokens_to_grid(tokens: Tensor, grid: int) -> Tensor:
    """``[B, 1 + grid^2, D]`` tokens (class token first) as a ``[B, D, grid, grid]`` map of the patch tokens,
    row-major as the patches were embedded."""
    b, t, d = tokens.shape
    if t != 1 + grid * grid:
        raise ValueError(f"{t} tokens are not a class token and a {grid}x{grid} patch grid")
    return tokens[:, 1:].transpose(1, 2).reshape(b, d, grid, grid)


class AssistantDomainModule(nn.Module):
    """CADTrans's Assistant Domain Module (ADM): a small CNN on the aggregated attention map.

    ``e1 = relu(bn(conv3x3(x)))``, ``e2 = relu(bn(conv3x3(e1)))``, ``f_a = avgpool(bn(conv3x3(e2)))`` (the
    assistant features) and ``z_a = fc2(relu(fc1(f_a)))`` (the assistant logits)."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]

        self.body = nn.Sequential(*conv(channels, width), nn.ReLU(), *conv(width, width), nn.ReLU(),
                                  *conv(width, width), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.body(x)
        return f, self.head(f)


def consistency_split(logits: Tensor, assistant_logits: Tensor, pseudo_labels: Tensor) -> Tensor:
    """The easy samples (a bool mask): those whose target prediction, assistant prediction and pseudo-label
    all agree; every other sample is hard."""
    pred = logits.detach().argmax(1)
    return (pred == assistant_logits.detach().argmax(1)) & (pred == pseudo_labels)


# ------------------------------------------------------------------------------------------- CMK-MMD
def multi_kernel(x: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> Tensor:
    """``K[i, j] = sum_m exp(-||x_i - x_j||^2 / s_m)``, the multi-kernel of DAN (Long et al., ICML 2015) as the
    authors' code writes it (``guassian_kernel``): bandwidths ``s_m = s * kernel_mul^(m - kernel_num // 2)``,
    ``m = 0 .. kernel_num - 1``, around the mean squared distance ``s`` between distinct rows (no gradient
    through the bandwidths). Float32."""
    x = x.float().flatten(1)
    n = x.shape[0]
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    base = d2.detach().sum() / max(1, n * n - n)
    base = base.clamp(min=1e-12) / kernel_mul ** (kernel_num // 2)
    return sum(torch.exp(-d2 / (base * kernel_mul**m)) for m in range(kernel_num))


def conditional_mmd(features: Tensor, labels: Tensor, easy: Tensor, num_classes: int, kernel_mul: float = 2.0,
                    kernel_num: int = 5) -> tuple[Tensor, Tensor]:
    """``(intra, inter)``: the class-conditional multi-kernel MMD between the hard and the easy samples of a
    batch.

    With ``H_c`` the hard and ``E_c`` the easy samples of class ``c`` (``labels``) and ``k`` the
    :func:`multi_kernel` over the whole batch, ``MMD^2(A, B) = mean_{A x A} k + mean_{B x B} k - 2 mean_{A x B} k``
    (the biased estimate); ``intra`` is its mean over the classes ``c`` with both ``H_c`` and ``E_c``
    non-empty (hard samples pulled to the easy ones of their class), ``inter`` its mean over the pairs
    ``c != c'`` with ``H_c`` and ``E_c'`` non-empty (hard samples pushed from the easy ones of other classes),
    as the contrastive domain discrepancy of CAN (Kang et al., CVPR 2019). Either is 0 where no such class or
    pair exists. Vectorised over classes, no host synchronisation."""
    k = multi_kernel(features)
    # scatter rather than F.one_hot, which reads the labels back to check their range
    onehot = k.new_zeros(labels.shape[0], num_classes).scatter_(1, labels[:, None], 1.0)
    hard_c = onehot * (~easy).float()[:, None]
    easy_c = onehot * easy.float()[:, None]
    n_hard, n_easy = hard_c.sum(0), easy_c.sum(0)
    wh = hard_c / n_hard.clamp(min=1)
    we = easy_c / n_easy.clamp(min=1)
    hh = (wh * (k @ wh)).sum(0)  # [C]: mean kernel within H_c
    ee = (we * (k @ we)).sum(0)  # [C]: within E_c
    he = wh.T @ k @ we  # [C, C]: between H_c and E_c'
    mmd = hh[:, None] + ee[None, :] - 2.0 * he
    valid = (n_hard > 0)[:, None] & (n_easy > 0)[None, :]
    same = torch.eye(num_classes, dtype=torch.bool, device=k.device)
    intra_mask, inter_mask = (valid & same).float(), (valid & ~same).float()
    intra = (mmd * intra_mask).sum() / intra_mask.sum().clamp(min=1)
    inter = (mmd * inter_mask).sum() / inter_mask.sum().clamp(min=1)
    return intra, inter


class AssistantNet(nn.Module):
    """The assistant domain's classifier as a network ``x -> z_a`` (for evaluation beside the ViT): the
    student's forward, its aggregated attention features, the ADM's logits."""

    def __init__(self, method: CADTrans):
        super().__init__()
        object.__setattr__(self, "method", method)  # not a child: the method owns the modules

    def forward(self, x: Tensor) -> Tensor:
        m = self.method
        m.student(x)
        return m.assistant(m.attn_tap)[1]


# ---------------------------------------------------------------------------------------------- CADTrans
@register_method("cadtrans")
class CADTrans(SHOT):
    """Shao, Zhang, Luo, Li & Wang, "Consistent Assistant Domains Transformer for Source-free Domain
    Adaptation" (arXiv 2510.01559, 2025). No official code is available (the paper names
    RoryShao/CADTrans; it is not published).

    The student must be a Vision Transformer (``model.name: vit_tiny`` / ``vit_small``). SHOT's setting
    (the source classifier frozen, the network below it adapted on the unlabelled target pool with
    information maximisation and centroid pseudo-labels ``y``; :class:`~mentor.adapt.shot.SHOT`) plus:

    1. **Assistant domain**: the outputs of the multi-head self-attention (``layer{l}.attn``) of the blocks
       after the first third (ViT-B's ``l > 4`` of 12; ``from_layer`` sets the count skipped) are aggregated
       by an EMA over layers (:func:`aggregate_attention`, ``lam`` 0.99), their patch tokens laid out as a map
       (:func:`tokens_to_grid`) and read by the :class:`AssistantDomainModule`, which gives assistant logits
       ``z_a``, trained with ``adm_par * CE(z_a, y)`` on a detached copy of the attention features.
    2. **Consistency**: a sample is easy when the ViT's prediction, the assistant's and its pseudo-label
       agree (:func:`consistency_split`), hard otherwise.
    3. **CMK-MMD**: ``mmd_par * (intra - inter_weight * inter)`` (:func:`conditional_mmd`) on the ViT's
       L2-normalised features (the input of ``fc``), easy features as fixed anchors (no gradient), so hard
       samples are pulled towards the easy samples of their class and pushed from those of other classes.

        ``loss = ent_par * (mean H(p) - H(mean p)) + cls_par * CE(z, y) + adm_par * CE(z_a, y)
        + mmd_par * (intra - inter_weight * inter)``

    Logged terms: ``ent``, ``div``, ``ce``, ``adm_ce``, ``intra``, ``inter`` and ``easy`` (the easy fraction);
    ``val_acc_assistant`` is the assistant's accuracy. The deployed network is the ViT.

    **Partial**: built from the paper's abstract and a third-party summary of it; the formulas of the
    consistency strategies, of CMK-MMD and of the total objective are not available. Design choices:

    - "Global attention" of a layer = the output of its attention module (``[B, 1 + N, D]``), whose patch
      tokens form the ADM's ``D``-channel map; the EMA runs over the layers after the first ``from_layer``
      (default: a third of the depth, rounded down: 4 of ViT-B's 12 as in the paper; 2 of ``vit_tiny``'s 6).
    - ADM: width ``adm_width`` (default the ViT's width); ``f_a`` is the pooled output of the third conv + BN
      (no ReLU), ``z_a`` a two-layer MLP, as the summary writes them. The ADM starts untrained (the source run
      is a plain ViT) and learns on a detached copy of the attention features: its BatchNorms amplify the
      gradient of the small attention outputs, and while it is untrained that gradient wrecks the ViT.
    - Easy = the three predictions agree; pseudo-labels are SHOT's centroid labels, refreshed every
      ``interval`` epochs (also when ``cls_par`` is 0).
    - CMK-MMD = the class-conditional, contrastive form of CAN's contrastive domain discrepancy with DAN's five
      Gaussian kernels (bandwidth multiplier 2 around the mean squared distance, as in the authors' ARFNet
      code ``guassian_kernel``), hard samples against easy ones within a batch, on unit features.
    - Weights ``adm_par`` 10 (the ADM's input is detached, so its weight acts on the ADM alone: a fresh head
      at ten times the backbone's rate, as SHOT's object code trains its new bottleneck), ``mmd_par`` 0.1 (at 1
      its gradient is about six times the CE's and a small ViT collapses to one class within an epoch),
      ``inter_weight`` 1, SHOT's ``cls_par`` 0.3 and ``ent_par`` 1, and SHOT's SGD (momentum 0.9, Nesterov,
      weight decay 1e-3) at ``lr`` 1e-3 (SHOT's 1e-2 times the 0.1 its object code gives the backbone, which
      the whole ViT is) are this implementation's.
    """

    @rules(adm_par=NON_NEGATIVE, mmd_par=NON_NEGATIVE, inter_weight=NON_NEGATIVE, lam=between(0, 1),
           from_layer=NON_NEGATIVE, adm_width=COUNT, kernel_mul=POSITIVE, kernel_num=COUNT)
    @dataclass
    class Config(SHOT.Config):
        lr: float | None = 1e-3
        adm_par: float = 10.0
        mmd_par: float = 0.1
        inter_weight: float = 1.0
        lam: float = 0.99
        from_layer: int | None = None  # blocks before the aggregated ones; null: depth // 3
        adm_width: int | None = None  # null: the ViT's width
        kernel_mul: float = 2.0
        kernel_num: int = 5

    def __init__(self, cfg, student, info):
        if not isinstance(student, VisionTransformer):
            raise ConfigError(f"method cadtrans builds its assistant domain from a Vision Transformer's attention, "
                              f"but the student is {type(student).__name__}: set model.name=vit_tiny (or vit_small), "
                              "and train the source run (model.init_from) with the same model")
        super().__init__(cfg, student, info)
        depth = len(student.blocks())
        skip = depth // 3 if cfg.from_layer is None else cfg.from_layer
        if skip >= depth:
            raise ConfigError(f"method.from_layer={skip} leaves none of the student's {depth} blocks to aggregate; "
                              f"use 0 .. {depth - 1}")
        self.attn_names = tuple(f"layer{i}.attn" for i in range(skip + 1, depth + 1))
        self.attn_tap = FeatureTap(student, self.attn_names)
        self.adm = AssistantDomainModule(student.dim, cfg.adm_width or student.dim, info.num_classes)
        object.__setattr__(self, "_assistant_net", AssistantNet(self))

    def on_epoch(self, epoch: int, refresh: Refresh) -> None:
        if epoch % self.cfg.interval == 0:
            self.refresh_labels(refresh)

    def assistant(self, tap: FeatureTap) -> tuple[Tensor, Tensor]:
        """``(f_a, z_a)`` from the attention features the last forward of the student recorded in ``tap``."""
        x = aggregate_attention([tap[n].detach() for n in self.attn_names], self.cfg.lam)
        return self.adm(tokens_to_grid(x, self.student.grid))

    def eval_heads(self) -> dict[str, nn.Module]:
        return {"assistant": self._assistant_net}

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        feats, logits = self.tap(batch["u_weak"])
        _, z_a = self.assistant(self.attn_tap)
        target = self.pseudo_labels[batch["u_index"]]
        ent, div = im_terms(logits, c.epsilon)
        ce = F.cross_entropy(logits.float(), target)
        adm_ce = F.cross_entropy(z_a.float(), target)
        easy = consistency_split(logits, z_a, target)
        f = F.normalize(feats.float(), dim=1)
        anchored = torch.where(easy[:, None], f.detach(), f)
        intra, inter = conditional_mmd(anchored, target, easy, self.info.num_classes, c.kernel_mul, c.kernel_num)
        loss = (c.ent_par * (ent - div) + c.cls_par * ce + c.adm_par * adm_ce
                + c.mmd_par * (intra - c.inter_weight * inter))
        ctx.pseudo_labels(target)
        return {"loss": loss, "ent": ent.detach(), "div": div.detach(), "ce": ce.detach(), "adm_ce": adm_ce.detach(),
                "intra": intra.detach(), "inter": inter.detach(), "easy": easy.float().mean()}


__all__ = ["AssistantDomainModule", "AssistantNet", "CADTrans", "aggregate_attention", "conditional_mmd",
           "consistency_split", "multi_kernel", "tokens_to_grid"]
