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


class CapturableSGD(torch.optim.Optimizer):
    """SGD with momentum, Nesterov and weight decay whose learning rate may be a device tensor.

    The same update as ``torch.optim.SGD`` (dampening 0): ``g = grad + wd * p``;
    ``buf = momentum * buf + g``; ``g = g + momentum * buf`` (Nesterov) or ``g = buf``;
    ``p -= lr * g``. Momentum buffers start at zero, which equals torch's first-step copy. With a
    tensor ``lr`` the update never reads a value back to the host, so the whole training step can be
    captured in a CUDA graph while a schedule changes the rate between replays (``lr.fill_``).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"]:
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
                grads = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                torch._foreach_add_(params, torch._foreach_mul(grads, -lr))
            else:
                torch._foreach_add_(params, grads, alpha=-lr)
        return None


def _replace(cfg, overrides: dict | None, what: str):
    if not overrides:
        return cfg
    try:
        return dataclasses.replace(cfg, **overrides)
    except TypeError as e:
        raise ConfigError(f"phase {what} override: {e}") from None


def _param_groups(params: list[nn.Parameter], cfg: OptimConfig) -> list[dict]:
    if cfg.decay_norm_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay, no_decay = split_decay(params)
    return [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, overrides: dict | None = None,
                    capturable: bool = False, extra: list[tuple[list[nn.Parameter], dict]] | None = None):
    """SGD (momentum, Nesterov) or AdamW over ``params``, norms and biases undecayed by default.

    ``extra`` adds parameter groups with their own rate, decay or betas (``[(codes, {"lr": 0.01})]``);
    the optimizer's kind is the phase's. ``capturable=True`` gives optimizers whose step can be captured
    in a CUDA graph (state and step counters on the device; see :class:`CapturableSGD`);
    :func:`device_lr` then moves their rates to the device."""
    cfg = _replace(cfg, overrides, "optimizer")
    groups = _param_groups(list(params), cfg)
    for more, own in extra or []:
        sub = _replace(cfg, own, "parameter group")
        groups += [{**g, "lr": sub.lr, "betas": sub.betas, "momentum": sub.momentum}
                   for g in _param_groups(list(more), sub)]
    # foreach kernels keep the update a handful of launches; state lives on the parameters' device.
    if cfg.name == "sgd":
        if capturable:
            return CapturableSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True, capturable=capturable)


def device_lr(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold each group's learning rate in a device tensor (:class:`StepSchedule` then updates it in
    place, so a captured step reads the current rate)."""
    for group in opt.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


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


class StepSchedule:
    """Every group's learning rate at optimizer step ``k``: its base rate times ``lr_factor(k)``.

    A pure function of the step, so the state is the step alone. A rate held in a device tensor
    (:func:`device_lr`) is updated in place with ``fill_``: no host synchronisation, and a captured
    step keeps reading the same address.
    """

    def __init__(self, opt: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int, base_lr: float):
        self.optimizer, self.cfg, self.max_steps, self.base_lr = opt, cfg, max_steps, float(base_lr)
        self.base = [float(g["lr"]) for g in opt.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.last_step, self.cfg, self.max_steps, self.base_lr)
        for group, base in zip(self.optimizer.param_groups, self.base):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * factor)
            else:
                group["lr"] = base * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base": list(self.base)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.base = int(state["last_step"]), [float(b) for b in state["base"]]
        self._apply()


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int, base_lr: float,
                    overrides: dict | None = None) -> StepSchedule:
    """The schedule of one phase's optimizer: the run's ``schedule`` with the phase's ``overrides``."""
    return StepSchedule(opt, _replace(cfg, overrides, "schedule"), max_steps, base_lr)
