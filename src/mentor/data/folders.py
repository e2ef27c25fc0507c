"""Image-folder trees (one sub-folder per class; domains as sibling folders), streamed for a DataLoader.

Layout: ``root/<class>/*.png`` for one domain, ``root/<domain>/<class>/*.png`` for a multi-domain
benchmark (Office-31, Office-Home, PACS, DomainNet). Class indices follow the sorted class-folder
names, taken over *all* domains under a root, so a class has the same index in every domain whichever
subset of domains a run loads. Pillow is an optional extra, imported on first use.

Multi-domain data may instead come as ``path label`` list files, one per domain (and split), with paths
relative to the root (DomainNet, the Office lists): :func:`find_domain_lists`, :func:`read_image_list`,
:class:`ImageList`. :func:`check_domain_layout` lists every problem of either layout in one go.

A class folder without image files is an error unless the caller asks to skip it (``empty_classes``); a
file Pillow cannot decode (damaged, truncated, not an image, or a possible decompression bomb) is a
``DataError`` naming it, however the images are read.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mentor.data.errors import DataError
from mentor.data.readers import ArrayDataset
from mentor.registry import Registry, suggest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
EMPTY_CLASSES = ("error", "skip")  # what to do with a class folder holding no image file

log = logging.getLogger("mentor")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image folders needs Pillow, which is not installed; install the "
                        "`images` extra: pip install 'mentor[images]'") from None
    return Image


def _subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_classes(*roots: str | Path, empty_classes: str | None = None) -> list[str]:
    """Sorted union of the class-folder names under each root (the shared class index order).

    ``empty_classes`` says what to do with a class whose folder exists under some root but holds no
    image file: None lists it like any other, ``"error"`` raises a ``DataError`` naming every such
    folder, ``"skip"`` leaves the class out (of every root, so the roots keep one class list) with a
    warning naming the folders.
    """
    roots = tuple(map(Path, roots))
    names: set[str] = set()
    for root in roots:
        if root.is_dir():
            names.update(_subfolders(root))
    classes = sorted(names)
    if empty_classes is None:
        return classes
    if empty_classes not in EMPTY_CLASSES:
        raise ValueError(f"empty_classes must be one of {EMPTY_CLASSES} or None, got {empty_classes!r}")
    empty = [root / c for c in classes for root in roots if (root / c).is_dir() and not _has_images(root / c)]
    if not empty:
        return classes
    shown = _some([str(p) for p in empty])
    if empty_classes == "error":
        raise DataError(f"{_count(empty, 'class folder')} {'holds' if len(empty) == 1 else 'hold'} no image "
                        f"files ({', '.join(IMAGE_EXTENSIONS)}): {shown}; a class needs images to be learned and "
                        f"tested. Put images in {'it' if len(empty) == 1 else 'them'}, delete "
                        f"{'it' if len(empty) == 1 else 'them'}, or leave such classes out "
                        f"(`data.empty_classes: skip` in a recipe).")
    skipped = sorted({p.name for p in empty})
    kept = [c for c in classes if c not in skipped]
    if not kept:
        raise DataError(f"no class folder under {', '.join(map(str, roots))} holds image files "
                        f"({', '.join(IMAGE_EXTENSIONS)}); put the images in <root>/<class>/ folders")
    log.warning("leaving out %s whose folder holds no image files: %s (empty: %s); %s images in other "
                "folders are not used either", _count(skipped, "class"), ", ".join(skipped), shown,
                "its" if len(skipped) == 1 else "their")
    return kept


def list_domains(root: str | Path) -> list[str]:
    """The domain folders under a multi-domain root, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected root/<domain>/<class>/<images>")
    return _subfolders(root)


def _has_images(folder: Path) -> bool:
    """Whether ``folder`` holds at least one image file (stops at the first)."""
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted); none when it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return int(h), int(w)


class UndecodableImage(Exception):
    """One image file Pillow cannot decode: ``args`` are (path, problem, whether it is a size problem).

    Internal and picklable (a DataLoader worker sends its ``args`` back); :func:`undecodable_error` turns
    one or more into the ``DataError`` a user sees.
    """


