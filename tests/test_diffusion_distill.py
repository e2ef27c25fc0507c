"""AMED, GITS and SFD against closed-form oracles: the Gaussian's exact flow and brute-force references."""

import itertools
import math

import pytest
import torch
from torch import nn

from mentor.diffusion.amed import (
    AMEDOutput,
    AMEDPredictor,
    FeatureHook,
    InputFeature,
    amed_plugin,
    amed_sample,
    amed_solver,
    load_predictor,
    positional_embedding,
    save_predictor,
    train_amed,
)
from mentor.diffusion.denoisers import EDMPrecond, GaussianDenoiser
from mentor.diffusion.gits import cost_matrix, dp_schedule, gits_schedule, teacher_trajectory
from mentor.diffusion.samplers import SAMPLERS, nfe
from mentor.diffusion.schedules import get_schedule, polynomial
from mentor.diffusion.sfd import StepConditioned, load_student, save_student, sfd_distill, sfd_sample

F64 = torch.float64


def gaussian_params(eigs, seed=0):
    """Mean and covariance of an anisotropic Gaussian with a random rotation."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    cov = q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ q.T
    return 0.3 * torch.randn(d, generator=g, dtype=F64), cov


def latents(n, d, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rmse_vs_exact(den, out, x0, sigmas):
    ref = den.exact(x0, float(sigmas[0]), float(sigmas[-1]))
    return float((out - ref).square().mean().sqrt())


# A Gaussian whose smallest standard deviation (0.05) makes few-step solvers visibly inexact (GITS), and a
# milder one (smallest 0.2) on which the few-step teachers used by AMED/SFD are accurate.
STIFF = GaussianDenoiser(*gaussian_params([1.0, 0.25, 0.04, 0.0025]))
MILD_PARAMS = gaussian_params([1.0, 0.3, 0.1, 0.04])
MILD = GaussianDenoiser(*MILD_PARAMS)


# --------------------------------------------------------------------------------------------------
# GITS


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_dp_matches_brute_force_over_all_subsets(coeff):
    g = torch.Generator().manual_seed(3)
    T = 9
    cost = torch.randn(T, T, generator=g, dtype=F64)  # signed, like the "dev" metric
    for num_steps in (2, 3, 4, 5, 6):
        best, best_path = math.inf, None
        for inner in itertools.combinations(range(1, T - 1), num_steps - 2):
            path = (0, *inner, T - 1)
            value = sum(coeff**m * float(cost[path[m], path[m + 1]]) for m in range(num_steps - 1))
            if value < best:
                best, best_path = value, list(path)
        path, value = dp_schedule(cost, num_steps, coeff)
        assert path == best_path
        assert value == pytest.approx(best, abs=1e-12)


def test_cost_matrix_matches_a_loop_over_samples():
    g = torch.Generator().manual_seed(0)
    T, B, d = 6, 5, 3
    points = torch.randn(T, B, d, generator=g, dtype=F64)
    dirs = torch.randn(T - 1, B, d, generator=g, dtype=F64)
    sig = polynomial(T)

    def dev(p, b):  # |end - p|^2 minus its squared projection on the chord, per sample
        v, chord = points[-1, b] - p, points[-1, b] - points[0, b]
        return math.sqrt(max(float(v @ v) - float(v @ chord) ** 2 / float(chord @ chord), 0.0))

    for metric in ("l1", "l2", "dev"):
        got = cost_matrix(points, dirs, sig, metric)
        for i in range(T - 1):
            for j in range(i + 1, T):
                total = 0.0
                for b in range(B):
                    jump = points[i, b] + (sig[j] - sig[i]) * dirs[i, b]
                    if metric == "l1":
                        total += float((jump - points[j, b]).abs().sum())
                    elif metric == "l2":
                        total += float((jump - points[j, b]).norm())
                    else:
                        total += dev(jump, b) - (dev(points[j, b], b) if j < T - 1 else 0.0)
                assert float(got[i, j]) == pytest.approx(total, abs=1e-10), (metric, i, j)


@pytest.mark.parametrize("teacher", ["ipndm", "unipc"])
def test_teacher_directions_are_taken_at_the_teacher_points(teacher):
    sig = polynomial(8)
    x0 = latents(4, 4) * sig[0]
    points, dirs = teacher_trajectory(STIFF, x0, sig, teacher)
    assert points.shape == (8, 4, 4) and dirs.shape == (7, 4, 4)
    for i in range(7):
        expect = (points[i] - STIFF(points[i], sig[i])) / sig[i]
        torch.testing.assert_close(dirs[i], expect, rtol=1e-10, atol=1e-12)


def test_gits_schedule_is_a_subset_of_the_teacher_grid_and_beats_polynomial():
    grid = polynomial(61)
    z = latents(512, 4)
    for num_steps in (4, 5, 6):
        res = gits_schedule(STIFF, (4,), num_steps, teacher="ipndm", teacher_steps=61, num_samples=256, batch=128,
                            seed=0, dtype=F64)
        assert len(res.sigmas) == num_steps == len(res.indices)
        assert res.indices[0] == 0 and res.indices[-1] == 60
        assert all(a < b for a, b in zip(res.indices, res.indices[1:]))
        assert res.sigmas[0] == grid[0] and res.sigmas[-1] == grid[-1]
        assert all(bool(torch.isclose(grid, s, rtol=1e-12).any()) for s in res.sigmas)
        base = polynomial(num_steps)
        e_poly = rmse_vs_exact(STIFF, SAMPLERS["euler"](STIFF, z * base[0], base), z * base[0], base)
        e_gits = rmse_vs_exact(STIFF, SAMPLERS["euler"](STIFF, z * res.sigmas[0], res.sigmas), z * base[0], base)
        assert e_gits < 0.85 * e_poly, (num_steps, e_gits, e_poly)


# --------------------------------------------------------------------------------------------------
# AMED


class FixedR(nn.Module):
    """A stand-in predictor: constant r, unit scales."""

    def __init__(self, r):
        super().__init__()
        self.r = r

    def forward(self, feature, t_cur, t_next):
        r = torch.full((feature.shape[0],), self.r, dtype=F64)
        return AMEDOutput(r, torch.ones_like(r), torch.ones_like(r))


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("base", ["ipndm", "dpm_solver_pp", "euler"])
def test_plugin_with_fixed_r_is_the_base_solver_on_the_interleaved_grid(base, afs):
    sig, r = polynomial(5), 0.37
    mid = sig[1:] ** r * sig[:-1] ** (1 - r)
    fine = torch.cat([torch.stack([sig[:-1], mid], 1).reshape(-1), sig[-1:]])
    x0 = latents(8, 4) * sig[0]
    got = amed_plugin(MILD, x0, sig, FixedR(r), base=base, afs=afs, return_trajectory=True)
    ref = SAMPLERS[base](MILD, x0, fine, afs=afs, return_trajectory=True)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-11, atol=1e-11)
    assert got.nfe == ref.nfe == 2 * (len(sig) - 1) - int(afs)


def test_amed_solver_with_r_half_is_dpm_solver_2():
    sig = polynomial(5)
    x0 = latents(8, 4) * sig[0]
    got = amed_solver(MILD, x0, sig, FixedR(0.5), afs=True, return_trajectory=True)
    ref = SAMPLERS["dpm_solver_2"](MILD, x0, sig, afs=True, return_trajectory=True)
    torch.testing.assert_close(got.x, ref.x, rtol=1e-12, atol=1e-12)
    assert got.nfe == ref.nfe == nfe("dpm_solver_2", 5, afs=True)


def test_predictor_size_and_ranges():
    assert sum(p.numel() for p in AMEDPredictor(scale_dir=0).parameters()) == 8929  # the paper's predictor
    torch.manual_seed(0)
    pred = AMEDPredictor(scale_dir=0.01, scale_time=0.2).to(F64)
    assert sum(p.numel() for p in pred.parameters()) == 8929 + 2 * 21
    out = pred(torch.randn(16, 64, dtype=F64) * 3, torch.tensor(80.0), torch.tensor(5.0))
    assert ((out.r > 0) & (out.r < 1)).all()
    assert ((out.scale_dir >= 0.99) & (out.scale_dir <= 1.01)).all()
    assert ((out.scale_time >= 0.8) & (out.scale_time <= 1.2)).all()
    t = torch.tensor([0.5, 3.0], dtype=F64)
    emb = positional_embedding(t, 8)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4], dtype=F64)
    torch.testing.assert_close(emb, torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], 1))


def _train(den, solver, teacher, schedule, M, iterations=40, scale_dir=0.01):
    torch.manual_seed(0)
    pred = AMEDPredictor(scale_dir=scale_dir).to(F64)
    res = train_amed(den, pred, (4,), num_steps=4, M=M, solver=solver, teacher=teacher, schedule=schedule,
                     afs=True, iterations=iterations, batch=64, dtype=F64, generator=torch.Generator().manual_seed(0))
    return pred, res


@pytest.mark.parametrize("solver,base,teacher,M,scale_dir,iterations", [
    ("amed", "dpm_solver_2", "heun", 3, 0.01, 25),  # AMED-Solver generalises DPM-Solver-2 (r = 1/2, c = 1)
    ("dpm_solver_pp", "dpm_solver_pp", "dpm_solver_pp", 3, 0.05, 25),
    ("ipndm", "ipndm", "ipndm", 3, 0.01, 40),
])
def test_amed_lowers_the_nfe5_error_of_its_base_solver(solver, base, teacher, M, scale_dir, iterations):
    schedule = "time_uniform"
    z = latents(512, 4)
    n_base, afs_base = (4, True) if base == "dpm_solver_2" else (6, False)
    assert nfe(base, n_base, afs=afs_base) == 5
    sb = get_schedule(schedule, n_base)
    e_base = rmse_vs_exact(MILD, SAMPLERS[base](MILD, z * sb[0], sb, afs=afs_base), z * sb[0], sb)
    pred, res = _train(MILD, solver, teacher, schedule, M, iterations=iterations, scale_dir=scale_dir)
    assert res.losses[-1] < res.losses[0]
    sig = get_schedule(schedule, 4)
    out = amed_sample(MILD, z, pred, res.config, return_trajectory=True)
    assert out.nfe == 5
    e_amed = rmse_vs_exact(MILD, out.x, z * sig[0], sig)
    assert e_amed < 0.8 * e_base, (e_amed, e_base)


def test_predictor_save_load_round_trip(tmp_path):
    pred, res = _train(MILD, "ipndm", "ipndm", "polynomial", M=2, iterations=3)
    path = tmp_path / "sub" / "amed.pt"
    save_predictor(path, pred, res.config)
    blob = torch.load(path, weights_only=True)
    assert blob["sampling"]["num_steps"] == 4 and blob["sampling"]["base"] == "ipndm"
    loaded, config = load_predictor(path)
    assert config == res.config
    assert config["M"] == 2 and config["afs"] is True and config["schedule"] == "polynomial"
    z = latents(32, 4, seed=5)
    torch.testing.assert_close(amed_sample(MILD, z, loaded, config), amed_sample(MILD, z, pred, res.config),
                               rtol=0, atol=0)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an AMED predictor"):
        load_predictor(tmp_path / "other.pt")


class TinyNet(nn.Module):
    """net(x_in, c_noise, class_labels=None) -> F for EDMPrecond, on 8x8 single-channel images."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        c = c_noise.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.head(torch.tanh(self.body(torch.cat([x, c], 1))))


