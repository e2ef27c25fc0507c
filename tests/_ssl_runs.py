"""Engine runs shared by the semi-supervised tests: the 6-step digits run every method trains, saves and
resumes on, and the 5-step run the two-rank DDP checks compare with one process."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from _helpers import fit_until_signal

from mentor.engine import Trainer

# 4 labels per class of the digits, the rest unlabelled (mu = 2), a small BN network, 6 steps.
RUN = ["data.name=digits", "data.val_size=200", "data.padding=1", "data.flip=false", "data.labels_per_class=4",
       "data.batch_size=16", "data.unlabeled_ratio=2", "model.name=test_bncnn", "trainer.max_steps=6",
       "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=1", "trainer.progress=false",
       "optim.lr=0.1"]

DDP_RUN = ["data.name=digits", "data.val_size=200", "data.padding=1", "data.flip=false", "data.labels_per_class=4",
           "data.unlabeled_ratio=2", "model.name=test_mlp", "trainer.max_steps=5", "trainer.eval_every=5",
           "trainer.ckpt_every=5", "trainer.log_every=5", "trainer.progress=false", "optim.lr=0.1",
           "schedule.name=constant"]


def resumes_bitwise(cfg: Callable[[str], object], out: Path, splits=None,
                    state: Callable[[Trainer], dict] = lambda t: t.method.state_dict()):
    """Train ``cfg("a")`` straight through, and ``cfg("b")`` stopped by a signal after step 2 and resumed;
    assert that the resumed run ends with the straight run's ``state`` bit for bit. Returns the straight
    trainer, its state before training, its state after, its logged training events and the method state
    saved in its ``last.pt``."""
    straight = Trainer(cfg("a"), splits=splits)
    start = {k: v.clone() for k, v in state(straight).items()}
    summary = straight.fit()
    assert summary["steps"] == 6
    events = [json.loads(line) for line in (out / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 6 and all(math.isfinite(e["loss"]) and "pl_acc" in e for e in train)
    ref = state(straight)
    saved = torch.load(out / "a" / "last.pt", weights_only=True)["method"]

    fit_until_signal(Trainer(cfg("b"), splits=splits), after_step=2)
    second = Trainer(cfg("b"), splits=splits)
    second.fit()
    assert second.start_step == 3
    got = state(second)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    return straight, start, ref, train, saved
