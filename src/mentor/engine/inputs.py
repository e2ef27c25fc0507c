"""The step's inputs: a labelled batch drawn on the device, augmented into the method's named views."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DataConfig
from ..data import ArrayDataset, DeviceLoader, load_dataset, stratified_split, stratified_subset
from ..data.augment import build_augment
from ..data.stream import StreamLoader


@dataclass
class Splits:
    """Train / validation / test tensors (uint8 images) of one dataset, carved per the protocol."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    train_index: Tensor  # positions of ``train`` images in the official training set


def _folder_splits(cfg: DataConfig):
    """(train, test) of an image-folder tree, in memory or streamed."""
    from pathlib import Path

    from ..config import ConfigError
    from ..data.folders import ImageFolder, find_classes
    from ..data.stream import FolderSplit

    if cfg.root is None:
        raise ConfigError("data.root is required for data.name=image_folder (a folder of class sub-folders)")
    root = Path(cfg.root).expanduser()
    if (root / "train").is_dir():
        train_root, test_root = root / "train", Path(cfg.test_root) if cfg.test_root else root / "test"
    else:
        train_root, test_root = root, Path(cfg.test_root) if cfg.test_root else None
    if test_root is None or not test_root.is_dir():
        raise ConfigError(f"image_folder needs a test split: {root}/train and {root}/test, or data.test_root")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {cfg.channels}")
    classes = find_classes(train_root, test_root)
    mode = "L" if cfg.channels == 1 else "RGB"
    train = ImageFolder(train_root, cfg.image_size, classes=classes, mode=mode)
    test = ImageFolder(test_root, cfg.image_size, classes=classes, mode=mode)
    if not cfg.stream:
        full = train.to_array_dataset(root.name)
        test_ds = test.to_array_dataset(root.name)
        test_ds.mean, test_ds.std = full.mean, full.std
        return full, test_ds
    full = FolderSplit(train, num_workers=cfg.num_workers, name=root.name)
    full.mean, full.std = full.estimate_stats()
    return full, FolderSplit(test, mean=full.mean, std=full.std, num_workers=cfg.num_workers, name=root.name)


def load_splits(cfg: DataConfig) -> Splits:
    """Official train split -> stratified (train, val); optional stratified training subset; test."""
    if cfg.name == "image_folder":
        full, test = _folder_splits(cfg)
    else:
        full = load_dataset(cfg.name, split="train", root=cfg.root)
        test = load_dataset(cfg.name, split="test", root=cfg.root)
    if cfg.val_size > 0:
        tr_idx, va_idx = stratified_split(full.labels, cfg.val_size, seed=cfg.split_seed)
    else:
        tr_idx, va_idx = torch.arange(len(full.labels)), torch.arange(0)
    if cfg.subset is not None:
        keep = stratified_subset(full.labels[tr_idx], cfg.subset, seed=cfg.split_seed)
        tr_idx = tr_idx[keep]
    return Splits(train=full.subset(tr_idx), val=full.subset(va_idx), test=test, train_index=tr_idx)


def normalize(x_u8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x_u8.float().div_(255.0) - mean) / std


def stat_tensors(ds: ArrayDataset, device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(ds.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, view), stable across runs and machines."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2))) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


def view_augment(name: str, cfg: DataConfig):
    """The augmentation of one view, with the recipe's crop padding and flip where they apply."""
    weak = {"padding": cfg.padding, "flip": cfg.flip}
    if name == "weak":
        return build_augment("weak", **weak)
    if name == "strong":
        return build_augment("strong", weak=weak)
    return build_augment(name)


class TrainInputs:
    """Draws batch ``step`` (a pure function of seed and step) and makes every view the method wants.

    The view named ``"train"`` is the recipe's ``data.augment``; any other view name is an
    augmentation name (``weak``, ``strong``, ``none``). Each view has its own generator seeded from
    (seed, step, rank, view), so the same step always gives the same pixels.
    """

    def __init__(self, splits: Splits, cfg: DataConfig, views: tuple[str, ...], seed: int, rank: int,
                 world_size: int, device: torch.device, channels_last: bool = False):
        if isinstance(splits.train, ArrayDataset):
            self.loader = DeviceLoader(splits.train.images, splits.train.labels, cfg.batch_size, seed,
                                       rank=rank, world_size=world_size, device=device)
        else:
            self.loader = StreamLoader(splits.train, cfg.batch_size, seed, rank=rank, world_size=world_size,
                                       device=device)
        self.seed, self.rank, self.device = seed, rank, device
        self.channels_last = channels_last
        self.mean, self.std = stat_tensors(splits.train, device)
        self.views = [(v, view_augment(cfg.augment if v == "train" else v, cfg)) for v in views]

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    def __call__(self, step: int) -> dict[str, Tensor]:
        x_u8, y = self.loader.batch(step)
        batch: dict[str, Tensor] = {"y": y, "index": self.loader.indices(step).to(self.device)}
        for i, (name, aug) in enumerate(self.views):
            g = torch.Generator(device=self.device)
            g.manual_seed(_mix(self.seed, step, self.rank, i))
            x = aug(x_u8.float().div_(255.0), g)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch[f"x_{name}"] = x
            if i == 0:
                batch["x"] = x
        return batch
