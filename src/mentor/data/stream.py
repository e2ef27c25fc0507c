"""Image-folder splits too large for the device, read from disk by DataLoader workers.

Batches follow the same :class:`IndexSchedule` as in-memory data, so a run is reproducible from
(seed, step) and resumes exactly whether its data stream or live on the device. Only decoding moves
to worker processes; augmentation still runs batched on the device.

A file that cannot be decoded comes back from the worker as a marker in place of its batch, and the
main process raises one ``DataError`` naming it: an exception raised in a worker would reach the main
process with the worker's traceback pasted into its message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from mentor.data.folders import ImageFolder, UndecodableImage, bombs_as_errors, undecodable_error
from mentor.data.loader import IndexSchedule


class _Undecodable(NamedTuple):
    """A batch in which some files could not be decoded: (path, problem, too large) of each."""

    failures: list[tuple[str, str, bool]]


class _Uint8(Dataset):
    """Positions of a split -> (uint8 [C, H, W], label) read from the folder."""

    def __init__(self, folder: ImageFolder, indices: torch.Tensor):
        self.folder = folder
        self.indices = indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return torch.from_numpy(self.folder.read_uint8(j).copy()).permute(2, 0, 1), self.folder.samples[j][1]

    def __getitems__(self, positions: list[int]) -> list[tuple[torch.Tensor, int]] | _Undecodable:
        """One batch (the DataLoader's fetcher calls this in place of ``__getitem__`` per position)."""
        items, failed = [], []
        with bombs_as_errors():  # once per batch, not per image
            for i in positions:
                j = self.indices[i]
                try:
                    arr = self.folder.decode_uint8(j)
                except UndecodableImage as e:
                    failed.append(e.args)
                    continue
                items.append((torch.from_numpy(arr.copy()).permute(2, 0, 1), self.folder.samples[j][1]))
        return _Undecodable(failed) if failed else items


def _collate(batch):
    return batch if isinstance(batch, _Undecodable) else default_collate(batch)


def _checked(loader: DataLoader) -> Iterator:
    """The loader's batches; a batch with undecodable files raises their ``DataError`` here, in the main process."""
    for batch in loader:
        if isinstance(batch, _Undecodable):
            raise undecodable_error(batch.failures)
        yield batch


class FolderSplit:
    """A split of an image folder (positions into it), read lazily. Mirrors ArrayDataset's interface."""

    def __init__(self, folder: ImageFolder, indices: torch.Tensor | None = None, mean: tuple = (),
                 std: tuple = (), num_workers: int = 2, name: str | None = None):
        self.folder = folder
        self.indices = torch.arange(len(folder)) if indices is None else indices
        all_labels = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
        self.labels = all_labels[self.indices]
        self.num_classes = folder.num_classes
        self.classes = list(folder.classes)
        self.name = name or folder.root.name
        self.mean, self.std = mean, std
        self.num_workers = num_workers

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels = 1 if self.folder.mode == "L" else 3
        return (channels, *self.folder.size)

    def subset(self, idx: torch.Tensor) -> FolderSplit:
        return FolderSplit(self.folder, self.indices[idx], self.mean, self.std, self.num_workers, self.name)

    def loader(self, batch_sampler: Iterable[list[int]]) -> Iterator:
        """The batches ``batch_sampler`` names (positions in this split), decoded by ``num_workers`` workers."""
        return _checked(DataLoader(_Uint8(self.folder, self.indices), batch_sampler=batch_sampler,
                                   num_workers=self.num_workers, persistent_workers=False, collate_fn=_collate))

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator:
        """(uint8 images, labels) in order, this rank's share (positions rank, rank + world, ...)."""
        idx = list(range(rank, len(self), world_size))
        yield from self.loader([idx[i:i + batch_size] for i in range(0, len(idx), batch_size)])

    def estimate_stats(self, n: int = 512, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std (pixel / 255) on a seeded sample of at most ``n`` images."""
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(self), generator=g)[:n].tolist()
        x = torch.cat([xb for xb, _ in self.loader([pick])]).double() / 255.0
        return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3), correction=0).tolist())


class _Steps:
    """Batch sampler: this rank's positions for step, step + 1, ... (endless)."""

    def __init__(self, schedule: IndexSchedule, start: int):
        self.schedule, self.start = schedule, start

    def __iter__(self):
        step = self.start
        while True:
            yield self.schedule.indices(step).tolist()
            step += 1


class StreamLoader(IndexSchedule):
    """``batch(step)`` for a :class:`FolderSplit`: workers decode ahead; the batch lands on ``device``.

    Steps are expected in order; asking for another step (a resume, a dry run at step 0) restarts the
    workers at that step.
    """

    def __init__(self, split: FolderSplit, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", drop_last: bool = True):
        super().__init__(len(split), batch_size, seed, rank, world_size, drop_last, device="cpu")
        self.split = split
        self.target = torch.device(device)
        self._it: Iterator | None = None
        self._next = -1

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None or step != self._next:
            self._it = self.split.loader(_Steps(self, step))
        try:
            x, y = next(self._it)
        except BaseException:
            self._it = None  # an undecodable file (or an interrupt) ended the workers: restart if asked again
            raise
        self._next = step + 1
        return x.to(self.target, non_blocking=True), y.to(self.target, non_blocking=True)
