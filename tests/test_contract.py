"""The Method contract: its rules checked with clear errors, the ramp helper, the hooks, the catalogue."""

import importlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _helpers import BNNet  # noqa: F401  (registers test_bncnn)

from mentor.config import load_config
from mentor.engine import Trainer
from mentor.errors import ContractError
from mentor.methods import BUILTIN, METHODS, BuildInfo, Method, MethodConfig, StepContext, register_method
from mentor.nn import ramp

pytest.importorskip("sklearn")


def _cfg(tmp_path, method, *extra):
    return load_config(None, [
        f"out_dir={tmp_path / method}", f"method.name={method}", "data.name=digits", "data.val_size=200",
        "data.batch_size=16", "data.padding=1", "data.flip=false", "model.name=test_bncnn", "trainer.max_steps=4",
        "trainer.eval_every=4", "trainer.ckpt_every=4", "trainer.log_every=2", "trainer.progress=false", *extra])


def _register(name, step):
    if name not in METHODS:

        @register_method(name)
        class Broken(Method):
            @dataclass
            class Config(MethodConfig):
                pass

            def training_step(self, batch, ctx):
                return step(self, batch, ctx)


def _ce(self, batch):
    return F.cross_entropy(self.student(batch["x"]), batch["y"])


_register("test_no_loss", lambda self, b, ctx: {"ce": _ce(self, b)})
_register("test_vector_term", lambda self, b, ctx: {"loss": _ce(self, b), "per": self.student(b["x"]).sum(1)})
_register("test_python_term", lambda self, b, ctx: {"loss": _ce(self, b), "lr": 0.1})
_register("test_changing_keys", lambda self, b, ctx: {"loss": _ce(self, b), **({"odd": _ce(self, b)}
                                                                                if ctx.step % 2 else {})})


@pytest.mark.parametrize("method,words", [
    ("test_no_loss", "without 'loss'"),
    ("test_vector_term", "term 'per' has shape"),
    ("test_python_term", "term 'lr' is a float"),
    ("test_changing_keys", "same terms every step"),
])
def test_contract_breaks_are_clear_errors_before_anything_is_written(tmp_path, method, words):
    with pytest.raises(ContractError, match=words):
        Trainer(_cfg(tmp_path, method)).fit()
    assert not (tmp_path / method / "last.pt").exists()


@pytest.mark.parametrize("shape,formula", [
    ("linear", lambda t: t),
    ("sigmoid", lambda t: math.exp(-5.0 * (1.0 - t) ** 2)),
    ("cosine", lambda t: (1.0 - math.cos(math.pi * t)) / 2.0),
])
def test_ramp_is_the_same_eagerly_and_on_a_device_step(shape, formula):
    length, start = 10, 5
    for step in (0, 4, 5, 9, 14, 15, 100):
        t = min(max((step + 1 - start) / length, 0.0), 1.0)
        eager = ramp(step, length, start=start, shape=shape)
        captured = ramp(torch.tensor(step), length, start=start, shape=shape)
        assert eager.dim() == 0 and float(eager) == pytest.approx(formula(t), abs=1e-6)
        assert float(captured) == float(eager)
    assert float(ramp(3, 0)) == 1.0  # no warm-up


def test_dkd_warmup_uses_the_ramp_in_both_forms():
    from mentor.distill.dkd import warmup_factor

    for step in (0, 7, 39, 500):
        ctx_int = StepContext(step=step, max_steps=1000, steps_per_epoch=2)
        ctx_t = StepContext(step=torch.tensor(step), max_steps=1000, steps_per_epoch=2)
        expected = min((step + 1) / 40, 1.0)  # 20 epochs of 2 steps
        assert float(warmup_factor(ctx_int, 20)) == pytest.approx(expected)
        assert float(warmup_factor(ctx_t, 20)) == pytest.approx(expected)


def test_catalogue_lists_exactly_what_each_module_registers():
    for module in sorted(set(BUILTIN.values())):
        importlib.import_module(module)
    builtin_classes = {n: METHODS.get(n) for n in METHODS.names() if not n.startswith("test_")}
    assert set(builtin_classes) == set(BUILTIN)
    for name, cls in builtin_classes.items():
        assert cls.__module__ == BUILTIN[name], name


def test_config_imports_only_the_named_methods_family():
    import subprocess
    import sys

    code = ("import sys; from mentor.config import load_config; load_config(None, ['method.name=dkd', "
            "'method.teacher=x']); print(sorted(m for m in ('mentor.diffusion', 'mentor.adapt', 'mentor.semi', "
            "'mentor.distill') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mentor.distill']"


if "test_epoch_hook" not in METHODS:

    @register_method("test_epoch_hook")
    class EpochHook(Method):
        """Records the epochs its refresh hook saw and the size of the training split it was given."""

        @dataclass
        class Config(MethodConfig):
            pass

        def __init__(self, cfg, student, info):
            super().__init__(cfg, student, info)
            self.seen: list[tuple[int, int]] = []
            self.register_buffer("refreshed", torch.zeros((), dtype=torch.long))

        def on_epoch(self, epoch, refresh):
            self.seen.append((epoch, len(refresh.labeled)))
            self.refreshed += 1

        def training_step(self, batch, ctx):
            return {"loss": F.cross_entropy(self.student(batch["x"]), batch["y"])}


def test_on_epoch_runs_before_each_epoch_with_the_training_split(tmp_path):
    # 60 labelled images in batches of 16 -> 3 steps per epoch (drop_last); 8 steps -> epochs 0, 1, 2
    t = Trainer(_cfg(tmp_path, "test_epoch_hook", "data.subset=60", "trainer.max_steps=8"))
    assert t.inputs.steps_per_epoch == 3
    t.fit()
    assert t.method.seen == [(0, 60), (1, 60), (2, 60)]


def test_reset_restores_the_snapshot():
    m = Method(MethodConfig(name="x"), BNNet(3), BuildInfo(num_classes=3))
    m.snapshot()
    w = m.student.fc.weight.detach().clone()
    with torch.no_grad():
        m.student.fc.weight.add_(1.0)
        m.student.bn.running_var.mul_(3.0)
    m.reset()
    assert torch.equal(m.student.fc.weight, w) and torch.equal(m.student.bn.running_var, torch.ones(8))
