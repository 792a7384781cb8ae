"""Backbone config and the static trunk: a timm model in `features_only` mode with cross-task BN.

Every BatchNorm of the backbone becomes `CrossTaskBatchNorm2d` (statistics over all workers'
batches); heads use GroupNorm or local BN, never cross-task BN, because ranks run different heads
and their collectives would not line up (DESIGN.md). Which trunk a config builds is decided by
the registry in `gppf.api.trunk` (kind x timm family); this file registers the generic static one,
and importing it registers every bundled trunk (whoever holds a BackboneConfig has imported it).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

import gppf.models.swin  # noqa: F401  (registers the Swin trunks; lego registers LegoResNet)
from gppf.api.task import FeatureInfo
from gppf.api.trunk import Trunk, register_trunk, timm_kwargs
from gppf.config.job import BackboneConfig
from gppf.dist.cross_bn import CrossTaskBatchNorm2d, checkpoint
from gppf.io.checkpoint import LoadReport, load_weights


def _checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module` in backward. Patches `forward` instead of wrapping the module, so
    state_dict keys are the same with and without checkpointing; BN running stats are updated
    only in the first forward (see cross_bn.recomputing)."""
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return inner(x)
        return checkpoint(inner, x)

    module.forward = forward


class Backbone(Trunk):
    """Static trunk: `forward(x, task) -> list of feature maps`, the same network for every task."""

    def __init__(
        self,
        name: str = "resnet50",
        out_indices: tuple[int, ...] = (-4, -3, -2, -1),
        cross_task_bn: bool = True,
        grad_checkpointing: bool = False,
        drop_path_rate: float | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.timm_name = name
        kwargs = timm_kwargs(drop_path_rate, model_kwargs)
        self.body = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=tuple(out_indices), **kwargs
        )
        if cross_task_bn:
            CrossTaskBatchNorm2d.convert(self.body)
        self.feature_info = [
            FeatureInfo(c, r)
            for c, r in zip(self.body.feature_info.channels(), self.body.feature_info.reduction())
        ]
        if grad_checkpointing:
            # Checkpoint every container child (the stages, a deep stem); single layers are cheap.
            for child in self.body.children():
                if any(True for _ in child.parameters()) and any(True for _ in child.children()):
                    _checkpoint_forward(child)

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> Backbone:
        return cls(
            cfg.name,
            cfg.out_indices,
            cfg.cross_task_bn,
            cfg.grad_checkpointing,
            cfg.drop_path_rate,
            cfg.model_kwargs,
        )

    def forward(self, x: torch.Tensor, task: str | None = None) -> list[torch.Tensor]:
        return self.body(x)  # one network for every task

    def export(self, task: str | None = None) -> dict[str, torch.Tensor]:
        # features_only keeps timm's module names; it only lacks the classifier (num_classes=0).
        return {k: v.detach().clone() for k, v in self.body.state_dict().items()}

    def load_plain(self, state: dict[str, torch.Tensor], source: str) -> LoadReport:
        return load_weights(self.body, state, source)


@register_trunk("static")
def _static(cfg: BackboneConfig, task_names: list[str]) -> Trunk:
    return Backbone.from_config(cfg)