def _decode_problem(e: Exception, Image) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "Pillow does not recognise it as an image (not an image file, or its start is damaged)"
    if isinstance(e, FileNotFoundError):
        return "the file does not exist"
    detail = " ".join(str(e).split()).rstrip(".") or type(e).__name__
    return f"it is damaged or truncated ({detail})"


def undecodable_error(failures: list[tuple[str, str, bool]]) -> DataError:
    """One ``DataError`` paragraph for the image files (path, problem, too large) that cannot be decoded."""
    if len(failures) == 1:
        path, problem, _ = failures[0]
        head = f"{path} cannot be read as an image: {problem}. Delete it or replace it with an intact copy"
    else:
        listed = "; ".join(f"{path}: {problem}" for path, problem, _ in failures[:_SHOWN])
        more = f" (+{len(failures) - _SHOWN} more)" if len(failures) > _SHOWN else ""
        head = (f"{len(failures)} files cannot be read as images: {listed}{more}. Delete them or replace them "
                f"with intact copies")
    if any(large for _, _, large in failures):
        head += ("; a genuine image that large must be shrunk beforehand, e.g. with ImageMagick: "
                 "`mogrify -resize '4096x4096>' FILE`")
    return DataError(head + ".")


@contextmanager
def bombs_as_errors() -> Iterator[None]:
    """Within this block, an image over Pillow's decompression-bomb *warning* size fails to decode.

    Pillow only warns (``DecompressionBombWarning``) between ``Image.MAX_IMAGE_PIXELS`` and twice that, and
    decodes anyway: minutes and gigabytes for one image that is then shrunk to a few pixels. Set once around
    a loop over many images (the filter is process-wide state, too costly to set per image).
    """
    Image = _pil()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


class ImageFiles(Dataset):
    """Labelled image files, each read, converted to ``mode`` and resized to ``size`` on access.

    The shared reader behind :class:`ImageFolder` (labels from class folders) and :class:`ImageList`
    (labels from a ``path label`` list file). Items are ``(float tensor [C, H, W] in [0, 1], int label)``;
    ``mode`` is a Pillow mode ("RGB" gives 3 channels, "L" gives 1).
    """

    def __init__(self, root: str | Path, samples: list[tuple[Path, int]], classes: list[str],
                 size: int | tuple[int, int], mode: str = "RGB"):
        self.root = Path(root)
        self.samples = list(samples)
        self.classes = list(classes)
        self.size = _size(size)
        self.mode = mode

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def read_uint8(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 [H, W, C] after conversion to ``mode`` and resizing.

        A file Pillow cannot decode is a ``DataError`` naming it. Pillow only warns about an image between
        its decompression-bomb warning and error sizes; inside :func:`bombs_as_errors` that is an error too.
        """
        try:
            return self.decode_uint8(i)
        except UndecodableImage as e:
            raise undecodable_error([e.args]) from None

    def decode_uint8(self, i: int) -> np.ndarray:
        """:meth:`read_uint8`, raising :class:`UndecodableImage` (to gather several before reporting)."""
        path = self.samples[i][0]
        Image = _pil()
        bilinear = getattr(Image, "Resampling", Image).BILINEAR
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode).resize((self.size[1], self.size[0]), bilinear)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            size = str(e).split(", could be")[0].rstrip(".")  # Pillow's "Image size (N pixels) exceeds limit ..."
            problem = f"it is too large to decode safely, a possible decompression bomb ({size})"
            raise UndecodableImage(str(path), problem, True) from None
        except Exception as e:  # whatever a damaged file makes a decoder raise
            raise UndecodableImage(str(path), _decode_problem(e, Image), False) from None
        arr = np.asarray(im, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = self.read_uint8(i)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0), self.samples[i][1]

    def to_array_dataset(self, name: str | None = None) -> ArrayDataset:
        """Every image decoded into one uint8 ArrayDataset (for folders small enough to live on the device).

        ``mean``/``std`` are measured on these images, so call it on a training folder.
        """
        arrays, failed = [], []
        with bombs_as_errors():
            for i in range(len(self)):
                try:
                    arrays.append(self.decode_uint8(i))
                except UndecodableImage as e:
                    failed.append(e.args)  # go on, so that one message names every bad file
        if failed:
            raise undecodable_error(failed)
        stacked = np.stack(arrays)
        images = torch.from_numpy(stacked).permute(0, 3, 1, 2)
        labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        scaled = images.double() / 255.0
        mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
        std = tuple(scaled.std(dim=(0, 2, 3), correction=0).tolist())
        return ArrayDataset(images.contiguous(), labels, self.num_classes, name or self.root.name,
                            list(self.classes), mean, std)


class ImageFolder(ImageFiles):
    """Images under ``root/<class>/`` (searched recursively), resized to ``size`` on read.

    Items are ``(float tensor [C, H, W] in [0, 1], int label)``; ``mode`` is a Pillow mode
    ("RGB" gives 3 channels, "L" gives 1). ``classes`` fixes the class order (default: this root's
    sorted class folders, an empty one an error or, with ``empty_classes="skip"``, left out; see
    :func:`find_classes`); a class folder missing under this root simply contributes no images.
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int], classes: list[str] | None = None,
                 mode: str = "RGB", empty_classes: str = "error"):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root} is not a folder; expected {root}/<class>/<images>")
        classes = list(classes) if classes is not None else find_classes(root, empty_classes=empty_classes)
        if not classes:
            raise DataError(f"{root} has no class sub-folders; expected {root}/<class>/*.png")
        samples: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            samples += [(p, label) for p in _image_files(root / name)]
        if not samples:
            raise DataError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                            f"folders {classes[:5]}")
        super().__init__(root, samples, classes, size, mode)


