"""The pool of synthetic images a data-free student learns from, kept on the device.

The inversion methods (DeepInversion, CMI, Fast, CSD) add each synthesis round's best batch to a
store and train the student on batches drawn uniformly from everything synthesised so far. Their code
writes every image to disk as a PNG and rebuilds a DataLoader after each round; here the pool is a
fixed-size ring of device tensors: images as ``uint8`` (the same quantisation as a PNG, a quarter of the
memory of float32) or ``half``, with the labels they were synthesised for. It is a sub-module, so its
contents are checkpointed and a resumed run draws the same batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SyntheticPool(nn.Module):
    """``capacity`` images of shape ``shape`` in [0, 1], stored as ``dtype`` (uint8 or half), with labels.

    Once full, the oldest images are overwritten first. :meth:`sample` draws uniformly from the filled
    part without reading its size back to the host.
    """

    def __init__(self, capacity: int, shape: tuple[int, int, int], dtype: str = "uint8"):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"the synthetic pool needs room for at least one image, got capacity {capacity}")
        if dtype not in ("uint8", "half"):
            raise ValueError(f"pool dtype must be 'uint8' or 'half', got {dtype!r}")
        self.capacity = capacity
        store = torch.uint8 if dtype == "uint8" else torch.float16
        self.register_buffer("images", torch.zeros(capacity, *shape, dtype=store))
        self.register_buffer("labels", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("added", torch.zeros((), dtype=torch.long))  # images ever added

    @property
    def filled(self) -> Tensor:
        return self.added.clamp(max=self.capacity)

    @torch.no_grad()
    def add(self, x01: Tensor, y: Tensor | None = None) -> None:
        """Append a batch of images in [0, 1] (and their labels), overwriting the oldest once full."""
        n = x01.shape[0]
        if n > self.capacity:
            x01, n = x01[-self.capacity:], self.capacity
            y = None if y is None else y[-self.capacity:]
        slots = (self.added + torch.arange(n, device=self.added.device)) % self.capacity
        x01 = x01.detach().clamp(0, 1)
        if self.images.dtype == torch.uint8:
            self.images[slots] = (x01 * 255).round().to(torch.uint8)
        else:
            self.images[slots] = x01.to(self.images.dtype)
        self.labels[slots] = 0 if y is None else y.to(self.labels)
        self.added += n

    def decode(self, idx: Tensor) -> Tensor:
        """Images at ``idx`` as float32 in [0, 1]."""
        x = self.images[idx].float()
        return x / 255.0 if self.images.dtype == torch.uint8 else x

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` images (float32 in [0, 1]) and their labels, drawn uniformly with replacement from the
        filled part (the first image while the pool is still empty)."""
        u = torch.rand(n, device=self.added.device)
        idx = (u * self.filled.clamp(min=1)).long().clamp(max=self.capacity - 1)
        return self.decode(idx), self.labels[idx]
