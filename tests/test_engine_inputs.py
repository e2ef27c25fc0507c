"""Inputs a method declares, the engine produces: few labels and an unlabelled pool, per-domain batches
with held-out domains reported one by one, no data at all, and a network started from a trained run."""

from dataclasses import dataclass

import _dg  # noqa: F401  (registers test_digit_domains)
import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    BNNet,  # noqa: F401  (registers test_bncnn)
    fit_until_signal,
)
from torch import nn

from mentor.config import ConfigError, load_config
from mentor.data import load_dataset
from mentor.engine import Trainer, train
from mentor.errors import DataError
from mentor.methods import METHODS, NO_DATA, Inputs, Method, MethodConfig, Phase, StepContext, register_method

pytest.importorskip("sklearn")

BASE = ["data.name=digits", "data.val_size=200", "data.padding=1", "data.flip=false", "model.name=test_bncnn",
        "trainer.eval_every=4", "trainer.ckpt_every=4", "trainer.log_every=2", "trainer.progress=false"]


def cfg(tmp_path, name, *extra):
    return load_config(None, [f"out_dir={tmp_path / name}", *BASE, *extra])


if "test_peek" not in METHODS:

    @register_method("test_peek")
    class Peek(Method):
        """Records the keys and shapes of every batch it is given; trains on the labelled CE."""

        inputs = Inputs(labeled=("weak", "none"), unlabeled=("weak", "strong"))

        @dataclass
        class Config(MethodConfig):
            pass

        def __init__(self, cfg, student, info):
            super().__init__(cfg, student, info)
            self.batches: list[dict] = []

        def training_step(self, batch, ctx):
            self.batches.append({k: tuple(v.shape) for k, v in batch.items()})
            self.last_u_index = batch["u_index"]
            pred = self.student(batch["u"]).argmax(1)
            ctx.pseudo_labels(pred, (pred % 2 == 0).float())
            return {"loss": F.cross_entropy(self.student(batch["x"]), batch["y"])}


def test_labels_per_class_keeps_the_rest_as_the_unlabelled_pool(tmp_path):
    # 4 labels per class = 40 labels with a batch of 64: never a crash, the split is repeated to fill it.
    t = Trainer(cfg(tmp_path, "peek", "method.name=test_peek", "data.labels_per_class=4", "data.batch_size=64",
                    "data.unlabeled_ratio=2", "trainer.max_steps=2"))
    full = load_dataset("digits", "train")
    assert len(t.splits.train) == 40 and torch.bincount(t.splits.train.labels).tolist() == [4] * 10
    assert len(t.splits.unlabeled) == len(full) - 200  # the whole training split after validation
    # the labelled images are training images (positions into the official split), not validation ones
    val_pos = set(range(len(full))) - set(t.splits.train_index.tolist())
    assert len(val_pos) == len(full) - 40
    t.fit()
    b = t.method.batches[0]
    assert b["x"] == b["x_weak"] == b["x_none"] == (64, 1, 8, 8) and b["y"] == (64,)
    assert b["u"] == b["u_weak"] == b["u_strong"] == (128, 1, 8, 8) and b["u_index"] == (128,)
    assert "_u_y" not in b and "u_y" not in b  # unlabelled labels never reach the method


def test_label_seed_chooses_another_fold(tmp_path):
    a = Trainer(cfg(tmp_path, "a", "method.name=test_peek", "data.labels_per_class=2", "data.batch_size=8"))
    b = Trainer(cfg(tmp_path, "b", "method.name=test_peek", "data.labels_per_class=2", "data.batch_size=8",
                    "data.label_seed=1"))
    assert not torch.equal(a.splits.train_index, b.splits.train_index)


def test_pseudo_label_diagnostics_match_a_hand_count():
    ctx = StepContext(step=0, max_steps=1, unlabeled_targets=torch.tensor([0, 1, 2, 3, 4]))
    ctx.pseudo_labels(torch.tensor([0, 1, 0, 3, 0]), torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    assert float(ctx.diagnostics["mask_rate"]) == pytest.approx(3 / 5)
    assert float(ctx.diagnostics["pl_acc"]) == pytest.approx(2 / 3)  # kept: 0 ok, 1 ok, 0 vs 2 wrong


def test_diagnostics_are_logged_never_selected(tmp_path):
    t = Trainer(cfg(tmp_path, "diag", "method.name=test_peek", "data.labels_per_class=4", "data.batch_size=16",
                    "data.unlabeled_ratio=1", "trainer.max_steps=2", "trainer.log_every=1"))
    t.fit()
    import json

    events = [json.loads(line) for line in (tmp_path / "diag" / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["split"] == "train"]
    assert all("pl_acc" in e and "mask_rate" in e for e in train_events)
    assert t.metric == "acc"


def test_too_many_labels_per_class_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="labels_per_class=500 is larger than class"):
        Trainer(cfg(tmp_path, "x", "data.labels_per_class=500"))
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------------- domains


if "test_domain_peek" not in METHODS:

    @register_method("test_domain_peek")
    class DomainPeek(Method):
        inputs = Inputs(labeled=("train",), domains=True)

        @dataclass
        class Config(MethodConfig):
            pass

        def training_step(self, batch, ctx):
            self.domain = batch["domain"]
            self.y = batch["y"]
            return {"loss": F.cross_entropy(self.student(batch["x"]), batch["y"])}


def test_domain_batches_are_balanced_and_held_out_domains_reported_one_by_one(tmp_path):
    t = Trainer(cfg(tmp_path, "dom", "method.name=test_domain_peek", "data.name=test_digit_domains",
                    "data.test_domains=[rolled]", "data.batch_size=8", "trainer.max_steps=4"))
    n = len(load_dataset("digits", "train")) // 3
    assert list(t.splits.domains) == ["plain", "inverted"]
    holdout = round(0.2 * n)
    assert len(t.splits.val) == 2 * holdout and len(t.splits.train) == 2 * (n - holdout)
    summary = t.fit()
    assert t.method.domain.tolist() == [0] * 8 + [1] * 8  # batch_size images from each domain, in order
    assert summary["test_acc_last"] == summary["test_acc_last@rolled"] == summary["test_acc_last@worst"]


def test_mean_and_worst_over_several_held_out_domains(tmp_path):
    summary = train(cfg(tmp_path, "two", "method.name=erm", "data.name=test_digit_domains",
                        "data.test_domains=[inverted, rolled]", "data.batch_size=8", "trainer.max_steps=4"))
    a, b = summary["test_acc_last@inverted"], summary["test_acc_last@rolled"]
    assert summary["test_acc_last"] == pytest.approx((a + b) / 2)
    assert summary["test_acc_last@worst"] == min(a, b)


@pytest.mark.parametrize("extra,words", [
    (["data.test_domains=[rolld]"], "no domain 'rolld'. Did you mean 'rolled'"),
    (["data.test_domains=[plain]", "data.domains=[plain]"], "share"),
    (["data.test_domains=[plain, inverted, rolled]"], "leave at least one"),
])
def test_bad_domain_names_are_clear_errors(tmp_path, extra, words):
    with pytest.raises((ConfigError, DataError), match=words):
        Trainer(cfg(tmp_path, "bad", "method.name=erm", "data.name=test_digit_domains", *extra))
    assert not (tmp_path / "bad").exists()


def test_per_domain_method_on_plain_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="per-domain batches"):
        Trainer(cfg(tmp_path, "erm", "method.name=erm"))


