"""The learning-rate schedule: linear warmup to the peak, then cosine/linear decay to min_lr_ratio, or constant."""

from __future__ import annotations

import itertools

import pytest
import torch

from dtune.optim import build_optimizer, build_scheduler, lr_factor
from dtune.schema import OptimConfig


def lrs(cfg: OptimConfig, steps: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    got = lrs(cfg, 20)
    assert got[:4] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4])  # never a zero-lr step
    assert got[4] == pytest.approx(1e-3)  # the peak, right after warmup
    assert got[-1] == pytest.approx(1e-4)  # the floor, on the last step
    assert all(a >= b for a, b in itertools.pairwise(got[4:]))  # monotone decay
    assert got[12] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 8 / 15)).item()))


def test_linear_and_constant_schedules():
    linear = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, linear, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    constant = OptimConfig(lr=1.0, warmup_steps=1, schedule="constant")
    assert [lr_factor(s, constant, 4) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_only_trainable_parameters_are_optimised():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
