"""Speed of one FixMatch iteration, side by side in one run: mentor's engine against USB (semilearn).

Both sides train WRN-28-2 (``wrn_28_2`` in each codebase's zoo) with FixMatch on CIFAR-shaped data:
50,000 random uint8 32x32x3 images in 10 classes generated here (nothing is downloaded; speed does not
depend on the pixels), 40 of them labelled; per iteration 64 labelled images in a weak view and
7 x 64 unlabelled images in a weak and a strong view (960 images through the network in one forward,
USB's ``use_cat``), SGD, an EMA copy with decay 0.999. Each side is timed in steady state after its
warm-up, the device synchronised only at the two ends; the result is iterations/s and the ratio.

- ``USB``: USB's FixMatch as a user runs it (``_usb_fixmatch_step.py``, a subprocess with the python
  of USB's own virtualenv): the body of its training loop (``train_step`` and the hooks around it:
  backward, optimizer, EMA) fed by its ``BasicDataset``/``DataLoader`` pipeline, which makes the views
  in PIL on the CPU (``RandAugment(3, 5)`` + Cutout for the strong one) in its loader workers, with the
  values of USB's classic CIFAR-10 recipe (fp32, one worker, two for the unlabelled loader). Timed a
  second time on batches the loaders produced beforehand: the difference is the time the training
  loop waits for the data pipeline, reported as its share of USB's iteration.
- ``mentor``: the engine's own step (``Trainer._train_step`` with ``method.name=fixmatch``): the batch
  drawn on the device, the weak and strong views made there, forward, backward, SGD, EMA, loss meter.
  On CUDA also ``trainer.compile`` with ``trainer.cuda_graph`` (the step captured once and replayed,
  ``mentor.engine.graph``) in bf16.

mentor's strong view draws 2 RandAugment ops per image (FixMatch's paper) where USB's CIFAR pipeline
draws 3; ``--strong-ops 3`` (the default) gives mentor's view USB's count, so both sides make the same
augmentations.

USB lives in its own virtualenv, never in mentor's ``.venv``. ``--setup-usb`` creates it at
``.venv-usb`` (``--usb-venv``) with exactly these commands, and exits::

    python3 -m venv .venv-usb
    .venv-usb/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-usb/bin/pip install --no-deps semilearn==0.3.2 torchaudio==2.11.1
    .venv-usb/bin/pip install tqdm==4.70.1 scikit-image==0.26.0 progress==1.6.1 ruamel.yaml==0.19.1 \\
        scikit-learn==1.9.1 timm==1.0.31 transformers==5.24.0 tensorboard==2.21.0 wandb==0.31.0 aim==3.29.1

semilearn's own requirements are installed without resolving them (its list would bring another torch):
the last line is what ``import semilearn`` needs. FixMatch's step uses none of torchaudio,
transformers, timm, tensorboard, wandb or aim, but semilearn's package ``__init__`` imports every
dataset, network and logging hook it has, so they must be importable; torchaudio is only imported
(audio datasets), never called, so the 2.11 build beside torch 2.14 does.

    python benchmarks/semi_speed.py --setup-usb
    python benchmarks/semi_speed.py                               # CPU, and CUDA when there is one
    python benchmarks/semi_speed.py --devices cuda --warmup 20 --steps 100
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mentor.config import load_config
from mentor.data import ArrayDataset
from mentor.data.augment import StrongAugment
from mentor.engine import Trainer
from mentor.engine.inputs import Splits
from mentor.engine.trainer import hardware_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import time_steps  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_usb_fixmatch_step.py"
USB_PACKAGES = ["tqdm==4.70.1", "scikit-image==0.26.0", "progress==1.6.1", "ruamel.yaml==0.19.1",
                "scikit-learn==1.9.1", "timm==1.0.31", "transformers==5.24.0", "tensorboard==2.21.0",
                "wandb==0.31.0", "aim==3.29.1"]
CIFAR10_MEAN, CIFAR10_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # USB's CIFAR-10 normalisation

MODES = {
    # name: (precision, compile, cuda_graph)
    "eager_fp32": ("fp32", False, False),
    "compile_graph_bf16": ("bf16", True, True),
}
DEFAULT_MODES = {"cpu": "eager_fp32", "cuda": "eager_fp32,compile_graph_bf16"}


def setup_commands(venv: Path) -> list[list[str]]:
    pip = [str(venv / "bin" / "pip"), "install"]
    return [
        [sys.executable, "-m", "venv", str(venv)],
        pip + ["torch==2.14.1", "torchvision==0.29.1"],
        pip + ["--no-deps", "semilearn==0.3.2", "torchaudio==2.11.1"],
        pip + USB_PACKAGES,
    ]


def setup_usb(venv: Path) -> None:
    for cmd in setup_commands(venv):
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import semilearn.algorithms.fixmatch"], check=True)
    print(f"USB's virtualenv is ready: {venv}")


def make_data(n: int, classes: int, labels_per_class: int, seed: int = 0):
    """CIFAR-shaped random images (uint8, [N, 32, 32, 3] as CIFAR is stored), balanced labels, and the
    positions of ``labels_per_class`` labelled images per class."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    lb_index = np.concatenate([np.flatnonzero(labels == c)[:labels_per_class] for c in range(classes)])
    return images, labels.astype(np.int64), lb_index


