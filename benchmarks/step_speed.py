"""Speed of one distillation training step, side by side in one process: the reference loop pattern
against the engine in its eager, compiled and CUDA-graph modes.

The pair is the literature's resnet32x4 -> resnet8x4 on CIFAR-100-shaped data (3x32x32, 100 classes,
50,000 synthetic images; weights untrained: speed does not depend on them), batch 64, SGD.

``reference`` is the loop pattern of the codebases mentor replaces (mdistiller's trainer): batches
assembled on the host and copied to the device every step, eager fp32, and the loss and top-1 accuracy
read back to the host every step for the running meters. It is given its batches ready-made (no host
augmentation, no loader workers), so it is an upper bound on that pattern's speed. Every other row is
the engine's own step (``Trainer._train_step``: device batch draw and augmentation, forward, backward,
optimizer, device-side loss meter).

    python benchmarks/step_speed.py --method dkd                     # on a GPU; prints JSON lines
    python benchmarks/step_speed.py --method kd --modes eager,graph --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mentor.config import load_config
from mentor.distill.losses import dkd_loss, kd_loss
from mentor.engine import Trainer
from mentor.engine.checkpoint import atomic_save
from mentor.engine.trainer import hardware_name
from mentor.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import H100_BF16_DENSE_TFLOPS, synthetic_splits, time_steps  # noqa: E402

MODES = {
    # name: (precision, compile, cuda_graph, channels_last)
    "eager_fp32": ("fp32", False, False, False),
    "eager": ("bf16", False, False, False),
    "compile": ("bf16", True, False, False),
    "graph": ("bf16", False, True, False),
    "compile_graph": ("bf16", True, True, False),
    "compile_graph_cl": ("bf16", True, True, True),
}


def fake_teacher(model: str, num_classes: int, channels: int, size: int, where: Path) -> Path:
    """A run directory holding an untrained network in the shape of a trained teacher."""
    net = create_model(model, num_classes=num_classes, in_channels=channels)
    info = {"model": model, "kwargs": {}, "num_classes": num_classes, "in_channels": channels,
            "image_size": size, "dataset": "synthetic", "method": "supervised"}
    where.mkdir(parents=True, exist_ok=True)
    atomic_save({"step": 0, "model": net.state_dict(), "info": info}, where / "best.pt")
    return where


def reference_loop(args, splits, teacher_dir: Path, device: torch.device) -> float:
    """Images/s of the reference pattern: host batches, eager fp32, a host read-back every step."""
    torch.manual_seed(0)
    student = create_model(args.student, num_classes=args.classes, in_channels=3).to(device).train()
    teacher = create_model(args.teacher, num_classes=args.classes, in_channels=3).to(device).eval()
    teacher.load_state_dict(torch.load(teacher_dir / "best.pt", weights_only=True)["model"])
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = splits.train.images.float().div(255.0).sub(0.5).div(0.25).pin_memory()
    labels = splits.train.labels.pin_memory()
    n, b = images.shape[0], args.batch
    order = torch.randperm(n)
    meters = {"loss": 0.0, "top1": 0.0}

    def step(i: int) -> None:
        idx = order[(i * b) % (n - b):(i * b) % (n - b) + b]
        x = images[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        ce = F.cross_entropy(logits, y)
        if args.method == "dkd":
            kd = min((i + 1) / 20.0, 1.0) * dkd_loss(logits, t_logits, y, 1.0, 8.0, 4.0)[2]
        else:
            kd = kd_loss(logits, t_logits, 4.0)
        loss = ce + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meters["loss"] += loss.item()  # the running meters read the device every step
        meters["top1"] += (logits.argmax(1) == y).float().mean().item()

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    torch.cuda.synchronize(device)
    return args.steps * b / (time.perf_counter() - t0)


def engine_rate(args, splits, teacher_dir: Path, mode: str, out_dir: Path) -> tuple[float, float]:
    """(images/s, FLOPs per step) of the engine's own step in one mode."""
    precision, compiled, graph, channels_last = MODES[mode]
    cfg = load_config(None, [
        f"method.name={args.method}", f"method.teacher={teacher_dir}", f"model.name={args.student}",
        f"data.batch_size={args.batch}", "data.augment=weak", "trainer.device=cuda",
        f"trainer.precision={precision}", f"trainer.compile={str(compiled).lower()}",
        f"trainer.cuda_graph={str(graph).lower()}", f"trainer.channels_last={str(channels_last).lower()}",
        f"trainer.max_steps={args.warmup + args.steps + 1}",
        "trainer.progress=false", f"out_dir={out_dir / mode}", "resume=false", "optim.lr=0.05",
    ])
    trainer = Trainer(cfg, splits=splits)
    rate = args.steps * args.batch / time_steps(trainer, args.warmup, args.steps)
    loss = trainer.meter.read().get("loss", float("nan"))
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"mode {mode}: the loss is not finite ({loss})")
    return rate, loss


def step_flops(args, splits, teacher_dir: Path, out_dir: Path) -> float:
    """FLOPs of one step (teacher forward, student forward and backward), counted in eager mode."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(None, [
        f"method.name={args.method}", f"method.teacher={teacher_dir}", f"model.name={args.student}",
        f"data.batch_size={args.batch}", "trainer.device=cuda", "trainer.progress=false",
        f"out_dir={out_dir / 'flops'}", "resume=false"])
    trainer = Trainer(cfg, splits=splits)
    trainer.method.train()
    trainer._train_step(0)
    with FlopCounterMode(display=False) as fc:
        trainer._train_step(1)
    return float(fc.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="dkd", choices=["kd", "dkd"])
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--modes", default="reference," + ",".join(MODES))
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_speed.py measures GPU steps: no CUDA device here")
    device = torch.device("cuda")
    splits = synthetic_splits(50_000, 3, 32, args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dir = fake_teacher(args.teacher, args.classes, 3, 32, tmp / "teacher")
        flops = step_flops(args, splits, teacher_dir, tmp)
        rates = {}
        for mode in args.modes.split(","):
            extra = {}
            if mode == "reference":
                rates[mode] = reference_loop(args, splits, teacher_dir, device)
            else:
                rates[mode], extra["loss"] = engine_rate(args, splits, teacher_dir, mode, tmp)
            rate = rates[mode]
            row = {"mode": mode, "method": args.method, "pair": f"{args.teacher}->{args.student}",
                   "batch": args.batch, "img_s": round(rate, 1),
                   "x_reference": round(rate / rates["reference"], 2) if "reference" in rates else None,
                   "tflops": round(flops / args.batch * rate / 1e12, 2),
                   "peak_tflops_bf16": H100_BF16_DENSE_TFLOPS, **extra,
                   "hardware": hardware_name(device), "torch": torch.__version__,
                   "date": datetime.date.today().isoformat()}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
