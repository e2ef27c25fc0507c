"""CoMatch: memory-smoothed pseudo-labels and a contrastive loss on the graph they span."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import COUNT, NON_NEGATIVE, PROBABILITY, rules
from ..methods import Inputs, StepContext, register_method
from ..nn.masking import step_tensor
from ..nn.memory import FeatureQueue, similarity
from .fixmatch import Logits
from .simmatch import EmbeddingConfig, EmbeddingMatch


@register_method("comatch")
class CoMatch(EmbeddingMatch):
    """Li, Xiong & Hoi, "CoMatch: Semi-supervised Learning with Contrastive Graph Regularization", ICCV 2021,
    in the form of USB's ``comatch`` algorithm.

    One forward over ``cat(x_w, u_w, u_s0, u_s1)`` gives logits and unit embeddings ``e``. With ``p`` the
    weak-view class distribution after distribution alignment (:class:`~mentor.nn.distalign.DistAlignQueue`,
    uniform target) and a queue of past (embedding, distribution) rows ``(k_j, p_j)``
    (:class:`~mentor.nn.memory.FeatureQueue`):

    - memory smoothing: ``p^ = alpha p + (1 - alpha) sum_j a_j p_j``, ``a_j = softmax_j(e_w . k_j / T)``;
    - pseudo-label graph over the unlabelled batch: ``W_bc = p^_b . p^_c``, ``W_bb = 1``, entries below
      ``contrast_p_cutoff`` set to 0, rows normalised;
    - embedding graph: ``S_bc = softmax_c(e_s0,b . e_s1,c / T)``;
    - ``loss = CE(x) + lambda_u mean_b[1(max p^_b >= p_cutoff) CE(z_s0,b, p^_b)]
      + lambda_c mean_b[-sum_c W_bc log(S_bc + 1e-7)]`` (means over all unlabelled images).

    Then the queue takes the weak embeddings with their aligned (unsmoothed) ``p``, and the labelled
    embeddings with their one-hot labels. The smoothing starts once ``step >= memory_start`` and
    ``step > queue_batch`` (the queue has been filled); before, ``p^ = p``. Defaults are USB's classic-CV
    configuration for CIFAR-10 (``comatch_cifar10_40_0.yaml``): ``T`` 0.2, ``p_cutoff`` 0.95,
    ``contrast_p_cutoff`` 0.8, ``lambda_u`` 1, ``lambda_c`` 1 (``contrast_loss_ratio``), ``proj_size`` 64,
    ``queue_batch`` 5, ``smoothing_alpha`` 0.9, ``da_len`` 32; ``memory_start`` 1024 is USB's first
    epoch. The queue has ``queue_size`` rows, by default ``queue_batch`` times the labelled plus
    unlabelled images of one process's batch (USB's ``queue_batch * (uratio + 1) * batch_size``, sized by
    :meth:`setup` from the first batch; USB's ImageNet configuration sets 30000).

    Where USB's code and the official code (salesforce/CoMatch) or the paper differ, this class follows USB:

    - The smoothing waits for ``epoch > 0 and step > queue_batch`` (USB); the official CIFAR code starts
      at ``epoch > 0 or step > queue_batch``, as soon as the queue is full: ``memory_start: 0``.
    - Distribution alignment divides by the mean of a zero-started queue of ``da_len`` batch means with
      a ``1e-6`` on both sides (USB); the official code by the mean of the means so far: the same after
      the normalisation, up to the epsilon.
    - The weak view's probabilities and embeddings come from the student's forward (USB and the official
      CIFAR code; the official ImageNet code uses a momentum encoder and a larger queue).
    - The pseudo-label is the soft ``p^`` (USB's ``hard_label`` argument is read but not used).
    - The graphs are over each process's own batch (USB); under DDP the queue gathers every rank's rows,
      so every rank holds the same queue, and with it spans ``queue_batch / world_size`` steps, as USB's.

    Design choices: the queue is a ring (USB cuts a push that passes the end and skips the slots at the
    start, which only happens when the size is not a multiple of the rows per push); ``num_projectors`` 1
    (the paper and USB's published results; USB's configurations set ``use_epass``, 3 averaged heads,
    since 2024); the second strong view's logits, computed in the one forward, are not used (as USB).
    """

    inputs = Inputs(labeled=("weak",), unlabeled=("weak", "strong", "strong"))

    @rules(contrast_p_cutoff=PROBABILITY, lambda_c=NON_NEGATIVE, queue_batch=COUNT, queue_size=NON_NEGATIVE)
    @dataclass
    class Config(EmbeddingConfig):
        T: float = 0.2
        proj_size: int = 64
        contrast_p_cutoff: float = 0.8
        lambda_c: float = 1.0
        queue_batch: int = 5
        queue_size: int = 0

    queue: FeatureQueue

    def setup(self, batch: dict[str, Tensor]) -> None:
        rows = batch["x"].shape[0] + batch["u_weak"].shape[0]
        size = self.cfg.queue_size or self.cfg.queue_batch * rows
        self.queue = FeatureQueue(size, self.cfg.proj_size, self.info.num_classes).to(batch["x"].device)

    def views(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"x": batch["x"], "u_weak": batch["u_weak"], "u_strong": batch["u_strong"],
                "u_strong_1": batch["u_strong_1"]}

    def align(self, probs: Tensor, z: Logits, ctx: StepContext) -> Tensor:
        c = self.cfg
        if not hasattr(self, "queue"):
            raise RuntimeError("CoMatch.setup(batch) sizes its queue: call it before the first step")
        p = self.dist_align(probs)
        with torch.no_grad(), torch.autocast(p.device.type, enabled=False):  # products of probabilities in float32
            a = F.softmax(similarity(z["emb_u_weak"].detach(), self.queue.features, c.T), dim=1)
            smoothed = c.smoothing_alpha * p + (1 - c.smoothing_alpha) * (a @ self.queue.probs).to(p.dtype)
        t = step_tensor(ctx.step, p.device)
        on = self.memory_on(ctx, p.device) & (t > float(c.queue_batch))
        z["probs_aligned"] = p
        z["probs_smoothed"] = torch.where(on, smoothed, p)
        return z["probs_smoothed"]

    def extra_terms(self, z: Logits, mask: Tensor, batch: dict[str, Tensor],
                    ctx: StepContext) -> dict[str, tuple[float, Tensor]]:
        c = self.cfg
        probs = z["probs_smoothed"]
        with torch.autocast(probs.device.type, enabled=False):  # thresholded products: float32, not bf16
            graph = probs @ probs.T
        graph = torch.where(torch.eye(graph.shape[0], dtype=torch.bool, device=graph.device), 1.0, graph)
        graph = graph * (graph >= c.contrast_p_cutoff).to(graph.dtype)
        graph = graph / graph.sum(1, keepdim=True)
        sim = F.softmax(similarity(z["emb_u_strong"], z["emb_u_strong_1"], c.T), dim=1)
        contrast = -(torch.log(sim + 1e-7) * graph).sum(1).mean()
        onehot = torch.zeros(batch["y"].shape[0], self.info.num_classes, device=probs.device, dtype=probs.dtype)
        onehot.scatter_(1, batch["y"][:, None], 1.0)
        self.queue.push([z["emb_u_weak"], z["emb_x"]], [z["probs_aligned"], onehot])
        return {"contrast": (c.lambda_c, contrast)}


__all__ = ["CoMatch"]
