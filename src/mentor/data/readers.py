"""Readers for the official on-disk formats of the small image datasets.

* idx (MNIST, Fashion-MNIST): big-endian header ``0x00 0x00 <type> <ndim>`` then ``ndim`` uint32
  sizes then the data; images are magic 2051 (ubyte, 3 dims), labels 2049 (ubyte, 1 dim). The files
  may be gzipped (detected by the gzip magic bytes, not by the name).
* CIFAR-10/100 "python version": pickled dicts with ``data`` (N x 3072 uint8, channel-major 32x32)
  and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100), as written by Python 2's cPickle.
* UCI handwritten digits as shipped inside scikit-learn (8x8, values 0..16).

Each reader checks what it reads and turns every problem into a ``DataError`` naming the file.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mentor.data.errors import DataError, refetch_hint

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_IDX_UBYTE = 0x08


@dataclass
class ArrayDataset:
    """A whole split in memory: uint8 ``images`` [N, C, H, W] and int64 ``labels`` [N].

    ``mean``/``std`` are per-channel normalisation constants on the [0, 1] scale (pixel / 255),
    computed once on the training split of the real data.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    classes: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 [N={self.images.shape[0]}], got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")
        if not self.classes:
            self.classes = [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        """(uint8 images, labels) in order, this rank's share (positions rank, rank + world, ...)."""
        idx = torch.arange(rank, len(self), world_size)
        for start in range(0, len(idx), batch_size):
            sel = idx[start:start + batch_size]
            yield self.images[sel], self.labels[sel]

    def subset(self, indices: torch.Tensor) -> ArrayDataset:
        """The same dataset restricted to ``indices`` (e.g. a validation split)."""
        return ArrayDataset(self.images[indices], self.labels[indices], self.num_classes, self.name,
                            list(self.classes), self.mean, self.std)


# --------------------------------------------------------------------------------------------- idx


def read_maybe_gzip(path: str | Path, dataset: str | None = None) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path} is a truncated or corrupt gzip file ({e}); "
                        f"{refetch_hint(path, dataset)}") from None


