"""Named datasets: where their files are looked for, how they are read, where they are downloaded from.

``load_dataset(name, split, root)`` looks only in ``root`` (and ``root/<name>``) when it is given;
otherwise it searches, in order: ``$MENTOR_DATA/<name>`` and
``$MENTOR_DATA``; ``~/.cache/mentor/<name>``; and system folders a distribution package fills
(``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``). When nothing is
found, the error lists every place searched and the ways to get the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mentor.data.errors import FETCH_HINT, DataError
from mentor.data.readers import (
    CIFAR10_BATCHES,
    CIFAR100_BATCHES,
    DIGITS_SPLIT_SEED,
    ArrayDataset,
    extract_tar,
    idx_header,
    read_cifar,
    read_cifar_class_names,
    read_digits,
    read_idx_pair,
)
from mentor.registry import Registry

ENV_VAR = "MENTOR_DATA"
SPLITS = ("train", "test")
Found = dict[str, Path]


@dataclass(frozen=True)
class Download:
    """One official file: its URL, the name it is stored under, and its published SHA-256.

    ``sha256=None`` means no published value could be confirmed; ``fetch`` then refuses the file
    unless verification is switched off explicitly.
    """

    url: str
    filename: str
    sha256: str | None


@dataclass(frozen=True)
class Place:
    """A folder on the search path and why it is there (for messages)."""

    path: Path
    why: str


def cache_dir(name: str) -> Path:
    """The per-user folder a dataset is fetched into by default: ``~/.cache/mentor/<name>``."""
    return Path.home() / ".cache" / "mentor" / name


def default_fetch_dir(name: str) -> Path:
    """Where ``fetch`` writes without ``to``: ``$MENTOR_DATA/<name>`` when set, else the user cache."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() / name if env else cache_dir(name)


@dataclass(frozen=True)
class Source:
    """How to find, read and fetch one named dataset (subclasses know the file format)."""

    name: str
    title: str
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    downloads: tuple[Download, ...] = ()
    system_dirs: tuple[str, ...] = ()
    apt_package: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- what subclasses provide
    def wanted(self, split: str) -> str:
        """The files a folder must hold for ``split``, in words."""
        raise NotImplementedError

    def find(self, folder: Path, split: str) -> tuple[Found | None, str]:
        """The split's files in ``folder``, or None and a short note on what is missing."""
        raise NotImplementedError

    def read(self, found: Found, split: str) -> ArrayDataset:
        raise NotImplementedError

    def describe(self, found: Found) -> list[str]:
        """One line per file found: name, size and (where cheap to tell) the number of images."""
        return [f"{p}  {_size(p)}" for p in found.values()]

    # -- shared machinery
    def places(self, root: str | Path | None = None) -> list[Place]:
        if root is not None:
            # An explicit root is the only place looked at: silently reading other files is worse
            # than a clear "not found".
            base = Path(root).expanduser()
            return [Place(base, "root argument"), Place(base / self.name, f"root argument/{self.name}")]
        places = []
        env = os.environ.get(ENV_VAR)
        if env:
            base = Path(env).expanduser()
            places += [Place(base / self.name, f"${ENV_VAR}/{self.name}"), Place(base, f"${ENV_VAR}")]
        places.append(Place(cache_dir(self.name), "user cache"))
        places += [Place(Path(d), f"Debian package {self.apt_package}") for d in self.system_dirs]
        return places

    def locate(
        self, split: str, root: str | Path | None = None
    ) -> tuple[Place | None, Found | None, list[str]]:
        """The first place holding ``split`` and its files; else (None, None, one note per place)."""
        notes = []
        for place in self.places(root):
            if place.why == "user cache" and not os.environ.get(ENV_VAR):
                notes.append(f"${ENV_VAR} is not set")
            if not place.path.is_dir():
                notes.append(f"{place.path} ({place.why}): no such folder")
                continue
            found, note = self.find(place.path, split)
            if found is not None:
                return place, found, notes
            notes.append(f"{place.path} ({place.why}): {note}")
        return None, None, notes

    def how_to_get(self) -> list[str]:
        ways = [f"sudo apt-get install {self.apt_package}"] if self.apt_package else []
        if self.downloads:
            ways.append(f"{FETCH_HINT.format(name=self.name)}   (then set data.root=DIR in the recipe, or "
                        f"${ENV_VAR}=DIR)")
        ways.append(f"copy the files into one of the folders above, or set ${ENV_VAR} to a folder "
                    f"holding them (or a {self.name}/ sub-folder with them)")
        return ways

    def available(self, root: str | Path | None = None) -> bool:
        """Whether every split is found (``mentor data info`` exits non-zero otherwise)."""
        return all(self.locate(split, root)[1] is not None for split in SPLITS)

    def not_found(self, split: str, notes: list[str]) -> DataError:
        lines = [f"{self.name} ({split} split) not found: looked for {self.wanted(split)} in"]
        lines += [f"  - {n}" for n in notes]
        lines.append("Get the data with one of:")
        lines += [f"  - {w}" for w in self.how_to_get()]
        return DataError("\n".join(lines))

    def load(self, split: str, root: str | Path | None = None) -> ArrayDataset:
        _check_split(split)
        _, found, notes = self.locate(split, root)
        if found is None:
            raise self.not_found(split, notes)
        return self.read(found, split)

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None
                 ) -> ArrayDataset:
        return ArrayDataset(images, labels, self.num_classes, self.name,
                            list(classes or self.classes), self.mean, self.std)

    def info(self) -> str:
        c, h, w = self.shape
        lines = [f"{self.name}: {self.title}, {self.num_classes} classes, {c}x{h}x{w} images"]
        missing = False
        for split in SPLITS:
            place, found, notes = self.locate(split)
            if found is None:
                missing = True
                lines.append(f"  {split}: not found; looked in")
                lines += [f"    - {n}" for n in notes]
            else:
                assert place is not None
                lines.append(f"  {split}: {place.path} ({place.why})")
                lines += [f"    {d}" for d in self.describe(found)]
        if missing:
            lines.append("  get it with: " + "  |  ".join(self.how_to_get()[:-1] or self.how_to_get()))
        for d in self.downloads:
            lines.append(f"  source: {d.url}  sha256 {d.sha256 or 'unknown (unverified)'}")
        return "\n".join(lines)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} "
                        f"(validation is carved from train with mentor.data.stratified_split)")


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "unreadable"


