"""Backbone + one head per task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gppf.task import Task


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: nn.Module, tasks: list[Task]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({t.name: t.build_head(backbone.feature_info) for t in tasks})

    def forward(
        self, x: torch.Tensor, task: str, batch: dict[str, torch.Tensor] | None = None
    ) -> tuple[Any, torch.Tensor]:
        """Returns (head outputs, a zero scalar tied to every backbone output).

        Heads with `takes_batch = True` (detection: targets and image sizes) also get the batch.

        Add the zero to the loss: a head that ignores some backbone outputs (a classifier reads only
        the last) must still send a gradient through every backbone BN, because cross-task BN's
        backward is a collective that all ranks issue in the same order.
        """
        feats = self.backbone(x, task)
        tie = sum(f.sum() for f in feats) * 0.0
        head = self.heads[task]
        if getattr(head, "takes_batch", False):
            return head(feats, batch), tie
        return head(feats), tie
