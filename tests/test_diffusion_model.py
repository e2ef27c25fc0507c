"""The trained-model side of mentor.diffusion: the EDM U-Net, EDM training on the engine, loading and
sampling a run (`mentor sample`), and the sample-quality metrics (RMSE, Fréchet distance, KID)."""

import dataclasses
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import mentor.diffusion  # noqa: F401  (registers edm_unet and the edm method)
from mentor.cli import main
from mentor.config import load_config
from mentor.diffusion.denoisers import EDMPrecond
from mentor.diffusion.edm import EDM, edm_loss, load_edm, to_images
from mentor.diffusion.metrics import ClassifierFeatures, fd_score, frechet_distance, gaussian_stats, kid, rmse
from mentor.diffusion.sample import steps_for_nfe
from mentor.engine import train
from mentor.methods import BuildInfo, StepContext
from mentor.models import FeatureTap, create_model

TINY_UNET = ["model.name=edm_unet",
             "model.kwargs={channels: 16, channel_mult: [1, 2], num_blocks: 1, attention: false}"]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "diffusion" / "digits_edm.yaml"
DIGITS = ["data.name=digits", "data.val_size=200", "data.batch_size=32", "data.eval_batch_size=200",
          "data.augment=none", "trainer.progress=false", "trainer.threads=1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests are small; one thread avoids waiting on a second one the machine may not have free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The zero-initialised output layers make a fresh U-Net output 0; randomise every weight a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


# --------------------------------------------------------------------------------------------------
# the network


@pytest.mark.parametrize("size, mult, attention, low", [(28, (1, 2, 2), True, 7), (8, (1, 2), False, 4)])
@pytest.mark.parametrize("conditional", [False, True])
def test_unet_shapes_and_bottleneck(size, mult, attention, low, conditional):
    torch.manual_seed(0)
    net = create_model("edm_unet", num_classes=10, in_channels=1, image_size=size, channels=8, channel_mult=mult,
                       num_blocks=1, attention=attention, conditional=conditional)
    x, c = torch.randn(3, 1, size, size), torch.randn(3)
    labels = torch.tensor([0, 5, 9]) if conditional else None
    with FeatureTap(net, ["mid"]) as tap:
        out = net(x, c, class_labels=labels)
        mid = tap["mid"]
    assert out.shape == x.shape
    assert mid.shape == (3, 8 * mult[-1], low, low)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer: F = 0 at start
    _perturbed(net)
    out = net(x, c, class_labels=labels)
    assert out.abs().mean() > 0
    # the output depends on the noise level, and on the class exactly when conditional
    assert not torch.allclose(out, net(x, c + 0.5, class_labels=labels))
    if conditional:
        assert not torch.allclose(out, net(x, c, class_labels=torch.tensor([1, 2, 3])))
        # label -1 is "no label": the same as giving none
        torch.testing.assert_close(net(x, c, class_labels=torch.full((3,), -1)), net(x, c))
    # a single noise level broadcasts over the batch
    torch.testing.assert_close(net(x, c[:1].expand(3), class_labels=labels), net(x, c[0], class_labels=labels))


def test_unet_three_channels_and_size_check():
    net = create_model("edm_unet", num_classes=10, in_channels=3, channels=8, channel_mult=(1, 2), num_blocks=2)
    assert net(torch.randn(2, 3, 8, 8), torch.zeros(2)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="too small"):
        create_model("edm_unet", num_classes=10, in_channels=1, image_size=2, channel_mult=(1, 2, 2))


def test_edm_precond_composition_by_hand():
    torch.manual_seed(0)
    net = _perturbed(create_model("edm_unet", num_classes=10, in_channels=1, channels=8, channel_mult=(1, 2),
                                  num_blocks=1, attention=False)).double()
    sd = 0.5
    den = EDMPrecond(net, sigma_data=sd)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) * 3
    sigma = torch.tensor([0.01, 0.5, 2.0, 40.0], dtype=torch.float64)
    expected = []
    for i in range(4):
        s = float(sigma[i])
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / math.sqrt(s**2 + sd**2)
        c_in = 1 / math.sqrt(s**2 + sd**2)
        f = net(c_in * x[i:i + 1], torch.tensor([math.log(s) / 4], dtype=torch.float64))
        expected.append(c_skip * x[i:i + 1] + c_out * f)
    torch.testing.assert_close(den(x, sigma), torch.cat(expected))


