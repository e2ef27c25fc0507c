"""Image-folder trees (one sub-folder per class; domains as sibling folders), streamed for a DataLoader.

Layout: ``root/<class>/*.png`` for one domain, ``root/<domain>/<class>/*.png`` for a multi-domain
benchmark (Office-31, Office-Home, PACS, DomainNet). Class indices follow the sorted class-folder
names, taken over *all* domains under a root, so a class has the same index in every domain whichever
subset of domains a run loads. Pillow is an optional extra, imported on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mentor.data.errors import DataError
from mentor.data.readers import ArrayDataset
from mentor.registry import suggest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image folders needs Pillow, which is not installed; install the "
                        "`images` extra: pip install 'mentor[images]'") from None
    return Image


def _subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_classes(*roots: str | Path) -> list[str]:
    """Sorted union of the class-folder names under each root (the shared class index order)."""
    names: set[str] = set()
    for root in map(Path, roots):
        if root.is_dir():
            names.update(_subfolders(root))
    return sorted(names)


def list_domains(root: str | Path) -> list[str]:
    """The domain folders under a multi-domain root, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected root/<domain>/<class>/<images>")
    return _subfolders(root)


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return int(h), int(w)


class ImageFolder(Dataset):
    """Images under ``root/<class>/`` (searched recursively), resized to ``size`` on read.

    Items are ``(float tensor [C, H, W] in [0, 1], int label)``; ``mode`` is a Pillow mode
    ("RGB" gives 3 channels, "L" gives 1). ``classes`` fixes the class order (default: this root's
    sorted class folders); a class folder missing under this root simply contributes no images.
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int], classes: list[str] | None = None,
                 mode: str = "RGB"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; expected {self.root}/<class>/<images>")
        self.classes = list(classes) if classes is not None else find_classes(self.root)
        if not self.classes:
            raise DataError(f"{self.root} has no class sub-folders; expected {self.root}/<class>/*.png")
        self.size = _size(size)
        self.mode = mode
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if folder.is_dir():
                files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
                self.samples += [(p, label) for p in files]
        if not self.samples:
            raise DataError(f"{self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                            f"folders {self.classes[:5]}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def read_uint8(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 [H, W, C] after conversion to ``mode`` and resizing."""
        path = self.samples[i][0]
        Image = _pil()
        bilinear = getattr(Image, "Resampling", Image).BILINEAR
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode).resize((self.size[1], self.size[0]), bilinear)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{path} is not a readable image ({e}); replace or delete it") from None
        arr = np.asarray(im, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = self.read_uint8(i)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0), self.samples[i][1]

    def to_array_dataset(self, name: str | None = None) -> ArrayDataset:
        """Every image decoded into one uint8 ArrayDataset (for folders small enough to live on the device).

        ``mean``/``std`` are measured on these images, so call it on a training folder.
        """
        stacked = np.stack([self.read_uint8(i) for i in range(len(self))])
        images = torch.from_numpy(stacked).permute(0, 3, 1, 2)
        labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        scaled = images.double() / 255.0
        mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
        std = tuple(scaled.std(dim=(0, 2, 3), correction=0).tolist())
        return ArrayDataset(images.contiguous(), labels, self.num_classes, name or self.root.name,
                            list(self.classes), mean, std)


def image_folder_domains(root: str | Path, size: int | tuple[int, int], domains: list[str] | None = None,
                         mode: str = "RGB") -> dict[str, ImageFolder]:
    """One ``ImageFolder`` per domain under ``root/<domain>/<class>/``, all sharing one class order."""
    root = Path(root)
    available = list_domains(root)
    if not available:
        raise DataError(f"{root} has no domain folders; expected {root}/<domain>/<class>/<images>")
    chosen = available if domains is None else list(domains)
    for d in chosen:
        if d not in available:
            raise DataError(f"{root} has no domain folder {d!r}.{suggest(d, available)} "
                            f"Found: {', '.join(available)}")
    classes = find_classes(*(root / d for d in available))
    return {d: ImageFolder(root / d, size, classes=classes, mode=mode) for d in chosen}
