"""Accuracy of a network on an in-memory split, on the device, sharded across ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .distributed import Dist, all_reduce_sum


@torch.no_grad()
def accuracy(predict: Callable[[Tensor], Tensor], split, mean: Tensor, std: Tensor, batch_size: int,
             device: torch.device, dist: Dist | None = None, autocast: Callable | None = None,
             channels_last: bool = False) -> float:
    """Top-1 accuracy in [0, 1] of ``predict`` on a split (anything with ``batches()`` and ``len()``:
    an ArrayDataset or a streamed FolderSplit), this rank's share, summed over ranks; one host
    synchronisation at the end. Empty split -> nan."""
    dist = dist or Dist()
    n = len(split)
    if n == 0:
        return float("nan")
    correct = torch.zeros((), dtype=torch.long, device=device)
    for images, labels in split.batches(batch_size, dist.rank, dist.world_size):
        x = images.to(device, non_blocking=True).float().div_(255.0)
        x = (x - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(device, non_blocking=True)
        if autocast is not None:
            with autocast():
                logits = predict(x)
        else:
            logits = predict(x)
        correct += (logits.argmax(1) == y).sum()
    return all_reduce_sum(correct, dist).item() / n