#: Datasets a recipe reads from a user's folder tree (``data.name``, with ``data.root``), sized by the recipe's
#: ``data.image_size`` and ``data.channels``, beside the named datasets (``DATASETS``) and domain sets
#: (``DOMAIN_SETS``): ``image_folder`` reads ``root/train/<class>/*`` and ``root/test/<class>/*``.
FOLDER_DATASETS: Registry[type[ImageFiles]] = Registry("image-folder dataset")
FOLDER_DATASETS.register("image_folder")(ImageFolder)


class ImageList(ImageFiles):
    """The images a ``path label`` list names, paths relative to ``root`` (DomainNet/Office style).

    ``entries`` are ``(relative path, label)`` pairs as :func:`read_image_list` returns them; the class
    names are given (lists carry only integer labels).
    """

    def __init__(self, root: str | Path, entries: list[tuple[str, int]], classes: list[str],
                 size: int | tuple[int, int], mode: str = "RGB"):
        root = Path(root)
        super().__init__(root, [(root / rel, label) for rel, label in entries], classes, size, mode)


def image_folder_domains(root: str | Path, size: int | tuple[int, int], domains: list[str] | None = None,
                         mode: str = "RGB", empty_classes: str = "error") -> dict[str, ImageFolder]:
    """One ``ImageFolder`` per domain under ``root/<domain>/<class>/``, all sharing one class order.

    A class folder without images in any domain (loaded or not) is an error, or with
    ``empty_classes="skip"`` that class is left out of every domain (see :func:`find_classes`).
    """
    root = Path(root)
    available = list_domains(root)
    if not available:
        raise DataError(f"{root} has no domain folders; expected {root}/<domain>/<class>/<images>")
    chosen = available if domains is None else list(domains)
    for d in chosen:
        if d not in available:
            raise DataError(f"{root} has no domain folder {d!r}.{suggest(d, available)} "
                            f"Found: {', '.join(available)}")
    classes = find_classes(*(root / d for d in available), empty_classes=empty_classes)
    return {d: ImageFolder(root / d, size, classes=classes, mode=mode) for d in chosen}


# ------------------------------------------------------------------------------------ list files
#
# DomainNet and the Office benchmarks ship one text file per domain (and split) whose lines read
# ``relative/path/to/image.jpg <int label>``, the paths relative to the dataset root: e.g. DomainNet's
# ``clipart_train.txt`` / ``clipart_test.txt``, or TLlib's ``image_list/<domain>.txt``.

LIST_SPLITS = ("train", "test")
LIST_FOLDERS = (".", "image_list")  # where list files are looked for, relative to the root
_SHOWN = 3  # problems of one kind that a report spells out before summarising the rest as a count


