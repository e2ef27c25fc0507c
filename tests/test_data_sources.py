"""The dataset registry, the search path, `dataset_info`, and `fetch` with an in-memory opener."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import struct
import urllib.error

import numpy as np
import pytest

from mentor.data import DATASETS, DataError, dataset_info, download_file, fetch, list_datasets, load_dataset
from mentor.data.sources import Download, get_source


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MENTOR_DATA", raising=False)


def idx_gz(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def write_mnist(folder, n: int, fill: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_gz(np.full((n, 28, 28), fill)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_gz(np.arange(n) % 10))


# ------------------------------------------------------------------------------------- registry


def test_registry_names():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "mnist"]
    assert list_datasets("cifar*") == ["cifar10", "cifar100"]


def test_unknown_name_suggests():
    with pytest.raises(DataError, match="Did you mean 'cifar10'"):
        load_dataset("cifar_10")


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("mnist", "val")


# ---------------------------------------------------------------------------------- search path


def test_not_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MENTOR_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    msg = str(e.value)
    for place in (tmp_path / "env" / "mnist", tmp_path / "env",
                  tmp_path / "home" / ".cache" / "mentor" / "mnist"):
        assert f"{place} (" in msg
    assert "train-images-idx3-ubyte[.gz]" in msg
    assert "mentor data fetch mnist [--to DIR]" in msg and "$MENTOR_DATA" in msg
    assert "apt-get" not in msg  # no package for MNIST


def test_explicit_root_is_the_only_place(tmp_path, monkeypatch):
    monkeypatch.setenv("MENTOR_DATA", str(tmp_path / "env"))
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", root=tmp_path / "root")
    msg = str(e.value)
    assert f"{tmp_path / 'root'} (" in msg and f"{tmp_path / 'env'} (" not in msg
    searched = msg.split("Get the data")[0]
    assert "/usr/share/datasets" not in searched and "user cache" not in searched


def test_fashion_not_found_names_debian_package(tmp_path, monkeypatch):
    absent = dataclasses.replace(get_source("fashion_mnist"), system_dirs=(str(tmp_path / "usr"),))
    monkeypatch.setitem(DATASETS._entries, "fashion_mnist", absent)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", "test")
    msg = str(e.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "mentor data fetch fashion_mnist" in msg
    assert f"{tmp_path / 'usr'} (Debian package dataset-fashion-mnist): no such folder" in msg
    assert "$MENTOR_DATA is not set" in msg


def test_search_order(tmp_path, monkeypatch):
    env = tmp_path / "env"
    write_mnist(env, 3, fill=1)
    write_mnist(env / "mnist", 3, fill=2)
    write_mnist(tmp_path / "root", 3, fill=3)
    write_mnist(tmp_path / "home" / ".cache" / "mentor" / "mnist", 3, fill=4)
    assert load_dataset("mnist").images[0, 0, 0, 0] == 4  # only the cache without $MENTOR_DATA
    monkeypatch.setenv("MENTOR_DATA", str(env))
    assert load_dataset("mnist", root=tmp_path / "root").images[0, 0, 0, 0] == 3
    assert load_dataset("mnist").images[0, 0, 0, 0] == 2  # $MENTOR_DATA/<name> before $MENTOR_DATA
    for f in (env / "mnist").iterdir():
        f.unlink()
    assert load_dataset("mnist").images[0, 0, 0, 0] == 1


def test_incomplete_folder_is_reported(tmp_path):
    write_mnist(tmp_path, 2, fill=0)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="has train-images-idx3-ubyte.gz but no labels file"):
        load_dataset("mnist", root=tmp_path)
    assert len(load_dataset("mnist", "test", root=tmp_path)) == 2  # the test split is still complete


def test_dataset_info(tmp_path, monkeypatch):
    write_mnist(tmp_path / "env" / "mnist", 5, fill=0)
    monkeypatch.setenv("MENTOR_DATA", str(tmp_path / "env"))
    info = dataset_info("mnist")
    assert f"train: {tmp_path / 'env' / 'mnist'} ($MENTOR_DATA/mnist)" in info
    assert "train-images-idx3-ubyte.gz" in info and "[5 x 28 x 28]" in info and "[5]" in info
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in info
    missing = dataset_info("cifar100")
    assert "train: not found; looked in" in missing and "mentor data fetch cifar100" in missing
    assert str(tmp_path / "home" / ".cache" / "mentor" / "cifar100") in missing


def test_published_checksums_are_complete():
    for name in list_datasets():
        for d in get_source(name).downloads:
            assert d.sha256 is not None and len(d.sha256) == 64 and int(d.sha256, 16) >= 0
            assert d.url.endswith("/" + d.filename)


# ---------------------------------------------------------------------------------------- fetch


class FakeReply(io.BytesIO):
    """urlopen's reply, in memory: optional Content-Length, optional failure after `fail_after` bytes."""

    def __init__(self, data: bytes, length: int | None = None, fail_after: int | None = None):
        super().__init__(data)
        self.headers = {"Content-Length": str(length)} if length is not None else {}
        self.fail_after = fail_after

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(min(n, 7) if n > 0 else n)  # small chunks, like a slow socket


