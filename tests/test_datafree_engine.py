"""What the data-free family added to the engine and shares across its methods: phases run in windows
with a fresh optimizer per window and parameter groups and schedules of their own, seconds per phase,
the device pool, the base's round bookkeeping, and the errors a user can cause."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _datafree import df_cfg
from _helpers import FixedMLP, resumes_bitwise  # noqa: F401  (registers test_mlp)
from torch import nn

from mentor.config import ConfigError, OptimConfig, ScheduleConfig, load_config
from mentor.datafree import SyntheticPool
from mentor.datafree.base import LatentGeneratorMethod
from mentor.engine import Trainer
from mentor.engine.optim import build_optimizer, build_scheduler
from mentor.engine.trainer import train
from mentor.errors import TeacherError
from mentor.methods import METHODS, Phase, register_method

pytest.importorskip("sklearn")


# ---------------------------------------------------------------------------------------------- phases
def test_phase_windows_give_the_round_pattern():
    g, k = 3, 4
    synth = Phase("synthesis", [], every=g + k, span=g)
    student = Phase("student", [], every=g + k, offset=g, span=k)
    warm = Phase("student", [], every=g + k, offset=g + 2 * (g + k), span=k)
    pattern = ["S" if synth.due(s) else "K" if student.due(s) else "-" for s in range(2 * (g + k))]
    assert "".join(pattern) == "SSSKKKKSSSKKKK"
    assert [s for s in range(30) if warm.due(s)] == [17, 18, 19, 20, 24, 25, 26, 27]
    assert [s for s in range(15) if synth.opens(s)] == [0, 7, 14]
    # the old alternation (every=2, offsets 0 and 1) is unchanged
    a, b = Phase("a", [], every=2), Phase("b", [], every=2, offset=1)
    assert [a.due(s) for s in range(4)] == [True, False, True, False]
    assert [b.due(s) for s in range(4)] == [False, True, False, True]
    with pytest.raises(ValueError, match="span <= every"):
        Phase("x", [], every=2, span=3)


def test_parameter_groups_have_their_own_rate_and_the_phase_its_own_schedule():
    w, z = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(4, 2))
    opt = build_optimizer([w], OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4),
                          {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": (0.5, 0.999)},
                          extra=[([z], {"lr": 0.015})])
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.015]
    assert all(g["betas"] == (0.5, 0.999) for g in opt.param_groups)
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=5), 100, 1e-3,
                            {"name": "constant", "warmup_steps": 0})
    for _ in range(60):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.015]  # the run's cosine does not touch it
    with pytest.raises(ConfigError, match="schedule override"):
        build_scheduler(opt, ScheduleConfig(), 100, 1e-3, {"nam": "constant"})


if "test_windows" not in METHODS:

    @register_method("test_windows")
    class _Windows(LatentGeneratorMethod):
        """A latent-generator inversion whose synthesis loss is the teacher's CE: records, per synthesis
        step, whether Adam's state was fresh."""

        @dataclass
        class Config(LatentGeneratorMethod.Config):
            g_steps: int = 3
            kd_steps: int = 2
            oh: float = 1.0

        reset_generator = True

        def synthesis_terms(self, x01, ctx):
            t, ce, bn = self.oh_terms(x01)
            return {"loss": ce, "ce": ce}


def test_fresh_phase_clears_adam_at_every_round_and_the_pool_takes_the_best_batch(tmp_path, digits_teacher):
    t = Trainer(df_cfg(tmp_path, "w", "test_windows", digits_teacher, "trainer.max_steps=10",
                       "method.pool_size=40"))
    opt = t.optimizers[0]
    steps_seen = []
    for step in range(10):
        t._train_step(step)
        if t.phases[0].due(step):
            steps_seen.append(int(next(iter(opt.state.values()))["step"]))
    # Adam's step counter restarts at every round: 3 synthesis steps per round of 5
    assert steps_seen == [1, 2, 3, 1, 2, 3]
    m = t.method
    assert int(m.pool.added) == 32 and int(m.synthesised) == 32
    # the pool's newest batch is the round's lowest-loss batch, as uint8
    assert m.pool.images.dtype == torch.uint8
    newest = m.pool.decode(torch.arange(16, 32))
    assert torch.allclose(newest, (m.best_x * 255).round() / 255, atol=1e-6)
    assert torch.equal(m.pool.labels[16:32], m.y)


def test_phase_seconds_and_synthesised_images_reach_the_summary(tmp_path, digits_teacher):
    s = train(df_cfg(tmp_path, "s", "test_windows", digits_teacher, "trainer.max_steps=10"))
    assert set(s["phase_seconds"]) == {"synthesis", "student"} and all(v > 0 for v in s["phase_seconds"].values())
    assert s["images_synthesised"] == 32
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["images_synthesised"] == 32


def test_a_round_based_run_resumes_exactly(tmp_path, digits_teacher):
    # stopped mid-round (step 6 of rounds of 5): the round's labels, best batch, Adam state and pool carry over
    resumes_bitwise(lambda name: df_cfg(tmp_path, name, "test_windows", digits_teacher, "trainer.max_steps=12",
                                        "trainer.ckpt_every=3"), stop_after=6)


