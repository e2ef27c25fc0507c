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


class Float64Net(nn.Module):
    """A zoo network in float64 (its input cast up): a DDP run of it and one process agree to ~1e-15,
    where in float32 a rounding difference may flip a ReLU gate and move weights by up to ~1e-3."""

    def __init__(self, num_classes: int, in_channels: int = 1, model: str = "resnet8"):
        super().__init__()
        from mentor.models import create_model

        self.net = create_model(model, num_classes=num_classes, in_channels=in_channels).double()

    def forward(self, x):
        return self.net(x.double())


for _name, _net in (("test_mlp", FixedMLP), ("test_bncnn", BNNet), ("test_resnet8_f64", Float64Net)):
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` processes on localhost; one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def ddp_worker(rank, world, port, out_dir, overrides, splits, result_path):
    """One rank of a CPU (gloo) run of ``overrides`` on ``splits``; rank 0 saves its state and summary."""
    from mentor.config import load_config
    from mentor.engine import Trainer

    torchrun_env(rank, world, port)
    trainer = Trainer(load_config(None, [f"out_dir={out_dir}", *overrides]), splits=splits)
    summary = trainer.fit()
    if rank == 0:
        torch.save({"state": trainer.method.state_dict(), "summary": summary}, result_path)


SYNC_BN_SHARES = (3, 5)  # images of each rank: the ranks need not hold equal shares


def sync_bn_case(kind: str, dtype: torch.dtype, momentum: float | None, steps: int = 3):
    """Layer and data of one sync-BN check: a BatchNorm (seeded affine parameters), and per step the
    global batch and the gradient the loss ``sum(out * upstream)`` sends into the layer's output."""
    g = torch.Generator().manual_seed(7)
    bn = (nn.BatchNorm2d(4, momentum=momentum) if kind == "2d" else nn.BatchNorm1d(4, momentum=momentum)).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(4, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(4, generator=g, dtype=dtype))
    shape = (sum(SYNC_BN_SHARES), 4, 5, 5) if kind == "2d" else (sum(SYNC_BN_SHARES), 4)
    data = [(3.0 * torch.randn(shape, generator=g, dtype=dtype) + 2.0, torch.randn(shape, generator=g, dtype=dtype))
            for _ in range(steps)]
    return bn, data


SYNC_BN_CASES = [(kind, dtype, momentum) for dtype in (torch.float64, torch.float32)
                 for kind, momentum in (("2d", 0.1), ("2d", None), ("2d", 0.0), ("1d", 0.1))]


def sync_bn_worker(rank, world, port, result_path):
    """Rank ``rank`` runs every :data:`SYNC_BN_CASES` case on its share of the global batch through the
    synchronised layer (train steps, then one eval forward), and saves what it saw."""
    import torch.distributed as dist

    from mentor.nn.syncbn import convert_sync_bn

    torchrun_env(rank, world, port)
    dist.init_process_group("gloo")
    lo = sum(SYNC_BN_SHARES[:rank])
    rows = slice(lo, lo + SYNC_BN_SHARES[rank])
    results = []
    for case in SYNC_BN_CASES:
        bn, data = sync_bn_case(*case)
        convert_sync_bn(bn)
        seen = {"out": [], "grad": []}
        for x, up in data:
            x = x[rows].clone().requires_grad_(True)
            out = bn(x)
            (out * up[rows]).sum().backward()
            seen["out"].append(out.detach())
            seen["grad"].append(x.grad)
        bn.eval()
        seen["eval"] = bn(data[0][0][rows]).detach()
        seen.update(weight_grad=bn.weight.grad, bias_grad=bn.bias.grad, state=bn.state_dict())
        results.append(seen)
    torch.save(results, f"{result_path}.{rank}")
    dist.destroy_process_group()


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


def resumes_bitwise(cfg, stop_after: int) -> tuple[dict, dict]:
    """Train ``cfg("a")`` straight through and ``cfg("b")`` stopped by a signal after step ``stop_after`` and
    resumed; assert the resumed run ends with the straight run's method state bit for bit. Returns the
    straight run's state before and after training."""
    from mentor.engine import Trainer

    straight = Trainer(cfg("a"))
    start = {k: v.clone() for k, v in straight.method.state_dict().items()}
    straight.fit()
    ref = straight.method.state_dict()
    fit_until_signal(Trainer(cfg("b")), after_step=stop_after)
    resumed = Trainer(cfg("b"))
    resumed.fit()
    assert resumed.start_step == stop_after + 1
    got = resumed.method.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    return start, ref


def random_teacher(tmp_path, name: str = "resnet14", spread_bn: bool = False) -> str:
    """A checkpoint of an untrained zoo network in the format `mentor train` writes (best.pt); ``spread_bn``
    randomises the BatchNorm affine parameters (seeded), so per-channel statistics differ."""
    from mentor.engine import checkpoint as ckpt
    from mentor.models import create_model

    if spread_bn:
        torch.manual_seed(123)
    net = create_model(name, num_classes=10, in_channels=1)
    if spread_bn:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-1.0, 1.0)
    path = tmp_path / f"{name}.pt"
    ckpt.atomic_save({"model": net.state_dict(), "info": {"model": name, "num_classes": 10, "in_channels": 1,
                                                          "image_size": 28, "dataset": "test",
                                                          "method": "supervised"}}, path)
    return str(path)


def make_distiller(method: str, tmp_path, teacher: str = "resnet14", student: str = "resnet8", batch_size: int = 8,
                   seed: int = 0, spread_bn: bool = False, **hp):
    """A distillation method built around an untrained student and a :func:`random_teacher`, set up on one
    random batch of 1x28x28 images; returns ``(method, batch)``."""
    from mentor.methods import BuildInfo, create_method
    from mentor.models import create_model

    torch.manual_seed(seed)
    m = create_method(method, create_model(student, num_classes=10, in_channels=1), BuildInfo(),
                      teacher=random_teacher(tmp_path, teacher, spread_bn), **hp)
    batch = {"x": torch.randn(batch_size, 1, 28, 28), "y": torch.arange(batch_size) % 10}
    m.setup(batch)
    return m, batch