def mentor_splits(images: np.ndarray, labels: np.ndarray, lb_index: np.ndarray, classes: int) -> Splits:
    full = ArrayDataset(images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                        labels=torch.from_numpy(labels), num_classes=classes, name="synthetic_cifar",
                        mean=CIFAR10_MEAN, std=CIFAR10_STD)
    lb = torch.from_numpy(lb_index)
    held = full.subset(torch.arange(256))
    return Splits(train=full.subset(lb), val=held, test=held, train_index=lb, unlabeled=full)


def match_strong_ops(trainer: Trainer, num_ops: int) -> None:
    """Give the engine's strong views ``num_ops`` RandAugment ops per image."""
    found = False
    for part in trainer.inputs.parts:
        views = []
        for name, aug in part.views:
            if isinstance(aug, StrongAugment):
                aug, found = dataclasses.replace(aug, num_ops=num_ops), True
            views.append((name, aug))
        part.views = views
    if not found:
        raise RuntimeError("the FixMatch batch has no strong view to adjust")


def mentor_rate(args, splits: Splits, device: str, mode: str, out_dir: Path) -> dict:
    precision, compiled, graph = MODES[mode]
    overrides = [
        "method.name=fixmatch", "model.name=wrn_28_2", f"data.batch_size={args.batch}",
        f"data.unlabeled_ratio={args.uratio}", "data.augment=weak", "data.padding=4", "data.flip=true",
        "optim.name=sgd", "optim.lr=0.03", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
        "schedule.name=cosine", "trainer.ema=0.999", f"trainer.device={device}", f"trainer.precision={precision}",
        f"trainer.compile={str(compiled).lower()}", f"trainer.cuda_graph={str(graph).lower()}",
        f"trainer.max_steps={args.warmup + args.steps + 1}", "trainer.progress=false",
        f"out_dir={out_dir / f'{device}_{mode}'}", "resume=false",
    ]
    if device == "cpu":
        overrides.append(f"trainer.threads={args.threads}")
    trainer = Trainer(load_config(None, overrides), splits=splits)
    if args.strong_ops:
        match_strong_ops(trainer, args.strong_ops)
    seconds = time_steps(trainer, args.warmup, args.steps)
    loss = trainer.meter.read().get("loss", float("nan"))
    if not np.isfinite(loss):
        raise RuntimeError(f"mentor {device} {mode}: the loss is not finite ({loss})")
    return {"it_s": args.steps / seconds, "loss": loss, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in trainer.method.student.parameters())}


