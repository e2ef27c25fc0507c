"""The trajectory geometry of mentor.diffusion.geometry checked against independent computations: straight lines,
the 2-D point-to-line formula, the Gaussian oracle's exact flow in its eigenbasis, numpy's SVD, a direct softmax
over distances, and the Euler step as a mean-shift step; and `mentor bench diffusion --geometry` end to end."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mentor.cli import main as cli_main
from mentor.diffusion import (
    EmpiricalDenoiser,
    GaussianDenoiser,
    boomerang_coordinates,
    denoised_outputs,
    denoising_cosines,
    deviation_stats,
    effective_count,
    mean_shift_profile,
    mean_shift_weights,
    perplexity,
    trajectory_geometry,
    trajectory_pca,
)
from mentor.diffusion.samplers import euler, heun
from mentor.diffusion.schedules import polynomial

F64 = torch.float64


def _rotation(dim: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


# ------------------------------------------------------------------------------------------------ deviation


def test_straight_lines_have_zero_deviation_unit_cosine_and_one_direction():
    # hand-made straight lines with uneven spacing, in 5-D
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.05, 0.3, 0.31, 0.8, 1.0], dtype=F64)
    points = a + t.reshape(-1, 1, 1) * (b - a)
    dev = deviation_stats(points)
    assert dev.deviation.abs().max() < 1e-12
    torch.testing.assert_close(dev.chord, torch.linalg.vector_norm(b - a, dim=-1))
    torch.testing.assert_close(dev.distance_to_end, (1 - t).reshape(-1, 1) * dev.chord)
    torch.testing.assert_close(trajectory_pca(points, k=2).explained[:, 0], torch.ones(3, dtype=F64))

    # the optimal denoiser of one data point: the exact flow is the straight line to it, Euler follows it
    y = torch.randn(1, 1, 2, 2, generator=g, dtype=F64)
    den = EmpiricalDenoiser(y)
    sig = polynomial(9)
    geo = trajectory_geometry(den, torch.randn(4, 1, 2, 2, generator=g, dtype=F64) * sig[0], sig)
    assert geo.deviation.max_relative.max() < 1e-12
    torch.testing.assert_close(geo.cosines, torch.ones_like(geo.cosines))
    torch.testing.assert_close(geo.mean_shift.effective, torch.ones_like(geo.mean_shift.effective))


def test_deviation_is_the_point_to_line_distance():
    # by hand: (0,0) -> (1,1) -> (2,0): 1 off the chord y = 0, half the chord, sqrt(2) from the end
    pts = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]], dtype=F64)
    dev = deviation_stats(pts)
    torch.testing.assert_close(dev.deviation[:, 0], torch.tensor([0.0, 1.0, 0.0], dtype=F64))
    torch.testing.assert_close(dev.relative[1, 0], torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(dev.distance_to_end[1, 0], torch.tensor(math.sqrt(2), dtype=F64))

    # random planar curves: |cross(p - start, end - start)| / |end - start|, also after embedding in 6-D
    g = torch.Generator().manual_seed(1)
    curves = torch.randn(7, 4, 2, generator=g, dtype=F64)
    d = (curves[-1] - curves[0]).numpy()
    rel = (curves - curves[0]).numpy()
    expected = np.abs(rel[..., 0] * d[:, 1] - rel[..., 1] * d[:, 0]) / np.linalg.norm(d, axis=-1)
    torch.testing.assert_close(deviation_stats(curves).deviation, torch.from_numpy(expected))
    embedded = torch.cat([curves, torch.zeros(7, 4, 4, dtype=F64)], -1) @ _rotation(6).T + 3.0
    torch.testing.assert_close(deviation_stats(embedded).deviation, torch.from_numpy(expected))
    np.testing.assert_allclose(deviation_stats(curves).max_deviation.numpy(), expected.max(0))


# ------------------------------------------------------------------------------------------------ Gaussian flow


def _eigen_flow(lam: np.ndarray, z_start: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """The exact flow in the eigenbasis: ``z_j(s) = sqrt((lam_j + s^2) / (lam_j + s_0^2)) z_j(s_0)``."""
    gain = np.sqrt((lam[None, :] + sig[:, None] ** 2) / (lam[None, :] + sig[0] ** 2))  # (N, F)
    return gain[:, None, :] * z_start[None]  # (N, B, F)


def test_gaussian_exact_flow_deviation_and_angles_in_the_eigenbasis():
    lam = np.array([0.02, 0.3, 1.5])
    q = _rotation(3, seed=2)
    mean = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    den = GaussianDenoiser(mean, q @ torch.diag(torch.from_numpy(lam)) @ q.T)
    sig = polynomial(15, sigma_min=0.01, sigma_max=20.0)
    x_start = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=F64) * sig[0]
    points = torch.stack([den.exact(x_start, sig[0], s) for s in sig])  # exact flow, not a solver

    s_np = sig.numpy()
    z = _eigen_flow(lam, ((x_start - mean) @ q).numpy(), s_np)  # same path in eigen coordinates
    # deviation: projection formula in the eigenbasis (rotations and shifts preserve distances)
    chord = z[-1] - z[0]
    e = chord / np.linalg.norm(chord, axis=-1, keepdims=True)
    v = z[-1] - z
    perp = v - (v * e).sum(-1, keepdims=True) * e
    expected = torch.from_numpy(np.linalg.norm(perp, axis=-1))
    torch.testing.assert_close(deviation_stats(points).deviation[1:-1], expected[1:-1])
    # angle: D - x = -s^2 / (lam + s^2) z and x_end - x = z_end - z in the eigenbasis
    w = -(s_np[:-1, None, None] ** 2 / (lam + s_np[:-1, None, None] ** 2)) * z[:-1]
    u = z[-1] - z[:-1]
    cos = (w * u).sum(-1) / np.linalg.norm(w, axis=-1) / np.linalg.norm(u, axis=-1)
    den_out = denoised_outputs(den, points, sig)
    torch.testing.assert_close(denoising_cosines(points, den_out), torch.from_numpy(cos))
    assert deviation_stats(points).max_deviation.min() > 1e-3  # anisotropic: a real bend, measured

    # isotropic data: D - x and x_end - x are both negative multiples of x - mean, so cos = 1, deviation 0
    iso = GaussianDenoiser(mean, 0.4 * torch.eye(3, dtype=F64))
    pts = torch.stack([iso.exact(x_start, sig[0], s) for s in sig])
    assert deviation_stats(pts).relative.max() < 1e-12
    torch.testing.assert_close(denoising_cosines(pts, denoised_outputs(iso, pts, sig)), torch.ones(14, 5, dtype=F64))


# ------------------------------------------------------------------------------------------------ PCA


def test_pca_matches_numpy_svd():
    g = torch.Generator().manual_seed(4)
    points = torch.randn(7, 3, 2, 3, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.5], dtype=F64)
    flat = points.reshape(7, 3, -1).numpy()
    pca = trajectory_pca(points, k=3)
    for b in range(3):
        c = flat[:, b] - flat[:, b].mean(0)
        s = np.linalg.svd(c, compute_uv=False) ** 2
        np.testing.assert_allclose(pca.explained[b].numpy(), s[:3] / s.sum(), rtol=1e-10)
        # scores: the centred states on the components; with all 6 components they rebuild the states
        np.testing.assert_allclose(pca.coords[:, b].numpy(), c @ pca.components[b].numpy().T, atol=1e-12)
    full = trajectory_pca(points, k=6)
    rebuilt = torch.einsum("nbk,bkf->nbf", full.coords, full.components) + full.mean
    torch.testing.assert_close(rebuilt, points.reshape(7, 3, -1))
    torch.testing.assert_close(full.cumulative[:, -1], torch.ones(3, dtype=F64))

    joint = trajectory_pca(points, k=2, joint=True)
    all_states = flat.reshape(21, -1)
    s = np.linalg.svd(all_states - all_states.mean(0), compute_uv=False) ** 2
    np.testing.assert_allclose(joint.explained.numpy(), s[:2] / s.sum(), rtol=1e-10)
    assert trajectory_pca(points[:2], k=3).explained[:, 1:].abs().max() < 1e-20  # 2 states: one direction only


def test_boomerang_coordinates_rebuild_the_deviation():
    g = torch.Generator().manual_seed(5)
    n = 6
    points = torch.randn(n, 4, 8, generator=g, dtype=F64)
    coords, explained = boomerang_coordinates(points, k=n)
    dev = deviation_stats(points)
    torch.testing.assert_close(coords[0, :, 0], dev.chord)
    assert coords[-1].abs().max() < 1e-12 and coords[0, :, 1:].abs().max() < 1e-12
    torch.testing.assert_close(coords[..., 1:].square().sum(-1), dev.deviation.square())
    assert (coords[n // 2, :, 1:3] >= 0).all()
    # the explained shares are those of the centred off-chord part, by numpy
    p, e = points.numpy(), (points[0] - points[-1]).numpy()
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    rel = p - p[-1]
    off = rel - (rel * e).sum(-1, keepdims=True) * e
    for b in range(4):
        s = np.linalg.svd(off[:, b] - off[:, b].mean(0), compute_uv=False) ** 2
        np.testing.assert_allclose(explained[b, :2].numpy(), s[:2] / s.sum(), rtol=1e-9)


# ------------------------------------------------------------------------------------------------ mean shift


def test_mean_shift_weights_are_a_softmax_over_distances():
    g = torch.Generator().manual_seed(6)
    data = torch.randn(20, 1, 2, 2, generator=g, dtype=F64) + 2.0
    labels = torch.arange(20) % 3
    x = torch.randn(4, 1, 2, 2, generator=g, dtype=F64)
    sigma = torch.tensor([0.3, 1.0, 3.0, 0.05], dtype=F64)
    d2 = ((x.reshape(4, 1, -1) - data.reshape(1, 20, -1)).numpy() ** 2).sum(-1)
    logits = -d2 / (2 * sigma.numpy()[:, None] ** 2)
    direct = np.exp(logits - logits.max(1, keepdims=True))
    direct /= direct.sum(1, keepdims=True)
    w = mean_shift_weights(data, x, sigma)
    np.testing.assert_allclose(w.numpy(), direct, rtol=1e-9, atol=1e-15)
    den = EmpiricalDenoiser(data, labels)
    torch.testing.assert_close((w @ data.reshape(20, -1)).reshape(x.shape), den(x, sigma))  # D = mean shift

    cls = torch.tensor([0, 2, 1, 2])
    wc = mean_shift_weights(den, x, sigma, class_labels=cls)
    for b in range(4):
        keep = labels.numpy() == int(cls[b])
        ref = np.exp(logits[b, keep] - logits[b, keep].max())
        np.testing.assert_allclose(wc[b, keep].numpy(), ref / ref.sum(), rtol=1e-9, atol=1e-15)
        assert wc[b, ~torch.from_numpy(keep)].abs().max() == 0
    torch.testing.assert_close((wc @ data.reshape(20, -1)).reshape(x.shape), den(x, sigma, class_labels=cls))


def test_effective_count_limits():
    uniform, one_hot = torch.full((2, 8), 1 / 8, dtype=F64), torch.eye(8, dtype=F64)[:2]
    torch.testing.assert_close(effective_count(uniform), torch.full((2,), 8.0, dtype=F64))
    torch.testing.assert_close(perplexity(uniform), torch.full((2,), 8.0, dtype=F64))
    torch.testing.assert_close(effective_count(one_hot), torch.ones(2, dtype=F64))
    torch.testing.assert_close(perplexity(one_hot), torch.ones(2, dtype=F64))
    w = torch.tensor([[0.5, 0.25, 0.25]], dtype=F64)
    torch.testing.assert_close(effective_count(w), torch.tensor([1 / 0.375], dtype=F64))


def test_euler_is_annealed_mean_shift_and_the_profile_finds_the_attractor():
    g = torch.Generator().manual_seed(7)
    data = torch.randn(30, 4, generator=g, dtype=F64)
    den = EmpiricalDenoiser(data)
    sig = polynomial(25, sigma_min=0.002, sigma_max=20.0)
    traj = euler(den, torch.randn(6, 4, generator=g, dtype=F64) * sig[0], sig, return_trajectory=True)
    p = traj.points
    for i in range(len(sig) - 1):
        m = mean_shift_weights(data, p[i], sig[i]) @ data  # one mean-shift step of bandwidth sigma_i
        r = sig[i + 1] / sig[i]
        torch.testing.assert_close(p[i + 1], r * p[i] + (1 - r) * m)

    prof = mean_shift_profile(den, p, sig)
    nearest = torch.cdist(p[-1], data).argmin(1)
    assert torch.equal(prof.final_index, nearest)
    torch.testing.assert_close(prof.final_weight[-1], torch.ones(6, dtype=F64))  # ends on a data point
    assert (prof.effective[0] > 25).all() and (prof.effective[-1] < 1.01).all()
    w5 = mean_shift_weights(data, p[5], sig[5]).numpy()
    np.testing.assert_allclose(prof.effective[5].numpy(), 1 / (w5**2).sum(1))
    np.testing.assert_allclose(prof.final_weight[5].numpy(), w5[np.arange(6), nearest.numpy()])


def test_trajectory_geometry_measures_the_solver_run():
    g = torch.Generator().manual_seed(8)
    den = GaussianDenoiser(torch.zeros(6, dtype=F64), torch.diag(torch.linspace(0.01, 2.0, 6, dtype=F64)))
    sig = polynomial(11)
    x = torch.randn(5, 6, generator=g, dtype=F64) * sig[0]
    geo = trajectory_geometry(den, x, sig, solver="heun", k=2)
    torch.testing.assert_close(geo.points, heun(den, x, sig, return_trajectory=True).points)
    torch.testing.assert_close(geo.denoised[3], den(geo.points[3], sig[3]))
    assert geo.cosines.shape == (10, 5) and geo.boomerang.shape == (11, 5, 3) and geo.mean_shift is None
    s = geo.summary()
    json.dumps(s)
    assert len(s["sigmas"]) == 11 and len(s["cosine"]["profile"]) == 10 and len(s["pca"]["joint"]) == 2
    assert s["deviation"]["max"]["mean"] == pytest.approx(float(geo.deviation.max_deviation.mean()))
    with pytest.raises(ValueError, match="sigmas"):
        trajectory_geometry(den, x, sig[:2])
    with pytest.raises(ValueError, match="unknown solver"):
        trajectory_geometry(den, x, sig, solver="nope")


# ------------------------------------------------------------------------------------------------ the command


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_mentor_bench_diffusion_geometry_writes_figures_and_numbers(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from mentor.diffusion.bench import digits_images

    out = tmp_path / "geo"
    argv = ["bench", "diffusion", "--geometry", "--oracles", "gaussian", "digits", "--n-data", "40",
            "--geometry-n", "5", "--geometry-steps", "8", "--seed", "3", "--quiet", "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "geometry.md").read_text().strip()
    assert "| gaussian | euler, 8 |" in printed and "| digits | euler, 8 |" in printed
    for name in ("gaussian", "digits"):
        assert _png_size(out / f"{name}.png") == (1200, 688)
    data = json.loads((out / "geometry.json").read_text())
    assert data["settings"]["steps"] == 8 and data["command"][:4] == ["mentor", "bench", "diffusion", "--geometry"]
    dig = data["oracles"]["digits"]
    np.testing.assert_allclose(dig["sigmas"], polynomial(9).numpy())
    assert dig["mean_shift"]["n_data"] == 40 and data["oracles"]["gaussian"]["mean_shift"] is None

    # the same trajectories again, from the seeded noise, measured by numpy
    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=F64)
    den = EmpiricalDenoiser(digits_images(40))
    p = euler(den, noise * 80.0, polynomial(9), return_trajectory=True).points.reshape(9, 5, -1).numpy()
    e = (p[-1] - p[0]) / np.linalg.norm(p[-1] - p[0], axis=-1, keepdims=True)
    v = p[-1] - p
    dev = np.linalg.norm(v - (v * e).sum(-1, keepdims=True) * e, axis=-1)
    assert dig["deviation"]["max"]["mean"] == pytest.approx(dev.max(0).mean(), rel=1e-9)
    np.testing.assert_allclose(dig["deviation"]["profile"][1:-1], dev.mean(1)[1:-1], rtol=1e-9)
    ys = den.data.reshape(40, -1).numpy()
    d2 = ((p[-1][:, None] - ys[None]) ** 2).sum(-1)
    logits = -((p[4][:, None] - ys[None]) ** 2).sum(-1) / (2 * float(polynomial(9)[4]) ** 2)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    assert dig["mean_shift"]["final_weight"][4] == pytest.approx(w[np.arange(5), d2.argmin(1)].mean(), rel=1e-9)


def test_geometry_command_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert cli_main(["bench", "diffusion", "--geometry", "--oracles", "--out", str(a_file)]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli_main(["bench", "diffusion", "--geometry", "--geometry-steps", "1", "--out", str(tmp_path / "a")]) == 2
    assert "--geometry-steps" in capsys.readouterr().err
    missing = tmp_path / "no-run"
    assert cli_main(["bench", "diffusion", "--geometry", "--oracles", "--run-dir", str(missing), "--quiet",
                     "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mentor: error:") and "no-run" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()  # nothing written when a run cannot be loaded


def test_geometry_of_a_trained_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from mentor.config import load_config
    from mentor.engine import train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "diffusion" / "digits_edm.yaml"
    run = tmp_path / "run"
    train(load_config(recipe, [
        f"out_dir={run}", "data.name=digits", "data.val_size=100", "data.batch_size=16", "data.eval_batch_size=100",
        "data.augment=none", "trainer.progress=false", "trainer.threads=1", "model.name=edm_unet",
        "model.kwargs={channels: 8, channel_mult: [1, 2], num_blocks: 1, attention: false}", "trainer.max_steps=2",
        "trainer.eval_every=2", "trainer.ckpt_every=2", "trainer.log_every=2", "schedule.warmup_steps=0",
        "method.eval_sigmas=2"]))
    out = tmp_path / "geo"
    assert cli_main(["bench", "diffusion", "--geometry", "--oracles", "--run-dir", str(run), "--geometry-n", "4",
                     "--geometry-steps", "6", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    data = json.loads((out / "geometry.json").read_text())
    r = data["oracles"]["run"]
    assert r["mean_shift"] is None and r["trajectories"] == 4 and r["figure"] == "run.png"
    assert "Trained EDM model" in r["description"] and _png_size(out / "run.png") == (1200, 688)
    # its sigma range is the run's, and the deviation vanishes at the ends of every path
    assert r["sigmas"][0] == pytest.approx(80.0) and r["sigmas"][-1] == pytest.approx(0.002)
    assert r["deviation"]["profile"][0] == 0 and r["deviation"]["profile"][-1] == 0
    assert r["deviation"]["max"]["mean"] > 0 and -1 <= r["cosine"]["min"] <= 1