# --------------------------------------------------------------------------------------------- idx


@dataclass(frozen=True)
class IdxSource(Source):
    """MNIST-style idx file pairs, ``train-*`` and ``t10k-*``, gzipped or not."""

    def _names(self, split: str) -> dict[str, str]:
        prefix = "train" if split == "train" else "t10k"
        return {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}

    def wanted(self, split: str) -> str:
        return " and ".join(f"{n}[.gz]" for n in self._names(split).values())

    def find(self, folder: Path, split: str) -> tuple[Found | None, str]:
        found: Found = {}
        for role, base in self._names(split).items():
            for candidate in (folder / f"{base}.gz", folder / base):
                if candidate.is_file():
                    found[role] = candidate
                    break
        if len(found) == 2:
            return found, ""
        if not found:
            return None, "no idx files for this split"
        have, lack = next(iter(found.values())).name, "labels" if "images" in found else "images"
        return None, f"has {have} but no {lack} file"

    def read(self, found: Found, split: str) -> ArrayDataset:
        images, labels = read_idx_pair(found["images"], found["labels"], self.num_classes, self.name)
        if tuple(images.shape[1:]) != self.shape:
            raise DataError(f"{found['images']}: images are {tuple(images.shape[2:])}, expected "
                            f"{self.shape[1:]} for {self.name}; is this the right dataset?")
        return self._dataset(images, labels)

    def describe(self, found: Found) -> list[str]:
        lines = []
        for path in found.values():
            dims = idx_header(path)
            what = " x ".join(map(str, dims)) if dims else "header unreadable"
            lines.append(f"{path.name}  {_size(path)}  [{what}]")
        return lines


# ------------------------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarSource(Source):
    """The CIFAR "python version": an extracted batch folder, or its .tar.gz (extracted on first use)."""

    folder: str = ""
    archive: str = ""
    fine: bool = False

    def _batches(self, split: str) -> list[str]:
        return (CIFAR100_BATCHES if self.fine else CIFAR10_BATCHES)[split]

    def wanted(self, split: str) -> str:
        return f"{self.folder}/{{{','.join(self._batches(split))}}} or {self.archive}"

    def _complete(self, folder: Path, split: str) -> list[str]:
        return [b for b in self._batches(split) if not (folder / b).is_file()]

    def find(self, folder: Path, split: str) -> tuple[Found | None, str]:
        # `folder` may be the parent of the batch folder or (when a user points root at it) the folder.
        for candidate in (folder / self.folder, folder):
            if candidate.is_dir() and not self._complete(candidate, split):
                return {"folder": candidate}, ""
        if (folder / self.archive).is_file():
            return {"archive": folder / self.archive}, ""
        if (folder / self.folder).is_dir():
            return None, f"{self.folder}/ lacks {', '.join(self._complete(folder / self.folder, split))}"
        return None, f"no {self.folder}/ and no {self.archive}"

    def _extracted(self, archive: Path, split: str) -> Path:
        # Extract beside the archive when that folder is writable, else into the user cache.
        into = archive.parent if os.access(archive.parent, os.W_OK) else cache_dir(self.name)
        dest = into / self.folder
        if dest.is_dir():
            lacking = self._complete(dest, split)
            if not lacking:
                return dest
            raise DataError(f"{dest} is incomplete (lacks {', '.join(lacking)}) and {archive} could be "
                            f"extracted in its place; delete {dest} and load again")
        return extract_tar(archive, self.folder, into, self.name)

    def read(self, found: Found, split: str) -> ArrayDataset:
        folder = found.get("folder") or self._extracted(found["archive"], split)
        images, labels = read_cifar(folder, split, self.fine, self.num_classes, self.name)
        names = read_cifar_class_names(folder, self.fine, self.name)
        if names is not None and len(names) != self.num_classes:
            names = None  # a meta file from some other variant; keep the official names
        return self._dataset(images, labels, names)


