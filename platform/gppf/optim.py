"""Optimizer and learning-rate schedule (linear warmup, then cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gppf.job_config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, controller_lr: float = 0.0) -> torch.optim.Optimizer:
    """Controller logits (lego backbones) form their own group: their own lr, no weight decay."""
    ctrl = [p for n, p in model.named_parameters() if ".controller." in f".{n}" and p.requires_grad]
    ctrl_ids = {id(p) for p in ctrl}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in ctrl_ids]
    groups = [{"params": params}]
    if ctrl:
        groups.append({"params": ctrl, "lr": controller_lr or cfg.lr, "weight_decay": 0.0})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {cfg.name!r}")


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at `step`: linear from 0 over `warmup` steps, then cosine to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, warmup, cfg.min_lr_ratio)
    )
