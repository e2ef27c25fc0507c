"""Small models and methods the engine tests register (no BatchNorm, so per-rank batches add up)."""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mentor.methods import METHODS, Method, MethodConfig, register_method
from mentor.models import MODELS, register_model


class TinyMLP(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 32):
        super().__init__()
        self.stem = nn.Flatten()
        self.layer1 = nn.LazyLinear(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.layer1(self.stem(x))))


class FixedMLP(nn.Module):
    """A no-BN, non-lazy MLP for 8x8 single-channel digits."""

    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 32):
        super().__init__()
        self.layer1 = nn.Linear(in_channels * 64, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.layer1(x.flatten(1))))


class BNNet(nn.Module):
    """A small conv net with BatchNorm (running statistics are buffers an EMA copy or test-time BN uses)."""

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))


for _name, _net in (("test_mlp", FixedMLP), ("test_bncnn", BNNet)):
    if _name not in MODELS:
        register_model(_name)(lambda num_classes, in_channels=1, _net=_net, **kw: _net(num_classes, in_channels, **kw))

if "test_nan_at" not in METHODS:

    @register_method("test_nan_at")
    class NanAt(Method):
        """Cross-entropy that turns NaN at one step (to exercise the engine's non-finite check)."""

        @dataclass
        class Config(MethodConfig):
            step: int = 3

        def training_step(self, batch, ctx):
            ce = F.cross_entropy(self.student(batch["x"]), batch["y"])
            aux = ce.detach() * 0 + (float("nan") if ctx.step == self.cfg.step else 0.0)
            return {"loss": ce + aux, "ce": ce, "aux": aux}


if "test_poison_at" not in METHODS:

    @register_method("test_poison_at")
    class PoisonAt(Method):
        """Cross-entropy whose step ``step`` ends by writing inf into one weight: the loss of that step is
        finite, the weights are not (the engine's check of the trained state must see it)."""

        @dataclass
        class Config(MethodConfig):
            step: int = 3

        def training_step(self, batch, ctx):
            return {"loss": F.cross_entropy(self.student(batch["x"]), batch["y"])}

        def after_step(self, ctx):
            super().after_step(ctx)
            if ctx.step == self.cfg.step:
                with torch.no_grad():
                    next(self.student.parameters()).view(-1)[0] = float("inf")


if "test_two_phase" not in METHODS:
    from mentor.methods import Phase

    @register_method("test_two_phase")
    class TwoPhase(Method):
        """Student trained every step; an extra head trained every ``every`` steps with its own lr."""

        @dataclass
        class Config(MethodConfig):
            every: int = 2
            head_lr: float = 0.5

        def __init__(self, cfg, student, info):
            super().__init__(cfg, student, info)
            self.head = nn.Linear(info.num_classes, info.num_classes)
            self.calls: list[tuple[int, str]] = []

        def phases(self):
            return [Phase("main", list(self.student.parameters())),
                    Phase("aux", list(self.head.parameters()), every=self.cfg.every,
                          optim={"lr": self.cfg.head_lr, "weight_decay": 0.0})]

        def training_step(self, batch, ctx):
            self.calls.append((ctx.step, ctx.phase))
            logits = self.student(batch["x"])
            if ctx.phase == "aux":
                logits = self.head(logits.detach())
            return {"loss": F.cross_entropy(logits, batch["y"])}


if "test_scored" not in METHODS:

    @register_method("test_scored")
    class Scored(Method):
        """Cross-entropy training, reported by a lower-is-better number of its own (the mean CE)."""

        select = ("ce", "min")

        @dataclass
        class Config(MethodConfig):
            pass

        def training_step(self, batch, ctx):
            return {"loss": F.cross_entropy(self.student(batch["x"]), batch["y"])}

        @torch.no_grad()
        def score(self, net, split, ev):
            total = torch.zeros((), device=ev.device)
            for x, y in ev.batches(split):
                total += F.cross_entropy(ev.run(net, x).float(), y, reduction="sum")
            return {"ce": ev.total(total).item() / len(split)}


if "test_item_step" not in METHODS:

    @register_method("test_item_step")
    class ItemStep(Method):
        """Cross-entropy whose step reads a value back to the host (not capturable in a CUDA graph)."""

        @dataclass
        class Config(MethodConfig):
            pass

        def training_step(self, batch, ctx):
            ce = F.cross_entropy(self.student(batch["x"]), batch["y"])
            return {"loss": ce * (2.0 if ce.item() > 100 else 1.0)}


def ddp_worker(rank, world, port, out_dir, overrides, splits, result_path):
    """One rank of a CPU (gloo) run of ``overrides`` on ``splits``; rank 0 saves its state and summary."""
    from mentor.config import load_config
    from mentor.engine import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, [f"out_dir={out_dir}", *overrides]), splits=splits)
    summary = trainer.fit()
    if rank == 0:
        torch.save({"state": trainer.method.state_dict(), "summary": summary}, result_path)


def fit_until_signal(trainer, after_step: int) -> None:
    """Run ``trainer.fit()`` and send SIGINT after step ``after_step``: the real signal path, so the loop
    saves ``last.pt`` at step ``after_step + 1`` and stops with KeyboardInterrupt."""
    import os
    import signal

    import pytest

    from mentor.engine import Trainer

    original = Trainer._train_step

    def stop(self, step):
        original(self, step)
        if step == after_step:
            os.kill(os.getpid(), signal.SIGINT)

    Trainer._train_step = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        Trainer._train_step = original