def opener_for(files: dict[str, bytes], calls: list[str] | None = None, **kw):
    def opener(url: str) -> FakeReply:
        if calls is not None:
            calls.append(url)
        return FakeReply(files[url], **kw)

    return opener


def fake_mnist(monkeypatch, n: int = 4):
    """Swap MNIST's download table for tiny in-memory files with their true checksums."""
    payloads = {}
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        payloads[f"{prefix}-images-idx3-ubyte.gz"] = idx_gz(rng.integers(0, 256, (n, 28, 28)))
        payloads[f"{prefix}-labels-idx1-ubyte.gz"] = idx_gz(np.arange(n) % 10)
    downloads = tuple(Download(f"https://example.invalid/{f}", f, hashlib.sha256(b).hexdigest())
                      for f, b in payloads.items())
    source = dataclasses.replace(get_source("mnist"), downloads=downloads)
    monkeypatch.setitem(DATASETS._entries, "mnist", source)
    return {d.url: payloads[d.filename] for d in downloads}


def test_fetch_then_load(tmp_path, monkeypatch):
    files = fake_mnist(monkeypatch)
    calls: list[str] = []
    paths = fetch("mnist", to=tmp_path / "dl", opener=opener_for(files, calls))
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(p.name for p in paths)
    assert len(paths) == 4 and len(calls) == 4
    ds = load_dataset("mnist", "test", root=tmp_path / "dl")
    assert ds.labels.tolist() == [0, 1, 2, 3]
    # A second fetch finds the verified files and downloads nothing.
    fetch("mnist", to=tmp_path / "dl", opener=opener_for(files, calls))
    assert len(calls) == 4


def test_fetch_default_target_is_on_the_search_path(tmp_path, monkeypatch):
    files = fake_mnist(monkeypatch)
    monkeypatch.setenv("MENTOR_DATA", str(tmp_path / "data"))
    paths = fetch("mnist", opener=opener_for(files))
    assert all(p.parent == tmp_path / "data" / "mnist" for p in paths)
    assert len(load_dataset("mnist")) == 4


def test_checksum_mismatch_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="checksum mismatch for f.gz") as e:
        download_file("https://example.invalid/f.gz", tmp_path / "f.gz", "0" * 64,
                      opener=lambda url: FakeReply(b"tampered bytes"))
    assert "0" * 64 in str(e.value) and hashlib.sha256(b"tampered bytes").hexdigest() in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary file


def test_checksum_mismatch_keeps_old_good_file(tmp_path):
    good = tmp_path / "f.gz"
    good.write_bytes(b"old")
    with pytest.raises(DataError):
        download_file("u", good, "0" * 64, opener=lambda url: FakeReply(b"new"))
    assert good.read_bytes() == b"old" and list(tmp_path.iterdir()) == [good]


def test_interrupted_download(tmp_path):
    data = bytes(range(100))
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(DataError, match="failed after 35 bytes .*ConnectionResetError"):
        download_file("u", tmp_path / "f", sha, opener=lambda url: FakeReply(data, fail_after=30))
    assert list(tmp_path.iterdir()) == []
    # A connection that just stops early, short of the announced length, is caught too.
    with pytest.raises(DataError, match="interrupted after 60 of 100 bytes"):
        download_file("u", tmp_path / "f", sha, opener=lambda url: FakeReply(data[:60], length=100))
    assert list(tmp_path.iterdir()) == []


def test_http_error(tmp_path):
    def opener(url):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    with pytest.raises(DataError, match="download of https://x.invalid/f failed .*404"):
        download_file("https://x.invalid/f", tmp_path / "f", "0" * 64, opener=opener)
    assert list(tmp_path.iterdir()) == []


def test_unverifiable_file_is_refused_unless_asked(tmp_path):
    calls: list[str] = []
    opener = opener_for({"u": b"payload"}, calls)
    with pytest.raises(DataError, match="could not be verified"):
        download_file("u", tmp_path / "f", None, opener=opener)
    assert calls == [] and list(tmp_path.iterdir()) == []
    assert download_file("u", tmp_path / "f", None, verify=False, opener=opener).read_bytes() == b"payload"


def test_fetch_refuses_table_with_unknown_checksum(tmp_path, monkeypatch):
    source = dataclasses.replace(get_source("cifar10"), downloads=(Download("u", "x.tar.gz", None),))
    monkeypatch.setitem(DATASETS._entries, "cifar10", source)
    with pytest.raises(DataError, match="x.tar.gz, so the files could not be verified"):
        fetch("cifar10", to=tmp_path, opener=opener_for({}))
    assert list(tmp_path.iterdir()) == []
