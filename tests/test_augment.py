"""Tests for mentor.data.augment: batched weak / strong (FixMatch RandAugment + Cutout) views.

Every op is checked against an independent computation: numpy formulas and loops written from the
PIL definitions the reference RandAugment uses, and, where Pillow is installed, PIL itself.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mentor.data import augment as A
from mentor.data.augment import (
    AUGMENTS,
    OP_RANGES,
    OPS,
    NoAugment,
    Normalize,
    StrongAugment,
    WeakAugment,
    build_augment,
)

U8 = 1.0 / 255.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def levels(shape, seed=0, low=0, high=256) -> torch.Tensor:
    """A float image batch on the uint8 grid (k / 255), like a decoded dataset."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(low, high, size=shape).astype(np.float32) / 255.0)


def one_op(name: str, x: torch.Tensor, magnitude: float, warp_fill: float = 0.5, ops=None, mags=None):
    """Apply a single chosen op (or a chosen sequence) to every image, with Cutout off."""
    b = x.shape[0]
    ops = [name] if ops is None else ops
    mags = [magnitude] if mags is None else mags
    aug = StrongAugment(num_ops=len(ops), cutout=0.0, warp_fill=warp_fill)
    params = {
        "ops": torch.tensor([[OPS.index(o) for o in ops]] * b),
        "magnitudes": torch.tensor([mags] * b, dtype=torch.float32),
        "cutout_size": torch.zeros(b),
        "cutout_center": torch.full((b, 2), 0.5),
    }
    return aug.apply(x, params)


# ----------------------------------------------------------------------------------------------
# determinism and per-image randomness


@pytest.mark.parametrize("aug", [WeakAugment(), StrongAugment(), StrongAugment(weak=WeakAugment())])
def test_same_seed_same_batch_other_seed_other_batch(aug):
    x = torch.rand(16, 3, 32, 32, generator=gen(99))
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_strong_draws_differ_per_image_and_cover_all_ops():
    aug = StrongAugment(num_ops=2)
    batch = 7000
    p = aug.sample_params(batch, gen(3))
    assert p["ops"].shape == (batch, 2) and p["magnitudes"].shape == (batch, 2)
    counts = torch.bincount(p["ops"].flatten(), minlength=len(OPS))
    # 14000 draws, uniform over 14 ops: 1000 each, sd ~30.
    assert counts.min() > 850 and counts.max() < 1150, counts
    # The two slots are drawn independently (with replacement): both slots equal ~1/14 of the time.
    same = (p["ops"][:, 0] == p["ops"][:, 1]).float().mean()
    assert abs(same - 1 / 14) < 0.02
    for k, name in enumerate(OPS):
        lo, hi = OP_RANGES[name]
        m = p["magnitudes"][p["ops"] == k]
        assert m.min() >= lo and m.max() <= hi
        if hi > lo:  # uniform: the drawn values reach both ends of the range
            assert m.min() < lo + 0.02 * (hi - lo) and m.max() > hi - 0.02 * (hi - lo)
            assert abs(m.mean() - (lo + hi) / 2) < 0.05 * (hi - lo)
    size = p["cutout_size"]
    assert size.min() >= 0 and size.max() <= 0.5 and abs(size.mean() - 0.25) < 0.01


def test_magnitude_ranges_match_fixmatch_table():
    # FixMatch (Sohn et al., 2020), appendix table of RandAugment ops; Solarize rescaled to [0, 1].
    expected = {
        "Rotate": (-30, 30),
        "Solarize": (0, 1),
        "Color": (0.05, 0.95),
        "Posterize": (4, 8),
        "Contrast": (0.05, 0.95),
        "Brightness": (0.05, 0.95),
        "Sharpness": (0.05, 0.95),
        "ShearX": (-0.3, 0.3),
        "ShearY": (-0.3, 0.3),
        "TranslateX": (-0.3, 0.3),
        "TranslateY": (-0.3, 0.3),
    }
    assert set(OPS) == set(OP_RANGES) and len(OPS) == 14
    for name, (lo, hi) in expected.items():
        assert OP_RANGES[name] == pytest.approx((lo, hi))