def test_feature_hook_pools_the_named_module_and_gives_zeros_on_afs():
    torch.manual_seed(0)
    den = EDMPrecond(TinyNet()).to(F64)
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    with FeatureHook(den, "net.body", size=4) as hook:
        assert hook(x, 1.0).abs().sum() == 0  # nothing evaluated yet
        den(x, torch.full((3,), 2.0, dtype=F64))
        inner = den.net.body(torch.cat([x / math.sqrt(4.25), torch.full_like(x, math.log(2.0) / 4)], 1))
        expect = nn.functional.adaptive_avg_pool2d(inner.mean(1, keepdim=True), 4).flatten(1)
        torch.testing.assert_close(hook(x, 2.0), expect)
        hook.clear()
        assert hook(x, 2.0).abs().sum() == 0
    with pytest.raises(KeyError, match="no sub-module"):
        FeatureHook(den, "net.nope")
    feat = InputFeature(size=8)(torch.randn(5, 3, 16, 16), torch.tensor(1.0))
    assert feat.shape == (5, 64)


# --------------------------------------------------------------------------------------------------
# SFD


class ParamGaussian(nn.Module):
    """A trainable denoiser: the Gaussian oracle's shrinkage, times exp(f(log sigma)) per eigendirection."""

    def __init__(self, mean, cov, hidden=32):
        super().__init__()
        lam, u = torch.linalg.eigh(cov)
        self.register_buffer("mean", mean.clone())
        self.register_buffer("lam", lam.clamp_min(0))
        self.register_buffer("u", u)
        self.f = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, len(lam)))
        nn.init.zeros_(self.f[2].weight)
        nn.init.zeros_(self.f[2].bias)

    def forward(self, x, sigma, **cond):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        gain = self.lam / (self.lam + s**2) * torch.exp(self.f(s.log()))
        return self.mean + ((x - self.mean) @ self.u * gain) @ self.u.T


