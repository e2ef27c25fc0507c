"""Batches drawn from a dataset held on the device, reproducible from (seed, step).

Small datasets (Fashion-MNIST, digits, CIFAR-size) fit on the accelerator as uint8, so a batch is one
``index_select`` there instead of a ``DataLoader`` round trip through host memory.
"""

from __future__ import annotations

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for one epoch, distinct for every (seed, epoch) pair in practice.

    ``seed * K + epoch`` would collide (seed 0 epoch K == seed 1 epoch 0); hashing the pair through
    NumPy's SeedSequence does not.
    """
    words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


class IndexSchedule:
    """Which sample positions each rank takes at each step: a pure function of (seed, step).

    The epoch is ``step // steps_per_epoch``; the epoch's order is a permutation of N drawn from a CPU
    ``torch.Generator`` seeded by ``(seed, epoch)``; the step's global batch is positions
    ``[i*B*W, (i+1)*B*W)`` of it, and rank ``r`` takes the contiguous slice ``[r*B, (r+1)*B)``. The
    ranks of one step therefore together see exactly the batch one process with batch size ``B*W``
    would see.

    With ``drop_last=False`` the last step of an epoch is filled up by wrapping round to the start of
    the same permutation (as ``DistributedSampler`` pads), so every rank still gets ``B`` samples and
    every sample is seen at least once per epoch.

    A split smaller than one global batch (40 labels, batch 64) is repeated ``k = ceil(B*W / N)``
    times and the epoch's order is a permutation of the ``k*N`` copies, as FixMatch's reference code
    expands its labelled indices: every image is drawn equally often, and a batch may hold an image
    more than once.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, device: str | torch.device = "cpu"):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n = int(n)
        self.global_batch = batch_size * world_size
        if self.n == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.copies = -(-self.global_batch // self.n) if drop_last else 1
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.n * self.copies // self.global_batch
        return -(-self.n // self.global_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the N samples in ``epoch`` (on the device; cached for the current epoch)."""
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.n * self.copies, generator=gen)
            if self.copies > 1:
                perm = perm % self.n
            if not self.drop_last and self.n % self.global_batch:
                # Append the wrap-around once per epoch so every step is a plain slice.
                pad = self.steps_per_epoch * self.global_batch - self.n
                perm = torch.cat([perm, perm.repeat(-(-pad // self.n))[:pad]])
            self._perm = perm.to(self.device)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """This rank's sample indices at ``step`` (a tensor of length ``batch_size`` on the device)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.global_batch + self.rank * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]


class DeviceLoader(IndexSchedule):
    """Shuffled mini-batches of (uint8 images, int64 labels) indexed on ``device``.

    ``batch(step)`` takes the positions :class:`IndexSchedule` gives this rank at ``step``: small
    datasets stay on the device and a batch is one ``index_select`` there.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        drop_last: bool = True,
    ):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        super().__init__(images.shape[0], batch_size, seed, rank, world_size, drop_last, device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images [B, C, H, W], int64 labels [B]) for ``step``, on the device."""
        idx = self.indices(step)
        return self.images.index_select(0, idx), self.labels.index_select(0, idx)
