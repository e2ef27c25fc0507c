"""USB's FixMatch iteration, timed; run by ``semi_speed.py`` with the interpreter of USB's own virtualenv.

This file imports ``semilearn`` (USB, Microsoft's Unified Semi-supervised Learning Benchmark, from PyPI)
and never mentor: the two codebases run in separate environments. It builds USB's ``fixmatch``
algorithm the way USB's Python API does for data it does not ship (``semilearn.get_config`` from a
dict, ``get_algorithm`` with the ``wrn_28_2`` builder, ``BasicDataset`` from numpy arrays,
``get_data_loader``), with the values of USB's classic CIFAR-10 FixMatch recipe
(``config/classic_cv/fixmatch/fixmatch_cifar10_40_0.yaml``: batch 64, ``uratio`` 7, EMA 0.999, SGD
0.03 Nesterov, fp32, ``use_cat``, one loader worker, hence two for the unlabelled loader) and the
views of USB's CIFAR-10 dataset (``semilearn/datasets/cv_datasets/cifar.py``: reflect-padded crop and
flip; the strong view adds PIL ``RandAugment(3, 5)`` with Cutout).

One iteration is the body of USB's training loop (``AlgorithmBase.train``): the next labelled and
unlabelled batches from the loaders, the ``before_train_step`` hooks, ``train_step`` on the batch
``process_batch`` moved to the device, and the ``after_train_step`` hooks (backward and optimizer step,
EMA, timer, logging; evaluation and checkpoints are scheduled past the end of the measurement). It
is timed twice: fed by the loaders (the pipeline a USB user runs), and on batches the loaders produced
beforehand (the step alone; the loaders' workers are shut down by then).

Two things differ on a machine without CUDA, where USB itself does not train (its ``send_model_cuda``
refuses): ``process_batch`` calls ``.cuda()``, so the batch is passed as it is (already on the CPU),
and the ``TimerHook`` (CUDA events) is not registered. Everything else runs as on a GPU.

    .venv-usb/bin/python benchmarks/_usb_fixmatch_step.py --data DATA.npz --out OUT.json --device cpu
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import random
import sys
import time
from importlib.metadata import version
from inspect import signature

import numpy as np
import torch

# USB's classic CIFAR-10 FixMatch recipe (fixmatch_cifar10_40_0.yaml), as far as one step uses it.
CLASSIC = {
    "algorithm": "fixmatch", "net": "wrn_28_2", "net_from_name": False, "num_classes": 10,
    "batch_size": 64, "uratio": 7, "ema_m": 0.999, "ulb_loss_ratio": 1.0, "hard_label": True, "T": 0.5,
    "p_cutoff": 0.95, "optim": "SGD", "lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4, "layer_decay": 1.0,
    "amp": False, "clip_grad": 0.0, "use_cat": True, "img_size": 32, "crop_ratio": 0.875,
    "train_sampler": "RandomSampler", "num_workers": 1, "num_labels": 40, "include_lb_to_ulb": True,
    "seed": 0, "epoch": 1, "num_log_iter": 256, "use_wandb": False, "use_aim": False, "use_tensorboard": False,
}
CIFAR10_MEAN, CIFAR10_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what USB's cifar.py uses


def cifar_views(size: int, crop_ratio: float):
    """USB's CIFAR weak and strong transforms (cifar.py), built from USB's and torchvision's pieces."""
    from semilearn.datasets.augmentation import RandAugment
    from torchvision import transforms

    def view(*extra):
        return transforms.Compose([
            transforms.Resize(size),
            transforms.RandomCrop(size, padding=int(size * (1 - crop_ratio)), padding_mode="reflect"),
            transforms.RandomHorizontalFlip(), *extra,
            transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

    return view(), view(RandAugment(3, 5))


def build(args, images: np.ndarray, labels: np.ndarray, lb_index: np.ndarray, num_iters: int):
    """(algorithm, labelled loader, unlabelled loader, device) as USB's Python API builds them."""
    from semilearn import BasicDataset, get_algorithm, get_config, get_data_loader, get_net_builder
    from semilearn.core.utils import send_model_cuda

    cuda = args.device == "cuda"
    config = dict(CLASSIC, batch_size=args.batch, uratio=args.uratio, num_workers=args.workers,
                  num_classes=int(labels.max()) + 1, num_labels=len(lb_index),
                  # the schedule's length; evaluation and checkpoints fall after the measurement
                  num_train_iter=num_iters, num_eval_iter=10 * num_iters,
                  dataset="synthetic_cifar",  # not one of USB's datasets: get_dataset returns None, nothing downloads
                  gpu=0 if cuda else None, distributed=False, multiprocessing_distributed=False,
                  save_dir=args.save_dir, save_name="fixmatch_speed")
    cfg = get_config(config)
    random.seed(cfg.seed)  # as USB's train.py seeds a run
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cuda:  # USB's train.py sets both flags in every run
        torch.backends.cudnn.deterministic = bool(args.cudnn_deterministic)
        torch.backends.cudnn.benchmark = True
    log = logging.getLogger("usb")
    log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.WARNING)
    alg = get_algorithm(cfg, get_net_builder(cfg.net, from_name=False), tb_log=None, logger=log)
    if cuda:
        alg.model = send_model_cuda(cfg, alg.model)
        alg.ema_model = send_model_cuda(cfg, alg.ema_model)
    else:
        alg.hooks_dict.pop("TimerHook")  # CUDA events
    weak, strong = cifar_views(cfg.img_size, cfg.crop_ratio)
    lb = BasicDataset(cfg.algorithm, images[lb_index], labels[lb_index], cfg.num_classes, weak, False, strong, False)
    ulb = BasicDataset(cfg.algorithm, images, labels, cfg.num_classes, weak, True, strong, False)
    # AlgorithmBase.set_data_loader's two training loaders, on these datasets
    lb_loader = get_data_loader(cfg, lb, cfg.batch_size, data_sampler=cfg.train_sampler, num_iters=num_iters,
                                num_epochs=cfg.epoch, num_workers=cfg.num_workers)
    ulb_loader = get_data_loader(cfg, ulb, cfg.batch_size * cfg.uratio, data_sampler=cfg.train_sampler,
                                 num_iters=num_iters, num_epochs=cfg.epoch, num_workers=2 * cfg.num_workers)
    alg.loader_dict = {"train_lb": lb_loader, "train_ulb": ulb_loader}
    return alg, lb_loader, ulb_loader, torch.device("cuda", 0) if cuda else torch.device("cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="npz with images [N, 32, 32, 3] uint8, labels [N], lb_index")
    p.add_argument("--out", required=True, help="where the JSON result is written")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--uratio", type=int, default=7)
    p.add_argument("--workers", type=int, default=1, help="USB's num_workers (the unlabelled loader gets twice)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cudnn-deterministic", type=int, default=1, choices=[0, 1],
                   help="USB's train.py sets cudnn.deterministic=True")
    p.add_argument("--save-dir", default="/tmp/usb-speed")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = np.load(args.data)
    images, labels, lb_index = data["images"], data["labels"].astype(np.int64), data["lb_index"]
    needed = 2 * (args.warmup + args.steps) + 4
    alg, lb_loader, ulb_loader, device = build(args, images, labels, lb_index, num_iters=4 * needed)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def to_device(data_lb, data_ulb):
        if cuda:
            return alg.process_batch(**data_lb, **data_ulb)
        wanted = signature(alg.train_step).parameters  # what process_batch selects, without the copy
        return {k: v for k, v in {**data_lb, **data_ulb}.items() if k in wanted and v is not None}

    def iteration(data_lb, data_ulb):
        alg.call_hook("before_train_step")
        alg.out_dict, alg.log_dict = alg.train_step(**to_device(data_lb, data_ulb))
        alg.call_hook("after_train_step")
        alg.it += 1

    alg.model.train()
    alg.it, alg.epoch = 0, 0
    alg.call_hook("before_run")
    alg.call_hook("before_train_epoch")

    # 1. fed by USB's loaders (PIL augmentation in the workers), as its training loop runs
    batches = zip(lb_loader, ulb_loader)
    for data_lb, data_ulb in itertools.islice(batches, args.warmup):
        iteration(data_lb, data_ulb)
    kept = []
    sync()
    t0 = time.perf_counter()
    for data_lb, data_ulb in itertools.islice(batches, args.steps):
        iteration(data_lb, data_ulb)
        if len(kept) < 4:
            kept.append((data_lb, data_ulb))
    sync()
    dt_loader = time.perf_counter() - t0
    loss = float(alg.out_dict["loss"])
    del batches  # shuts the loader workers down before the step is timed alone
    gc.collect()

    # 2. the same iteration on batches the loaders already produced (the step alone)
    for i in range(max(1, args.warmup // 2)):
        iteration(*kept[i % len(kept)])
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        iteration(*kept[i % len(kept)])
    sync()
    dt_step = time.perf_counter() - t0

    model = alg.model.module if hasattr(alg.model, "module") else alg.model
    result = {
        "it_s_loader": args.steps / dt_loader, "it_s_step": args.steps / dt_step,
        "pipeline_share": 1.0 - dt_step / dt_loader, "loss": loss,
        "semilearn": version("semilearn"), "torch": torch.__version__,
        "torchvision": version("torchvision"), "pillow": version("pillow"),
        "params": sum(q.numel() for q in model.parameters()), "threads": torch.get_num_threads(),
        "loader_workers": [args.workers, 2 * args.workers], "device": args.device,
        "cudnn_deterministic": bool(args.cudnn_deterministic) if cuda else None,
        "batch": [args.batch, args.batch * args.uratio], "warmup": args.warmup, "steps": args.steps,
        "hooks": list(alg.hooks_dict),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