# ------------------------------------------------------------------------------------------------ pool
def test_pool_is_a_ring_of_uint8_or_half_images_with_labels():
    pool = SyntheticPool(5, (1, 2, 2))
    x = torch.rand(3, 1, 2, 2)
    pool.add(x, torch.tensor([0, 1, 2]))
    assert int(pool.filled) == 3
    assert torch.allclose(pool.decode(torch.arange(3)), (x * 255).round() / 255)
    pool.add(torch.rand(4, 1, 2, 2), torch.tensor([3, 4, 5, 6]))
    assert int(pool.filled) == 5 and pool.labels.tolist() == [5, 6, 2, 3, 4]  # the oldest overwritten first
    torch.manual_seed(0)
    xs, ys = pool.sample(400)
    assert set(ys.tolist()) == {2, 3, 4, 5, 6}
    half = SyntheticPool(2, (1, 1, 1), dtype="half")
    half.add(torch.tensor([0.3]).view(1, 1, 1, 1))
    assert half.images.dtype == torch.float16 and abs(float(half.decode(torch.tensor([0]))) - 0.3) < 1e-3
    with pytest.raises(ValueError, match="at least one image"):
        SyntheticPool(0, (1, 2, 2))


def test_sampling_an_unfilled_pool_draws_only_filled_slots():
    pool = SyntheticPool(100, (1, 1, 1))
    pool.add(torch.ones(2, 1, 1, 1), torch.tensor([7, 8]))
    _, ys = pool.sample(500)
    assert set(ys.tolist()) == {7, 8}


# ---------------------------------------------------------------------------------------------- errors
def test_a_pool_of_zero_is_a_recipe_error(tmp_path, digits_teacher):
    with pytest.raises(ConfigError, match="pool_size"):
        df_cfg(tmp_path, "z", "test_windows", digits_teacher, "method.pool_size=0")


def test_a_teacher_without_batchnorm_names_the_layers_looked_for(tmp_path):
    out = tmp_path / "nobn"
    train(load_config(None, [f"out_dir={out}", "method.name=supervised", "model.name=test_mlp", "data.name=digits",
                             "data.val_size=200", "trainer.max_steps=2", "trainer.eval_every=2",
                             "trainer.ckpt_every=2", "trainer.progress=false"]))
    with pytest.raises(ConfigError, match=r"method.bn=1.*no BatchNorm layer.*BatchNorm1d/2d/3d.*method.bn=0"):
        Trainer(df_cfg(tmp_path, "n", "test_windows", out, "method.bn=1"))


def test_a_teacher_run_that_is_not_a_classifier_is_named(tmp_path):
    out = tmp_path / "edm"
    train(load_config("recipes/diffusion/digits_edm.yaml", [
        f"out_dir={out}", "trainer.max_steps=2", "schedule.warmup_steps=0", "trainer.eval_every=2",
        "trainer.ckpt_every=2", "trainer.progress=false"]))
    with pytest.raises((TeacherError, ConfigError), match="not a classifier"):
        Trainer(df_cfg(tmp_path, "c", "test_windows", out))


def test_missing_teacher_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="method.teacher"):
        Trainer(load_config(None, [f"out_dir={tmp_path / 'm'}", "method.name=test_windows", "model.name=resnet8",
                                   "data.name=digits"]))


def test_data_free_runs_read_real_data_for_reporting_only(tmp_path, digits_teacher):
    t = Trainer(df_cfg(tmp_path, "r", "test_windows", digits_teacher, "trainer.max_steps=2"))
    assert t.splits.train is None and len(t.splits.val) == 200
    assert t.method.info.num_classes == 10 and t.method.shape == (1, 8, 8)


def test_generator_reset_differs_between_rounds(tmp_path, digits_teacher):
    t = Trainer(df_cfg(tmp_path, "g", "test_windows", digits_teacher, "trainer.max_steps=10"))
    t._train_step(0)
    first = t.method.generator.l1.weight.detach().clone()
    for s in range(1, 6):
        t._train_step(s)
    second = t.method.generator.l1.weight.detach().clone()
    assert not torch.allclose(first, second)
    # a reset generator starts from N(0, 0.02) weights
    assert abs(float(second.std()) - 0.02) < 0.01
    assert F.mse_loss(second, first) > 1e-5


@pytest.mark.parametrize("method", ["dafl", "zskt", "dfad", "dfq", "deepinversion", "cmi", "fast", "csd", "cpsc_dfkd",
                                    "dfkd_fgvc", "dfdg"])
def test_steps_for_gives_the_student_the_asked_number_of_steps(tmp_path, digits_teacher, method):
    # the benchmark gives every method the same student budget through steps_for; count the student
    # phase's due steps in the method's own phase layout
    cfg = df_cfg(tmp_path, method, method, digits_teacher, "method.warmup_rounds=1" if method in ("fast", "csd")
                 else "trainer.seed=0")
    t = Trainer(cfg)
    for want in (7, 30):
        steps = METHODS.get(method).steps_for(cfg.method, want)
        student = next(p for p in t.phases if p.name == "student")
        got = sum(student.due(s) for s in range(steps))
        assert want <= got < want + student.span, (got, want)
        assert sum(student.due(s) for s in range(steps - student.every)) < want  # no whole period to spare


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("dfad", ["method.g_steps=1", "method.s_steps=5"]),
    ("fast", ["method.g_steps=5", "method.kd_steps=20", "method.warmup_rounds=1", "method.reset_l0=0"]),
])
def test_a_student_learns_the_digits_without_seeing_one(tmp_path, digits_teacher, method, extra):
    # 400 student steps of 64 synthetic images; the student never sees a real digit, the real test split
    # is read only to report (chance is 10%)
    cfg = df_cfg(tmp_path, method, method, digits_teacher, "method.batch_size=64", "method.nz=64",
                 "method.ngf=32", "optim.lr=0.1", "trainer.eval_every=1000", "trainer.ckpt_every=1000", *extra)
    cfg.trainer.max_steps = METHODS.get(method).steps_for(cfg.method, 400)
    s = train(cfg)
    assert s["test_acc_last"] > 0.4, s["test_acc_last"]
