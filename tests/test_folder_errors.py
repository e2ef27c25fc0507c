"""Image folders that fail clearly: empty class folders, decompression bombs and damaged files.

Each problem is one ``DataError`` paragraph naming the folder or file, whether the images are decoded up
front or by DataLoader workers, and ``mentor train`` prints it without a traceback (exit status 1).
"""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
import torch

from mentor import cli
from mentor.config import load_config
from mentor.data.errors import DataError
from mentor.data.folders import ImageFolder
from mentor.data.shifted import domain_folder
from mentor.data.stream import FolderSplit, StreamLoader
from mentor.engine.inputs import load_splits

Image = pytest.importorskip("PIL.Image")


def _png_bytes(value: int = 0, seed: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) if seed is not None else np.full((8, 8, 3), value,
                                                                                                np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _bomb_bytes(width: int, height: int) -> bytes:
    """An 8x8 PNG whose header declares width x height (with a correct CRC): Pillow checks the header size."""
    data = _png_bytes(7)
    assert data[12:16] == b"IHDR"
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def _tree(root, classes=("a", "b", "c"), n=(3, 2)):
    """root/{train,test}/<class>/<i>.png, each image one grey level (its class index * 40)."""
    for split, count in zip(("train", "test"), n):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                (root / split / name / f"{i}.png").write_bytes(_png_bytes(40 * c + i))
    return root


def _data(root, *extra):
    return load_config(None, ["data.name=image_folder", f"data.root={root}", "data.image_size=8", "data.val_size=0",
                              f"out_dir={root}/run", *extra]).data


def test_pngs_are_readable(tmp_path):
    # The helpers' files are what the tests say they are: an intact PNG decodes, the bomb declares its size.
    (tmp_path / "ok.png").write_bytes(_png_bytes(9))
    (tmp_path / "big.png").write_bytes(_bomb_bytes(20000, 20000))
    assert np.asarray(Image.open(tmp_path / "ok.png"))[0, 0].tolist() == [9, 9, 9]
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "big.png")


# ------------------------------------------------------------------------------------------ empty classes


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_folder_is_an_error_naming_it(tmp_path, split):
    root = _tree(tmp_path / "tree")
    for f in (root / split / "b").iterdir():
        f.unlink()
    (root / split / "b" / "notes.txt").write_text("not an image")  # a folder without *image* files
    with pytest.raises(DataError) as e:
        load_splits(_data(root))
    msg = str(e.value)
    assert f"{root / split / 'b'}" in msg and "no image files" in msg
    assert "data.empty_classes: skip" in msg and "\n" not in msg


