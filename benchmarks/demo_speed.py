"""Why the CPU demo runs as it does: the engine's training step and its evaluation on a CPU, side by side in
one run, for the demo's networks at Fashion-MNIST shape (1x28x28, batch 128).

Training: the engine's own step (batch draw, weak augmentation, forward, backward, SGD) in steady state, for
eager execution, channels-last memory format (oneDNN convolutions), ``torch.compile`` and both. Evaluation:
``Evaluator.accuracy`` over 5,000 images with evaluation batches of 1,000 (the default) and 128, with and
without channels-last. Prints a Markdown table; the ratios are the result (absolute rates depend on the CPU).

    python benchmarks/demo_speed.py                  # 2 threads, resnet20 and resnet8
    python benchmarks/demo_speed.py --models resnet20 --steps 40
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time

import torch
from throughput import synthetic_splits, time_steps

from mentor.config import load_config
from mentor.engine import Trainer
from mentor.engine.trainer import hardware_name

TRAIN_CONFIGS = {
    "eager": [],
    "channels_last": ["trainer.channels_last=true"],
    "compile": ["trainer.compile=true"],
    "compile + channels_last": ["trainer.compile=true", "trainer.channels_last=true"],
}


def trainer_for(model: str, extra: list[str], steps: int, threads: int) -> Trainer:
    cfg = load_config(None, [f"model.name={model}", "data.batch_size=128", "data.augment=weak", "data.padding=2",
                             "trainer.device=cpu", f"trainer.threads={threads}", f"trainer.max_steps={steps}",
                             "trainer.progress=false", "out_dir=/tmp/mentor-demo-speed", "resume=false", *extra])
    return Trainer(cfg, splits=synthetic_splits(8192, 1, 28, 10))


def train_rate(model: str, extra: list[str], warmup: int, steps: int, threads: int) -> float:
    trainer = trainer_for(model, extra, warmup + steps, threads)
    return steps * 128 / time_steps(trainer, warmup, steps)


def eval_rate(model: str, channels_last: bool, batch: int, threads: int, repeats: int = 2) -> float:
    """Images/s of ``Evaluator.accuracy`` over 5,000 images (the demo's validation split)."""
    extra = ["trainer.channels_last=true"] if channels_last else []
    trainer = trainer_for(model, [*extra, f"data.eval_batch_size={batch}"], 1, threads)
    net = copy.deepcopy(trainer.method.deployable()).eval()
    split = trainer.splits.train.subset(torch.arange(5000))
    ev = trainer.evaluator()
    ev.accuracy(net, split)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        ev.accuracy(net, split)
    return repeats * 5000 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"CPU: {hardware_name(torch.device('cpu'))}, {args.threads} threads, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}", "",
             "| model | what | setting | img/s | × eager / default |", "|---|---|---|---|---|"]
    for model in args.models.split(","):
        base = None
        for name, extra in TRAIN_CONFIGS.items():
            rate = train_rate(model, extra, args.warmup, args.steps, args.threads)
            base = base or rate
            lines.append(f"| {model} | train step | {name} | {rate:,.0f} | {rate / base:.2f} |")
            print(lines[-1], flush=True)
        base = None
        for cl in (False, True):
            for batch in (1000, 128):
                rate = eval_rate(model, cl, batch, args.threads)
                base = base or rate
                setting = f"eval batch {batch}" + (", channels_last" if cl else "")
                lines.append(f"| {model} | evaluation | {setting} | {rate:,.0f} | {rate / base:.2f} |")
                print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