# --------------------------------------------------------------------------------------------------
# the EDM loss


def _method(seed: int = 0, **hp) -> EDM:
    torch.manual_seed(seed)
    net = _perturbed(create_model("edm_unet", num_classes=10, in_channels=1, channels=8, channel_mult=(1, 2),
                                  num_blocks=1, attention=False, conditional=hp.get("conditional", False)))
    info = BuildInfo(num_classes=10, in_channels=1, image_size=8, mean=(0.3,), std=(0.4,))
    return EDM(EDM.Config(name="edm", **hp), net, info)


def test_edm_loss_equals_effective_target_form():
    """EDM's Eq. (8): lambda * |D - y|^2 = |F(c_in x) - (y - c_skip x) / c_out|^2, as lambda = 1 / c_out^2."""
    m = _method().double()
    sd = m.cfg.sigma_data
    g = torch.Generator().manual_seed(1)
    y = torch.rand(5, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(y.shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    got = edm_loss(m.student, y, sigma, noise, sd)
    s = sigma.view(-1, 1, 1, 1)
    x = y + s * noise
    total = s**2 + sd**2
    f = m.student.net(x / total.sqrt(), sigma.log() / 4)
    target = (y - sd**2 / total * x) / (s * sd / total.sqrt())
    torch.testing.assert_close(got, (f - target).square().flatten(1).mean(1))


def test_training_step_maps_data_to_signed_range_and_draws_lognormal_sigma():
    m = _method(P_mean=-0.5, P_std=0.7)
    u = torch.rand(6, 1, 8, 8)  # images in [0, 1]
    batch = {"x": (u - 0.3) / 0.4, "y": torch.zeros(6, dtype=torch.long)}
    torch.manual_seed(3)
    out = m.training_step(batch, StepContext(step=0, max_steps=1))
    torch.manual_seed(3)
    sigma = (torch.randn(6) * 0.7 - 0.5).exp()
    noise = torch.randn(6, 1, 8, 8)
    y = 2 * u - 1
    d = m.student(y + sigma.view(-1, 1, 1, 1) * noise, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight.view(-1, 1, 1, 1) * (d - y) ** 2).mean()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)


def test_label_dropout_and_conditional_check():
    m = _method(conditional=True, label_dropout=0.5)
    batch = {"x": torch.randn(64, 1, 8, 8), "y": torch.full((64,), 3, dtype=torch.long)}
    seen = []
    m.student.net.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["class_labels"]), with_kwargs=True)
    m.training_step(batch, StepContext(step=0, max_steps=1))
    dropped = (seen[0] == -1).float().mean().item()
    assert set(seen[0].tolist()) == {-1, 3} and 0.25 < dropped < 0.75
    from mentor.config import ConfigError

    with pytest.raises(ConfigError, match="conditional"):
        EDM(EDM.Config(name="edm", conditional=True), create_model("edm_unet", num_classes=10, in_channels=1),
            BuildInfo())


def test_eval_sigmas_are_lognormal_midquantiles():
    m = _method(eval_sigmas=4)
    z = torch.tensor([-1.1503493803760079, -0.3186393639643752, 0.3186393639643752, 1.1503493803760079])
    torch.testing.assert_close(m.eval_sigma_values(), torch.exp(-1.2 + 1.2 * z))


# --------------------------------------------------------------------------------------------------
# training through the engine, loading, sampling


def _edm_run(out, steps):
    """A tiny U-Net trained by the digits EDM recipe for ``steps`` steps, evaluated three times."""
    pytest.importorskip("sklearn")
    every = steps // 3
    cfg = load_config(RECIPE, [
        f"out_dir={out}", *DIGITS, *TINY_UNET, f"trainer.max_steps={steps}", f"trainer.eval_every={every}",
        f"trainer.ckpt_every={every}", f"trainer.log_every={every}", "trainer.ema=0.9", "schedule.warmup_steps=10",
        "optim.lr=2e-3", "method.eval_sigmas=4"])
    return out, train(cfg)


