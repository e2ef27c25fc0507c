"""Roles are declared: EMA teachers are trained state (checkpointed, resumed bitwise), frozen
teachers are not, and an undeclared frozen child is kept like any other trained part."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _helpers import BNNet, fit_until_signal
from torch import nn

from mentor.config import load_config
from mentor.engine import Trainer
from mentor.methods import METHODS, BuildInfo, Method, MethodConfig, register_method

pytest.importorskip("sklearn")


if "test_mean_teacher" not in METHODS:

    @register_method("test_mean_teacher")
    class MeanTeacherLike(Method):
        """CE + consistency with an EMA copy of the student that the loss reads (Mean Teacher's shape)."""

        @dataclass
        class Config(MethodConfig):
            decay: float = 0.9

        def __init__(self, cfg, student, info):
            super().__init__(cfg, student, info)
            self.add_ema_teacher("teacher", "student", cfg.decay)
            self.frozen_extra = nn.Linear(2, 2).requires_grad_(False)  # frozen, but not a teacher

        def training_step(self, batch, ctx):
            z = self.student(batch["x"])
            with torch.no_grad():
                zt = self.teacher(batch["x"])
            cons = (z.softmax(1) - zt.softmax(1)).square().sum(1).mean()
            return {"loss": F.cross_entropy(z, batch["y"]) + cons, "cons": cons}


def cfg_for(tmp_path, name, *extra):
    return load_config(None, [
        f"out_dir={tmp_path / name}", "method.name=test_mean_teacher", "data.name=digits", "data.val_size=200",
        "data.batch_size=32", "data.padding=1", "data.flip=false", "model.name=test_bncnn", "trainer.max_steps=8",
        "trainer.eval_every=4", "trainer.ckpt_every=4", "trainer.log_every=4", "trainer.progress=false",
        "optim.lr=0.1", *extra])


def test_ema_teacher_is_checkpointed_and_resume_is_bitwise(tmp_path):
    straight = Trainer(cfg_for(tmp_path, "a"))
    straight.fit()
    saved = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["method"]
    assert any(k.startswith("teacher.") for k in saved)  # the EMA teacher is trained state
    assert "frozen_extra.weight" in saved  # an undeclared frozen child is not mistaken for a teacher

    resumed_cfg = cfg_for(tmp_path, "c")
    fit_until_signal(Trainer(resumed_cfg), after_step=2)
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["step"] == 3
    second = Trainer(resumed_cfg)
    assert second.start_step == 0  # not yet loaded: fit() loads
    second.fit()
    assert second.start_step == 3
    ref, got = straight.method.state_dict(), second.method.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_ema_teacher_update_matches_hand_computation():
    info = BuildInfo(num_classes=3, in_channels=1)
    m = METHODS.get("test_mean_teacher")(METHODS.get("test_mean_teacher").Config(name="x", decay=0.75),
                                         BNNet(3), info)
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
        m.student.bn.running_mean.fill_(0.5)
    m.after_step(None)
    for name, p in m.student.named_parameters():
        expected = 0.75 * before[name] + 0.25 * p  # decay * ema + (1 - decay) * student
        assert torch.allclose(m.teacher.get_parameter(name), expected, atol=1e-6)
    assert torch.equal(m.teacher.bn.running_mean, torch.full((8,), 0.5))  # buffers copied, not averaged
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())


def test_declared_teacher_is_left_out_of_the_checkpoint_and_ddp():
    info = BuildInfo(num_classes=3, in_channels=1)
    m = Method(MethodConfig(name="x"), BNNet(3), info)
    m.add_teacher("teacher", BNNet(3))
    m.unfrozen = BNNet(3).requires_grad_(False)
    keys = m.trained_state().keys()
    assert not any(k.startswith("teacher.") for k in keys)
    assert any(k.startswith("unfrozen.") for k in keys)
    assert set(m.frozen_modules()) == {"teacher"}
    m.train()
    assert not m.teacher.training and m.student.training
