"""Optimizer groups and learning-rate schedules against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from mentor.config import OptimConfig, ScheduleConfig
from mentor.engine.optim import build_optimizer, build_scheduler, lr_factor


def lrs(cfg, max_steps, base=0.1):
    model = nn.Linear(2, 2)
    opt = build_optimizer(list(model.parameters()), OptimConfig(lr=base))
    sched = build_scheduler(opt, cfg, max_steps, base)
    out = []
    for _ in range(max_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_matches_formula():
    got = lrs(ScheduleConfig(name="cosine", warmup_steps=4), 20)
    assert got[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    for s in range(4, 20):
        expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
        assert got[s] == pytest.approx(expected)


def test_cosine_floor():
    assert lr_factor(10, ScheduleConfig(min_lr=0.01), 10, 0.1) == pytest.approx(0.1)


def test_multistep_fractions_and_steps():
    got = lrs(ScheduleConfig(name="multistep", milestones=[0.5, 15]), 20)
    assert got[9] == pytest.approx(0.1) and got[10] == pytest.approx(0.01)
    assert got[14] == pytest.approx(0.01) and got[15] == pytest.approx(0.001)


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    opt = build_optimizer(list(model.parameters()), OptimConfig(weight_decay=5e-4))
    by_wd = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert by_wd[5e-4] == 4 * 9 + 2 * 4  # conv kernel + linear weight
    assert by_wd[0.0] == 4 + 4 + 4 + 2  # conv bias, BN weight and bias, linear bias
    opt = build_optimizer(list(model.parameters()), OptimConfig(decay_norm_bias=True))
    assert len(opt.param_groups) == 1


def test_sgd_nesterov_and_adamw():
    p = [nn.Parameter(torch.ones(3, 3))]
    sgd = build_optimizer(p, OptimConfig(name="sgd", nesterov=True, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    adamw = build_optimizer(p, OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.9)))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)
