"""Trunk + optional shared neck + one head per task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gppf.task import Task


class MultiTaskModel(nn.Module):
    """`neck` (gppf.neck.SharedNeck, optional) sits between the trunk and every head; heads are
    built on the neck's pyramid when there is one, on the trunk's levels otherwise."""

    def __init__(self, backbone: nn.Module, tasks: list[Task], neck: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        features = neck.feature_info if neck is not None else backbone.feature_info
        self.heads = nn.ModuleDict({t.name: t.build_head(features) for t in tasks})

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
        if self.neck is not None:
            feats = self.neck(feats, task)
        head = self.heads[task]
        if getattr(head, "takes_batch", False):
            return head(feats, batch), tie
        return head(feats), tie
