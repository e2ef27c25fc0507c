"""Domain sets with a real distribution shift, for domain generalisation and adaptation.

* ``rotated_fmnist``: DomainBed's RotatedMNIST construction (Gulrajani & Lopez-Paz, "In Search of Lost
  Domain Generalization", ICLR 2021) applied to Fashion-MNIST: six domains rotated by 0..75 degrees.
* ``digits_domains``: handwritten digits (UCI optdigits, Alpaydin & Kaynak 1998) against digits printed
  in four Debian font families, rendered through UCI's own preprocessing so that only the writing
  differs: a 32x32 binary bitmap whose 4x4 blocks are counted into an 8x8 image.
* ``domain_folder`` / ``domain_list``: users' PACS, Office-Home, VLCS or DomainNet copies, as
  ``root/<domain>/<class>/<images>`` folders or as ``path label`` list files, read into memory.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mentor.data.domains import DomainSet, register_domains
from mentor.data.errors import DataError
from mentor.data.folders import (
    ImageList,
    check_domain_layout,
    find_domain_lists,
    image_folder_domains,
    layout_error,
    read_image_list,
)
from mentor.data.readers import ArrayDataset, read_digits
from mentor.data.sources import get_source
from mentor.registry import suggest

# ------------------------------------------------------------------------------------- rotation

# DomainBed's RotatedMNIST environments, in degrees counter-clockwise.
ROTATED_ANGLES = (0, 15, 30, 45, 60, 75)
_ROTATE_CHUNK = 8192  # images per grid_sample call: bounds the sampling grid's memory (~50 MB at 28x28)


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Images [N, C, H, W] rotated ``degrees`` counter-clockwise about the image centre.

    Bilinear interpolation, zero fill outside the image, same size out as in: what DomainBed gets from
    torchvision's ``rotate(img, angle, interpolation=BILINEAR, fill=0)`` on a PIL image. uint8 input
    comes back as uint8 (rounded); floating input keeps its dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if len(images) == 0 or degrees % 360 == 0:
        return images.clone()
    theta = _rotation_theta(degrees, *images.shape[-2:]).to(images.device)
    work = images.float() if images.dtype == torch.uint8 else images
    out = torch.cat([_sample(chunk, theta) for chunk in work.split(_ROTATE_CHUNK)])
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(images.dtype)


def _rotation_theta(degrees: float, height: int, width: int) -> torch.Tensor:
    """The 2x3 ``affine_grid`` matrix mapping output positions to the input positions they sample.

    With ``align_corners=False`` the normalised coordinates -1 and 1 are the image's outer pixel edges,
    so 0 is the centre of the pixel-centre grid (pixel (H-1)/2, (W-1)/2) and one unit is W/2 (or H/2)
    pixels; the aspect factors below turn a rotation in pixels into these units. On screen (y pointing
    down) a counter-clockwise rotation of the picture samples the input at (c x - s y, s x + c y).
    """
    rad = math.radians(degrees)
    c, s = math.cos(rad), math.sin(rad)
    # cos(90°) is 6e-17, not 0; snapping keeps quarter turns exact permutations of the pixels.
    c, s = (round(v) if abs(v - round(v)) < 1e-12 else v for v in (c, s))
    return torch.tensor([[c, -s * height / width, 0.0], [s * width / height, c, 0.0]], dtype=torch.float64)


def _sample(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(images.dtype).expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DataError(f"limit must be a positive number of images per domain or None, got {limit!r}")
    return limit


@register_domains("rotated_fmnist")
def rotated_fmnist(root: str | None = None, seed: int = 0, limit: int | None = None) -> DomainSet:
    """Rotated Fashion-MNIST: DomainBed's RotatedMNIST (Gulrajani & Lopez-Paz, ICLR 2021) on Fashion-MNIST.

    The official train and test images (70,000) are concatenated, shuffled by a permutation seeded with
    ``seed``, and dealt into six environments by position (environment i gets images i, i+6, ...), and
    environment i is rotated by ``ROTATED_ANGLES[i]`` degrees: domains "0", "15", ..., "75" of 11,666 or
    11,667 images each. ``root`` is where the Fashion-MNIST files are (default: the usual search path);
    ``limit`` keeps the first ``limit`` images of every domain.
    """
    limit = _check_limit(limit)
    source = get_source("fashion_mnist")
    train, test = source.load("train", root), source.load("test", root)
    images = torch.cat([train.images, test.images])
    labels = torch.cat([train.labels, test.labels])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    domains = {}
    for i, angle in enumerate(ROTATED_ANGLES):
        part = slice(i, None, len(ROTATED_ANGLES))
        imgs, labs = images[part][:limit], labels[part][:limit]
        domains[str(angle)] = ArrayDataset(rotate_images(imgs, angle).contiguous(), labs.clone(),
                                           source.num_classes, f"rotated_fmnist/{angle}", list(source.classes),
                                           source.mean, source.std)
    return DomainSet("rotated_fmnist", domains)


# ------------------------------------------------------------------------------ printed digits
#
# UCI optdigits (Alpaydin & Kaynak, 1998) was made with NIST's preprocessing: each handwritten digit was
# scanned, binarised and size-normalised into a 32x32 bitmap (it always spans the box's full height:
# every one of sklearn's 1,797 images has ink in its top and bottom block rows, with the width following
# the digit's own proportions), and the bitmap's 4x4 blocks were counted into an 8x8 image of 0..16.
# A printed digit here goes through the same steps, so the domains differ in how digits are drawn, not
# in resolution, value range or framing. Each image draws a style (serif, sans, mono), one of that
# style's faces, then one value from each range below, all uniformly and independently (integer ranges
# include both ends):

RENDER_SIZE_PX = (20, 64)
"""Font size (pixels per em) the glyph is rasterised at before size normalisation: small sizes give
the coarse, blocky edges of a low-resolution scan, large ones clean outlines."""
STROKE_EM = (0.0, 0.05)
"""Extra stroke width (Pillow's ``stroke_width``) as a fraction of the font size: from the font's own
weight up to a heavy pen (rounded to whole pixels at the render size)."""
ROTATION_DEG = (-10.0, 10.0)
"""Rotation (counter-clockwise, degrees) applied to the rendered glyph: the slant of a hand-placed form."""
HEIGHT_PX = (28, 32)
"""Height of the digit's ink in the 32x32 box after size normalisation (NIST scaled digits to fill the
box height; the width follows the glyph's aspect ratio, shrunk when it would exceed 32)."""
OFFSET_PX = (-2, 2)
"""Shift of the digit from the box centre, per axis, in box pixels; clipped so the ink stays inside."""

BITMAP_PX = 32  # UCI's bitmap size
BLOCK_PX = 4  # UCI's counting block: 32 / 4 = 8x8 counts of 0..16
INK_THRESHOLD = 128  # binarisation level on 0..255 grey, for the scan and after resampling
FONT_DIRS: tuple[str, ...] = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
"""Where font files are looked for (recursively), in order; no fontconfig needed."""
FONT_EXTENSIONS = (".ttf", ".otf", ".t1", ".pfb")  # preferred first when a face ships in several formats
FONT_STYLES = ("serif", "sans", "mono")


@dataclass(frozen=True)
class FontFamily:
    """A Debian font package family: per style, the face files (regular first, then bold/italic variants).

    ``faces`` names files without extension; a style's regular face is required, the variants are used
    when present (DejaVu's italics come from fonts-dejavu-extra).
    """

    packages: tuple[str, ...]
    faces: dict[str, tuple[str, ...]]


def _faces(*stems: str, variants: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {style: tuple(stem.format(v) for v in variants) for style, stem in zip(FONT_STYLES, stems)}


FONT_FAMILIES: dict[str, FontFamily] = {
    "dejavu": FontFamily(("fonts-dejavu-core", "fonts-dejavu-extra"), {
        "serif": ("DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic"),
        "sans": ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique"),
        "mono": ("DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique"),
    }),
    "liberation": FontFamily(("fonts-liberation",), _faces(
        "LiberationSerif-{}", "LiberationSans-{}", "LiberationMono-{}",
        variants=("Regular", "Bold", "Italic", "BoldItalic"))),
    "freefont": FontFamily(("fonts-freefont-ttf",), {
        "serif": ("FreeSerif", "FreeSerifBold", "FreeSerifItalic", "FreeSerifBoldItalic"),
        "sans": ("FreeSans", "FreeSansBold", "FreeSansOblique", "FreeSansBoldOblique"),
        "mono": ("FreeMono", "FreeMonoBold", "FreeMonoOblique", "FreeMonoBoldOblique"),
    }),
    "urw": FontFamily(("fonts-urw-base35",), _faces(
        "NimbusRoman-{}", "NimbusSans-{}", "NimbusMonoPS-{}", variants=("Regular", "Bold", "Italic", "BoldItalic"))),
}
PRINTED_DOMAINS = tuple(FONT_FAMILIES)


def _pillow():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise DataError("rendering the printed digits needs Pillow, which is not installed; install the "
                        "`digits` extra: pip install 'mentor[digits]'") from None
    return Image, ImageDraw, ImageFont


def _font_index() -> dict[str, dict[str, Path]]:
    """File stem -> {extension: path} for every font file under ``FONT_DIRS`` (first found wins)."""
    index: dict[str, dict[str, Path]] = {}
    for d in FONT_DIRS:
        base = Path(d).expanduser()
        if not base.is_dir():
            continue
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                stem, ext = os.path.splitext(name)
                if ext.lower() in FONT_EXTENSIONS:
                    index.setdefault(stem, {}).setdefault(ext.lower(), Path(dirpath) / name)
    return index


def _pick(index: dict[str, dict[str, Path]], stem: str) -> Path | None:
    found = index.get(stem, {})
    return next((found[e] for e in FONT_EXTENSIONS if e in found), None)


def find_font_faces(family: str) -> dict[str, list[Path]]:
    """The face files of one family, per style (regular first); a ``DataError`` naming the package to
    install when a style's regular face is missing."""
    return _find_faces([family], _font_index())[family]


def _find_faces(families: list[str], index: dict[str, dict[str, Path]]) -> dict[str, dict[str, list[Path]]]:
    found: dict[str, dict[str, list[Path]]] = {}
    missing: dict[str, list[str]] = {}
    for family in families:
        spec = FONT_FAMILIES[family]
        found[family] = {style: [p for p in (_pick(index, s) for s in stems) if p is not None]
                         for style, stems in spec.faces.items()}
        lacking = [stems[0] for stems in spec.faces.values() if _pick(index, stems[0]) is None]
        if lacking:
            missing[family] = lacking
    if missing:
        raise _missing_fonts_error(missing)
    return found


def _missing_fonts_error(missing: dict[str, list[str]]) -> DataError:
    """One paragraph: which families lack which faces, where they were looked for, what to install."""
    what = " and ".join(f"{f!r} (no {', '.join(stems)})" for f, stems in missing.items())
    packages = " ".join(FONT_FAMILIES[f].packages[0] for f in missing)
    plural = len(missing) > 1
    return DataError(f"digits_domains renders its printed domains from Debian's font packages, but the font "
                     f"famil{'ies' if plural else 'y'} {what} {'were' if plural else 'was'} not found under "
                     f"{', '.join(FONT_DIRS)}. Install {'them' if plural else 'it'} with `sudo apt-get install "
                     f"{packages}`, or run `make data`, which installs every font package the printed domains "
                     f"need.")


@functools.lru_cache(maxsize=1024)
def _font(path: str, size: int):
    _, _, ImageFont = _pillow()
    try:
        return ImageFont.truetype(path, size)
    except OSError as e:
        raise DataError(f"{path} is not a font Pillow can read ({e}); reinstall its package") from None


@dataclass(frozen=True)
class DigitStyle:
    """How one printed digit is drawn: a face and a draw from each of the module's ranges."""

    font: str  # font file
    size: int  # RENDER_SIZE_PX
    stroke: int  # pixels at that size (STROKE_EM x size, rounded)
    angle: float  # ROTATION_DEG
    height: int  # HEIGHT_PX
    dx: int  # OFFSET_PX, horizontal (positive: right)
    dy: int  # OFFSET_PX, vertical (positive: down)


def draw_styles(faces: dict[str, list[Path]], n: int, rng: np.random.Generator) -> list[DigitStyle]:
    """``n`` styles: a style (serif/sans/mono) uniformly, one of its faces uniformly, then every range."""
    styles = []
    for _ in range(n):
        options = faces[FONT_STYLES[rng.integers(len(FONT_STYLES))]]
        font = str(options[rng.integers(len(options))])
        size = int(rng.integers(RENDER_SIZE_PX[0], RENDER_SIZE_PX[1] + 1))
        stroke = int(round(rng.uniform(*STROKE_EM) * size))
        angle = float(rng.uniform(*ROTATION_DEG))
        height = int(rng.integers(HEIGHT_PX[0], HEIGHT_PX[1] + 1))
        dx, dy = (int(v) for v in rng.integers(OFFSET_PX[0], OFFSET_PX[1] + 1, size=2))
        styles.append(DigitStyle(font, size, stroke, angle, height, dx, dy))
    return styles


def render_bitmap(digit: int, style: DigitStyle) -> np.ndarray:
    """The 32x32 binary bitmap (bool, True = ink) of ``digit`` drawn in ``style``: NIST's steps on a
    printed glyph (rasterise, binarise, crop to the ink, size-normalise, place in the box)."""
    Image, ImageDraw, _ = _pillow()
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    half = style.size + 2 * style.stroke  # room for the glyph at any rotation about the canvas centre
    canvas = Image.new("L", (2 * half, 2 * half), 0)
    ImageDraw.Draw(canvas).text((half, half), str(digit), fill=255, font=_font(style.font, style.size),
                                anchor="mm", stroke_width=style.stroke, stroke_fill=255)
    ink = np.asarray(canvas.rotate(style.angle, resample=bilinear)) >= INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        raise DataError(f"{style.font} draws no ink for the digit {digit} at size {style.size}; "
                        f"the font file is damaged, reinstall its package")
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = min(style.height / h, BITMAP_PX / w)
    th, tw = max(1, min(BITMAP_PX, round(h * scale))), max(1, min(BITMAP_PX, round(w * scale)))
    glyph = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((tw, th), bilinear)) >= INK_THRESHOLD
    top = int(np.clip((BITMAP_PX - th) // 2 + style.dy, 0, BITMAP_PX - th))
    left = int(np.clip((BITMAP_PX - tw) // 2 + style.dx, 0, BITMAP_PX - tw))
    bitmap = np.zeros((BITMAP_PX, BITMAP_PX), dtype=bool)
    bitmap[top:top + th, left:left + tw] = glyph
    return bitmap


def block_counts(bitmap: np.ndarray) -> np.ndarray:
    """UCI's 8x8 feature image: the number of ink pixels (0..16) in each 4x4 block of a 32x32 bitmap."""
    n = BITMAP_PX // BLOCK_PX
    return bitmap.reshape(n, BLOCK_PX, n, BLOCK_PX).sum(axis=(1, 3)).astype(np.int64)


def counts_to_uint8(counts: np.ndarray) -> np.ndarray:
    """0..16 counts on the 0..255 scale, rounded exactly as ``read_digits`` scales the UCI data."""
    return np.rint(np.asarray(counts, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)


def render_digit(digit: int, style: DigitStyle) -> np.ndarray:
    """One printed digit as UCI stores a handwritten one: uint8 [8, 8] on the 0..255 scale."""
    return counts_to_uint8(block_counts(render_bitmap(digit, style)))


def _family_seed(seed: int, family: str) -> np.random.Generator:
    # Seeded by the family's name, not its position, so adding a family leaves the others unchanged.
    return np.random.default_rng([seed, zlib.crc32(family.encode())])


def render_printed_domain(family: str, faces: dict[str, list[Path]], seed: int, n: int,
                          limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [m, 1, 8, 8], int64 [m]) digits printed in one family; labels cycle 0..9 (class-balanced in
    every prefix of whole cycles). The styles of all ``n`` are drawn first, so ``limit`` (render only the
    first ``limit``) gives a prefix of the full domain."""
    styles = draw_styles(faces, n, _family_seed(seed, family))
    m = n if limit is None else min(n, limit)
    labels = np.arange(m) % 10
    images = np.stack([render_digit(int(d), s) for d, s in zip(labels, styles)])
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


@register_domains("digits_domains")
def digits_domains(root: str | None = None, seed: int = 0, per_domain: int = 1800,
                   limit: int | None = None) -> DomainSet:
    """Handwritten against printed digits: "handwritten" (UCI optdigits, Alpaydin & Kaynak 1998: all 1,797
    images of scikit-learn's copy, mentor's train then test split) and one domain per font family
    ("dejavu", "liberation", "freefont", "urw") of ``per_domain`` rendered digits, class-balanced.

    All domains are 1x8x8 block counts of a 32x32 bitmap on the same 0..255 scale, with the digits
    source's mean/std. Rendering is deterministic given ``seed`` (and the installed fonts and FreeType).
    ``limit`` keeps the first ``limit`` images of every domain. ``root`` is unused (nothing is read from
    files but the fonts).

    Rendering the four printed domains takes a few seconds, so nothing is cached. GNU FreeFont's faces
    descend from URW's Nimbus fonts, so "freefont" and "urw" differ little: with 1,800 images each their
    class-conditional pixel means are within sampling noise of each other, while every other pair of
    domains differs clearly. Hold both out together when a test domain must be unseen.
    """
    limit = _check_limit(limit)
    if not isinstance(per_domain, int) or per_domain < 1:
        raise DataError(f"per_domain must be a positive number of images, got {per_domain!r}")
    _pillow()
    faces = _find_faces(list(PRINTED_DOMAINS), _font_index())
    source = get_source("digits")
    parts = [read_digits("train"), read_digits("test")]
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    domains = {"handwritten": (images[:limit], labels[:limit])}
    for family in PRINTED_DOMAINS:
        domains[family] = render_printed_domain(family, faces[family], seed, per_domain, limit)
    return DomainSet("digits_domains", {
        name: ArrayDataset(imgs.contiguous(), labs.clone(), source.num_classes, f"digits_domains/{name}",
                           list(source.classes), source.mean, source.std)
        for name, (imgs, labs) in domains.items()})


# --------------------------------------------------------------------------- users' domain trees


def _mode(channels: int) -> str:
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return "L" if channels == 1 else "RGB"


def _pooled_stats(datasets: list[ArrayDataset]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of pixel / 255 over every image of every dataset."""
    channels = datasets[0].images.shape[1]
    total, squares, count = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0
    for ds in datasets:
        x = ds.images.double() / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.numel() // channels
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _with_pooled_stats(name: str, domains: dict[str, ArrayDataset]) -> DomainSet:
    mean, std = _pooled_stats(list(domains.values()))
    return DomainSet(name, {d: replace(ds, mean=mean, std=std) for d, ds in domains.items()})


def _chosen(root: Path, available: list[str], domains: list[str] | None) -> list[str]:
    chosen = available if domains is None else [str(d) for d in domains]
    for d in chosen:
        if d not in available:
            raise DataError(f"{root} has no domain {d!r}.{suggest(d, available)} Found: {', '.join(available)}")
    return chosen


def _check_root(root: str | None, kind: str, what: str, empty_classes: str = "error") -> None:
    """A user's domain tree exists and passes the layout checker (all problems in one message)."""
    if root is None:
        raise DataError(f"domain_{kind} needs data.root: {what}")
    problems = check_domain_layout(root, kind, empty_classes)
    if problems:
        raise layout_error(root, kind, problems)


@register_domains("domain_folder")
def domain_folder(root: str | None, image_size: int = 32, channels: int = 3,
                  domains: list[str] | None = None, empty_classes: str = "error") -> DomainSet:
    """A user's multi-domain image tree ``root/<domain>/<class>/<images>`` (DomainBed's layout for PACS,
    VLCS, Office-Home, DomainNet; Gulrajani & Lopez-Paz, ICLR 2021), every image read into memory at
    ``image_size`` with ``channels`` channels.

    Classes are the sorted class folders over all domains, so an index means the same class in every
    domain; ``domains`` picks some (default: all, sorted). mean/std are measured over all the domains
    loaded. Any layout problem (see ``check_domain_layout``) stops the load with all of them listed; a
    class folder without images is one, unless ``empty_classes="skip"`` leaves that class out of every
    domain (with a warning naming the folders).
    """
    _check_root(root, "folder", "the folder holding <domain>/<class>/<images>", empty_classes)
    mode = _mode(channels)
    folders = image_folder_domains(root, image_size, domains, mode, empty_classes)
    return _with_pooled_stats(Path(root).name, {d: f.to_array_dataset(d) for d, f in folders.items()})


@register_domains("domain_list")
def domain_list(root: str | None, image_size: int = 32, channels: int = 3,
                domains: list[str] | None = None) -> DomainSet:
    """A user's multi-domain data described by list files (DomainNet and Office style): per domain
    ``root/<domain>.txt``, or ``root/<domain>_train.txt`` and ``root/<domain>_test.txt`` (the train lines
    first), each line ``relative/path/to/image.jpg <int label>`` with the path relative to ``root``.
    Lists in ``root/image_list/`` are found too.

    A domain holds every image its lists name, read into memory at ``image_size`` with ``channels``
    channels; classes are the labels 0..K-1 (named "0".."K-1"); mean/std are measured over all the
    domains loaded. Any layout problem (see ``check_domain_layout``) stops the load with all of them listed.
    """
    _check_root(root, "list", "the folder the list files and image paths are relative to")
    mode = _mode(channels)
    base = Path(root)
    lists = find_domain_lists(base)
    entries = {d: [e for path in files for e in read_image_list(path)[0]] for d, files in lists.items()}
    num_classes = 1 + max(label for es in entries.values() for _, label in es)
    classes = [str(i) for i in range(num_classes)]
    loaded = {d: ImageList(base, entries[d], classes, image_size, mode).to_array_dataset(d)
              for d in _chosen(base, list(lists), domains)}
    return _with_pooled_stats(base.name, loaded)