SHORT_STEPS = 12


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A run directory in seconds (12 steps): for the tests of selection, loading and sampling."""
    return _edm_run(tmp_path_factory.mktemp("edm") / "run", SHORT_STEPS)


@pytest.fixture(scope="module")
def trained_digits_run(tmp_path_factory):
    return _edm_run(tmp_path_factory.mktemp("edm_trained") / "run", 120)


def _val_losses(out):
    return {r["step"]: r["val_loss_ema"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "val"}


def _untrained_closed_form(out):
    """The validation loss of the untrained network by its closed form: it outputs F = 0, so D = c_skip x and
    the weighted loss is (s^2 E[y^2] / sd^2 + sd^2) / (s^2 + sd^2) per noise level s."""
    from mentor.engine.inputs import load_splits

    cfg = load_config(out / "config.yaml")
    splits = load_splits(cfg.data)
    fresh = EDM(cfg.method, create_model("edm_unet", num_classes=10, in_channels=1, **cfg.model.kwargs),
                BuildInfo(in_channels=1, mean=splits.train.mean, std=splits.train.std))
    y2 = (splits.val.images.double() / 127.5 - 1).square().mean()
    s, sd = fresh.eval_sigma_values().double(), 0.5
    return float(((s**2 * y2 / sd**2 + sd**2) / (s**2 + sd**2)).mean()), cfg, splits, fresh


def test_edm_run_selects_and_reports_the_ema_validation_loss(digits_run):
    out, summary = digits_run
    # best.pt follows the EMA copy (the network one samples from)
    assert summary["select"] == "val_loss_ema"
    for key in ("test_loss_last", "test_loss_best", "val_loss_ema_best", "test_loss_ema_last"):
        assert math.isfinite(summary[key]), key
    vals = _val_losses(out)
    assert sorted(vals) == [4, 8, 12]
    assert summary["val_loss_ema_best"] == min(vals.values())
    assert summary["best_step"] == min(vals, key=vals.get)
    if summary["best_step"] == SHORT_STEPS:  # the selected weights at the last step are the EMA copy
        assert summary["test_loss_best"] == summary["test_loss_ema_last"]

    # The method's score of the untrained network must match the closed form (up to the sampling error
    # of the fixed noise), and a few steps of training already beat it.
    from mentor.engine.evaluate import Evaluator
    from mentor.engine.inputs import stat_tensors

    closed, cfg, splits, fresh = _untrained_closed_form(out)
    mean, std = stat_tensors(splits.train, torch.device("cpu"))
    untrained = fresh.score(fresh.deployable(), splits.val, Evaluator(mean, std, 200, torch.device("cpu")))["loss"]
    assert untrained == pytest.approx(closed, rel=0.02)
    assert vals[SHORT_STEPS] < closed
    # eval_images scores the first images only: the same number as scoring that subset
    capped = EDM(dataclasses.replace(cfg.method, eval_images=50), fresh.student.net, fresh.info)
    ev = Evaluator(mean, std, 200, torch.device("cpu"))
    first = splits.val.subset(torch.arange(50))
    assert capped.score(capped.deployable(), splits.val, ev)["loss"] == pytest.approx(
        fresh.score(fresh.deployable(), first, ev)["loss"], rel=1e-12)
    # `mentor eval` reads best.pt and reports the same number as the run (fixed validation noise)
    from mentor.engine.run import evaluate_run

    assert evaluate_run(out, device="cpu")["val_loss"] == pytest.approx(summary["val_loss_ema_best"], rel=1e-5)


@pytest.mark.slow
def test_edm_training_lowers_validation_loss(trained_digits_run):
    out, summary = trained_digits_run
    vals = _val_losses(out)
    assert sorted(vals) == [40, 80, 120] and summary["val_loss_ema_best"] == min(vals.values())
    closed = _untrained_closed_form(out)[0]
    assert vals[120] < vals[40] and vals[120] < 0.5 * closed, (vals, closed)


def test_load_edm_reads_ema_weights(digits_run):
    out, _ = digits_run
    den, info = load_edm(out, ema=True, device="cpu")
    raw, info_raw = load_edm(out, ema=False, device="cpu")
    state = torch.load(out / "best.pt", weights_only=True)
    assert info["ema"] and not info_raw["ema"]
    assert info["image_shape"] == (1, 8, 8) and info["num_classes"] == 10 and info["dataset"] == "digits"
    assert (info["sigma_min"], info["sigma_max"], info["sigma_data"]) == (0.002, 80.0, 0.5)
    for k, v in den.state_dict().items():
        torch.testing.assert_close(v, state["ema"][k])
    for k, v in raw.state_dict().items():
        torch.testing.assert_close(v, state["model"][k])
    assert not any(p.requires_grad for p in den.parameters())
    # a checkpoint file works too: last.pt keeps the EMA wrapper's state ("module." keys)
    last, info_last = load_edm(out / "last.pt", device="cpu")
    ema_last = torch.load(out / "last.pt", weights_only=True)["ema"]
    assert info_last["ema"] and info_last["step"] == SHORT_STEPS
    for k, v in last.state_dict().items():
        torch.testing.assert_close(v, ema_last[f"module.{k}"])


def test_to_images():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    assert to_images(x).tolist() == [0, 0, 128, 255, 255, 255]
    assert to_images(x).dtype == torch.uint8


def _read_png(data: bytes):
    """Decode an 8-bit, filter-0 PNG (what mentor writes) by hand: (width, height, colour type, pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    channels = {0: 1, 2: 3}[colour]
    assert depth == 8 and len(raw) == h * (1 + w * channels)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + w * channels)
    assert (rows[:, 0] == 0).all()
    return w, h, colour, rows[:, 1:].reshape(h, w, channels)