@pytest.mark.parametrize("cutout", [0.5, 0.0])
def test_identical_images_get_different_strong_views(cutout):
    x = levels((1, 3, 32, 32), seed=5).expand(256, 3, 32, 32)
    out = StrongAugment(cutout=cutout)(x, gen(4))
    distinct = torch.unique(out.flatten(1), dim=0).shape[0]
    # Without Cutout only images whose two ops both lack a magnitude (Identity, AutoContrast,
    # Equalize: (3/14)^2 ~ 5 %) can coincide.
    assert distinct >= (250 if cutout else 220)


# ----------------------------------------------------------------------------------------------
# each op against an independent reference


def test_identity_is_exact():
    x = levels((2, 3, 16, 16))
    assert torch.equal(one_op("Identity", x, 0.0), x)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_solarize_inverts_at_and_above_threshold(t):
    x = levels((2, 3, 8, 8), seed=1)
    xn = x.numpy()
    ref = np.where(xn >= np.float32(t), 1.0 - xn, xn)
    np.testing.assert_allclose(one_op("Solarize", x, t).numpy(), ref, atol=1e-7)


@pytest.mark.parametrize("magnitude,bits", [(4.0, 4), (5.5, 5), (6.9, 6), (7.99, 7), (8.0, 8)])
def test_posterize_keeps_top_bits(magnitude, bits):
    x = levels((2, 3, 8, 8), seed=2)
    u8 = np.round(x.numpy() * 255).astype(np.uint8)
    ref = (u8 & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.float32) / 255
    np.testing.assert_allclose(one_op("Posterize", x, magnitude).numpy(), ref, atol=1e-7)


def np_luma(img):  # [C, H, W] -> [H, W], ITU-R 601-2 as PIL's convert("L")
    return img[0] if img.shape[0] == 1 else 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]


def np_smooth(img):  # PIL SMOOTH (1 1 1 / 1 5 1 / 1 1 1, /13), border left as is
    out = img.copy()
    _, h, w = img.shape
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            out[:, i, j] = (img[:, i - 1 : i + 2, j - 1 : j + 2].sum(axis=(1, 2)) + 4 * img[:, i, j]) / 13
    return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["Brightness", "Color", "Contrast", "Sharpness"])
@pytest.mark.parametrize("f", [0.05, 0.4, 0.95])
def test_enhance_ops_blend_with_their_degenerate_image(name, f, channels):
    x = levels((2, channels, 10, 10), seed=3)
    out = one_op(name, x, f).numpy()
    for img, got in zip(x.numpy().astype(np.float64), out):
        if name == "Brightness":
            degenerate = np.zeros_like(img)
        elif name == "Color":
            degenerate = np.broadcast_to(np_luma(img), img.shape)
        elif name == "Contrast":
            degenerate = np.full_like(img, np_luma(img).mean())
        else:
            degenerate = np_smooth(img)
        # PIL ImageEnhance: blend(degenerate, image, factor), clipped.
        ref = np.clip(degenerate + f * (img - degenerate), 0, 1)
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_colour_is_identity_on_grayscale_but_contrast_is_not():
    x = levels((2, 1, 8, 8), seed=4)
    assert torch.allclose(one_op("Color", x, 0.1), x, atol=1e-7)
    assert not torch.allclose(one_op("Contrast", x, 0.1), x, atol=1e-3)


def test_autocontrast_stretches_each_channel_and_keeps_constant_channels():
    x = levels((2, 3, 8, 8), seed=6, low=40, high=200)
    x[1, 2] = 0.3  # a flat channel has no range to stretch
    out = one_op("AutoContrast", x, 0.0).numpy()
    for img, got in zip(x.numpy(), out):
        for c in range(3):
            lo, hi = img[c].min(), img[c].max()
            ref = img[c] if hi == lo else (img[c] - lo) / (hi - lo)
            np.testing.assert_allclose(got[c], ref, atol=1e-6)


