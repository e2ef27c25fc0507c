"""Evaluation of a network on an in-memory split, on the device, sharded across ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .distributed import Dist, all_reduce_sum

if TYPE_CHECKING:
    from .details import DetailsRecorder


@dataclass
class Evaluator:
    """What a method's ``score`` needs to read a split: normalisation, batch size, device, ranks.

    ``batches(split)`` yields this rank's share as normalised images and labels on the device;
    ``accuracy(net, split)`` is top-1 accuracy over all ranks with one host synchronisation; with
    ``details`` set, the logits it scores are also recorded there (confusion, calibration bins).
    """

    mean: Tensor
    std: Tensor
    batch_size: int
    device: torch.device
    dist: Dist = field(default_factory=Dist)
    autocast: Callable | None = None
    channels_last: bool = False
    details: DetailsRecorder | None = None

    def batches(self, split) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in split.batches(self.batch_size, self.dist.rank, self.dist.world_size):
            x = images.to(self.device, non_blocking=True).float().div_(255.0)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.to(self.device, non_blocking=True)

    def local(self) -> Evaluator:
        """This evaluator reading every row of a split in this process (host-side refreshes such as
        pseudo-labels over the whole pool, where a distributed evaluator would read its share only)."""
        import dataclasses

        return dataclasses.replace(self, dist=Dist()) if self.dist.world_size > 1 else self

    def run(self, net: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``net(x)`` under the run's autocast."""
        if self.autocast is None:
            return net(x)
        with self.autocast():
            return net(x)

    def total(self, value: Tensor) -> Tensor:
        """A device tensor summed over ranks."""
        return all_reduce_sum(value, self.dist)

    @torch.no_grad()
    def accuracy(self, net: Callable[[Tensor], Tensor], split) -> float:
        """Top-1 accuracy in [0, 1] of ``net`` on ``split``; an empty split gives nan."""
        n = len(split)
        if n == 0:
            return float("nan")
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for x, y in self.batches(split):
            logits = self.run(net, x)
            correct += (logits.argmax(1) == y).sum()
            if self.details is not None:
                self.details.add(split, logits, y)
        return self.total(correct).item() / n


def accuracy(predict: Callable[[Tensor], Tensor], split, mean: Tensor, std: Tensor, batch_size: int,
             device: torch.device, dist: Dist | None = None, autocast: Callable | None = None,
             channels_last: bool = False) -> float:
    """Top-1 accuracy in [0, 1] of ``predict`` on a split (anything with ``batches()`` and ``len()``:
    an ArrayDataset or a streamed FolderSplit), this rank's share, summed over ranks; one host
    synchronisation at the end. Empty split -> nan."""
    ev = Evaluator(mean, std, batch_size, device, dist or Dist(), autocast, channels_last)
    return ev.accuracy(predict, split)
