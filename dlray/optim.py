"""Optimizers and learning-rate schedules from `optim:` and `scheduler:`."""

from __future__ import annotations

import math

import torch


def build_optimizer(cfg, params, fused: bool = False) -> torch.optim.Optimizer:
    """`fused`: Adam(W) updates every parameter in one kernel (on CUDA), not one kernel per tensor."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(cfg, optimizer, steps_per_epoch: int, total: int, mode: str):
    """Every schedule but `plateau` is a LambdaLR stepped once per optimizer step, over the run's `total`
    optimizer steps (its budget); `plateau` is ReduceLROnPlateau, stepped at each validation with its metric."""
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.name == "cosine":
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def is_per_step(scheduler) -> bool:
    """True for schedules stepped after every optimizer step, False for per-epoch ones."""
    return not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def apply_hyperparameters(optimizer, scheduler, cfg, saved_base_lr: float) -> None:
    """Give a restored optimizer `cfg`'s hyperparameters. The schedule keeps its progress: the
    current learning rate is rescaled by the new base rate over the one it was saved with."""
    scale = cfg.lr / saved_base_lr
    for group in optimizer.param_groups:
        group["lr"] *= scale
        if "initial_lr" in group:
            group["initial_lr"] *= scale
        group["weight_decay"] = cfg.weight_decay
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * scale for lr in scheduler.base_lrs]