def euler_error(student, n, z, cond=None):
    sig = polynomial(n)
    with torch.no_grad():
        out = SAMPLERS["euler"](student, z * sig[0], sig, afs=True, cond=cond or {})
    return rmse_vs_exact(MILD, out, z * sig[0], sig)


def test_sfd_lowers_the_students_error_against_plain_euler(tmp_path):
    torch.manual_seed(0)
    student = ParamGaussian(*MILD_PARAMS).to(F64)
    z = latents(512, 4)
    before = euler_error(student, 4, z)
    assert before == pytest.approx(euler_error(MILD, 4, z), rel=1e-10)  # the student starts as the oracle
    res = sfd_distill(student, MILD, (4,), num_steps=4, M=3, iterations=60, batch=64, lr=1e-2, dtype=F64,
                      generator=torch.Generator().manual_seed(0))
    after = euler_error(student, 4, z)
    assert after < 0.5 * before, (after, before)
    fine = polynomial(13)
    teacher = rmse_vs_exact(MILD, SAMPLERS["dpm_solver_pp"](MILD, z * fine[0], fine), z * fine[0], fine)
    assert after < 1.5 * teacher  # the student gets close to its teacher
    path = tmp_path / "sfd.pt"
    save_student(path, student, res.config)
    copy = ParamGaussian(*MILD_PARAMS).to(F64)
    config = load_student(path, copy)
    assert config["num_steps"] == 4 and config["solver"] == "euler" and config["M"] == 3
    torch.testing.assert_close(sfd_sample(copy, z, config), sfd_sample(student, z, res.config), rtol=0, atol=0)


