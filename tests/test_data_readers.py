"""Readers for the official formats: tiny files written here from the format specs, then read back."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mentor.data import DataError, load_dataset, read_idx
from mentor.data.readers import ArrayDataset, read_digits

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keep the user's ~/.cache/mentor and $MENTOR_DATA out of every search."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MENTOR_DATA", raising=False)


# ------------------------------------------------------------------------- writers (from the spec)


def idx_bytes(arr: np.ndarray) -> bytes:
    """idx: 0x00 0x00 0x08(ubyte) ndim, then big-endian uint32 dims, then the data."""
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(arr)
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def tiny_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def cifar_pickle(path: Path, data: np.ndarray, labels: list[int], key: bytes) -> None:
    # Real batches are Python 2 cPickle dicts with byte-string keys; protocol 2 keeps that shape.
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"tiny", b"data": data, key: labels}, f, protocol=2)


def write_cifar10(parent: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        cifar_pickle(folder / name, x, y, b"labels")
        all_x.append(x)
        all_y.append(y)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return np.concatenate(all_x), np.concatenate(all_y)


# ------------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = tiny_mnist(7)
    write_idx_split(tmp_path, "train", images, labels, gz)
    write_idx_split(tmp_path, "t10k", images[:3], labels[:3], gz)
    ds = load_dataset("mnist", "train", root=tmp_path)
    assert isinstance(ds, ArrayDataset)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7, 1, 28, 28)
    assert ds.labels.dtype == torch.int64
    assert np.array_equal(ds.images[:, 0].numpy(), images)
    assert ds.labels.tolist() == labels.tolist()
    assert ds.num_classes == 10 and ds.name == "mnist" and len(ds.mean) == 1
    assert len(load_dataset("mnist", "test", root=tmp_path)) == 3


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    path = tmp_path / "labels-without-gz-suffix"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(5, dtype=np.uint8))))
    assert read_idx(path, 2049).tolist() == [0, 1, 2, 3, 4]


def test_truncated_gzip(tmp_path):
    images, labels = tiny_mnist(4)
    write_idx_split(tmp_path, "train", images, labels, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="truncated or corrupt gzip") as e:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(e.value) and "mentor data fetch mnist" in str(e.value)


def test_wrong_magic_says_files_swapped(tmp_path):
    images, labels = tiny_mnist(4)
    write_idx_split(tmp_path, "train", images, labels, gz=False)
    img, lab = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    a, b = img.read_bytes(), lab.read_bytes()
    img.write_bytes(b)
    lab.write_bytes(a)
    with pytest.raises(DataError, match="magic number is 2049, expected 2051") as e:
        load_dataset("mnist", root=tmp_path)
    assert str(img) in str(e.value) and "swapped" in str(e.value)


def test_idx_byte_count_checked(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    full = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path.write_bytes(full[:-1])
    with pytest.raises(DataError, match=r"declares shape \(3, 4, 4\) = 48 bytes .* holds 47") as e:
        read_idx(path, 2051)
    assert str(path) in str(e.value)
    path.write_bytes(full + b"\0")  # trailing bytes are just as wrong
    with pytest.raises(DataError, match="holds 49"):
        read_idx(path, 2051)
    path.write_bytes(full[:10])  # cut inside the header
    with pytest.raises(DataError, match="header is cut short"):
        read_idx(path, 2051)


def test_image_label_count_mismatch(tmp_path):
    images, labels = tiny_mnist(5)
    write_idx_split(tmp_path, "train", images, labels[:4], gz=True)
    with pytest.raises(DataError, match="5 images but .* 4 labels") as e:
        load_dataset("mnist", root=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(e.value) and "train-labels-idx1-ubyte.gz" in str(e.value)


def test_label_out_of_range(tmp_path):
    images, labels = tiny_mnist(5)
    labels[2] = 10
    write_idx_split(tmp_path, "train", images, labels, gz=False)
    with pytest.raises(DataError, match=r"labels range over \d+\.\.10, expected 0\.\.9") as e:
        load_dataset("mnist", root=tmp_path)
    assert "train-labels-idx1-ubyte" in str(e.value)


def test_wrong_image_size_for_dataset(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((2, 8, 8), np.uint8), np.zeros(2, np.uint8), gz=False)
    with pytest.raises(DataError, match=r"\(8, 8\), expected \(28, 28\)"):
        load_dataset("mnist", root=tmp_path)


# ------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_round_trip(tmp_path):
    x, y = write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.labels.tolist() == y[:15].tolist() and test.labels.tolist() == y[15:].tolist()
    # Channel-major rows: the first 1024 bytes are the red plane, row by row.
    assert train.images[4, 0, 1, 2].item() == x[4, 1 * 32 + 2]
    assert train.images[4, 2, 31, 31].item() == x[4, 3071]
    assert train.classes[:2] == ["plane", "car"]  # read from batches.meta
    assert len(train.mean) == 3


def test_cifar_root_may_point_at_batch_folder(tmp_path):
    write_cifar10(tmp_path)
    assert len(load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py")) == 3


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for split, n in (("train", 6), ("test", 2)):
        with open(folder / split, "wb") as f:
            batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     b"fine_labels": [99, 0, 57, 3, 12, 98][:n], b"coarse_labels": [1] * n}
            pickle.dump(batch, f, protocol=2)
    ds = load_dataset("cifar100", "train", root=tmp_path)
    assert ds.labels.tolist() == [99, 0, 57, 3, 12, 98]
    assert ds.num_classes == 100 and ds.classes[0] == "apple" and ds.classes[99] == "worm"
    assert load_dataset("cifar100", "test", root=tmp_path).labels.tolist() == [99, 0]


def _tar_folder(src_parent: Path, folder: str, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_parent / folder, arcname=folder)


def test_cifar_archive_is_extracted_once(tmp_path):
    src = tmp_path / "src"
    _, y = write_cifar10(src)
    data = tmp_path / "data"
    data.mkdir()
    _tar_folder(src, "cifar-10-batches-py", data / "cifar-10-python.tar.gz")
    ds = load_dataset("cifar10", "train", root=data)
    assert ds.labels.tolist() == y[:15].tolist()
    assert (data / "cifar-10-batches-py" / "test_batch").is_file()
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    (data / "cifar-10-python.tar.gz").unlink()  # the extracted folder is used from now on
    assert len(load_dataset("cifar10", "test", root=data)) == 3


def test_truncated_cifar_archive(tmp_path):
    src = tmp_path / "src"
    write_cifar10(src)
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "cifar-10-python.tar.gz"
    _tar_folder(src, "cifar-10-batches-py", archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot extract") as e:
        load_dataset("cifar10", root=data)
    assert str(archive) in str(e.value)
    assert [p.name for p in data.iterdir()] == ["cifar-10-python.tar.gz"]  # no half-extracted folder


def test_archive_with_foreign_members_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="not the expected archive"):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_corrupt_pickle(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable CIFAR pickle") as e:
        load_dataset("cifar10", root=tmp_path)
    assert str(bad) in str(e.value)


def test_pickle_with_code_is_refused_not_run(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="posix.mkdir|os.mkdir") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(bad) in str(e.value) and not marker.exists()


def _py2_str(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def _py2_cifar_batch(raw: bytes, n: int, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the real files: byte-string payloads, numpy.core names."""
    s = _py2_str
    return b"".join([
        b"\x80\x02}(", s(b"data"),
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85", s(b"b"), b"\x87R",
        b"(K\x01K", bytes([n]), b"M\x00\x0c\x86",  # state: (1, (n, 3072), dtype, False, raw)
        b"cnumpy\ndtype\n", s(b"u1"), b"K\x00K\x01\x87R(K\x03", s(b"|"),
        b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89", s(raw), b"tb",
        s(b"labels"), b"](", b"".join(b"K" + bytes([v]) for v in labels), b"eu.",
    ])