def test_mentor_sample_writes_png_grid(digits_run, tmp_path, capsys):
    out, _ = digits_run
    png = tmp_path / "grid.png"
    assert main(["sample", str(out), "--solver", "ipndm", "--nfe", "5", "--schedule", "polynomial", "--n", "10",
                 "--seed", "0", "--out", str(png), "--device", "cpu"]) == 0
    w, h, colour, pixels = _read_png(png.read_bytes())
    # 10 images -> 4 columns x 3 rows of 8x8 tiles with 1-pixel borders
    assert (w, h, colour) == (4 * 9 + 1, 3 * 9 + 1, 0)
    assert (pixels[0, :, 0] == 0).all() and (pixels[:, 0, 0] == 0).all()
    tiles = [pixels[1 + 9 * r:9 + 9 * r, 1 + 9 * k:9 + 9 * k, 0] for r in range(3) for k in range(4)]
    assert all((t == 0).all() for t in tiles[10:])  # the unused cells stay black
    assert all(t.std() > 0 for t in tiles[:10])
    assert not np.array_equal(tiles[0], tiles[1])
    assert json.loads(capsys.readouterr().out)["nfe"] == 5
    # the same seed gives the same images
    again = tmp_path / "again.png"
    assert main(["sample", str(out), "--nfe", "5", "--n", "10", "--out", str(again), "--device", "cpu"]) == 0
    assert _read_png(again.read_bytes())[3].tobytes() == pixels.tobytes()


