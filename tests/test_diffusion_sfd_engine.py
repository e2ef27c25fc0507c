"""SFD as the engine's ``sfd`` method: the step against a restated SFD loop, exact resume, the student file,
the validation score, SFD-v, and ``sfd_distill`` running the method."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from _helpers import resumes_bitwise
from torch import nn

import mentor.diffusion  # noqa: F401  (registers edm_unet)
from mentor.config import ConfigError, load_config
from mentor.diffusion.edm import load_edm
from mentor.diffusion.samplers import SAMPLERS
from mentor.diffusion.sfd import StepConditioned, load_student, sfd_distill, sfd_sample
from mentor.diffusion.sfd_method import SFD, StepPlan, default_step_modules, load_sfd
from mentor.engine import Trainer, train
from mentor.errors import CheckpointError, GraphCaptureError, TeacherError
from mentor.methods import StepContext

ROOT = Path(__file__).resolve().parents[1] / "recipes" / "diffusion"
TINY_UNET = ["model.name=edm_unet",
             "model.kwargs={channels: 16, channel_mult: [1, 2], num_blocks: 1, attention: false}"]
QUIET = ["trainer.progress=false", "trainer.threads=1"]
F64 = torch.float64


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory):
    """A tiny digits EDM run (12 steps of the digits recipe): the teacher."""
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("edm") / "run"
    cfg = load_config(ROOT / "digits_edm.yaml", [
        f"out_dir={out}", *TINY_UNET, *QUIET, "data.val_size=200", "data.batch_size=32", "data.eval_batch_size=200",
        "trainer.max_steps=12", "trainer.eval_every=12", "trainer.ckpt_every=12", "trainer.log_every=12",
        "trainer.ema=0.9", "schedule.warmup_steps=2", "optim.lr=2e-3", "method.eval_sigmas=2"])
    train(cfg)
    return out


def sfd_cfg(out, teacher, *extra):
    return load_config(ROOT / "digits_sfd.yaml", [
        f"out_dir={out}", f"method.teacher={teacher}", *TINY_UNET, *QUIET, "method.batch_size=6",
        "method.val_size=10", "trainer.max_steps=8", "trainer.eval_every=8", "trainer.ckpt_every=8",
        "trainer.log_every=1", "optim.lr=1e-3", *extra])


def polynomial_grid(n, smin, smax, rho=7.0):
    """EDM's schedule written out: (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    return torch.tensor([(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
                         for i in range(n)], dtype=F64)


def restated_sfd(student, teacher, noises, *, n=4, M=3, smin=0.002, smax=80.0, lr, drop_at, afs=True):
    """SFD's loop as the official code runs it, written out: per iteration the teacher's DPM-Solver++(3M)
    trajectory on (M+1)(n-1)+1 timestamps sliced every M+1, Euler intervals from the student's own (detached)
    output, L1 summed / batch, one Adam step per interval (the first interval analytic with AFS), the rate /10
    from iteration ``drop_at`` on. Returns the loss of every optimizer step."""
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                           foreach=True)
    sig = polynomial_grid(n, smin, smax)
    fine = polynomial_grid((M + 1) * (n - 1) + 1, smin, smax)
    losses = []
    for it, z in enumerate(noises):
        for group in opt.param_groups:
            group["lr"] = lr / 10 if it >= drop_at else lr
        with torch.no_grad():
            traj = SAMPLERS["dpm_solver_pp"](teacher, z * fine[0].to(z), fine, return_trajectory=True, max_order=3)
        targets = [traj.points[k * (M + 1)] for k in range(n)]
        s = sig.to(z)
        x = targets[0]
        for i in range(n - 1):
            if afs and i == 0:
                x = x + (s[1] - s[0]) * x / torch.sqrt(1 + s[0] ** 2)
                continue
            out = x + (s[i + 1] - s[i]) * (x - student(x, s[i])) / s[i]
            loss = (out - targets[i + 1]).abs().sum() / z.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            x = out.detach()
    return losses


