"""AdamW over the trainable parameters, with linear warmup then cosine/linear decay (or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dtune.schema import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model``; with ``loraplus_lr_ratio``, PEFT's LoRA+ groups (Hayou et
    al. 2024, arXiv:2402.12354): B matrices and 1-D parameters (DoRA magnitudes, biases) at lr x ratio, A matrices
    and the rest at lr. The schedule scales every group's lr by the same factor."""
    kwargs = {"betas": (cfg.betas[0], cfg.betas[1]), "eps": cfg.eps}
    if cfg.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=cfg.lr,
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
            loraplus_weight_decay=cfg.weight_decay,
            **kwargs,
        )
        # Empty groups (no embedding adapters, no 1-D parameters) would only confuse ZeRO's flat partitions.
        optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
        return optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based: the lr used by the first step is factor(0))."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps - 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
