"""CRD's contrastive objective: a per-sample memory bank, the NCE loss and both directions together.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020. Every sample of the
training split has a momentum-averaged, L2-normalised embedding in a memory bank (one per view:
student and teacher); a student embedding is contrasted with the teacher memory of its own sample
(the positive) and of K other samples (the negatives), and the reverse, with the NCE loss of the
paper's Eq. 18 and a noise distribution uniform over the N samples.

Nothing here reads a tensor value on the host: negatives are drawn on the device with a
``torch.Generator``, the NCE normaliser is set with a device-side select, and the bank is updated with
index writes, so a training step never waits for the device.

Under DDP the bank and the normaliser are kept equal on every rank by the modules themselves (each
update gathers every rank's batch), so they are ``rank_synced``: the engine leaves them out of DDP's
buffer broadcast, which would copy rank 0's whole bank before every forward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn.masking import all_gather_cat, distributed
from ...nn.memory import last_writer

__all__ = ["CRDLoss", "MemoryBank", "NCE", "nce_log_z", "nce_loss"]

# Rounds of redrawing the negatives that share the anchor's label; with C balanced classes a
# same-class negative survives with probability (1/C)^(rounds + 1) (1e-5 for 10 classes).
_REDRAW_ROUNDS = 4


def _rank() -> int:
    return dist.get_rank() if distributed() else 0


class MemoryBank(nn.Module):
    """One L2-normalised embedding per training sample and view, updated with momentum, plus the
    label last seen for each sample: CRD's memory (``ContrastMemory`` in the reference code).

    ``memory`` [views, size, dim] and ``labels`` [size] (-1 = not seen yet) are buffers, so they move
    with the module and go into checkpoints; the negative-sampling stream (a seed and a draw counter)
    is the module's extra state, so a resumed run draws the same negatives. The initial rows are
    uniform in [-sqrt(3/dim), sqrt(3/dim)], i.e. of norm about 1, as in the reference code.

    Under DDP, :meth:`update` gathers every rank's indices, embeddings and labels (in rank order: the
    rows of the one-process global batch) and applies the same update on every rank, so every rank
    holds the bank one process with the global batch would hold (``rank_synced``: the engine keeps it
    out of DDP's buffer broadcast). :meth:`sample` draws each rank's negatives from its own stream
    (the rank is part of the seed), so the negatives are not those of the one-process run.
    """

    #: every update gathers all DDP ranks' batches: the bank is equal on every rank, out of DDP's broadcast
    rank_synced = True

    def __init__(self, size: int, dim: int, views: int = 1, momentum: float = 0.5, seed: int | None = None):
        super().__init__()
        if size < 1 or dim < 1 or views < 1:
            raise ValueError(f"MemoryBank needs size, dim, views >= 1, got {size}, {dim}, {views} (size is the "
                             "number of training samples: BuildInfo.train_size)")
        stdv = math.sqrt(3.0 / dim)
        self.register_buffer("memory", torch.rand(views, size, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.momentum = float(momentum)
        # Drawn from the global CPU generator, which the engine seeds from the run's seed.
        self.seed = int(torch.randint(2**62, ()).item()) if seed is None else int(seed)
        self.draws = 0
        self._gen: torch.Generator | None = None

    @property
    def size(self) -> int:
        return self.memory.shape[1]

    @property
    def dim(self) -> int:
        return self.memory.shape[2]

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed, "draws": self.draws}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.seed, self.draws = int(state["seed"]), int(state["draws"])

    def _generator(self) -> torch.Generator:
        device = self.memory.device
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        rank = _rank()
        # Reseeded from (seed, draw, rank) on every draw: the stream depends on nothing but this
        # module's state, so resuming from a checkpoint continues it exactly.
        self._gen.manual_seed((self.seed * 6364136223846793005 + self.draws * 1442695040888963407 + rank) % 2**63)
        self.draws += 1
        return self._gen

    def sample(self, index: Tensor, k: int, labels: Tensor | None = None) -> Tensor:
        """Memory positions ``[B, 1 + k]``: column 0 is ``index`` (each anchor's own sample, the
        positive), then ``k`` negatives drawn uniformly with replacement from all ``size`` samples.

        With ``labels`` (the anchors' classes), a negative whose stored label equals its anchor's is
        redrawn, a fixed number of rounds (no host sync): the reference draws CRD's negatives from the
        other classes (``CIFAR100InstanceSample``, mode "exact"). Samples not seen yet (label -1)
        count as other-class.
        """
        gen = self._generator()
        shape = (index.shape[0], k)
        neg = torch.randint(0, self.size, shape, generator=gen, device=self.memory.device)
        if labels is not None:
            for _ in range(_REDRAW_ROUNDS):
                same = self.labels[neg] == labels[:, None]
                neg = torch.where(same, torch.randint(0, self.size, shape, generator=gen, device=neg.device), neg)
        return torch.cat([index[:, None].to(neg), neg], dim=1)

    def scores(self, anchors: Tensor, view: int, idx: Tensor) -> Tensor:
        """Dot products ``[B, 1 + k]`` (float32) of each anchor ``[B, dim]`` with the rows ``idx`` of
        memory ``view``; gradients flow into the anchors only."""
        a = anchors.float()
        with torch.autocast(a.device.type, enabled=False):
            mem = self.memory[view]
            if self.size <= idx.shape[1] * self.dim:
                # All N scores then a gather: cheaper than materialising B x (1+k) x dim rows. The
                # clone keeps the matrix autograd saves intact when update() writes the bank.
                if a.requires_grad:
                    mem = mem.clone()
                return (a @ mem.t()).gather(1, idx)
            return torch.einsum("bkd,bd->bk", mem[idx], a)

    @torch.no_grad()
    def update(self, index: Tensor, embeddings: Tensor, labels: Tensor | None = None) -> None:
        """``memory[v, i] <- normalise(m * memory[v, i] + (1 - m) * e_v)`` for each sample ``i`` of
        the batch and each view ``v``; ``embeddings`` is [views, B, dim] (or [B, dim] for one view).
        Also records ``labels`` when given.

        As the reference's ``ContrastMemory`` (rows read with ``index_select``, averaged, renormalised,
        written with ``index_copy_``): every new row is computed from the bank as it was before the
        update, and an index that occurs twice in a batch keeps its last occurrence's row (the
        reference leaves that choice to the device on a GPU). Under DDP the batch is every rank's,
        gathered in rank order."""
        emb = embeddings.detach()
        if emb.dim() == 2:
            emb = emb[None]
        if emb.shape[0] != self.memory.shape[0] or emb.shape[2] != self.dim:
            raise ValueError(f"MemoryBank.update: embeddings {tuple(emb.shape)} do not fit a bank of "
                             f"{self.memory.shape[0]} views x {self.dim} dims")
        emb = all_gather_cat(emb.transpose(0, 1).to(self.memory.dtype)).transpose(0, 1)
        index = all_gather_cat(index).to(device=self.memory.device, dtype=torch.long)
        src = last_writer(index, self.size)
        m = self.momentum
        new = F.normalize(self.memory[:, index] * m + emb[:, src] * (1.0 - m), dim=-1)
        self.memory.index_copy_(1, index, new)
        if labels is not None:
            self.labels.index_copy_(0, index, all_gather_cat(labels).to(self.labels)[src])


def nce_log_z(scores: Tensor, n_data: int, temperature: float = 0.07) -> Tensor:
    """CRD's estimate of the log normaliser: ``log(N * mean(exp(scores / T)))`` over every score of
    the batch (positives and negatives), without gradients."""
    logits = scores.detach().float() / temperature
    return math.log(n_data) + torch.logsumexp(logits.flatten(), 0) - math.log(logits.numel())


def nce_loss(scores: Tensor, n_data: int, temperature: float = 0.07, log_z: Tensor | float | None = None) -> Tensor:
    """NCE loss of CRD (Tian et al., ICLR 2020, Eq. 18, as the reference ``ContrastLoss``).

    ``scores`` [B, 1 + K]: column 0 the positive's similarity, then K negatives'. With
    ``P = exp(score / T) / Z`` and the noise term ``c = K / N`` (K draws from a uniform noise
    distribution over the ``n_data`` samples)::

        loss = -(1/B) * sum_b [ log(P_b0 / (P_b0 + c)) + sum_k log(c / (P_bk + c)) ]

    ``log_z`` is ``log Z``; ``None`` estimates it from these scores (:func:`nce_log_z`). With
    ``u = log P - log c`` both terms are logistic losses, ``softplus(-u)`` for the positive and
    ``softplus(u)`` for each negative, which is how it is computed (stable, so the reference's
    ``eps`` is not needed).
    """
    k = scores.shape[1] - 1
    if k < 1:
        raise ValueError(f"nce_loss: needs a positive and at least one negative per row, got {tuple(scores.shape)}")
    if log_z is None:
        log_z = nce_log_z(scores, n_data, temperature)
    u = scores.float() / temperature - (log_z + math.log(k / n_data))
    return (F.softplus(-u[:, 0]).sum() + F.softplus(u[:, 1:]).sum()) / scores.shape[0]


class NCE(nn.Module):
    """:func:`nce_loss` with the normaliser Z estimated once, on the first batch, then held fixed (as
    the reference does).

    Z lives in a buffer, 0 meaning "not estimated yet". Each call computes the estimate and keeps the
    stored value where there is one, ``torch.where(z > 0, z, estimate)``: a device-side select
    instead of a Python ``if`` on a tensor value, so no step syncs with the host (the estimate costs
    one logsumexp over scores already computed). The buffer goes into checkpoints, so a resumed run
    keeps the first batch's Z.

    Under DDP the estimate is over the scores of the global batch (each rank's logsumexp is gathered:
    one number per rank and call), so Z is the same on every rank (``rank_synced``); each rank's scores
    are against its own negatives.
    """

    #: the estimate is over every DDP rank's scores: Z is equal on every rank, out of DDP's broadcast
    rank_synced = True

    def __init__(self, n_data: int, temperature: float = 0.07):
        super().__init__()
        self.n_data = int(n_data)
        self.temperature = float(temperature)
        self.register_buffer("z", torch.zeros(()))

    def _log_z(self, scores: Tensor) -> Tensor:
        """:func:`nce_log_z` over the scores of every rank (the ranks' batches have equal shapes)."""
        if not distributed():
            return nce_log_z(scores, self.n_data, self.temperature)
        logits = scores.detach().float() / self.temperature
        lse = torch.logsumexp(all_gather_cat(torch.logsumexp(logits.flatten(), 0)[None]), 0)
        return math.log(self.n_data) + lse - math.log(logits.numel() * dist.get_world_size())

    def forward(self, scores: Tensor) -> Tensor:
        estimate = self._log_z(scores).exp()
        z = torch.where(self.z > 0, self.z, estimate.to(self.z))
        self.z.copy_(z)
        return nce_loss(scores, self.n_data, self.temperature, z.log())


class CRDLoss(nn.Module):
    """Both directions of CRD's objective over a two-view :class:`MemoryBank` (view 0 the student's
    embeddings, view 1 the teacher's), with the reference defaults K = 16384, T = 0.07, momentum 0.5.

    ``forward(student_emb, teacher_emb, index, labels=None)`` takes L2-normalised embeddings
    [B, dim] and the samples' positions in the training split, and returns the two NCE losses
    ``(student-anchored, teacher-anchored)``: the student embedding against the teacher memory,
    and the teacher embedding against the student memory. The same negatives serve both. Then the
    bank takes the batch (momentum update). ``labels`` draws the negatives from other classes
    (:meth:`MemoryBank.sample`). Under DDP the bank update and the normalisers are over the global
    batch (equal on every rank), the negatives are each rank's own.
    """

    def __init__(self, n_data: int, dim: int = 128, k: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5):
        super().__init__()
        self.k = int(k)
        self.bank = MemoryBank(n_data, dim, views=2, momentum=momentum)
        self.nce_student = NCE(n_data, temperature)
        self.nce_teacher = NCE(n_data, temperature)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, index: Tensor,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        idx = self.bank.sample(index, self.k, labels)
        loss_s = self.nce_student(self.bank.scores(student_emb, 1, idx))
        loss_t = self.nce_teacher(self.bank.scores(teacher_emb, 0, idx))
        self.bank.update(index, torch.stack([student_emb, teacher_emb]), labels)
        return loss_s, loss_t
