"""SimMatch: pseudo-labels and similarity targets that calibrate each other through a labelled memory bank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, rules
from ..errors import ConfigError
from ..methods import BuildInfo, StepContext, register_method
from ..models.penultimate import PenultimateTap
from ..nn.distalign import DistAlignQueue
from ..nn.masking import step_tensor
from ..nn.memory import EmbeddingHead, LabeledMemoryBank, similarity
from .fixmatch import FixMatch, Logits, SemiConfig
from .mean_teacher import batch_statistics


@rules(p_cutoff=PROBABILITY, T=POSITIVE, proj_size=COUNT, num_projectors=COUNT, smoothing_alpha=PROBABILITY,
       da_len=COUNT, memory_start=NON_NEGATIVE)
@dataclass
class EmbeddingConfig(SemiConfig):
    """What SimMatch and CoMatch share: FixMatch's threshold, an embedding head, the temperature of the
    similarities, the weight of the classifier in the smoothed pseudo-label, queue alignment, and the step
    from which the memory is read."""

    p_cutoff: float = 0.95
    T: float = 0.1
    proj_size: int = 128
    num_projectors: int = 1
    smoothing_alpha: float = 0.9
    da_len: int = 32
    memory_start: int = 1024


class EmbeddingMatch(FixMatch):
    """FixMatch whose one forward also gives every view's l2-normalised embedding, with the weak
    probabilities aligned to a uniform target through a queue of batch means: the common part of SimMatch
    and CoMatch as USB implements them (``SimMatch_Net``/``CoMatch_Net``, ``DistAlignQueueHook``).

    The embedding is :class:`~mentor.nn.memory.EmbeddingHead` on the student's penultimate features (the
    input of its classifier ``fc``, read by :class:`~mentor.models.penultimate.PenultimateTap`), a head the
    method owns and trains; the student alone is deployed. :meth:`forward_views` returns the logits of
    every view by name and its embedding as ``emb_<view>``; the hooks of a subclass pass what they derive
    from the memory to the later hooks of the same step through that dict. The pseudo-label is the
    (aligned, smoothed) distribution itself, not sharpened. Similarities of embeddings and products of
    distributions are taken in float32 with autocast off (:func:`~mentor.nn.memory.similarity`), where a
    bf16 step would move every logit by ~0.04 at a temperature of 0.1.
    """

    Config = EmbeddingConfig

    def __init__(self, cfg: EmbeddingConfig, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        self.tap = PenultimateTap(student)
        self.head = EmbeddingHead(self.tap.num_features, cfg.proj_size, cfg.num_projectors)
        self.dist_align = DistAlignQueue(info.num_classes, cfg.da_len, eps=1e-6)

    def forward_views(self, batch: dict[str, Tensor]) -> Logits:
        inputs = self.views(batch)
        sizes = [v.shape[0] for v in inputs.values()]
        features, logits = self.tap(torch.cat(list(inputs.values())))
        z = dict(zip(inputs, logits.split(sizes)))
        z.update({f"emb_{k}": e for k, e in zip(inputs, self.head(features).split(sizes))})
        return z

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        return self.dist_align(probs)

    def targets(self, probs: Tensor, raw: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        return probs

    def memory_on(self, ctx: StepContext, device: torch.device) -> Tensor:
        """A 0-d bool: the step reads the memory (``step >= memory_start``)."""
        return step_tensor(ctx.step, device) >= float(self.cfg.memory_start)


@register_method("simmatch")
class SimMatch(EmbeddingMatch):
    """Zheng, You, Huang, Wang, Qian & Xu, "SimMatch: Semi-supervised Learning with Similarity Matching",
    CVPR 2022, in the form of USB's ``simmatch`` algorithm.

    One forward over ``cat(x_w, u_w, u_s)`` gives logits and unit embeddings ``e``. A bank holds one
    embedding ``k_j`` and label ``y_j`` per labelled image (:class:`~mentor.nn.memory.LabeledMemoryBank`,
    ``K`` = the labelled-set size). For an unlabelled image, with ``p`` its weak-view class distribution
    after distribution alignment (:class:`~mentor.nn.distalign.DistAlignQueue`, uniform target):

    - similarities ``q_j = softmax_j(e_w . k_j / T)`` (weak) and ``s_j = softmax_j(e_s . k_j / T)`` (strong);
    - unfolding: ``q^_j = q_j p(y_j) / sum_i q_i p(y_i)``;
    - aggregation: ``p^ = alpha p + (1 - alpha) q_agg`` with ``q_agg(c) = sum_{j: y_j = c} q_j``;
    - ``loss = CE(x) + lambda_u mean_b[1(max p^ >= p_cutoff) CE(z_s, p^)] + lambda_in mean_b[-sum_j q^_j log s_j]``
      (means over all unlabelled images).

    Before step ``memory_start`` the bank is not read: ``p^ = p`` and the similarity term is 0 (USB's and
    the official code's first epoch). After the losses the bank is written at the labelled batch's
    indices (``index``) with ``normalize(m k_j + (1 - m) e_x)``, the bank read by the losses being the one
    from before the update. Defaults are USB's classic-CV configuration for CIFAR-10
    (``simmatch_cifar10_40_0.yaml``): ``T`` 0.1, ``p_cutoff`` 0.95, ``lambda_u`` 1, ``lambda_in`` 1
    (``in_loss_ratio``), ``proj_size`` 128, ``smoothing_alpha`` 0.9, ``da_len`` 32, and for CIFAR, SVHN and
    STL-10 USB's bank of the student's own labelled embeddings with momentum 0.7 (``use_ema_teacher``
    False, ``ema_bank`` 0.7). ``memory_start`` 1024 is USB's first epoch of its 2^20-step protocol.

    Where USB's code and the paper or the official code (KyleZheng1997/simmatch, ImageNet) differ, this
    class follows USB:

    - The aggregation is the convex combination above (USB and the official code, ``c_smooth`` 0.9 in its
      scripts); the paper writes ``p^ = Normalize(p * q_agg)``. The unfolding is the paper's.
    - The bank holds the student's embeddings of the labelled weak view from the one forward, detached,
      moved with momentum ``bank_momentum`` 0.7. The paper and the official code write an EMA teacher's
      embeddings as they are, which USB does for its other datasets: ``ema_teacher: true`` with
      ``bank_momentum: 0`` (and ``ema_decay``, USB's ``ema_m`` 0.999). The teacher (network and head)
      embeds the labelled batch normalising with that batch's statistics and leaves every running
      statistic alone; USB's extra forward of its live model in training mode moves the student's BN
      statistics as a side effect.
    - The weak view's probabilities and embeddings come from the student's forward (USB; the official code
      takes them from the EMA teacher).
    - The pseudo-label is the soft ``p^`` (USB and the official code), not sharpened.

    Design choices: the bank starts as random unit vectors with label 0 (as USB's) and is stored
    ``K x dim``; an index that appears twice in a batch keeps its last occurrence; ``num_projectors`` 1
    (the papers, and USB's published results; USB's configurations set ``use_epass``, 3 averaged heads,
    since 2024). Under DDP the bank update gathers every rank's labelled batch, so all ranks hold the
    same bank, that of one process with the global batch; each rank's loss is the mean over its own batch.
    """

    @rules(lambda_in=NON_NEGATIVE, bank_momentum=DECAY, ema_decay=DECAY)
    @dataclass
    class Config(EmbeddingConfig):
        lambda_in: float = 1.0
        ema_teacher: bool = False
        bank_momentum: float = 0.7
        ema_decay: float = 0.999

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        if info.train_size < 1:
            raise ConfigError("method simmatch keeps one embedding per labelled image: it needs the size of the "
                              "labelled set (BuildInfo.train_size; the engine sets it)")
        self.bank = LabeledMemoryBank(info.train_size, cfg.proj_size, cfg.bank_momentum)
        self.teacher_tap: PenultimateTap | None = None
        if cfg.ema_teacher:
            self.add_ema_teacher("teacher", "student", cfg.ema_decay)
            self.add_ema_teacher("teacher_head", "head", cfg.ema_decay)
            self.teacher_tap = PenultimateTap(self.teacher, self.tap.path)

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        c = self.cfg
        p = self.dist_align(probs)
        bank = self.bank.features.clone()  # the losses read the bank as it was before this step writes it
        labels = self.bank.labels
        with torch.no_grad(), torch.autocast(p.device.type, enabled=False):
            q = F.softmax(similarity(z["emb_u_weak"].detach(), bank, c.T), dim=1).to(p.dtype)
            unfolded = q * p.gather(1, labels.expand(p.shape[0], -1))
            # q_agg(c) = sum of q_j over the entries of class c: a product with the bank's one-hot labels
            # (no scatter_add, whose atomic adds on a GPU leave the sum's rounding to chance).
            onehot = torch.zeros(labels.shape[0], p.shape[1], device=p.device, dtype=p.dtype)
            aggregated = q @ onehot.scatter_(1, labels[:, None], 1.0)
        on = self.memory_on(ctx, p.device)
        z["bank"], z["sim_target"], z["memory_on"] = bank, unfolded / unfolded.sum(1, keepdim=True), on
        return torch.where(on, c.smoothing_alpha * p + (1 - c.smoothing_alpha) * aggregated, p)

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        log_s = F.log_softmax(similarity(z["emb_u_strong"], z["bank"], self.cfg.T), dim=1)
        sim = -(z["sim_target"] * log_s).sum(1).mean() * z["memory_on"]
        self.bank.update(self.bank_embeddings(z, batch), batch["y"], batch["index"])
        return {"in": (self.cfg.lambda_in, sim)}

    @torch.no_grad()
    def bank_embeddings(self, z: Logits, batch: dict[str, Tensor]) -> Tensor:
        """The labelled batch's embeddings the bank takes: the EMA teacher's, or the student's."""
        if self.teacher_tap is None:
            return z["emb_x"].detach()
        with batch_statistics(self.teacher):
            features, _ = self.teacher_tap(batch["x"])
        return self.teacher_head(features)


__all__ = ["EmbeddingConfig", "EmbeddingMatch", "SimMatch"]