def find_domain_lists(root: str | Path) -> dict[str, list[Path]]:
    """Domain name -> its list files: ``<domain>.txt``, or ``<domain>_train.txt`` then ``<domain>_test.txt``.

    Files are looked for in ``root`` and, when it holds none, in ``root/image_list`` (TLlib's layout);
    the domains come out sorted, as folder domains do.
    """
    root = Path(root)
    for sub in LIST_FOLDERS:
        folder = root / sub
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if files:
            break
    else:
        return {}
    found: dict[str, list[Path]] = {}
    for path in files:
        found.setdefault(_split_list_name(path.stem)[0], []).append(path)
    # The train list comes before the test list, so a domain's images have a fixed order.
    order = {None: 0, **{s: i + 1 for i, s in enumerate(LIST_SPLITS)}}
    return {d: sorted(ps, key=lambda p: order[_split_list_name(p.stem)[1]]) for d, ps in sorted(found.items())}


def _split_list_name(stem: str) -> tuple[str, str | None]:
    """``clipart_train`` -> (``clipart``, ``train``); ``amazon`` -> (``amazon``, None)."""
    for split in LIST_SPLITS:
        if stem.endswith(f"_{split}") and len(stem) > len(split) + 1:
            return stem[: -len(split) - 1], split
    return stem, None


