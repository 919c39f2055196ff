"""Optimizers and learning-rate schedules, defined in optimizer steps.

The schedule is a pure function of the global optimizer step, so the learning rate at step s is
the same whatever the number of processes or accumulation steps. It is a plain LambdaLR that
train.py steps once per optimizer step and never hands to `accelerator.prepare` (a prepared
scheduler steps once per process per call).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distcifar.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        # 1-D parameters are biases and BatchNorm scales: weight decay on them only hurts.
        (decay if param.ndim > 1 or cfg.decay_norm_and_bias else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at global optimizer step `step` (0-based)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // max(1, round(cfg.step_epochs * steps_per_epoch)))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress  # onecycle: linear up over the warm-up, linear down to zero


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch, total_steps))
