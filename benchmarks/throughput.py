"""Training-step throughput of the engine for a zoo model on CIFAR-shaped data.

Times the engine's own step (device batch draw, augmentation, forward, backward, optimizer) in steady
state after warm-up, synchronising the device only at the ends, and prints one JSON line per
configuration. On CUDA it also reports the achieved TFLOP/s (FLOPs counted on one step).

    python benchmarks/throughput.py --model resnet8x4 --batch 64 --device cuda --precision bf16 --compile
    python benchmarks/throughput.py --model resnet20 --size 28 --channels 1 --batch 128   # CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from mentor.config import load_config
from mentor.data import ArrayDataset
from mentor.engine import Trainer
from mentor.engine.inputs import Splits
from mentor.engine.trainer import hardware_name

H100_BF16_DENSE_TFLOPS = 989.0


def synthetic_splits(n: int, channels: int, size: int, num_classes: int, seed: int = 0) -> Splits:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    ds = ArrayDataset(images=images, labels=labels, num_classes=num_classes, name="synthetic",
                      classes=[str(i) for i in range(num_classes)], mean=(0.5,) * channels,
                      std=(0.25,) * channels)
    return Splits(train=ds, val=ds.subset(torch.arange(256)), test=ds.subset(torch.arange(256)),
                  train_index=torch.arange(n))


def time_steps(trainer: Trainer, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` of the engine's own training step after ``warmup`` steps, the device
    synchronised only at the two ends (the steady state every speed figure here reports)."""
    trainer.method.train()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for step in range(warmup):
        trainer._train_step(step)
    sync()
    t0 = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer._train_step(step)
    sync()
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict:
    overrides = [
        f"model.name={args.model}", f"data.batch_size={args.batch}", f"data.augment={args.augment}",
        f"trainer.device={args.device}", f"trainer.precision={args.precision}",
        f"trainer.compile={str(args.compile).lower()}", f"trainer.channels_last={str(args.channels_last).lower()}",
        f"trainer.max_steps={args.warmup + args.steps}", "trainer.progress=false", "out_dir=/tmp/mentor-bench",
        "resume=false",
    ]
    if args.threads:
        overrides.append(f"trainer.threads={args.threads}")
    cfg = load_config(None, overrides)
    splits = synthetic_splits(max(4096, args.batch * 8), args.channels, args.size, args.classes)
    trainer = Trainer(cfg, splits=splits)
    dev = trainer.device
    dt = time_steps(trainer, args.warmup, args.steps)
    img_s = args.steps * args.batch / dt
    out = {
        "model": args.model, "batch": args.batch, "input": [args.channels, args.size, args.size],
        "augment": args.augment, "device": dev.type, "precision": args.precision, "compile": args.compile,
        "channels_last": args.channels_last, "img_s": round(img_s, 1),
        "step_ms": round(1000 * dt / args.steps, 3),
        "threads": torch.get_num_threads(), "torch": str(torch.__version__),
        "hardware": hardware_name(dev),
        "date": datetime.date.today().isoformat(),
    }
    if dev.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            trainer._train_step(args.warmup + args.steps)
        flops = fc.get_total_flops()
        out["tflops"] = round(flops * args.steps / dt / 1e12, 2)
        out["peak_tflops_bf16"] = H100_BF16_DENSE_TFLOPS
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet8x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--augment", default="weak", choices=["none", "weak", "strong"])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
