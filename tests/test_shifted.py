"""Shifted domain sets: rotated Fashion-MNIST, handwritten vs printed digits, users' domain folders and lists."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fmnist

from mentor.data import shifted
from mentor.data.domains import DOMAIN_SETS
from mentor.data.errors import DataError
from mentor.data.folders import check_domain_layout, find_domain_lists, read_image_list
from mentor.data.shifted import (
    DigitStyle,
    block_counts,
    counts_to_uint8,
    digits_domains,
    domain_folder,
    domain_list,
    render_bitmap,
    render_digit,
    rotate_images,
    rotated_fmnist,
)
from mentor.data.sources import get_source, load_dataset

ndimage = pytest.importorskip("scipy.ndimage")


def test_the_four_sets_are_registered():
    for name in ("rotated_fmnist", "digits_domains", "domain_folder", "domain_list"):
        assert name in DOMAIN_SETS


# ------------------------------------------------------------------------------------- rotation


def test_quarter_turns_are_exact_pixel_permutations():
    g = torch.Generator().manual_seed(0)
    for size in (7, 8):  # odd and even: the centre on a pixel and between pixels
        x = torch.randint(0, 256, (3, 2, size, size), generator=g, dtype=torch.uint8)
        for k in (1, 2, 3):
            assert torch.equal(rotate_images(x, 90 * k), torch.rot90(x, k, dims=(-2, -1)))
        xf = x.double()
        torch.testing.assert_close(rotate_images(xf, 90), torch.rot90(xf, 1, dims=(-2, -1)), atol=1e-9, rtol=0)
    # A half turn of a non-square image: both axes flipped.
    y = torch.rand(2, 1, 6, 10, dtype=torch.float64, generator=g)
    torch.testing.assert_close(rotate_images(y, 180), y.flip(-1).flip(-2), atol=1e-9, rtol=0)


def test_positive_angles_turn_counter_clockwise_on_screen():
    x = torch.zeros(1, 1, 7, 7, dtype=torch.uint8)
    x[0, 0, 3, 5] = 200  # two pixels right of the centre (row 3, column 3)
    out = rotate_images(x, 90)
    assert out[0, 0, 1, 3] == 200 and int(out.sum()) == 200  # now two pixels above it


def _bilinear_rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Output pixel (i, j) samples the input at the centre-relative point rotated back by ``degrees``
    (y pointing down), bilinearly, with zeros outside the image."""
    h, w = img.shape
    ci, cj = (h - 1) / 2, (w - 1) / 2
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))

    def pixel(i, j):
        return img[i, j] if 0 <= i < h and 0 <= j < w else 0.0

    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            u, v = j - cj, i - ci
            x, y = cj + c * u - s * v, ci + s * u + c * v
            j0, i0 = int(np.floor(x)), int(np.floor(y))
            fx, fy = x - j0, y - i0
            out[i, j] = ((1 - fy) * ((1 - fx) * pixel(i0, j0) + fx * pixel(i0, j0 + 1))
                         + fy * ((1 - fx) * pixel(i0 + 1, j0) + fx * pixel(i0 + 1, j0 + 1)))
    return out