def usb_rate(args, data_path: Path, device: str, out_dir: Path) -> dict:
    python = Path(args.usb_venv) / "bin" / "python"
    out = out_dir / f"usb_{device}.json"
    cmd = [str(python), "-W", "ignore", str(WORKER), "--data", str(data_path), "--out", str(out),
           "--device", device, "--batch", str(args.batch), "--uratio", str(args.uratio),
           "--workers", str(args.usb_workers), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--cudnn-deterministic", str(int(not args.usb_nondeterministic)), "--save-dir", str(out_dir / "usb")]
    env = dict(os.environ)
    if device == "cpu":
        cmd += ["--threads", str(args.threads)]
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, cwd=out_dir, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"USB's FixMatch step failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def report(args, rows: list[dict], usb: dict, hardware: dict, command: str, load: tuple) -> str:
    any_usb = next(iter(usb.values()))
    images = args.batch * (1 + 2 * args.uratio)
    mentor_params = next(r["params"] for r in rows if r["side"] == "mentor")
    lines = [
        f"## FixMatch iteration speed: mentor against USB (semilearn {any_usb['semilearn']})",
        "",
        f"WRN-28-2, CIFAR-shaped random data ({args.pool:,} uint8 3x32x32 images, 10 classes, 40 labelled), "
        f"{args.batch} labelled images (weak view) + {args.uratio}x{args.batch} unlabelled (weak and strong "
        f"view) per iteration, {images} images through the network, SGD, EMA 0.999. Steady state: "
        f"{args.warmup} warm-up iterations, then {args.steps} timed between two device synchronisations. "
        f"RandAugment ops per strong view: USB 3, mentor {args.strong_ops or 2}.",
        "",
        "| device | side | what one iteration is | precision | it/s | x USB (its pipeline) | x USB (step alone) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u = usb[r["device"]]
        lines.append(f"| {r['device_text']} | {r['side']} | {r['what']} | {r['precision']} | {fmt(r['it_s'])} | "
                     f"{r['it_s'] / u['it_s_loader']:.2f} | {r['it_s'] / u['it_s_step']:.2f} |")
    lines.append("")
    for device, u in usb.items():
        lines.append(f"- {device}: data pipeline share of USB's iteration time {100 * u['pipeline_share']:.0f}% "
                     f"(1 - step-alone time / loader-fed time; loader workers {u['loader_workers'][0]} labelled + "
                     f"{u['loader_workers'][1]} unlabelled)")
    for device, name in hardware.items():
        lines.append(f"- hardware ({device}): {name}")
    lines += [
        f"- torch: mentor {torch.__version__} (this process), USB {any_usb['torch']} (its virtualenv); "
        f"torchvision {any_usb['torchvision']}, Pillow {any_usb['pillow']}, semilearn {any_usb['semilearn']}; "
        f"Python {platform.python_version()}",
        f"- parameters: mentor wrn_28_2 {mentor_params:,} (its convolutions have biases), USB wrn_28_2 "
        f"{any_usb['params']:,}",
    ]
    if "cuda" in usb:
        lines.append(f"- USB on CUDA: cudnn.deterministic={usb['cuda']['cudnn_deterministic']} and "
                     "cudnn.benchmark=True (as USB's train.py sets them), fp32 (the recipe's amp: False)")
    lines += [f"- load average (1 min) of this machine at the start and the end: {load[0]:.1f}, {load[1]:.1f} "
              f"({os.cpu_count()} CPUs)",
              f"- command: `{command}`", f"- date: {datetime.date.today().isoformat()}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup-usb", action="store_true", help="create USB's virtualenv (see above) and exit")
    p.add_argument("--usb-venv", default=str(ROOT / ".venv-usb"))
    p.add_argument("--devices", default="cpu,cuda", help="cuda is skipped where there is none")
    p.add_argument("--modes", default=None, help=f"mentor's modes, of {', '.join(MODES)} "
                   f"(default: cpu {DEFAULT_MODES['cpu']}; cuda {DEFAULT_MODES['cuda']})")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training process on the CPU")
    p.add_argument("--usb-workers", type=int, default=1, help="USB's num_workers (its recipe: 1)")
    p.add_argument("--usb-nondeterministic", action="store_true",
                   help="leave cudnn.deterministic off on USB's side (its train.py turns it on)")
    p.add_argument("--strong-ops", type=int, default=3, help="RandAugment ops of mentor's strong view (0: its own)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--uratio", type=int, default=7)
    p.add_argument("--pool", type=int, default=50_000, help="images in the synthetic training set")
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on the CPU, 20 on CUDA")
    p.add_argument("--steps", type=int, default=None, help="default: 5 on the CPU, 100 on CUDA")
    p.add_argument("--out", default="runs/bench/semi_speed.md")
    args = p.parse_args(argv)
    if args.setup_usb:
        setup_usb(Path(args.usb_venv))
        return
    if not (Path(args.usb_venv) / "bin" / "python").exists():
        raise SystemExit(f"USB's virtualenv {args.usb_venv} is missing: run `python {Path(__file__).name} "
                         "--setup-usb` first")
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    if not devices:
        raise SystemExit("no device to measure on (CUDA is not available here)")
    command = "python benchmarks/semi_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    images, labels, lb_index = make_data(args.pool, 10, 4)
    splits = mentor_splits(images, labels, lb_index, 10)
    warmup, steps = args.warmup, args.steps
    rows, usb, hardware = [], {}, {}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_path = tmp / "data.npz"
        np.savez(data_path, images=images, labels=labels, lb_index=lb_index)
        for device in devices:
            args.warmup = warmup if warmup is not None else (2 if device == "cpu" else 20)
            args.steps = steps if steps is not None else (5 if device == "cpu" else 100)
            hardware[device] = hardware_name(torch.device(device))
            text = f"cpu, {args.threads} threads" if device == "cpu" else device
            print(f"[{device}] USB ...", file=sys.stderr, flush=True)
            u = usb[device] = usb_rate(args, data_path, device, tmp)
            workers = f"{u['loader_workers'][0]}+{u['loader_workers'][1]} workers"
            rows.append({"device": device, "device_text": text, "side": "USB", "precision": "fp32",
                         "it_s": u["it_s_loader"], "what": f"train_step + hooks, fed by its DataLoader (PIL "
                         f"RandAugment on the CPU, {workers})"})
            rows.append({"device": device, "device_text": text, "side": "USB", "precision": "fp32",
                         "it_s": u["it_s_step"], "what": "the same on pre-collated batches (step alone)"})
            for mode in (args.modes or DEFAULT_MODES[device]).split(","):
                print(f"[{device}] mentor {mode} ...", file=sys.stderr, flush=True)
                m = mentor_rate(args, splits, device, mode, tmp)
                precision, compiled, graph = MODES[mode]
                how = ", ".join(["engine step"] + (["compiled"] if compiled else []) +
                                (["CUDA graph"] if graph else []) + ["views made on the device"])
                rows.append({"device": device, "device_text": text, "side": "mentor", "precision": precision,
                             "it_s": m["it_s"], "what": how, "params": m["params"]})
    table = report(args, rows, usb, hardware, command, (load_start, os.getloadavg()[0]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
