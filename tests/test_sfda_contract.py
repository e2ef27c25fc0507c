"""The source-free contract: an unlabelled target pool, the source network, labels never reaching the method."""

from dataclasses import dataclass

import pytest
import torch
from _helpers import BNNet  # noqa: F401  (registers test_bncnn)

from mentor.adapt.sfda import SourceFreeMethod
from mentor.config import ConfigError, load_config
from mentor.engine import Trainer, train
from mentor.methods import METHODS, MethodConfig, register_method
from mentor.nn import entropy

pytest.importorskip("sklearn")

if "test_sfda_entropy" not in METHODS:

    @register_method("test_sfda_entropy")
    class EntropySFDA(SourceFreeMethod):
        """Entropy minimisation on the unlabelled target with the classifier frozen; records what it saw."""

        @dataclass
        class Config(MethodConfig):
            pass

        def __init__(self, cfg, student, info):
            super().__init__(cfg, student, info)
            self.register_buffer("seen", torch.zeros(info.unlabeled_size, dtype=torch.long))
            self.refreshed: list[int] = []

        def on_epoch(self, epoch, refresh):
            feats, probs = self.embed(refresh.unlabeled, refresh)
            self.refreshed.append(len(probs))

        def training_step(self, batch, ctx):
            assert "y" not in batch and "x" not in batch
            self.seen.index_add_(0, batch["u_index"], torch.ones_like(batch["u_index"]))
            _, logits = self.tap(batch["u_weak"])
            loss = entropy(logits).mean()
            return {"loss": loss}


def _printed(tmp_path, **kw):
    return [f"out_dir={tmp_path}", "data.name=digits_domains", "data.domains=[dejavu,liberation]",
            "data.test_domains=[handwritten]", "data.batch_size=32", "data.augment=none", "model.name=test_bncnn",
            "trainer.eval_every=20", "trainer.ckpt_every=20", "trainer.progress=false", "optim.lr=0.1",
            *[f"{k}={v}" for k, v in kw.items()]]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("printed") / "run"
    train(load_config(None, _printed(out, **{"method.name": "erm", "trainer.max_steps": 40})))
    return out


def _target(out, source, steps=20):
    return load_config(None, [f"out_dir={out}", "method.name=test_sfda_entropy", f"model.init_from={source}",
                              "model.name=test_bncnn", "data.name=digits_domains", "data.domains=[handwritten]",
                              "data.test_domains=[handwritten]", "data.batch_size=64", "data.augment=none",
                              f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                              f"trainer.ckpt_every={steps}", "trainer.progress=false", "optim.lr=0.01"])


def test_a_source_free_run_reads_the_whole_target_pool_without_labels(tmp_path, source_run):
    trainer = Trainer(_target(tmp_path / "t", source_run, steps=22))
    pool = len(trainer.splits.train)
    assert trainer.method.info.unlabeled_size == pool == 1797 - round(0.2 * 1797)
    assert trainer.inputs.steps_per_epoch == pool // 64 == 22
    head = trainer.method.tap.head
    before = head.weight.detach().clone()
    summary = trainer.fit()
    # one epoch in batches of data.batch_size over the whole pool: no image twice, all but the remainder once
    seen = trainer.method.seen
    assert int(seen.sum()) == 22 * 64 and int(seen.max()) == 1 and int((seen == 0).sum()) == pool - 22 * 64
    assert trainer.method.refreshed[0] == pool  # on_epoch embeds every target image
    assert torch.equal(head.weight, before)  # the classifier stays the source's hypothesis
    assert "oracle" in summary["best_selected_on"] and "test_acc_last" in summary


def test_the_source_network_is_the_starting_point(tmp_path, source_run):
    from mentor.engine import checkpoint as ckpt

    trainer = Trainer(_target(tmp_path / "t", source_run))
    _, _, weights = ckpt.run_info(str(source_run), "source")
    for k, v in trainer.method.student.state_dict().items():
        assert torch.equal(v.cpu(), weights[k].cpu()), k


def test_a_source_free_method_without_a_source_run_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path / 't'}", "method.name=test_sfda_entropy", "model.name=test_bncnn",
                             "data.name=digits_domains", "data.domains=[handwritten]",
                             "data.test_domains=[handwritten]"])
    with pytest.raises(ConfigError, match="model.init_from"):
        Trainer(cfg)
    assert not (tmp_path / "t").exists()