# ------------------------------------------------------------------------------------------ digits


@dataclass(frozen=True)
class DigitsSource(Source):
    """UCI handwritten digits, bundled with scikit-learn: nothing to search for or download."""

    def places(self, root: str | Path | None = None) -> list[Place]:
        return []

    def wanted(self, split: str) -> str:
        return "scikit-learn's bundled copy"

    def available(self, root: str | Path | None = None) -> bool:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return False
        return True

    def load(self, split: str, root: str | Path | None = None) -> ArrayDataset:
        _check_split(split)
        images, labels = read_digits(split)
        return self._dataset(images, labels)

    def info(self) -> str:
        try:
            import sklearn
        except ImportError:
            where = "scikit-learn is not installed: pip install 'mentor[digits]'"
        else:
            sizes = {s: len(read_digits(s)[1]) for s in SPLITS}
            where = (f"bundled with scikit-learn {sklearn.__version__}: {sizes['train']} train / "
                     f"{sizes['test']} test images (mentor's fixed stratified split, seed "
                     f"{DIGITS_SPLIT_SEED}; sklearn has no official test split)")
        return f"{self.name}: {self.title}, {self.num_classes} classes, 1x8x8 images\n  {where}"


# -------------------------------------------------------------------------------------- the table

DATASETS: Registry[Source] = Registry("dataset")

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# SHA-256 of the official files, as published in TensorFlow Datasets' url_checksums (fashion_mnist,
# mnist, and Keras' cifar loaders for the python tarballs). The ossci-datasets MNIST mirror serves the
# same bytes as the original (torchvision checks one MD5 list against both). Debian's
# dataset-fashion-mnist files are re-compressed (no file name in the gzip header, different MD5), so
# their hashes do not match these; they are only searched locally, never verified.
_FASHION_SHA = ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")
_MNIST_SHA = ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
              "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
              "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
              "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")

_CIFAR100_CLASSES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange "
    "orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit "
    "raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
    "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip "
    "turtle wardrobe whale willow_tree wolf woman worm".split()
)


def _register(source: Source) -> None:
    DATASETS.register(source.name)(source)


_register(IdxSource(
    "fashion_mnist", "Fashion-MNIST (Xiao et al., 2017)", (1, 28, 28),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
     "Ankle boot"),
    # Measured on the 60,000 training images (pixel / 255, population std over all pixels).
    mean=(0.2860,), std=(0.3530,),
    downloads=tuple(Download(_FASHION_URL + f, f, s) for f, s in zip(_IDX_FILES, _FASHION_SHA)),
    system_dirs=("/usr/share/datasets/fashion-mnist",), apt_package="dataset-fashion-mnist",
))
_register(IdxSource(
    "mnist", "MNIST handwritten digits (LeCun et al., 1998)", (1, 28, 28),
    tuple(str(i) for i in range(10)), mean=(0.1307,), std=(0.3081,),
    downloads=tuple(Download(_MNIST_URL + f, f, s) for f, s in zip(_IDX_FILES, _MNIST_SHA)),
))
_register(CifarSource(
    "cifar10", "CIFAR-10 (Krizhevsky, 2009)", (3, 32, 32),
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    downloads=(Download(_CIFAR_URL + "cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),),
    folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz", fine=False,
))
_register(CifarSource(
    "cifar100", "CIFAR-100, fine labels (Krizhevsky, 2009)", (3, 32, 32), _CIFAR100_CLASSES,
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    downloads=(Download(_CIFAR_URL + "cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),),
    folder="cifar-100-python", archive="cifar-100-python.tar.gz", fine=True,
))
_register(DigitsSource(
    "digits", "UCI handwritten digits (Alpaydin & Kaynak, 1998), 8x8", (1, 8, 8),
    tuple(str(i) for i in range(10)),
    # Measured on mentor's fixed train split after scaling 0..16 to 0..255 (pixel / 255).
    mean=(0.3056,), std=(0.3765,),
))


# ------------------------------------------------------------------------------------- public API


def get_source(name: str) -> Source:
    """The registered ``Source`` for ``name`` (DataError with near-match suggestions when unknown)."""
    try:
        return DATASETS.get(name)
    except KeyError as e:
        raise DataError(str(e.args[0])) from None


def list_datasets(pattern: str = "*") -> list[str]:
    """Names ``load_dataset`` accepts (optionally filtered by a glob)."""
    return DATASETS.names(pattern)


def load_dataset(name: str, split: str = "train", root: str | Path | None = None) -> ArrayDataset:
    """A whole split of a named dataset as uint8 tensors; ``root``, when given, replaces the search path."""
    return get_source(name).load(split, root)


def dataset_info(name: str) -> str:
    """What ``mentor data info NAME`` prints: where each split was found (files, sizes, counts) or where
    it was looked for, and the official download sources."""
    return get_source(name).info()