def read_idx(path: str | Path, expected_magic: int | None = None, dataset: str | None = None) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array of the shape its header declares."""
    data = read_maybe_gzip(path, dataset)
    fix = refetch_hint(path, dataset)
    if len(data) < 4:
        raise DataError(f"{path} is only {len(data)} bytes long, too short for an idx file; {fix}")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        kinds = {IDX_IMAGES_MAGIC: "images", IDX_LABELS_MAGIC: "labels"}
        swapped = (f" (that is the {kinds[magic]} magic: are the images and labels files swapped?)"
                   if magic in kinds else "")
        raise DataError(f"{path}: idx magic number is {magic}, expected {expected_magic} "
                        f"({kinds.get(expected_magic, 'idx')}){swapped}; {fix}")
    if data[0] or data[1] or data[2] != _IDX_UBYTE:
        raise DataError(f"{path}: not an unsigned-byte idx file (header {data[:4].hex()}); {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: idx header is cut short ({len(data)} of {header} bytes); {fix}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise DataError(f"{path}: header declares shape {dims} = {expected} bytes of data but the file "
                        f"holds {len(data) - header}; it is truncated or corrupt; {fix}")
    return np.frombuffer(data, np.uint8, count=expected, offset=header).reshape(dims).copy()


def read_idx_pair(
    images_path: str | Path, labels_path: str | Path, num_classes: int, dataset: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 [N, 1, H, W]) and labels (int64 [N]) from an idx images/labels file pair."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC, dataset)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, dataset)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels; the two files come from different downloads, "
                        f"{refetch_hint(images_path, dataset)} (and the labels file)")
    _check_label_range(labels, num_classes, labels_path, dataset)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _check_label_range(labels: np.ndarray, num_classes: int, path: str | Path, dataset: str | None) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels range over {labels.min()}..{labels.max()}, expected "
                        f"0..{num_classes - 1}; {refetch_hint(path, dataset)}")


# ------------------------------------------------------------------------------------------- CIFAR

CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_BATCHES = {"train": ["train"], "test": ["test"]}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: a pickle can run arbitrary code, and a data
    file has no business naming any other global."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "scalar"),
                # Python 3 writes byte strings as _codecs.encode(text, "latin1") under protocol 2.
                ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"the file refers to {module}.{name}, which is not array data")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            # Files pickled under NumPy 1 name numpy.core, which NumPy 2 only keeps as a deprecated alias.
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def load_pickle(path: str | Path, dataset: str | None = None) -> dict:
    """A CIFAR-style pickled dict with its keys as ``str`` (Python 2 pickles store them as bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # latin1 is how NumPy asks for Python 2 str payloads of arrays to be decoded.
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OSError) as e:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); "
                        f"{refetch_hint(path, dataset)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict; "
                        f"{refetch_hint(path, dataset)}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(
    path: str | Path, label_key: str, dataset: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 3, 32, 32], int64 [n]) from one CIFAR python batch file."""
    d = load_pickle(path, dataset)
    fix = refetch_hint(path, dataset)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} is not a CIFAR batch with {label_key!r}: it has keys {sorted(d)}; {fix}")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (n, 3072); {fix}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path} holds {data.shape[0]} images but {labels.size} labels; {fix}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(
    folder: str | Path, split: str, fine: bool, num_classes: int, dataset: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR-10 (``fine=False``) or CIFAR-100 (fine labels) split from its extracted batch folder."""
    folder = Path(folder)
    names = (CIFAR100_BATCHES if fine else CIFAR10_BATCHES)[split]
    key = "fine_labels" if fine else "labels"
    parts = [read_cifar_batch(folder / n, key, dataset) for n in names]
    for n, (_, labels) in zip(names, parts):
        _check_label_range(labels, num_classes, folder / n, dataset)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def read_cifar_class_names(folder: str | Path, fine: bool, dataset: str | None = None) -> list[str] | None:
    """Class names from ``batches.meta`` / ``meta`` when the folder has one."""
    meta = Path(folder) / ("meta" if fine else "batches.meta")
    if not meta.exists():
        return None
    names = load_pickle(meta, dataset).get("fine_label_names" if fine else "label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else None


def _safe_member(member: tarfile.TarInfo, top: str) -> bool:
    parts = Path(member.name).parts
    return (bool(parts) and parts[0] == top and ".." not in parts and not member.name.startswith("/")
            and (member.isfile() or member.isdir()))


def extract_tar(archive: str | Path, top: str, into: str | Path, dataset: str | None = None) -> Path:
    """Extract ``archive`` (whose members all live under ``top/``) to ``into/top`` and return that.

    Extraction goes to a temporary folder beside the target and is renamed into place only once it
    is complete, so an interrupted or failed extraction never leaves a half-filled ``top`` behind.
    """
    archive, into = Path(archive), Path(into)
    fix = refetch_hint(archive, dataset)
    dest = into / top
    if dest.exists():
        raise DataError(f"{dest} already exists, so {archive} is not extracted over it; delete {dest} "
                        f"to re-extract, or point the loader at it")
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=into))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if not _safe_member(m, top)]
            if bad or not members:
                raise DataError(f"{archive} is not the expected archive: it holds members other than "
                                f"files under {top}/ ({bad[:3]}); {fix}")
            # The "data" filter (Python >= 3.11.4 / 3.10.12) is a second guard on top of _safe_member.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)  # type: ignore[arg-type]
        os.replace(tmp / top, dest)
        return dest
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot extract {archive} ({type(e).__name__}: {e}); it is probably "
                        f"truncated; {fix}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ digits

# sklearn ships digits without a test split; mentor fixes one: a stratified third (599 of 1,797
# images) drawn by ``stratified_split(labels, 1/3, seed=0)``, so every run reports on the same images.
DIGITS_TEST_FRACTION = 1 / 3
DIGITS_SPLIT_SEED = 0


def read_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """UCI handwritten digits from scikit-learn: uint8 [N, 1, 8, 8] (0..16 scaled to 0..255), labels."""
    from mentor.data.splits import stratified_split

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset ships inside scikit-learn, which is not installed; "
                        "install the `digits` extra: pip install 'mentor[digits]'") from None
    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    idx = (train_idx if split == "train" else test_idx).numpy()
    return torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])


def idx_header(path: str | Path) -> tuple[int, ...] | None:
    """The shape an idx file's header declares (reads only the header; None when unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            stream: io.BufferedIOBase = gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f  # type: ignore[assignment]
            start = stream.read(4)
            ndim = start[3]
            return struct.unpack(f">{ndim}I", stream.read(4 * ndim))
    except (OSError, EOFError, IndexError, struct.error, zlib.error):
        return None
