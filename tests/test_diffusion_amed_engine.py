"""AMED on the engine (method ``amed``) and AMED's sampling through the solvers of mentor.diffusion.samplers.

The reference is the implementation before both moved: its update rules and training loop are kept below,
verbatim in what they compute (``OldStepper``, ``old_losses``), and a few of its outputs recorded with fixed seeds.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from _helpers import resumes_bitwise
from _nosync import NoHostSync
from torch import nn

import mentor.diffusion  # noqa: F401  (registers edm_unet and the edm method)
from mentor.cli import main
from mentor.config import load_config
from mentor.diffusion.amed import (
    AMEDPredictor,
    FeatureHook,
    InputFeature,
    amed_plugin,
    amed_solver,
    load_predictor,
    train_amed,
)
from mentor.diffusion.amed_method import AMED, PREDICTOR_FILE
from mentor.diffusion.denoisers import EDMPrecond, GaussianDenoiser
from mentor.diffusion.edm import load_edm
from mentor.diffusion.samplers import AB_WEIGHTS, SAMPLERS, phi
from mentor.diffusion.schedules import get_schedule, polynomial
from mentor.engine import Trainer, train
from mentor.errors import GraphCaptureError, MentorError
from mentor.methods import StepContext

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
EDM_RECIPE = ROOT / "recipes" / "diffusion" / "digits_edm.yaml"
AMED_RECIPE = ROOT / "recipes" / "diffusion" / "digits_amed.yaml"


# --------------------------------------------------------------------------------------------------
# the implementation before the change, as it computed (mentor/diffusion/amed.py: _AMEDStepper, train_amed)


def _bc(v, x):
    v = v.to(x.dtype)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim > 0 else v


def _old_threshold(x0, quantile=0.995):
    s = _bc(torch.quantile(x0.abs().reshape(x0.shape[0], -1), quantile, dim=1).clamp_min(1.0), x0)
    return x0.clamp(-s, s) / s


def _old_dpmpp_update(x, dens, ts, t, order, scale=1.0, w3=1.0):
    lam = [-torch.log(_bc(s, x)) for s in ts]
    t_b = _bc(t, x)
    h = -torch.log(t_b) - lam[-1]
    inc = -torch.expm1(-h) * dens[-1]
    if order == 2:
        r0 = (lam[-1] - lam[-2]) / h
        inc = inc - torch.expm1(-h) * (dens[-1] - dens[-2]) / (2 * r0)
    elif order >= 3:
        r0, r1 = (lam[-1] - lam[-2]) / h, (lam[-2] - lam[-3]) / h
        d10, d11 = (dens[-1] - dens[-2]) / r0, (dens[-2] - dens[-3]) / r1
        d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
        d2 = (d10 - d11) / (r0 + r1)
        inc = inc + h * phi(2, -h) * d1 + w3 * h * phi(3, -h) * d2
    return (t_b / _bc(ts[-1], x)) * x + (_bc(scale, x) if isinstance(scale, torch.Tensor) else scale) * inc


class OldStepper:
    """One interval of AMED-Solver or AMED-Plugin at a time, carrying the multistep history (the old rules)."""

    def __init__(self, denoiser, predictor, num_intervals, *, kind, max_order, afs, feature, cond,
                 thresholding=False, lower_order_final=True):
        self.denoiser, self.predictor, self.kind = denoiser, predictor, kind
        self.num_intervals, self.afs, self.feature, self.cond = num_intervals, afs, feature, cond or {}
        self.max_order = 1 if kind == "euler" else max_order
        self.thresholding, self.lower_order_final = thresholding, lower_order_final
        self.history, self.times, self.substeps, self.nfe = [], [], 0, 0

    def _D(self, x, sigma):
        self.nfe += 1
        return self.denoiser(x, sigma, **self.cond)

    def detach(self):
        self.history = [h.detach() for h in self.history]
        self.times = [t.detach() for t in self.times]

    def _ab(self, d):
        coeffs = AB_WEIGHTS[min(self.max_order, len(self.history) + 1)]
        inc = coeffs[0] * d
        for c, old in zip(coeffs[1:], reversed(self.history)):
            inc = inc + c * old
        return inc

    def _push(self, v, t=None):
        self.history.append(v)
        if t is not None:
            self.times.append(t)
        keep = max(self.max_order - 1, 1) if self.kind != "dpm_solver_pp" else self.max_order
        del self.history[:-keep]
        del self.times[:-keep]

    def _order(self):
        step, total = self.substeps, 2 * self.num_intervals + 1
        if not self.lower_order_final:
            return min(self.max_order, step)
        return step if step < self.max_order else min(self.max_order, total - step)

    def step(self, x, i, t_cur, t_next):
        use_afs = self.afs and i == 0
        self.feature.clear()
        if use_afs:
            d_cur = x / torch.sqrt(1 + t_cur**2)
            den = x - t_cur * d_cur
        else:
            den = self._D(x, t_cur)
            d_cur = (x - den) / t_cur
        out = self.predictor(self.feature(x, t_cur), t_cur, t_next)
        r, c, a = _bc(out.r, x), _bc(out.scale_dir, x), out.scale_time.to(x.dtype)
        t_mid = t_next ** r * t_cur ** (1 - r)
        t_mid_s = t_mid.reshape(-1)
        if self.kind == "solver":
            x_mid = x + (t_mid - t_cur) * d_cur
            d_mid = (x_mid - self._D(x_mid, a * t_mid_s)) / t_mid
            return x + c * (t_next - t_cur) * d_mid
        if self.kind in ("ipndm", "euler"):
            x_mid = x + (t_mid - t_cur) * self._ab(d_cur)
            self._push(d_cur)
            d_mid = (x_mid - self._D(x_mid, a * t_mid_s)) / t_mid
            x_next = x_mid + c * (t_next - t_mid) * self._ab(d_mid)
            self._push(d_mid)
            return x_next
        if self.thresholding:
            den = _old_threshold(den)
        self._push(den, t_cur.expand(x.shape[0]) if t_cur.ndim == 0 else t_cur)
        self.substeps += 1
        x_mid = _old_dpmpp_update(x, self.history, self.times, t_mid_s, self._order())
        den_mid = self._D(x_mid, a * t_mid_s)
        if self.thresholding:
            den_mid = _old_threshold(den_mid)
        self._push(den_mid, t_mid_s)
        self.substeps += 1
        return _old_dpmpp_update(x_mid, self.history, self.times, t_next, self._order(), scale=out.scale_dir)


def old_sample(denoiser, x, sigmas, predictor, kind, feature, afs, **kw):
    order = 3 if kind == "dpm_solver_pp" else 4
    stepper = OldStepper(denoiser, predictor, len(sigmas) - 1, kind=kind, max_order=order, afs=afs, feature=feature,
                         cond=None, **kw)
    sig = sigmas.to(dtype=x.dtype)
    for i in range(len(sig) - 1):
        x = stepper.step(x, i, sig[i], sig[i + 1])
    return x, stepper.nfe


def old_losses(denoiser, predictor, noises, *, kind, num_steps, M, teacher, schedule, schedule_kw, afs, feature,
               lr=5e-3):
    """The old train_amed loop on the given noise batches: the loss of every interval, in order."""
    kind = "solver" if kind == "amed" else kind
    order = 3 if kind == "dpm_solver_pp" else 4
    student = get_schedule(schedule, num_steps, **schedule_kw)
    fine = get_schedule(schedule, (M + 1) * (num_steps - 1) + 1, **schedule_kw)
    params = [p for p in predictor.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    out_losses = []
    for z in noises:
        with torch.no_grad():
            traj = SAMPLERS[teacher](denoiser, z * fine[0].to(z), fine, afs=False, return_trajectory=True)
        targets = traj.points[:: M + 1]
        sig = student.to(z)
        stepper = OldStepper(denoiser, predictor, num_steps - 1, kind=kind, max_order=order, afs=afs, feature=feature,
                             cond={})
        x = targets[0]
        for i in range(num_steps - 1):
            out = stepper.step(x, i, sig[i], sig[i + 1])
            loss = (out - targets[i + 1]).square().sum() / z.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
            opt.step()
            stepper.detach()
            out_losses.append(float(loss.detach()))
            x = targets[i + 1] if kind in ("solver", "euler") else out.detach()
    return out_losses


# --------------------------------------------------------------------------------------------------
# sampling: the solver functions with the predictor's per-step data equal the old stepper


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        c = c_noise.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.head(torch.tanh(self.body(torch.cat([x, c], 1))))


def _predictor(seed, **kw):
    """A predictor whose r, scales and their spread over samples are far from their initial values."""
    torch.manual_seed(seed)
    p = AMEDPredictor(**kw).to(F64)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for q in p.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=g, dtype=F64))
    return p


@pytest.fixture(scope="module")
def tiny_denoiser():
    torch.manual_seed(0)
    den = EDMPrecond(TinyNet()).to(F64)
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64) * polynomial(5)[0]
    return den, x0


# (sum, sum of squares, NFE) of the final sample, recorded with the implementation before the change
RECORDED = {
    ("solver", False): (-83.25408758178365, 196.3408535633164, 8),
    ("solver", True): (-84.69338781847492, 188.75780161844648, 7),
    ("ipndm", False): (-116.74784062985606, 497.1449351051359, 8),
    ("ipndm", True): (-130.45158616602797, 397.0158790800774, 7),
    ("dpm_solver_pp", False): (-79.72259923100718, 158.91250911431666, 8),
    ("dpm_solver_pp", True): (-79.68499669356383, 158.8997228558668, 7),
    ("euler", False): (-73.9061979247974, 77.341196947656, 8),
    ("euler", True): (-73.22085533712229, 75.61638342598019, 7),
}


def _new_sample(den, x0, sig, pred, kind, feature, afs, **kw):
    if kind == "solver":
        return amed_solver(den, x0, sig, pred, afs=afs, feature=feature, return_trajectory=True)
    return amed_plugin(den, x0, sig, pred, base=kind, afs=afs, feature=feature, return_trajectory=True, **kw)


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("kind", ["solver", "ipndm", "dpm_solver_pp", "euler"])
def test_solver_hook_path_equals_the_old_stepper(tiny_denoiser, kind, afs):
    den, x0 = tiny_denoiser
    sig = polynomial(5)
    pred = _predictor(1, feature_dim=16, scale_dir=0.05, scale_time=0.1)
    with torch.no_grad(), FeatureHook(den, "net.body", size=4) as hook:
        got = _new_sample(den, x0, sig, pred, kind, hook, afs)
        ref, ref_nfe = old_sample(den, x0, sig, pred, kind, hook, afs)
        # r, the scales and their spread over samples are far from trivial
        den(x0, torch.full((6,), 80.0, dtype=F64))
        out = pred(hook(x0, sig[0]), sig[0], sig[1])
    assert 0.35 < float(out.r.min()) < float(out.r.max()) < 0.5 and float(out.scale_time.max()) > 1.02
    torch.testing.assert_close(got.x, ref, rtol=1e-12, atol=1e-12)
    assert got.nfe == ref_nfe == 8 - int(afs)
    total, squares, calls = RECORDED[(kind, afs)]
    assert float(got.x.sum()) == pytest.approx(total, rel=1e-12)
    assert float(got.x.square().sum()) == pytest.approx(squares, rel=1e-12)
    assert got.nfe == calls and got.points.shape == (5, 6, 1, 8, 8)


def test_amed_sampling_reports_each_interval_to_the_callback(tiny_denoiser):
    den, x0 = tiny_denoiser
    sig = polynomial(5)
    pred = _predictor(1, feature_dim=16, scale_dir=0.05, scale_time=0.1)
    seen = []
    with torch.no_grad(), FeatureHook(den, "net.body", size=4) as hook:
        traj = amed_plugin(den, x0, sig, pred, base="ipndm", feature=hook, return_trajectory=True,
                           callback=lambda info: seen.append((info["i"], float(info["sigma"]), info["x"])))
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert [s for _, s, _ in seen] == pytest.approx(sig[:-1].tolist(), rel=1e-15)
    for i, _, x in seen:  # each interval starts from the trajectory's point
        assert torch.equal(x, traj.points[i])


@pytest.mark.parametrize("options", [{"thresholding": True}, {"lower_order_final": False}])
def test_dpm_solver_pp_plugin_options_equal_the_old_stepper(tiny_denoiser, options):
    den, x0 = tiny_denoiser
    loud = lambda x, s, **c: 3 * den(x, s, **c)  # noqa: E731  (outputs beyond [-1, 1]: thresholding acts)
    sig = polynomial(6)
    pred = _predictor(4, feature_dim=16, scale_dir=0.05, scale_time=0.1)
    with torch.no_grad(), FeatureHook(den, "net.body", size=4) as hook:
        got = amed_plugin(loud, x0, sig, pred, base="dpm_solver_pp", feature=hook, **options)
        ref, _ = old_sample(loud, x0, sig, pred, "dpm_solver_pp", hook, False, **options)
        plain = amed_plugin(loud, x0, sig, pred, base="dpm_solver_pp", feature=hook)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, plain)  # the option changed the sample


#: per-iteration losses of the old train_amed (3 iterations, batch 16, the Gaussian and predictor below)
RECORDED_LOSSES = {"ipndm": (2.4299188610417746, 1.617253687484495, 3.679536607420383),
                   "dpm_solver_pp": (0.5629987762064789, 22.71259907415305, 14.419673821460387)}


def test_train_amed_runs_the_method_and_equals_the_old_loop():
    """The thin Python API (the method on the engine) gives the old loop's losses and weights on the same noise."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    cov = q @ torch.diag(torch.tensor([1.0, 0.3, 0.1, 0.04], dtype=F64)) @ q.T
    den = GaussianDenoiser(0.3 * torch.randn(4, generator=g, dtype=F64), cov)
    for kind, teacher in (("ipndm", "ipndm"), ("dpm_solver_pp", "dpm_solver_pp")):
        new, old = _predictor(2, scale_dir=0.05), _predictor(2, scale_dir=0.05)
        res = train_amed(den, new, (4,), num_steps=4, M=2, solver=kind, teacher=teacher, schedule="polynomial",
                         afs=True, iterations=3, batch=16, dtype=F64, generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(0)
        noises = [torch.randn(16, 4, generator=gen, dtype=F64) for _ in range(3)]
        ref = old_losses(den, old, noises, kind=kind, num_steps=4, M=2, teacher=teacher, schedule="polynomial",
                         schedule_kw={}, afs=True, feature=InputFeature())
        per_iteration = [sum(ref[3 * k:3 * k + 3]) for k in range(3)]
        assert res.losses == pytest.approx(per_iteration, rel=1e-10)
        assert res.losses == pytest.approx(RECORDED_LOSSES[kind], rel=1e-10)
        for k, v in old.state_dict().items():
            torch.testing.assert_close(new.state_dict()[k], v, rtol=1e-10, atol=1e-12)
        assert res.summary["steps"] == 9 and math.isfinite(res.summary["val_rmse_last"])
        assert not any(p._post_accumulate_grad_hooks for p in new.parameters())  # handed back without hooks
    assert res.config["base"] == "dpm_solver_pp" and res.config["max_order"] == 3


# --------------------------------------------------------------------------------------------------
# the method on the engine, from a tiny digits EDM run


TINY_UNET = ["model.name=edm_unet",
             "model.kwargs={channels: 16, channel_mult: [1, 2], num_blocks: 1, attention: false}"]
QUIET = ["trainer.progress=false", "trainer.threads=1"]


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("edm") / "run"
    cfg = load_config(EDM_RECIPE, [
        f"out_dir={out}", "data.val_size=200", "data.batch_size=32", "data.eval_batch_size=200", *QUIET, *TINY_UNET,
        "trainer.max_steps=12", "trainer.eval_every=12", "trainer.ckpt_every=12", "trainer.log_every=12",
        "trainer.ema=0.9", "schedule.warmup_steps=10", "optim.lr=2e-3", "method.eval_sigmas=2"])
    train(cfg)
    return out


def amed_cfg(out, teacher, *extra):
    return load_config(AMED_RECIPE, [f"out_dir={out}", f"method.teacher={teacher}", "method.batch_size=8",
                                     "method.val_size=16", "data.val_size=32", "trainer.max_steps=6",
                                     "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=1", *QUIET,
                                     *extra])


@pytest.mark.parametrize("solver", ["amed", "dpm_solver_pp"])
def test_engine_loss_equals_the_old_loop_on_the_same_noise(tmp_path, edm_run, monkeypatch, solver):
    noises, start = [], {}
    draw, setup = AMED.draw, AMED.setup

    def recording_draw(self, batch):
        z = draw(self, batch)
        noises.append(z.clone())
        return z

    def snapshot(self, batch):
        start.update({k: v.clone() for k, v in self.student.state_dict().items()})
        return setup(self, batch)

    monkeypatch.setattr(AMED, "draw", recording_draw)
    monkeypatch.setattr(AMED, "setup", snapshot)
    teacher_solver = "heun" if solver == "amed" else "dpm_solver_pp"
    out = tmp_path / "amed"
    summary = train(amed_cfg(out, edm_run, f"method.solver={solver}", f"method.teacher_solver={teacher_solver}"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(noises) == 2 and len(got) == 6

    den, info = load_edm(edm_run, device="cpu")
    pred = AMEDPredictor()
    pred.load_state_dict(start)
    kw = {"sigma_min": info["sigma_min"], "sigma_max": info["sigma_max"]}
    with FeatureHook(den, "net.mid") as hook:
        ref = old_losses(den, pred, noises, kind=solver, num_steps=4, M=1, teacher=teacher_solver,
                         schedule="time_uniform", schedule_kw=kw, afs=True, feature=hook)
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-8)  # float32; the rules round in another order
    # the predictor file holds best.pt's weights, the sampling configuration and reads back
    best = torch.load(out / "best.pt", weights_only=True)["model"]
    loaded, config = load_predictor(out)  # a run directory names its amed.pt
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, best[k]), k
    assert config["solver"] == ("amed_solver" if solver == "amed" else "amed_plugin")
    assert config["schedule_kw"] == kw and config["feature"] == {"kind": "hook", "module": "net.mid", "size": 8}
    assert summary["predictor_file"] == PREDICTOR_FILE and summary["nfe"] == 5 and summary["iterations"] == 2
    assert summary["select"] == "val_rmse" and summary["val_rmse_best"] == min(
        r["val_rmse"] for r in rows if r.get("split") == "val")


def test_engine_run_resumes_bitwise_between_two_intervals(tmp_path, edm_run):
    # dpm_solver_pp keeps the longest state (outputs, their lambda); step 5 is the third interval of iteration 1
    start, end = resumes_bitwise(lambda name: amed_cfg(tmp_path / name, edm_run, "method.solver=dpm_solver_pp",
                                                       "method.teacher_solver=dpm_solver_pp"), stop_after=4)
    assert not torch.equal(start["student.fc_r.weight"], end["student.fc_r.weight"])
    assert end["history"].abs().sum() > 0 and end["history_lams"].shape == (3, 8)


def test_mentor_sample_reads_the_runs_predictor(tmp_path, edm_run, capsys):
    out = tmp_path / "amed"
    assert main(["train", str(AMED_RECIPE), f"out_dir={out}", f"method.teacher={edm_run}", "method.batch_size=8",
                 "method.val_size=16", "data.val_size=32", "trainer.max_steps=3", "trainer.eval_every=3",
                 "trainer.ckpt_every=3", *QUIET]) == 0
    capsys.readouterr()
    png = tmp_path / "amed.png"
    assert main(["sample", str(edm_run), "--predictor", str(out / PREDICTOR_FILE), "--n", "4", "--out", str(png),
                 "--device", "cpu"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["nfe"] == 5 and reply["solver"] == "amed_solver" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_reads_nothing_back_and_refuses_capture(tmp_path, edm_run):
    trainer = Trainer(amed_cfg(tmp_path / "run", edm_run, "method.solver=ipndm", "method.teacher_solver=ipndm"))
    method = trainer.method
    with NoHostSync():
        for step in range(4):  # an iteration's three intervals (the teacher's solver on the first) and the next
            out = method.training_step({}, StepContext(step=step, max_steps=6))
            out["loss"].backward()
    assert method.history.abs().sum() > 0
    with pytest.raises(GraphCaptureError, match="trainer.cuda_graph=false"):
        method.training_step({}, StepContext(step=torch.tensor(1), max_steps=6))


@pytest.mark.parametrize("override, words", [
    ("model={name: resnet8}", "model.name=amed_predictor"),
    ("method.feature=net.nothing", "method.feature='net.nothing'"),
    ("method.feature_size=4", "model.kwargs.feature_dim: 16"),
    ("method.teacher_solver=euler_ancestral", "not an ODE solver"),
])
def test_recipe_errors_name_the_key(tmp_path, edm_run, override, words):
    with pytest.raises(MentorError, match=words.replace(".", r"\.").replace("(", r"\(")):
        Trainer(amed_cfg(tmp_path / "bad", edm_run, override))


def test_a_teacher_that_is_no_edm_run_is_refused(tmp_path):
    pytest.importorskip("sklearn")
    from mentor.engine import checkpoint as ckpt
    from mentor.models import create_model

    path = tmp_path / "classifier.pt"
    ckpt.atomic_save({"model": create_model("resnet8", num_classes=10, in_channels=1).state_dict(),
                      "info": {"model": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 8,
                               "dataset": "digits", "method": "supervised"}}, path)
    with pytest.raises(MentorError, match=f"method.teacher={path}: .* edm run"):
        Trainer(amed_cfg(tmp_path / "bad", path))
