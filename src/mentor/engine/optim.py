"""Optimizers and learning-rate schedules over optimizer steps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config import ConfigError, OptimConfig, ScheduleConfig


def split_decay(params: Iterable[nn.Parameter]) -> tuple[list, list]:
    """Parameters that get weight decay (matrices, kernels) and those that do not (norms, biases).

    Norm weights and biases are 1-D: the usual rule (timm, nanoGPT) is to decay only ndim >= 2.
    """
    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    return decay, no_decay


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, overrides: dict | None = None):
    """SGD (momentum, Nesterov) or AdamW over ``params``, norms and biases undecayed by default."""
    if overrides:
        try:
            cfg = dataclasses.replace(cfg, **overrides)
        except TypeError as e:
            raise ConfigError(f"phase optimizer override: {e}") from None
    params = list(params)
    if cfg.decay_norm_bias:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        decay, no_decay = split_decay(params)
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # foreach kernels keep the update a handful of launches; state lives on the parameters' device.
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def lr_factor(step: int, cfg: ScheduleConfig, max_steps: int, base_lr: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "multistep":
        marks = [m * max_steps if 0 < m < 1 else m for m in cfg.milestones]
        return cfg.gamma ** sum(step >= m for m in marks)
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int, base_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, max_steps, base_lr))