def test_step_conditioned_sfd_serves_several_step_counts():
    torch.manual_seed(0)
    counts = (4, 5, 6, 7)
    student = StepConditioned(ParamGaussian(*MILD_PARAMS), ["f.2"], counts).to(F64)
    z = latents(512, 4)
    before = {n: euler_error(student, n, z, {"num_steps": n}) for n in counts}
    for n in counts:  # zero-initialised modulation: identical to the wrapped denoiser
        assert before[n] == pytest.approx(euler_error(MILD, n, z), rel=1e-10)
    res = sfd_distill(student, MILD, (4,), num_steps=4, M=3, teacher_solver="ipndm", iterations=100, batch=64,
                      lr=1e-2, step_counts=counts, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert res.config["step_counts"] == list(counts)
    for n in counts:
        after = rmse_vs_exact(MILD, sfd_sample(student, z, res.config, num_steps=n), z * 80.0, polynomial(n))
        assert after < 0.5 * before[n], (n, after, before[n])
    with pytest.raises(ValueError, match="step counts"):
        student(z, 1.0, num_steps=9)


# --------------------------------------------------------------------------------------------------
# Benchmark


def test_bench_budgets_match_the_nfe_count():
    from mentor.diffusion.bench import budget

    assert budget("euler", 5) == (6, False)
    assert budget("heun", 5) == (4, True) and budget("heun", 6) == (4, False)
    assert budget("amed", 3) == (3, True) and budget("amed", 10) == (6, False)
    for name in SAMPLERS:
        for target in (3, 4, 5, 6, 8, 10):
            n, afs = budget(name, target)
            assert nfe(name, n, afs=afs) == target


def test_bench_writes_the_markdown_table(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from mentor.diffusion.bench import main

    out = tmp_path / "bench.md"
    argv = ["--oracles", "gaussian", "--solvers", "euler", "heun", "--nfe", "3", "4", "--gits-solvers", "euler",
            "--amed", "amed_solver", "--amed-iterations", "2", "--gits-samples", "32", "--n", "16", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()
            if line.startswith("| ") and "method" not in line}
    assert set(rows) == {"Euler (DDIM)", "Heun", "Euler (DDIM) + GITS", "AMED-Solver"}
    assert all(len(cells) == 2 and all(c.strip() not in ("", "-") for c in cells) for cells in rows.values())


def test_mentor_bench_diffusion_prints_the_table(capsys, tmp_path):
    from mentor.cli import main as cli_main

    out = tmp_path / "table.md"
    assert cli_main(["bench", "diffusion", "--oracles", "gaussian", "--solvers", "euler", "heun", "--nfe", "4", "6",
                     "--no-gits", "--no-amed", "--n", "32", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "euler" in text and "heun" in text and text.strip() == out.read_text().strip()
