"""Optimizer and the warmup-cosine learning-rate curve (the schedule itself is `gppf.engine.stages`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from gppf.config.job import OptimConfig


NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed")


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Swin's (and timm's) rule: 1-D tensors (norm weights, biases) and position tables."""
    return p.ndim <= 1 or name.endswith(".bias") or any(n in name for n in NO_DECAY_NAMES)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """One default group, plus the groups the trunk asks for (lego: controller logits with their
    own lr and no weight decay), plus, with `norm_bias_decay` off, a group of the norms, biases and
    position tables without weight decay. Every parameter that can train is in it from the
    start: stages freeze and unfreeze by `requires_grad`, and a frozen parameter simply gets no
    gradient. With `decay_divided_by_lr` the optimizer's weight decay is weight_decay / lr."""
    trunk = getattr(model, "backbone", None)
    special = trunk.param_groups(cfg.lr) if trunk is not None else []
    special = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in special]
    special = [g for g in special if g["params"]]
    taken = {id(p) for g in special for p in g["params"]}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": [p for n, p in rest if cfg.norm_bias_decay or not no_decay(n, p)]}]
    if not cfg.norm_bias_decay:
        groups.append({"params": [p for n, p in rest if no_decay(n, p)], "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]] + special
    decay = cfg.weight_decay / cfg.lr if cfg.decay_divided_by_lr else cfg.weight_decay
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=decay)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {cfg.name!r}")


def warmup_cosine(
    step: int, total: int, warmup: int, min_ratio: float = 0.0, warmup_factor: float = 0.0
) -> float:
    """LR multiplier at `step`: linear over `warmup` steps (from `warmup_factor`, mmcv's warmup
    ratio; 0: from 1/warmup), then cosine to `min_ratio`."""
    if warmup > 0 and step < warmup:
        if warmup_factor > 0:
            return warmup_factor + (1 - warmup_factor) * step / warmup
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_step(step: int, warmup: int, decay_steps: list[int], factor: float = 0.1) -> float:
    """LR multiplier at `step`: linear over `warmup` steps (from 1/warmup), then x factor at each
    of `decay_steps` passed (mmcv's step policy)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return factor ** sum(1 for d in decay_steps if step >= d)