def np_equalize(u8):  # [C, H, W] uint8, PIL ImageOps.equalize written as a plain loop
    out = u8.copy()
    for c in range(u8.shape[0]):
        hist = np.bincount(u8[c].ravel(), minlength=256)
        present = [int(n) for n in hist if n]
        if len(present) <= 1:
            continue
        step = (sum(present) - present[-1]) // 255
        if step == 0:
            continue
        lut, n = [], step // 2
        for i in range(256):
            lut.append(min(n // step, 255))
            n += int(hist[i])
        out[c] = np.array(lut)[u8[c]]
    return out


def test_equalize_matches_a_per_image_per_channel_loop():
    rng = np.random.default_rng(7)
    # Skewed histograms (many dark pixels) so equalisation really moves values; a flat channel; and a
    # channel where fewer than 255 pixels are below the brightest level (PIL's step = 0): both stay.
    u8 = (rng.beta(0.7, 3.0, size=(3, 3, 32, 32)) * 255).astype(np.uint8)
    u8[1, 1] = 17
    u8[2, 0] = 250
    u8[2, 0, :7, :] = rng.integers(0, 200, size=(7, 32))
    x = torch.from_numpy(u8.astype(np.float32) / 255)
    out = one_op("Equalize", x, 0.0).numpy()
    for img, got in zip(u8, out):
        np.testing.assert_allclose(got, np_equalize(img).astype(np.float32) / 255, atol=1e-7)
    assert not np.allclose(out[0], x[0].numpy(), atol=0.02)
    assert np.array_equal(out[1, 1], x[1, 1].numpy()) and np.array_equal(out[2, 0], x[2, 0].numpy())


@pytest.mark.parametrize("shift", [1, 3, -2])
def test_translate_by_whole_pixels_is_a_shift(shift):
    x = levels((2, 3, 16, 20), seed=8)
    fill = 0.25
    got_x = one_op("TranslateX", x, shift / 20, warp_fill=fill)
    got_y = one_op("TranslateY", x, shift / 16, warp_fill=fill)
    # PIL convention: output pixel x reads input x + t * W, i.e. positive t moves the content left.
    ref_x = torch.full_like(x, fill)
    ref_y = torch.full_like(x, fill)
    if shift > 0:
        ref_x[..., :, :-shift] = x[..., :, shift:]
        ref_y[..., :-shift, :] = x[..., shift:, :]
    else:
        ref_x[..., :, -shift:] = x[..., :, :shift]
        ref_y[..., -shift:, :] = x[..., :shift, :]
    assert torch.equal(got_x, ref_x)
    assert torch.equal(got_y, ref_y)


@pytest.mark.parametrize("size", [8, 9, 32])
def test_rotate_by_90_degrees_is_rot90(size):
    x = levels((2, 3, size, size), seed=9)
    # Positive angles turn the content counter-clockwise, like PIL's Image.rotate and torch.rot90.
    assert torch.equal(one_op("Rotate", x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(one_op("Rotate", x, -90.0), torch.rot90(x, -1, dims=(-2, -1)))


def test_shear_reads_pixels_along_the_sheared_row():
    x = levels((1, 1, 12, 12), seed=10)
    s, fill = 0.3, 0.5
    got = one_op("ShearX", x, s, warp_fill=fill)[0, 0].numpy()
    src = x[0, 0].numpy()
    ref = np.full_like(src, fill)
    for i in range(12):
        for j in range(12):
            # PIL AFFINE (1, s, 0, 0, 1, 0) on pixel centres, nearest neighbour.
            k = math.floor(j + 0.5 + s * (i + 0.5))
            if 0 <= k < 12:
                ref[i, j] = src[i, k]
    np.testing.assert_array_equal(got, ref)
    got_y = one_op("ShearY", x.transpose(-1, -2), s, warp_fill=fill)[0, 0].numpy()
    np.testing.assert_array_equal(got_y.T, ref)


def test_geometric_ops_compose_in_drawn_order():
    x = levels((2, 3, 16, 16), seed=11)
    fill = 0.5
    got = one_op("", x, 0.0, warp_fill=fill, ops=["Rotate", "TranslateX"], mags=[90.0, 3 / 16])
    rotated = torch.rot90(x, 1, dims=(-2, -1))
    ref = torch.full_like(x, fill)
    ref[..., :, :-3] = rotated[..., :, 3:]  # rotate first, then shift the rotated image
    assert torch.equal(got, ref)
    other = one_op("", x, 0.0, warp_fill=fill, ops=["TranslateX", "Rotate"], mags=[3 / 16, 90.0])
    assert not torch.equal(other, got)


@pytest.mark.parametrize("center,side", [((0.5, 0.5), 8), ((0.3, 0.6), 7), ((0.0, 0.0), 4)])
def test_cutout_fills_one_square(center, side):
    x = levels((1, 3, 32, 32), seed=12, low=0, high=100)  # below the gray fill, so it is findable
    aug = StrongAugment(num_ops=0, cutout=0.5, fill=0.5)
    size = {8: 0.25, 7: 7 / 32, 4: 0.25}[side]
    params = {
        "ops": torch.zeros(1, 0, dtype=torch.long),
        "magnitudes": torch.zeros(1, 0),
        "cutout_size": torch.tensor([size]),
        "cutout_center": torch.tensor([center]),
    }
    out = aug.apply(x, params)
    gray = (out == 0.5).all(dim=1)[0]
    rows, cols = torch.where(gray)
    h = int(rows.max() - rows.min() + 1)
    w = int(cols.max() - cols.min() + 1)
    assert h == w == side and int(gray.sum()) == side * side  # one solid square, clipped at corners
    assert torch.equal(out[:, :, ~gray], x[:, :, ~gray])
    if center == (0.5, 0.5):
        assert rows.min() == 12 and cols.min() == 12  # centred on (16, 16)


# ----------------------------------------------------------------------------------------------
# Pillow, when installed, as the reference implementation itself


def pil_op(name, u8, m, pil):
    from PIL import ImageEnhance, ImageOps

    img = pil.fromarray(u8)
    w, h = img.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Solarize":
        return ImageOps.solarize(img, round(m * 255))
    if name == "Posterize":
        return ImageOps.posterize(img, int(m))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(m)
    if name == "Rotate":
        return img.rotate(m)
    affine = {
        "ShearX": (1, m, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, m, 1, 0),
        "TranslateX": (1, 0, m * w, 0, 1, 0),
        "TranslateY": (1, 0, 0, 0, 1, m * h),
    }[name]
    return img.transform(img.size, pil.AFFINE, affine)


@pytest.mark.parametrize(
    "name,m",
    [
        ("AutoContrast", 0),
        ("Equalize", 0),
        ("Solarize", 100 / 255),
        ("Posterize", 5),
        ("Color", 0.3),
        ("Contrast", 0.3),
        ("Brightness", 0.6),
        ("Sharpness", 0.2),
        ("Rotate", 23.0),
        ("ShearX", -0.22),
        ("ShearY", 0.17),
        ("TranslateX", 0.21),
        ("TranslateY", -0.13),
    ],
)
def test_ops_agree_with_pillow(name, m):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(13)
    u8 = (rng.beta(0.8, 2.0, size=(32, 32, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(u8.astype(np.float32) / 255).permute(2, 0, 1)[None]
    ours = one_op(name, x, float(m), warp_fill=0.0)[0].permute(1, 2, 0).numpy()  # PIL fills black
    ref = np.asarray(pil_op(name, u8, m, pil)).astype(np.float32) / 255
    diff = np.abs(ours - ref)
    if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        # Nearest-neighbour lookups may round a coordinate on a pixel boundary the other way.
        assert (diff > 1e-6).mean() < 0.03
    else:
        # PIL rounds or truncates to 8 bits, the enhancers twice (an integer degenerate image, then
        # the blend); we stay in float.
        assert diff.max() <= (2.01 if name in ("Color", "Contrast", "Sharpness") else 1.01) * U8


# ----------------------------------------------------------------------------------------------
# weak view


@pytest.mark.parametrize(
    "mode,torch_mode", [("reflect", "reflect"), ("replicate", "replicate"), ("zeros", "constant")]
)
def test_weak_is_a_crop_of_the_padded_image_then_flip(mode, torch_mode):
    aug = WeakAugment(padding=4, flip=True, padding_mode=mode)
    x = torch.rand(24, 3, 28, 28, generator=gen(14))
    p = aug.sample_params(24, gen(15))
    out = aug.apply(x, p)
    padded = F.pad(x, (4, 4, 4, 4), mode=torch_mode)
    for i in range(24):
        ox, oy = (int(v) for v in p["offset"][i])
        crop = padded[i, :, oy : oy + 28, ox : ox + 28]
        if p["flip"][i]:
            crop = crop.flip(-1)
        assert torch.equal(out[i], crop)


def test_weak_offsets_and_flips_are_uniform_per_image():
    aug = WeakAugment(padding=4)
    p = aug.sample_params(4000, gen(16))
    # Binomial(4000, 0.5): sd ~32.
    assert abs(int(p["flip"].sum()) - 2000) < 160
    counts = torch.bincount(p["offset"].flatten(), minlength=9)
    assert counts.numel() == 9 and counts.min() > 700  # 8000 draws over 0..8, ~889 each
    assert not WeakAugment(flip=False).sample_params(100, gen(16))["flip"].any()


def test_weak_without_flip_or_padding_is_identity():
    x = torch.rand(4, 1, 8, 8, generator=gen(17))
    assert torch.equal(WeakAugment(padding=0, flip=False)(x, gen(0)), x)
    with pytest.raises(ValueError, match="reflect padding"):
        WeakAugment(padding=8)(x, gen(0))
    with pytest.raises(ValueError, match="padding_mode"):
        WeakAugment(padding_mode="wrap")


# ----------------------------------------------------------------------------------------------
# shapes, registry, normalisation


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", ["none", "weak", "strong"])
def test_views_keep_shape_dtype_and_range(name, size, channels):
    aug = build_augment(name, weak=True) if name == "strong" else build_augment(name)
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(32, channels, size, size, generator=gen(18), dtype=dtype)
        out = aug(x, gen(19))
        assert out.shape == x.shape and out.dtype == dtype
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_strong_runs_in_bfloat16():
    x = torch.rand(8, 3, 32, 32, generator=gen(20)).bfloat16()
    out = StrongAugment()(x, gen(21))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_registry_and_builder():
    assert AUGMENTS.names() == ["none", "strong", "weak"]
    assert isinstance(build_augment("none"), NoAugment)
    strong = build_augment("strong", num_ops=3, weak={"padding": 2, "flip": False})
    assert strong.num_ops == 3 and strong.weak == WeakAugment(padding=2, flip=False)
    assert build_augment("strong", weak=False).weak is None
    with pytest.raises(KeyError, match="strong"):
        build_augment("strnog")
    with pytest.raises(ValueError, match="bad arguments"):
        build_augment("weak", pad=3)


def test_normalize_per_channel():
    x = torch.rand(4, 3, 5, 5, generator=gen(22))
    out = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(x, gen(0))
    for c, (m, s) in enumerate([(0.1, 0.5), (0.2, 0.25), (0.3, 2.0)]):
        torch.testing.assert_close(out[:, c], (x[:, c] - m) / s)
    with pytest.raises(ValueError, match="channels"):
        Normalize((0.1, 0.2), (1.0, 1.0))(x)


def test_normalize_after_inference_mode_still_differentiates():
    # Its constants are cached per device; one first made under inference mode must not break a
    # later call on images that need gradients (data-free synthesis normalises generated images).
    norm = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.5))
    with torch.inference_mode():
        norm(torch.rand(2, 3, 4, 4))
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    norm(x).sum().backward()
    torch.testing.assert_close(x.grad[0, :, 0, 0], torch.tensor([5.0, 4.0, 2.0]))


# ----------------------------------------------------------------------------------------------
# fit for a compiled, CUDA-graph-captured step


def test_source_has_no_host_synchronisation():
    src = inspect.getsource(A)
    for banned in (".item(", ".tolist(", "nonzero", ".cpu(", ".numpy(", "masked_select"):
        assert banned not in src, banned


@pytest.mark.parametrize(
    "aug",
    [WeakAugment(), StrongAugment(weak=WeakAugment()), Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))],
    ids=["weak", "strong", "normalize"],
)
def test_apply_captures_as_one_graph(aug):
    # fullgraph=True fails on any graph break: a host sync, data-dependent Python control flow or a
    # data-dependent shape. The "eager" backend checks the capture without the slow C++ codegen.
    torch._dynamo.reset()
    x = torch.rand(8, 3, 32, 32, generator=gen(23))
    if isinstance(aug, Normalize):
        compiled = torch.compile(aug.__call__, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), aug(x))
        return
    params = aug.sample_params(8, gen(24))
    compiled = torch.compile(aug.apply, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, params), aug.apply(x, params))


@pytest.mark.slow
def test_apply_compiles_with_inductor():
    torch._dynamo.reset()
    aug = StrongAugment(weak=WeakAugment())
    x = torch.rand(8, 3, 32, 32, generator=gen(25))
    params = aug.sample_params(8, gen(26))
    compiled = torch.compile(aug.apply, fullgraph=True)
    torch.testing.assert_close(compiled(x, params), aug.apply(x, params), atol=1e-5, rtol=0)