@pytest.mark.parametrize("degrees", [45, 30, -20, 75])
def test_rotation_matches_scipy_and_a_hand_written_bilinear_loop(degrees):
    img = torch.rand(1, 1, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(degrees % 7))
    ours = rotate_images(img, degrees)[0, 0].numpy()
    # grid-constant: zeros outside, interpolated across the border (scipy's "constant" stops at the edge).
    ref = ndimage.rotate(img[0, 0].numpy(), degrees, order=1, reshape=False, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    np.testing.assert_allclose(ours, _bilinear_rotate(img[0, 0].numpy(), degrees), atol=1e-9)
    wide = torch.rand(1, 1, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = ndimage.rotate(wide[0, 0].numpy(), degrees, order=1, reshape=False, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(rotate_images(wide, degrees)[0, 0].numpy(), ref, atol=1e-9)


def test_uint8_rotation_rounds_the_float_result():
    x = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ref = np.stack([ndimage.rotate(im[0].double().numpy(), 30, order=1, reshape=False, mode="grid-constant")
                    for im in x])
    # Rounded from float32 sampling: within half a level, plus float32 error on a 0..255 scale.
    assert np.abs(rotate_images(x, 30)[:, 0].numpy().astype(float) - ref).max() <= 0.5 + 1e-3


# ------------------------------------------------------------------------------ rotated Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_all():
    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    return torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels])


@needs_fmnist
def test_rotated_fmnist_is_domainbeds_construction(fmnist_all):
    images, labels = fmnist_all
    assert len(labels) == 70_000
    ds = rotated_fmnist(seed=3, limit=30)
    assert ds.names() == ["0", "15", "30", "45", "60", "75"]
    fm = get_source("fashion_mnist")
    # DomainBed: one seeded shuffle of train + test, then environment i takes positions i, i + 6, ...
    perm = torch.randperm(70_000, generator=torch.Generator().manual_seed(3))
    for i, name in enumerate(ds.names()):
        d = ds.domains[name]
        idx = perm[i::6][:30]
        assert d.images.shape == (30, 1, 28, 28) and d.images.dtype == torch.uint8
        assert torch.equal(d.labels, labels[idx])
        assert d.classes == list(fm.classes) and d.mean == fm.mean and d.std == fm.std
        ref = np.stack([ndimage.rotate(im[0].double().numpy(), int(name), order=1, reshape=False,
                                       mode="grid-constant") for im in images[idx]])
        # uint8 results are rounded from float32 sampling: within half a level (+ float32 error) of scipy.
        assert np.abs(d.images[:, 0].numpy().astype(float) - ref).max() <= 0.5 + 1e-3
    assert torch.equal(ds.domains["0"].images, images[perm[0::6][:30]])


@needs_fmnist
def test_rotated_fmnist_seed_and_limit():
    a, b = rotated_fmnist(seed=0, limit=10), rotated_fmnist(seed=1, limit=10)
    assert not torch.equal(a.domains["0"].labels, b.domains["0"].labels)
    assert torch.equal(rotated_fmnist(seed=0, limit=10).domains["45"].images, a.domains["45"].images)
    with pytest.raises(DataError, match="limit"):
        rotated_fmnist(limit=0)


# ------------------------------------------------------------------------------- printed digits


def _real_faces(family="dejavu"):
    pytest.importorskip("PIL")
    try:
        return shifted.find_font_faces(family)
    except DataError as e:
        pytest.skip(f"fonts not installed (make data): {e}")


def _uci_counts(bitmap: np.ndarray) -> np.ndarray:
    """Ink pixels per 4x4 block, counted one block at a time."""
    out = np.zeros((8, 8), dtype=np.int64)
    for bi in range(8):
        for bj in range(8):
            out[bi, bj] = int(sum(bitmap[4 * bi + r, 4 * bj + c] for r in range(4) for c in range(4)))
    return out


def test_the_count_scale_is_the_one_read_digits_uses():
    from sklearn.datasets import load_digits

    from mentor.data.readers import read_digits

    # read_digits' images are a permutation of sklearn's; pair every raw count with its stored value.
    raw = np.asarray(load_digits().images)
    stored = torch.cat([read_digits("train")[0], read_digits("test")[0]])[:, 0].numpy()
    pairs = {(int(r), int(s)) for r, s in zip(np.sort(raw.ravel()), np.sort(stored.ravel()))}
    assert sorted(r for r, _ in pairs) == list(range(17))  # one stored value per count
    for count, value in pairs:
        assert counts_to_uint8(np.array([count]))[0] == value


def test_block_counts_of_a_rendered_digit_match_a_hand_count():
    faces = _real_faces()
    style = DigitStyle(str(faces["sans"][0]), size=40, stroke=0, angle=0.0, height=32, dx=0, dy=0)
    bitmap = render_bitmap(1, style)
    assert bitmap.shape == (32, 32) and bitmap.dtype == bool
    expected = _uci_counts(bitmap)
    assert np.array_equal(block_counts(bitmap), expected)
    assert np.array_equal(render_digit(1, style), np.floor(expected * 255 / 16 + 0.5).astype(np.uint8))
    # Size-normalised to the full box height and centred (the spare columns split evenly, +-1).
    rows, cols = np.flatnonzero(bitmap.any(1)), np.flatnonzero(bitmap.any(0))
    assert rows[0] == 0 and rows[-1] == 31
    assert abs(cols[0] - (31 - cols[-1])) <= 1
    # A "1" is a narrow upright stroke: most of its ink sits in the middle half of the columns.
    assert bitmap[:, 8:24].sum() > 0.8 * bitmap.sum()


def test_height_offset_and_clipping_follow_the_style():
    faces = _real_faces()
    base = dict(font=str(faces["serif"][0]), size=48, stroke=1)
    shifted_down = render_bitmap(7, DigitStyle(**base, angle=0.0, height=28, dx=0, dy=2))
    rows = np.flatnonzero(shifted_down.any(1))
    assert (rows[0], rows[-1]) == ((32 - 28) // 2 + 2, 31)
    # A full-height digit has no room to move vertically: the offset is clipped, the ink stays inside.
    clipped = render_bitmap(7, DigitStyle(**base, angle=0.0, height=32, dx=2, dy=2))
    assert np.flatnonzero(clipped.any(1))[[0, -1]].tolist() == [0, 31]
    # 10 degrees counter-clockwise lifts the right end of the bar of a "7" relative to its left end.
    tilted = render_bitmap(7, DigitStyle(**base, height=28, dx=0, dy=0, angle=10.0))
    top = np.flatnonzero(tilted.any(1))[0]
    assert tilted[top, 16:].sum() > tilted[top, :16].sum()


@pytest.fixture(scope="module")
def small_digits():
    _real_faces()
    return digits_domains(per_domain=300)


def test_digits_domains_shapes_values_balance(small_digits):
    ds = small_digits
    assert ds.names() == ["handwritten", "dejavu", "liberation", "freefont", "urw"]
    allowed = {int(np.floor(k * 255 / 16 + 0.5)) for k in range(17)}
    digits = get_source("digits")
    for name, d in ds.domains.items():
        assert d.images.dtype == torch.uint8 and d.image_shape == (1, 8, 8)
        assert set(torch.unique(d.images).tolist()) <= allowed
        assert d.mean == digits.mean and d.std == digits.std and d.classes == [str(i) for i in range(10)]
        if name != "handwritten":
            assert d.labels.bincount(minlength=10).tolist() == [30] * 10
    from sklearn.datasets import load_digits

    target = np.asarray(load_digits().target)
    assert ds.domains["handwritten"].labels.bincount().tolist() == np.bincount(target).tolist()


def test_digits_domains_are_deterministic_and_limit_is_a_prefix(small_digits):
    again = digits_domains(per_domain=300, limit=40)
    other = digits_domains(per_domain=300, seed=1, limit=40)
    for name in ("handwritten", "urw"):
        assert torch.equal(again.domains[name].images, small_digits.domains[name].images[:40])
        assert torch.equal(again.domains[name].labels, small_digits.domains[name].labels[:40])
    assert not torch.equal(other.domains["urw"].images, again.domains["urw"].images)


def test_handwritten_and_printed_digits_differ(small_digits):
    """Per-pixel two-sample t statistics: a handwritten/printed pair differs far beyond sampling noise
    (two halves of one domain stay within |t| < 4, with 64 pixels tested)."""

    def max_t(a: torch.Tensor, b: torch.Tensor) -> float:
        x, y = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
        se = np.sqrt(x.var(0, ddof=1) / len(x) + y.var(0, ddof=1) / len(y)) + 1e-12
        return float(np.abs((x.mean(0) - y.mean(0)) / se).max())

    hand = small_digits.domains["handwritten"].images
    for family in ("dejavu", "liberation", "freefont", "urw"):
        printed = small_digits.domains[family].images
        assert max_t(hand, printed) > 8
        blocks = (torch.arange(len(printed)) // 10) % 2 == 0  # halves made of whole 0..9 cycles
        assert max_t(printed[blocks], printed[~blocks]) < 4
    assert max_t(hand[0::2], hand[1::2]) < 4


def test_a_missing_font_family_names_its_package(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    # Empty files under the right names: finding fonts only looks at names, and urw is left out.
    for family in ("dejavu", "liberation", "freefont"):
        for stems in shifted.FONT_FAMILIES[family].faces.values():
            (tmp_path / f"{stems[0]}.ttf").touch()
    monkeypatch.setattr(shifted, "FONT_DIRS", (str(tmp_path),))
    with pytest.raises(DataError) as e:
        digits_domains(per_domain=10)
    msg = str(e.value)
    assert "apt-get install fonts-urw-base35" in msg and "make data" in msg and "'urw'" in msg
    assert "fonts-liberation" not in msg and "\n" not in msg
    monkeypatch.setattr(shifted, "FONT_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError, match="fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-urw-base35"):
        digits_domains(per_domain=10)


# --------------------------------------------------------------------------- users' domain data


def _png(path: Path, value: int, size=(5, 3)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


@pytest.fixture
def folder_tree(tmp_path):
    """Two domains, classes cat/dog, every image one grey level."""
    pytest.importorskip("PIL")
    root = tmp_path / "PACS"
    grey = {("photo", "cat"): [10, 20], ("photo", "dog"): [30], ("sketch", "cat"): [200], ("sketch", "dog"): [250, 90]}
    for (domain, cls), values in grey.items():
        for i, v in enumerate(values):
            _png(root / domain / cls / f"{i}.png", v)
    return root, grey


def _pooled(values: list[int], pixels: int) -> tuple[float, float]:
    x = np.repeat(np.asarray(values, dtype=np.float64) / 255.0, pixels)
    return float(x.mean()), float(x.std())


def test_domain_folder_reads_every_domain(folder_tree):
    root, grey = folder_tree
    assert check_domain_layout(root, "folder") == []
    ds = domain_folder(str(root), image_size=4, channels=3)
    assert ds.names() == ["photo", "sketch"] and ds.classes == ["cat", "dog"]
    sketch = ds.domains["sketch"]
    assert sketch.images.shape == (3, 3, 4, 4) and sketch.labels.tolist() == [0, 1, 1]
    assert sketch.images[:, 0, 0, 0].tolist() == [200, 250, 90]  # cat/0, dog/0, dog/1
    mean, std = _pooled([v for vs in grey.values() for v in vs], 16)
    for d in ds.domains.values():  # one set of statistics over all domains
        assert d.mean == pytest.approx((mean,) * 3, abs=1e-9) and d.std == pytest.approx((std,) * 3, abs=1e-9)
    gray = domain_folder(str(root), image_size=2, channels=1, domains=["sketch"])
    assert gray.names() == ["sketch"] and gray.image_shape == (1, 2, 2)
    assert gray.domains["sketch"].mean == pytest.approx((_pooled([200, 250, 90], 4)[0],), abs=1e-9)
    with pytest.raises(DataError, match="Did you mean 'sketch'"):
        domain_folder(str(root), domains=["sketchy"])
    with pytest.raises(DataError, match="channels"):
        domain_folder(str(root), channels=2)


def test_folder_layout_problems_are_listed_then_raised(folder_tree, tmp_path):
    root, _ = folder_tree
    (root / "photo" / "dog" / "0.png").unlink()  # photo/dog is now empty
    _png(root / "sketch" / "zebra" / "0.png", 5)  # a class only sketch has
    (root / "art" / "cat").mkdir(parents=True)  # and a domain with one empty class
    problems = check_domain_layout(root, "folder")
    assert sorted(problems) == sorted([
        "domain art lacks 2 classes other domains have: dog, zebra",
        "domain photo lacks 1 class other domains have: zebra",
        f"domain art class cat is empty (no image files in {root / 'art' / 'cat'})",
        f"domain photo class dog is empty (no image files in {root / 'photo' / 'dog'})",
    ])
    with pytest.raises(DataError) as e:
        domain_folder(str(root))
    msg = str(e.value)
    assert "4 problems" in msg and all(p in msg for p in problems) and "Fix:" in msg
    (tmp_path / "bare").mkdir()
    assert check_domain_layout(tmp_path / "bare") == [f"{tmp_path / 'bare'} has no domain folders; expected "
                                                      f"{tmp_path / 'bare'}/<domain>/<class>/<images>"]
    assert check_domain_layout(tmp_path / "absent", "list") == [f"{tmp_path / 'absent'} is not a folder"]


@pytest.fixture
def list_tree(tmp_path):
    """DomainNet-style lists: clipart_train/clipart_test, and one whole-domain list for real."""
    pytest.importorskip("PIL")
    root = tmp_path / "domain_net"
    files = {"clipart/a/0.png": 40, "clipart/b/1 copy.png": 80, "clipart/a/2.png": 120,
             "real/a/0.png": 160, "real/b/0.png": 240}
    for rel, v in files.items():
        _png(root / rel, v)
    (root / "clipart_train.txt").write_text("clipart/a/0.png 0\nclipart/b/1 copy.png 1\n\n")
    (root / "clipart_test.txt").write_text("clipart/a/2.png 0\n")
    (root / "real.txt").write_text("# path label\nreal/b/0.png 1\nreal/a/0.png 0\n")
    return root


def test_domain_list_reads_the_lists(list_tree):
    root = list_tree
    assert check_domain_layout(root, "list") == []
    assert {d: [p.name for p in ps] for d, ps in find_domain_lists(root).items()} == {
        "clipart": ["clipart_train.txt", "clipart_test.txt"], "real": ["real.txt"]}
    ds = domain_list(str(root), image_size=3)
    assert ds.names() == ["clipart", "real"] and ds.classes == ["0", "1"]
    clip = ds.domains["clipart"]
    assert clip.labels.tolist() == [0, 1, 0] and clip.images[:, 1, 2, 2].tolist() == [40, 80, 120]
    assert ds.domains["real"].images[:, 0, 0, 0].tolist() == [240, 160]
    mean, std = _pooled([40, 80, 120, 160, 240], 9)
    assert clip.mean == pytest.approx((mean,) * 3, abs=1e-9) and clip.std == pytest.approx((std,) * 3, abs=1e-9)
    assert domain_list(str(root), image_size=3, domains=["real"]).names() == ["real"]


def test_lists_in_an_image_list_folder(list_tree):
    (list_tree / "image_list").mkdir()
    for p in list_tree.glob("*.txt"):
        p.rename(list_tree / "image_list" / p.name)
    assert domain_list(str(list_tree), image_size=2, channels=1).image_shape == (1, 2, 2)


def test_list_layout_problems_are_listed_then_raised(list_tree):
    root = list_tree
    (root / "clipart_test.txt").write_text("clipart/a/2.png 0\nno-label-here\nclipart/a/2.png zero\n"
                                           + "".join(f"missing/{i}.png 0\n" for i in range(5)))
    (root / "real.txt").write_text("real/b/0.png -1\nreal/a/0.png 0\n")
    (root / "real_train.txt").write_text("real/a/0.png 0\n")
    entries, bad = read_image_list(root / "clipart_test.txt")
    assert entries[0] == ("clipart/a/2.png", 0) and len(entries) == 6
    problems = check_domain_layout(root, "list")
    expected = [
        f"{root / 'clipart_test.txt'}: 2 lines not `relative/path <int label>`: clipart_test.txt:2, "
        f"clipart_test.txt:3",
        f"{root / 'clipart_test.txt'}: 5 listed images not found under {root}: missing/0.png, missing/1.png, "
        f"missing/2.png (+2 more)",
        f"{root / 'real.txt'}: 1 label out of range (below 0): real/b/0.png -1",
        "domain real has both real.txt and per-split lists (real_train.txt); keep one form",
        "domain real lacks 1 label other domains have: 1",
    ]
    assert sorted(problems) == sorted(expected) and bad == [expected[0]]
    with pytest.raises(DataError) as e:
        domain_list(str(root))
    assert all(p in str(e.value) for p in expected) and "labels numbering the classes 0..K-1" in str(e.value)


def test_lists_numbered_from_one_are_caught(tmp_path):
    pytest.importorskip("PIL")
    _png(tmp_path / "x.png", 1)
    (tmp_path / "art.txt").write_text("x.png 1\nx.png 2\n")
    (tmp_path / "photo.txt").write_text("x.png 2\nx.png 1\n")
    assert check_domain_layout(tmp_path, "list") == [
        "labels must number the classes 0..K-1, but no list uses 1 label 0 (lists numbered from 1 need 1 "
        "subtracted from every label)"]
    assert check_domain_layout(tmp_path / "art.txt", "list") == [f"{tmp_path / 'art.txt'} is not a folder"]
    (tmp_path / "art.txt").unlink()
    (tmp_path / "photo.txt").unlink()
    assert check_domain_layout(tmp_path, "list")[0].startswith(f"{tmp_path} has no list files")