def read_image_list(path: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """The ``(relative path, label)`` entries of one list file, and one problem per unreadable line.

    A line is a path and an integer label separated by white space; the label is the last field, so a
    path may itself contain spaces. Blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"{path}: cannot be read ({e})"]
    entries: list[tuple[str, int]] = []
    bad: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(maxsplit=1)
        try:
            entries.append((fields[0], int(fields[1])))
        except (IndexError, ValueError):
            bad.append(f"{path.name}:{number}")
    problems = []
    if bad:
        problems.append(f"{path}: {_count(bad, 'line')} not `relative/path <int label>`: {_some(bad)}")
    return entries, problems


def check_domain_layout(root: str | Path, kind: str = "folder", empty_classes: str = "error") -> list[str]:
    """Every problem that would stop a multi-domain tree from loading, one line each ([] when it is usable).

    ``kind="folder"``: ``root/<domain>/<class>/<images>``; every domain must have the same class folders,
    none of them empty (with ``empty_classes="skip"``, a class empty in some domain is no problem: it is
    left out of every domain, as :func:`image_folder_domains` does). ``kind="list"``:
    ``root/<domain>.txt`` (or ``<domain>_train.txt`` and ``<domain>_test.txt``) with ``relative/path <label>``
    lines whose files exist and whose labels number the classes 0..K-1, every domain using every label.
    Nothing is raised: the lines are meant to be printed as they are (``domain_folder`` and ``domain_list``
    raise them as one ``DataError``).
    """
    root = Path(root)
    if kind not in ("folder", "list"):
        raise ValueError(f"kind must be 'folder' or 'list', got {kind!r}")
    if empty_classes not in EMPTY_CLASSES:
        raise ValueError(f"empty_classes must be one of {EMPTY_CLASSES}, got {empty_classes!r}")
    if not root.is_dir():
        return [f"{root} is not a folder"]
    return _check_folder_layout(root, empty_classes) if kind == "folder" else _check_list_layout(root)


def _check_folder_layout(root: Path, empty_classes: str) -> list[str]:
    domains = _subfolders(root)
    if not domains:
        return [f"{root} has no domain folders; expected {root}/<domain>/<class>/<images>"]
    classes = {d: _subfolders(root / d) for d in domains}
    empty = [(d, c) for d in domains for c in classes[d] if not _has_images(root / d / c)]
    if empty_classes == "skip":
        skipped = {c for _, c in empty}
        classes = {d: [c for c in cs if c not in skipped] for d, cs in classes.items()}
        problems = [f"domain {d} has no class folder holding images" for d in domains if not classes[d]]
        return problems + _missing_classes({d: set(c) for d, c in classes.items() if c})
    problems = [f"domain {d} has no class folders" for d in domains if not classes[d]]
    problems += _missing_classes({d: set(c) for d, c in classes.items() if c})
    return problems + [f"domain {d} class {c} is empty (no image files in {root / d / c})" for d, c in empty]


def _check_list_layout(root: Path) -> list[str]:
    lists = find_domain_lists(root)
    if not lists:
        return [f"{root} has no list files; expected {root}/<domain>.txt (or <domain>_train.txt and "
                f"<domain>_test.txt) with lines `relative/path/to/image.jpg <int label>`"]
    problems: list[str] = []
    labels: dict[str, set[int]] = {}
    for domain, files in lists.items():
        whole = [p for p in files if _split_list_name(p.stem)[1] is None]
        if whole and len(files) > len(whole):
            problems.append(f"domain {domain} has both {whole[0].name} and per-split lists "
                            f"({', '.join(p.name for p in files if p not in whole)}); keep one form")
        labels[domain] = set()
        for path in files:
            entries, unreadable = read_image_list(path)
            problems += unreadable
            if not entries and not unreadable:
                problems.append(f"{path} lists no images")
            problems += _missing_files(root, path, entries)
            problems += _bad_labels(path, entries)
            labels[domain].update(label for _, label in entries if label >= 0)
    problems += _unused_labels(labels)
    problems += _missing_classes({d: ls for d, ls in labels.items() if ls}, what="label")
    return problems


def _unused_labels(labels: dict[str, set[int]]) -> list[str]:
    """Labels below the largest that no list uses: the numbering does not run 0..K-1."""
    used = set().union(*labels.values())
    unused = sorted(set(range(max(used) + 1)) - used) if used else []
    if not unused:
        return []
    # PACS' official lists (and TLlib's copies) number their 7 classes 1..7.
    hint = " (lists numbered from 1 need 1 subtracted from every label)" if unused == [0] else ""
    return [f"labels must number the classes 0..K-1, but no list uses {_count(unused, 'label')} "
            f"{_some([str(u) for u in unused])}{hint}"]


def _missing_files(root: Path, path: Path, entries: list[tuple[str, int]]) -> list[str]:
    missing = [rel for rel, _ in entries if not (root / rel).is_file()]
    if not missing:
        return []
    return [f"{path}: {_count(missing, 'listed image')} not found under {root}: {_some(missing)}"]


def _bad_labels(path: Path, entries: list[tuple[str, int]]) -> list[str]:
    negative = [f"{rel} {label}" for rel, label in entries if label < 0]
    if not negative:
        return []
    return [f"{path}: {_count(negative, 'label')} out of range (below 0): {_some(negative)}"]


def _missing_classes(have: dict[str, set], what: str = "class") -> list[str]:
    """One problem per domain lacking classes (folder names or labels) that other domains have."""
    everything = set().union(*have.values()) if have else set()
    problems = []
    for d, own in have.items():
        lacking = sorted(everything - own)
        if lacking:
            problems.append(f"domain {d} lacks {_count(lacking, what)} other domains have: "
                            f"{_some([str(c) for c in lacking])}")
    return problems


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else ('es' if noun.endswith('s') else 's')}"


def _some(items: list[str]) -> str:
    """The first few items, then how many more there are."""
    shown = ", ".join(items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown} (+{len(items) - _SHOWN} more)"


def layout_error(root: str | Path, kind: str, problems: list[str]) -> DataError:
    """One ``DataError`` paragraph listing a tree's layout problems and how the layout should look."""
    root = Path(root)
    if kind == "folder":
        fix = (f"arrange the data as {root}/<domain>/<class>/<image files>, with the same class folders in "
               f"every domain and none of them empty (or leave classes with an empty folder out of every "
               f"domain with `data.empty_classes: skip`)")
    else:
        fix = (f"give each domain a list file {root}/<domain>.txt (or <domain>_train.txt and "
               f"<domain>_test.txt) whose lines read `relative/path/to/image.jpg <label>`, paths relative "
               f"to {root} and labels numbering the classes 0..K-1")
    lines = [f"{root} is not a usable multi-domain {kind} tree ({_count(problems, 'problem')}):"]
    lines += [f"  - {p}" for p in problems]
    lines.append(f"Fix: {fix}, then load it again.")
    return DataError("\n".join(lines))