def test_cifar_python2_pickle(tmp_path):
    write_cifar10(tmp_path)
    raw = bytes(range(256)) * 24
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(_py2_cifar_batch(raw, 2, [7, 3]))
    ds = load_dataset("cifar10", "test", root=tmp_path)
    assert ds.labels.tolist() == [7, 3]
    assert ds.images.reshape(-1).tolist() == list(raw)


def test_cifar_count_mismatch(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    cifar_pickle(bad, np.zeros((3, 3072), np.uint8), [1, 2], b"labels")
    with pytest.raises(DataError, match="3 images but 2 labels") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(bad) in str(e.value)


# ------------------------------------------------------------------------------------------ digits


def test_digits_fixed_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    x_train, y_train = read_digits("train")
    x_test, y_test = read_digits("test")
    assert x_train.shape == (1198, 1, 8, 8) and x_test.shape == (599, 1, 8, 8)
    assert x_train.dtype == torch.uint8 and int(x_train.max()) == 255  # 16 -> 255
    ref = load_digits()
    # The two parts are the whole set: per-class counts add up to sklearn's.
    total = torch.bincount(y_train, minlength=10) + torch.bincount(y_test, minlength=10)
    assert total.tolist() == np.bincount(ref.target).tolist()
    # Stratified third: every class has a third of its images (+-1) in test.
    for c in range(10):
        assert abs(int((y_test == c).sum()) - (ref.target == c).sum() / 3) <= 1
    # Pixel scaling 0..16 -> 0..255 against sklearn's own array, matched by image content.
    scaled = np.rint(ref.images * 255 / 16).astype(np.uint8)
    keys = {scaled[i].tobytes(): ref.target[i] for i in range(len(ref.target))}
    assert all(keys[x_test[i, 0].numpy().tobytes()] == y_test[i] for i in range(0, 599, 37))
    again = read_digits("test")
    assert torch.equal(again[0], x_test)  # fixed, not re-drawn
    ds = load_dataset("digits", "test")
    assert ds.num_classes == 10 and ds.images.shape[1:] == (1, 8, 8)


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"mentor\[digits\]"):
        load_dataset("digits")