def train_losses(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_engine_steps_equal_the_restated_sfd_loop(edm_run, tmp_path, monkeypatch):
    torch.testing.assert_close(polynomial_grid(13, 0.002, 80.0), mentor.diffusion.polynomial(13), rtol=1e-14, atol=0)
    drawn = []
    draw = SFD.draw
    monkeypatch.setattr(SFD, "draw", lambda self, b: drawn.append(draw(self, b).clone()) or drawn[-1])
    trainer = Trainer(sfd_cfg(tmp_path / "sfd", edm_run))
    summary = trainer.fit()
    assert len(drawn) == 4 and drawn[0].shape == (6, 1, 8, 8)  # 8 steps = 4 iterations of N - 2 = 2 intervals
    teacher, info = load_edm(edm_run, device="cpu")
    student = copy.deepcopy(teacher).requires_grad_(True)
    ref = restated_sfd(student, teacher, drawn, lr=1e-3, drop_at=2, smin=info["sigma_min"], smax=info["sigma_max"])
    assert train_losses(tmp_path / "sfd") == ref  # the same loss at every step, bit for bit
    for k, v in student.state_dict().items():
        assert torch.equal(trainer.method.student.state_dict()[k], v), k
    assert summary["method"] == "sfd" and summary["nfe"] == 2 and summary["iterations"] == 4
    assert summary["student_file"] == "student.pt" and summary["select"] == "val_rmse"


def test_resume_inside_an_iteration_is_exact(edm_run, tmp_path):
    # step 3 is the second interval of iteration 1: the teacher points and the chain come from the checkpoint
    resumes_bitwise(lambda name: sfd_cfg(tmp_path / name, edm_run), stop_after=2)


def test_student_file_score_and_sampling(edm_run, tmp_path):
    out = tmp_path / "sfd"
    trainer = Trainer(sfd_cfg(out, edm_run, "trainer.max_steps=4", "trainer.eval_every=4"))
    summary = trainer.fit()
    teacher, info = load_edm(edm_run, device="cpu")
    fresh = copy.deepcopy(teacher)
    config = load_student(out / "student.pt", fresh)
    assert config == {"solver": "euler", "num_steps": 4, "schedule": "polynomial", "afs": True, "M": 3,
                      "schedule_kw": {"sigma_min": info["sigma_min"], "sigma_max": info["sigma_max"]},
                      "teacher": "dpm_solver_pp", "teacher_opts": {"max_order": 3}, "step_counts": None}
    trained = trainer.method.student.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
    assert not all(torch.equal(teacher.state_dict()[k], v) for k, v in trained.items())  # it was trained
    # the validation score: Euler with AFS on 4 polynomial timestamps against the teacher's 3M on 13, fixed noise
    z = torch.randn((10, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    sig, fine = polynomial_grid(4, 0.002, 80.0).float(), polynomial_grid(13, 0.002, 80.0)
    with torch.no_grad():
        x = z * sig[0]
        for i in range(3):
            d = x / torch.sqrt(1 + sig[0] ** 2) if i == 0 else (x - fresh(x, sig[i])) / sig[i]
            x = x + (sig[i + 1] - sig[i]) * d
        ref = SAMPLERS["dpm_solver_pp"](teacher, z * fine[0].float(), fine, max_order=3)
    rmse = float((x - ref).square().mean().sqrt())
    assert summary["val_rmse_last"] == pytest.approx(rmse, rel=1e-5)
    assert summary["test_rmse_last"] == summary["val_rmse_last"]  # the same fixed noise on every split
    # the run's student loads back (load_sfd) and samples as sfd_sample does with the file's weights
    loaded, cfg, tinfo = load_sfd(out, device="cpu")
    assert cfg == config and tinfo["image_shape"] == (1, 8, 8)
    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    a, b = sfd_sample(loaded, noise, cfg), sfd_sample(fresh, noise, config)
    assert torch.equal(a, b) and torch.equal(a, sfd_sample(trainer.method.student.eval(), noise, config))
    # `mentor sample RUN` reads an sfd run: its student with its own configuration, into the same PNG grid
    from mentor.cli import main
    from mentor.diffusion.edm import to_images
    from mentor.diffusion.sample import image_grid, initial_noise, write_png

    assert main(["sample", str(out), "--n", "6", "--seed", "3", "--out", str(tmp_path / "grid.png"),
                 "--device", "cpu"]) == 0
    expected = image_grid(to_images(sfd_sample(loaded, initial_noise(6, (1, 8, 8), 3), cfg).float()))
    write_png(tmp_path / "expected.png", expected)
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
    assert main(["sample", str(out), "--class-label", "1", "--out", str(tmp_path / "bad.png")]) == 2
    assert not (tmp_path / "bad.png").exists()


def test_step_conditioned_run_and_its_copies(edm_run, tmp_path):
    out = tmp_path / "sfdv"
    cfg = sfd_cfg(out, edm_run, "method.step_counts=[3, 4]", "method.num_steps=4", "trainer.max_steps=6",
                  "trainer.eval_every=6", "trainer.ema=0.5")
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(0)  # method.plan_seed: one count per iteration, N - 2 steps each
    expected = []
    while len(expected) < 6:
        n = (3, 4)[int(torch.randint(2, (1,), generator=g))]
        expected += [n] * (n - 2)
    assert [trainer.method.plan.locate(s)[1] for s in range(6)] == expected[:6]
    summary = trainer.fit()
    student = trainer.method.student
    assert isinstance(student, StepConditioned)
    blocks = ["down.0", "down.2", "mid.block1", "mid.block2", "up.0", "up.1", "up.3", "up.4"]  # every ResBlock
    assert list(student.module_names) == [f"net.{b}.norm2" for b in blocks] == default_step_modules(student.denoiser)
    assert {"val_rmse_last", "test_rmse_3_last", "val_rmse_3_ema_last"} <= summary.keys()
    assert any(w.abs().sum() > 0 for w in student.film.parameters())  # the step tables were trained
    twin = copy.deepcopy(student)  # a copy modulates with its own tables (the EMA copy, best.pt's network)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(twin(x, 2.0, num_steps=3), student(x, 2.0, num_steps=3))
        assert not torch.equal(twin(x, 2.0, num_steps=3), twin(x, 2.0))
    config = load_student(out / "student.pt", twin)
    assert config["step_counts"] == [3, 4]


def test_step_plan():
    fixed = StepPlan(4, afs=True)
    assert [fixed.locate(s) for s in range(5)] == [(0, 4, 0), (0, 4, 1), (1, 4, 0), (1, 4, 1), (2, 4, 0)]
    assert StepPlan(4, afs=False).locate(7) == (2, 4, 1) and fixed.start(3) == 6
    a, b = StepPlan(4, True, (3, 4, 5), seed=1), StepPlan(4, True, (3, 4, 5), seed=1)
    g = torch.Generator().manual_seed(1)
    drawn = [(3, 4, 5)[int(torch.randint(3, (1,), generator=g))] for _ in range(20)]
    starts = [0]
    for n in drawn:
        starts.append(starts[-1] + n - 2)
    for step in reversed(range(starts[-1])):  # any order: a resumed run asks from the middle
        it = max(i for i in range(20) if starts[i] <= step)
        assert a.locate(step) == (it, drawn[it], step - starts[it])
    assert [b.start(i) for i in range(20)] == starts[:20]
    with pytest.raises(ValueError, match="trains no interval"):
        StepPlan(2, afs=True)


def test_user_errors(edm_run, tmp_path):
    teacher_model = r'model: \{name: edm_unet, kwargs: \{"channels": 16, "channel_mult": \[1, 2\]'
    with pytest.raises(ConfigError, match=teacher_model):
        Trainer(sfd_cfg(tmp_path / "a", edm_run, "model.kwargs={channels: 8, channel_mult: [1, 2], num_blocks: 1}"))
    with pytest.raises(ConfigError, match="must be one of method.step_counts"):
        Trainer(sfd_cfg(tmp_path / "b", edm_run, "method.step_counts=[5, 6]"))
    with pytest.raises(ConfigError, match="teacher_solver"):
        Trainer(sfd_cfg(tmp_path / "c", edm_run, "method.teacher_solver=euler_ancestral"))
    with pytest.raises(ConfigError, match="method.teacher .*not found"):
        Trainer(sfd_cfg(tmp_path / "d", tmp_path / "nothing"))
    sfd_run = tmp_path / "sfd"
    train(sfd_cfg(sfd_run, edm_run, "trainer.max_steps=2", "trainer.eval_every=2"))
    with pytest.raises(TeacherError, match=r"method.teacher=.*with method 'sfd', not 'edm'.*point method.teacher"):
        Trainer(sfd_cfg(tmp_path / "f", sfd_run))
    with pytest.raises(CheckpointError, match="not 'sfd'"):
        load_sfd(edm_run, device="cpu")
    method = Trainer(sfd_cfg(tmp_path / "e", edm_run)).method
    with pytest.raises(GraphCaptureError, match="cuda_graph=false"):
        method.training_step({}, StepContext(step=torch.tensor(0), max_steps=8))


# --------------------------------------------------------------------------------------------------
# sfd_distill: the same method on networks held in memory


class Shrink(nn.Module):
    """A trainable denoiser of 4-D Gaussian data: D(x, s) = x * g(s) with a small net for g."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x, sigma, **cond):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return x * torch.sigmoid(self.f(s.log())) / (1 + s**2)


def test_sfd_distill_runs_the_method_and_matches_the_restated_loop(tmp_path):
    torch.manual_seed(0)
    teacher = Shrink().to(F64)
    student = copy.deepcopy(teacher)
    twin = copy.deepcopy(teacher)
    seen = []
    res = sfd_distill(student, teacher, (4,), iterations=5, batch=16, lr=1e-2, dtype=F64,
                      generator=torch.Generator().manual_seed(7), callback=lambda it, loss: seen.append((it, loss)),
                      out_dir=tmp_path / "run")
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn((16, 4), generator=g, dtype=F64) for _ in range(5)]
    ref = restated_sfd(twin, teacher, noises, lr=1e-2, drop_at=math.ceil(0.5 * 5))
    per_iteration = [ref[2 * k] + ref[2 * k + 1] for k in range(5)]
    # float64 keeps the last-bit differences of the written-out schedule that float32 rounds away
    assert res.losses == pytest.approx(per_iteration, rel=1e-12) and seen == list(enumerate(res.losses))
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=1e-10, atol=1e-12)
    assert res.summary["steps"] == 10 and (tmp_path / "run" / "summary.json").exists()
    fresh = copy.deepcopy(teacher)
    assert load_student(tmp_path / "run" / "student.pt", fresh) == res.config
    z = torch.randn((8, 4), generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(sfd_sample(fresh, z, res.config), sfd_sample(student, z, res.config))
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher is used as it is