# --------------------------------------------------------------------------------- no data, init_from


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(None, [f"out_dir={out}", *BASE, "data.batch_size=32", "trainer.max_steps=8",
                             "optim.lr=0.1"]))
    return out


if "test_generator" not in METHODS:

    @register_method("test_generator")
    class TinyGenerator(Method):
        """A generator learns to make images the frozen teacher classifies as their sampled class; the
        student learns the teacher's outputs on them; a pool of generated uint8 images is kept."""

        inputs = NO_DATA

        @dataclass
        class Config(MethodConfig):
            teacher: str = ""
            pool: int = 16

        def __init__(self, cfg, student, info):
            super().__init__(cfg, student, info)
            from mentor.distill import load_teacher

            self.add_teacher("teacher", load_teacher(cfg.teacher, info))
            self.gen = nn.Sequential(nn.Linear(8, 64), nn.Tanh())
            self.register_buffer("pool", torch.zeros(cfg.pool, 1, 8, 8, dtype=torch.uint8))
            self.register_buffer("filled", torch.zeros((), dtype=torch.long))

        def phases(self):
            return [Phase("generator", list(self.gen.parameters())),
                    Phase("student", list(self.student.parameters()), optim={"lr": 0.05})]

        def training_step(self, batch, ctx):
            assert batch == {}
            z = torch.randn(8, 8)
            y = torch.arange(8) % self.info.num_classes
            x = self.gen(z).view(8, 1, 8, 8) * 2
            if ctx.phase == "generator":
                return {"loss": F.cross_entropy(self.teacher(x), y)}
            x = x.detach()
            with torch.no_grad():
                zt = self.teacher(x)
                slot = (self.filled + torch.arange(8)) % self.cfg.pool
                self.pool[slot] = ((x * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                self.filled += 8
            kl = F.kl_div(F.log_softmax(self.student(x), 1), F.softmax(zt, 1), reduction="batchmean")
            return {"loss": kl}


def test_training_with_no_data_resumes_exactly(tmp_path, digits_teacher):
    def make(name):
        return load_config(None, [f"out_dir={tmp_path / name}", "method.name=test_generator",
                                  f"method.teacher={digits_teacher}", "model.name=test_bncnn", "data.val_size=200",
                                  "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3",
                                  "trainer.log_every=3", "trainer.progress=false", "optim.lr=0.01"])

    straight = Trainer(make("a"))
    assert straight.splits.train is None and len(straight.splits.val) == 200  # real data for reporting only
    straight.fit()
    fit_until_signal(Trainer(make("b")), after_step=3)
    second = Trainer(make("b"))
    second.fit()
    assert second.start_step == 4
    ref, got = straight.method.state_dict(), second.method.state_dict()
    assert int(ref["filled"]) == 48 and ref["pool"].any()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_no_data_without_a_source_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="trains without data"):
        Trainer(load_config(None, [f"out_dir={tmp_path / 'x'}", "method.name=test_generator",
                                   "model.name=test_bncnn"]))


def test_init_from_starts_the_network_from_a_run(tmp_path, digits_teacher):
    best = torch.load(digits_teacher / "best.pt", weights_only=True)["model"]
    t = Trainer(cfg(tmp_path, "ft", f"model.init_from={digits_teacher}", "data.batch_size=16"))
    for k, v in best.items():
        assert torch.equal(t.method.student.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="does not fit model.name=resnet8"):
        Trainer(cfg(tmp_path, "ft2", f"model.init_from={digits_teacher}", "model.name=resnet8"))
    with pytest.raises(ConfigError, match="not found"):
        Trainer(cfg(tmp_path, "ft3", f"model.init_from={tmp_path / 'nowhere'}"))