# ------------------------------------------------------------------------------------ image folder


def _png(path: Path, rgb: tuple[int, int, int], size=(6, 5)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def test_image_folder_domains_share_class_order(tmp_path):
    pytest.importorskip("PIL")
    from mentor.data import image_folder_domains

    _png(tmp_path / "photo" / "dog" / "a.png", (255, 0, 0))
    _png(tmp_path / "photo" / "cat" / "b.jpg", (0, 255, 0))
    _png(tmp_path / "sketch" / "zebra" / "c.png", (0, 0, 255))
    _png(tmp_path / "sketch" / "dog" / "nested" / "d.png", (10, 20, 30))
    (tmp_path / "sketch" / "dog" / "notes.txt").write_text("not an image")
    domains = image_folder_domains(tmp_path, size=(4, 3))
    assert sorted(domains) == ["photo", "sketch"]
    assert domains["photo"].classes == domains["sketch"].classes == ["cat", "dog", "zebra"]
    photo, sketch = domains["photo"], domains["sketch"]
    assert len(photo) == 2 and len(sketch) == 2
    x, y = photo[1]  # sorted: cat/b.jpg (label 0), dog/a.png (label 1)
    assert y == 1 and x.shape == (3, 4, 3) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(4, 3)) and float(x[1:].abs().max()) == 0.0
    assert [label for _, label in sketch.samples] == [1, 2]
    only = image_folder_domains(tmp_path, size=4, domains=["sketch"])
    assert only["sketch"].classes == ["cat", "dog", "zebra"]  # same indices with fewer domains
    loader = torch.utils.data.DataLoader(photo, batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, 4, 3) and yb.tolist() == [0, 1]
    arrays = photo.to_array_dataset()
    assert arrays.images.dtype == torch.uint8 and arrays.images.shape == (2, 3, 4, 3)
    assert arrays.images[1, 0, 0, 0] == 255


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    from mentor.data import ImageFolder, image_folder_domains

    with pytest.raises(DataError, match="no class sub-folders"):
        (tmp_path / "empty").mkdir()
        ImageFolder(tmp_path / "empty", 4)
    _png(tmp_path / "d" / "cls" / "ok.png", (1, 2, 3))
    bad = tmp_path / "d" / "cls" / "zz.png"
    bad.write_bytes(b"\x89PNG not really")
    folder = ImageFolder(tmp_path / "d", 4, mode="L")
    assert folder[0][0].shape == (1, 4, 4)
    with pytest.raises(DataError, match="cannot be read as an image") as e:
        folder[1]
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="Did you mean 'd'"):
        image_folder_domains(tmp_path, 4, domains=["dd"])


# --------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.min() == 0 and train.labels.max() == 9
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # The hard-coded normalisation constants are the training set's.
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - train.mean[0]) < 1e-4
    assert abs(pixels.std().item() - train.std[0]) < 1e-4