def test_empty_class_folder_skipped_with_a_warning(tmp_path, caplog):
    root = _tree(tmp_path / "tree")
    for f in (root / "test" / "b").iterdir():
        f.unlink()
    with caplog.at_level(logging.WARNING, logger="mentor"):
        splits = load_splits(_data(root, "data.empty_classes=skip"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(root / "test" / "b") in warned[0] and "leaving out 1 class" in warned[0]
    # Class b is out of both splits (its 3 training images too); a and c are renumbered 0 and 1.
    assert splits.train.classes == splits.test.classes == ["a", "c"]
    assert splits.train.num_classes == splits.test.num_classes == 2
    assert sorted(splits.train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert sorted(splits.test.labels.tolist()) == [0, 0, 1, 1]
    # Grey levels: class c's images (80, 81, 82) carry label 1.
    c_train = splits.train.images[splits.train.labels == 1][:, 0, 0, 0]
    assert sorted(c_train.tolist()) == [80, 81, 82]


def test_every_class_empty_with_skip_is_still_an_error(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folder under .* holds image files"):
        load_splits(_data(tmp_path, "data.empty_classes=skip"))


def test_image_folder_alone_refuses_an_empty_class(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(_png_bytes(1))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'b'}"):
        ImageFolder(tmp_path, 8)
    assert ImageFolder(tmp_path, 8, empty_classes="skip").classes == ["a"]


def _domains(root):
    """root/<domain>/<class>/0.png for domains photo and sketch, classes cat/dog/fox; sketch/dog empty."""
    for d in ("photo", "sketch"):
        for c, name in enumerate(("cat", "dog", "fox")):
            (root / d / name).mkdir(parents=True)
            if (d, name) != ("sketch", "dog"):
                (root / d / name / "0.png").write_bytes(_png_bytes(10 * c))
    return root


def test_empty_class_in_a_domain_folder(tmp_path, caplog):
    root = _domains(tmp_path / "PACS")
    with pytest.raises(DataError) as e:
        domain_folder(str(root), image_size=8)
    assert f"no image files in {root / 'sketch' / 'dog'}" in str(e.value)
    assert "data.empty_classes: skip" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="mentor"):
        ds = domain_folder(str(root), image_size=8, empty_classes="skip")
    assert ds.classes == ["cat", "fox"]  # dog is out of every domain, not only sketch
    assert ds.domains["photo"].labels.tolist() == [0, 1] and ds.domains["photo"].images[:, 0, 0, 0].tolist() == [0, 20]
    assert any(str(root / "sketch" / "dog") in r.getMessage() for r in caplog.records)


def test_domain_folder_gets_the_recipe_option(tmp_path):
    root = _domains(tmp_path / "PACS")
    common = ["data.name=domain_folder", f"data.root={root}", "data.image_size=8", "data.val_size=0",
              "data.test_domains=[sketch]", f"out_dir={tmp_path}/run"]
    with pytest.raises(DataError, match="class dog is empty"):
        load_splits(load_config(None, common).data)
    splits = load_splits(load_config(None, [*common, "data.empty_classes=skip"]).data)
    assert splits.test.classes == ["cat", "fox"]


# ------------------------------------------------------------------------------ files that do not decode


def _with_bad(root, name, blob, split="train", cls="b"):
    path = root / split / cls / name
    path.write_bytes(blob)
    return path


BAD_FILES = {
    "bomb": lambda: _bomb_bytes(20000, 20000),  # over twice Image.MAX_IMAGE_PIXELS: Pillow's error
    "big": lambda: _bomb_bytes(10000, 10000),  # over Image.MAX_IMAGE_PIXELS: Pillow only warns
    "random": lambda: np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes(),
    "truncated": lambda: _png_bytes(seed=2)[:100],
}
EXPECTED = {"bomb": "too large to decode safely", "big": "too large to decode safely",
            "random": "does not recognise it as an image", "truncated": "truncated"}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_undecodable_file_up_front(tmp_path, kind):
    root = _tree(tmp_path / "tree")
    bad = _with_bad(root, "x.png", BAD_FILES[kind]())
    with pytest.raises(DataError) as e:
        load_splits(_data(root))
    msg = str(e.value)
    assert msg.startswith(f"{bad} cannot be read as an image: ") and EXPECTED[kind] in msg
    assert "Delete it or replace it" in msg and "\n" not in msg
    assert ("mogrify -resize" in msg) == (kind in ("bomb", "big"))


def test_every_undecodable_file_is_named_at_once(tmp_path):
    root = _tree(tmp_path / "tree")
    bad = [_with_bad(root, "x.png", BAD_FILES["random"]()),
           _with_bad(root, "y.png", BAD_FILES["truncated"](), split="test", cls="c")]
    with pytest.raises(DataError) as e:
        load_splits(_data(root))  # the train split fails first; its one bad file is named
    assert str(bad[0]) in str(e.value) and str(bad[1]) not in str(e.value)
    bad[0].unlink()
    _with_bad(root, "z.png", BAD_FILES["bomb"](), split="test", cls="a")
    with pytest.raises(DataError) as e:
        load_splits(_data(root))
    msg = str(e.value)
    assert msg.startswith("2 files cannot be read as images: ") and str(bad[1]) in msg
    assert str(root / "test" / "a" / "z.png") in msg and "mogrify" in msg


def _stream(root, num_workers):
    folder = ImageFolder(root / "train", 8)
    return FolderSplit(folder, num_workers=num_workers)


@pytest.mark.parametrize("kind", ["bomb", "big", "random", "truncated"])
def test_undecodable_file_in_a_worker_is_one_clean_error(tmp_path, kind, capfd):
    root = _tree(tmp_path / "tree")
    bad = _with_bad(root, "x.png", BAD_FILES[kind]())
    split = _stream(root, num_workers=1)
    loader = StreamLoader(split, batch_size=len(split), seed=0)  # step 0 holds every image
    with pytest.raises(DataError) as e:
        loader.batch(0)
    msg = str(e.value)
    assert msg.startswith(f"{bad} cannot be read as an image: ") and EXPECTED[kind] in msg
    assert "\n" not in msg and "Traceback" not in msg and "DataLoader" not in msg
    assert "Traceback" not in capfd.readouterr().err  # the worker printed nothing either
    # Asked again, the loader starts over (workers were ended) and fails the same way.
    with pytest.raises(DataError, match="cannot be read as an image"):
        loader.batch(0)


def test_streamed_batches_unchanged_for_good_files(tmp_path):
    # The in-worker path (batch fetch + marker check) gives the images an in-memory read gives.
    root = _tree(tmp_path / "tree")
    split = _stream(root, num_workers=0)
    x, y = next(split.batches(batch_size=len(split)))
    memory = split.folder.to_array_dataset()
    assert torch.equal(x, memory.images) and torch.equal(y, memory.labels)


def test_streamed_load_reports_the_file_from_a_worker(tmp_path):
    # data.stream=true measures mean/std in a worker at load time: that read fails cleanly too.
    root = _tree(tmp_path / "tree")
    bad = _with_bad(root, "x.png", BAD_FILES["truncated"]())
    with pytest.raises(DataError) as e:
        load_splits(_data(root, "data.stream=true", "data.num_workers=1"))
    assert str(e.value).startswith(f"{bad} cannot be read as an image")


# ------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize("stream, split", [(False, "train"), (True, "train"), (True, "test")])
def test_cli_train_exits_1_with_one_paragraph(tmp_path, capfd, stream, split):
    # Streamed, a bad training image fails at load time (mean/std are measured in a worker); a bad test
    # image only when the run evaluates, after training.
    root = _tree(tmp_path / "tree")
    bad = _with_bad(root, "x.png", BAD_FILES["bomb"](), split=split)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: supervised}\nmodel: {name: resnet8}\n")
    rc = cli.main(["train", str(recipe), "data.name=image_folder", f"data.root={root}", "data.image_size=8",
                   "data.val_size=0", "data.batch_size=4", f"data.stream={str(stream).lower()}",
                   "data.num_workers=1", "trainer.max_steps=1", "trainer.progress=false",
                   f"out_dir={tmp_path / 'run'}"])
    err = capfd.readouterr().err
    assert rc == 1
    assert err.startswith(f"mentor: error: {bad} cannot be read as an image") and err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_train_empty_class_exits_1(tmp_path, capfd):
    root = _tree(tmp_path / "tree")
    for f in (root / "train" / "c").iterdir():
        f.unlink()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: supervised}\nmodel: {name: resnet8}\n")
    rc = cli.main(["train", str(recipe), "data.name=image_folder", f"data.root={root}", "data.image_size=8",
                   "data.val_size=0", "trainer.max_steps=1", f"out_dir={tmp_path / 'run'}"])
    err = capfd.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and str(root / "train" / "c") in err


def test_a_class_folder_only_in_the_test_split_is_an_error(tmp_path):
    from mentor.engine.inputs import load_splits

    Image = pytest.importorskip("PIL.Image")
    for split, classes in (("train", ("a", "b")), ("test", ("a", "b", "c"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("L", (8, 8), 40 * i).save(tmp_path / split / c / f"{i}.png")
    cfg = load_config(None, ["data.name=image_folder", f"data.root={tmp_path}", "data.val_size=2",
                             "data.image_size=8", "data.channels=1"])
    with pytest.raises(DataError, match=r"class folder\(s\) c that .*train lacks"):
        load_splits(cfg.data)