def test_mentor_sample_rejects_unreachable_nfe(digits_run, tmp_path, capsys):
    out, _ = digits_run
    assert main(["sample", str(out), "--solver", "heun", "--nfe", "5", "--out", str(tmp_path / "x.png")]) == 2
    assert "heun cannot spend exactly 5" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["sample", str(out), "--class-label", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_mentor_sample_with_amed_predictor(digits_run, tmp_path, capsys):
    """A predictor trained on the run's bottleneck (module ``net.mid``) drives the sampler: its file decides
    solver, schedule and steps."""
    from mentor.diffusion.amed import AMEDPredictor, FeatureHook, save_predictor, train_amed

    out, _ = digits_run
    den, _ = load_edm(out, device="cpu")
    pred = AMEDPredictor()
    with FeatureHook(den, "net.mid") as hook:
        result = train_amed(den, pred, (1, 8, 8), num_steps=3, iterations=2, batch=4, feature=hook,
                            generator=torch.Generator().manual_seed(0))
    save_predictor(tmp_path / "amed.pt", pred, result.config)
    png = tmp_path / "amed.png"
    assert main(["sample", str(out), "--predictor", str(tmp_path / "amed.pt"), "--n", "4", "--out", str(png),
                 "--device", "cpu"]) == 0
    assert _read_png(png.read_bytes())[:3] == (2 * 9 + 1, 2 * 9 + 1, 0)
    assert json.loads(capsys.readouterr().out)["nfe"] == 3  # 2 intervals x 2 evaluations, minus AFS


def test_steps_for_nfe():
    assert steps_for_nfe("ipndm", 5) == 6
    assert steps_for_nfe("heun", 6) == 4
    assert steps_for_nfe("heun", 5, afs=True) == 4
    assert steps_for_nfe("euler", 3, afs=True) == 5


# --------------------------------------------------------------------------------------------------
# metrics


def test_rmse():
    x = torch.zeros(2, 1, 2, 2)
    ref = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]]).view(2, 1, 2, 2)
    torch.testing.assert_close(rmse(x, ref, reduction="none"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(rmse(x, ref), torch.tensor(1.0))


def test_gaussian_stats_match_numpy():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, cov = gaussian_stats(f)
    np.testing.assert_allclose(mu.numpy(), f.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-10)


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64)
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # the same in a rotated basis (commuting covariances)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ca, cb = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    assert frechet_distance(mu1, ca, mu2, cb) == pytest.approx(expected, rel=1e-9)
    # 2x2, non-commuting: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M with positive eigenvalues
    c1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    c2 = torch.tensor([[0.5, -0.2], [-0.2, 1.5]], dtype=torch.float64)
    m = c1 @ c2
    tr_sqrt = math.sqrt(float(m.trace()) + 2 * math.sqrt(float(torch.linalg.det(m))))
    closed = float(c1.trace() + c2.trace()) - 2 * tr_sqrt
    assert frechet_distance(torch.zeros(2), c1, torch.zeros(2), c2) == pytest.approx(closed, rel=1e-10)
    # identical statistics: zero
    f = torch.randn(200, d, generator=g)
    mu, cov = gaussian_stats(f)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-9


def test_kid_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 3, generator=g, dtype=torch.float64) + 0.5
    n, d = 12, 3

    def k(a, b):
        return (sum(a[i].item() * b[i].item() for i in range(d)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    assert kid(x, y, num_subsets=1, subset_size=n) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    # averaging over random subsets of the same full sets changes nothing; smaller subsets stay close
    assert kid(x, y, num_subsets=3, subset_size=n) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert kid(x, y, num_subsets=200, subset_size=6) == pytest.approx(xx + yy - 2 * xy, abs=0.5)


def test_classifier_features_and_fd_score(tmp_path):
    pytest.importorskip("sklearn")
    from tests._helpers import FixedMLP  # noqa: F401  (registers test_mlp, a net with an `fc` layer)

    out = tmp_path / "clf"
    train(load_config(None, [f"out_dir={out}", *DIGITS, "model.name=test_mlp", "trainer.max_steps=10",
                             "trainer.eval_every=10", "trainer.ckpt_every=10", "optim.lr=0.1"]))
    feats = ClassifierFeatures(out, device="cpu")
    assert feats.tag == "digits"
    real = feats.images("test")[:40]
    signed = real.float() / 127.5 - 1
    net = feats.net
    norm = (real.float() / 255 - feats.mean) / feats.std
    manual = torch.tanh(net.layer1(norm.flatten(1)))  # the input of fc
    torch.testing.assert_close(feats(real), manual)
    torch.testing.assert_close(feats(signed), manual, rtol=1e-5, atol=1e-5)
    noise = torch.rand(40, 1, 8, 8) * 2 - 1
    scores = fd_score(noise, real, feats, kid_subsets=5, kid_subset_size=20)
    assert set(scores) == {"FD-digits", "KID-digits"}
    same = fd_score(signed, real, feats, kid_subsets=5, kid_subset_size=20)
    assert abs(same["FD-digits"]) < 1e-6 and scores["FD-digits"] > 0.01
    with pytest.raises(ValueError, match="trained on"):
        feats(torch.zeros(2, 1, 28, 28))
