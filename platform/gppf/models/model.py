"""Trunk + optional shared neck + one head per task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gppf.api.heads import BindsTrunk, RoutesTask, TakesBatch, claims
from gppf.api.task import Task

Part = tuple[str, dict[str, torch.Tensor]]  # (task name, batch)


class MultiTaskModel(nn.Module):
    """`neck` (gppf.models.neck.SharedNeck, optional) sits between the trunk and every head; heads are
    built on the neck's pyramid when there is one, on the trunk's levels otherwise (and always on
    the trunk's for tasks with `reads_trunk`, such as the self-supervised auxiliary tasks).

    A head's optional abilities are gppf.api.heads' Protocols: BindsTrunk heads are handed the
    trunk once it is built (MoCo's momentum encoder starts as a copy of it), RoutesTask heads are
    told, at every forward, whose lego route the trunk ran, TakesBatch heads get the batch."""

    def __init__(self, backbone: nn.Module, tasks: list[Task], neck: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.reads_trunk = {t.name for t in tasks if neck is None or t.reads_trunk}
        self.heads = nn.ModuleDict(
            {
                t.name: t.build_head(
                    backbone.feature_info if t.name in self.reads_trunk else neck.feature_info
                )
                for t in tasks
            }
        )
        for head in self.heads.values():
            if claims(head, BindsTrunk):
                head.bind_trunk(backbone)
        # Looked up once: the forward runs every step.
        self.takes_batch = {n for n, h in self.heads.items() if claims(h, TakesBatch)}
        self.routed = {n for n, h in self.heads.items() if claims(h, RoutesTask)}

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
        return self._head(task, feats, batch, task), tie

    def forward_composite(self, parts: list[Part], input_key: list[str]) -> tuple[list[Any], torch.Tensor]:
        """CompL's composite step: the inputs of several tasks (a target and its auxiliary tasks)
        concatenated into ONE trunk forward along the first task's route, then each task's slice
        of the features through its head. One trunk forward per rank and step keeps cross-task
        BN's collectives in lockstep with the other ranks."""
        route = parts[0][0]
        xs = [batch[key] for (_, batch), key in zip(parts, input_key)]
        feats = self.backbone(torch.cat(xs), route)
        tie = sum(f.sum() for f in feats) * 0.0
        outs, start = [], 0
        for (task, batch), x in zip(parts, xs):
            sliced = [f[start : start + x.shape[0]] for f in feats]
            outs.append(self._head(task, sliced, batch, route))
            start += x.shape[0]
        return outs, tie

    def _head(self, task: str, feats: list[torch.Tensor], batch: dict | None, route: str) -> Any:
        if self.neck is not None and task not in self.reads_trunk:
            feats = self.neck(feats, task)
        head = self.heads[task]
        if task in self.routed:
            head.route_task = route
        if task in self.takes_batch:
            return head(feats, batch)
        return head(feats)
