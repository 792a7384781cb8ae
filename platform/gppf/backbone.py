"""The shared backbone: a timm model in `features_only` mode with cross-task BN.

Every BatchNorm of the backbone becomes `CrossTaskBatchNorm2d` (statistics over all workers'
batches); heads use GroupNorm or local BN, never cross-task BN, because ranks run different heads
and their collectives would not line up (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gppf.cross_bn import CrossTaskBatchNorm2d, recomputing
from gppf.lego import LegoConfig, LegoResNet
from gppf.task import FeatureInfo


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # a timm model (static: any with features_only; lego: a ResNet)
    kind: str = "static"  # "static" (one shared network) or "lego" (per-task routes, GPPF §3.2)
    lego: LegoConfig = field(default_factory=LegoConfig)
    out_indices: tuple[int, ...] = (1, 2, 3, 4)  # static: res2..res5 for ResNets, strides 4..32
    cross_task_bn: bool = True  # False = GPPF Table 1's "local BN" ablation
    grad_checkpointing: bool = False  # static backbones only for now
    drop_path_rate: float = 0.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


def build_backbone(cfg: BackboneConfig, task_names: list[str]) -> nn.Module:
    """The shared backbone of a job: `forward(x, task) -> feature maps`, `feature_info`."""
    if cfg.kind == "static":
        return Backbone.from_config(cfg)
    if cfg.kind != "lego":
        raise ValueError(f"backbone.kind must be 'static' or 'lego', got {cfg.kind!r}")
    if cfg.grad_checkpointing:
        raise ValueError("backbone.grad_checkpointing is not supported with backbone.kind=lego yet")
    if not cfg.name.startswith("resnet"):
        raise ValueError(
            f"backbone.kind=lego supports timm ResNets (resnet18, resnet50, ...), got {cfg.name!r}"
        )
    model = LegoResNet(cfg.name, task_names, cfg.lego)
    if cfg.cross_task_bn:
        CrossTaskBatchNorm2d.convert(model)
    return model


def _recompute_context():
    import contextlib

    return contextlib.nullcontext(), recomputing()


def _checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module` in backward. Patches `forward` instead of wrapping the module, so
    state_dict keys are the same with and without checkpointing; BN running stats are updated
    only in the first forward (see cross_bn.recomputing)."""
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return inner(x)
        return checkpoint(inner, x, use_reentrant=False, context_fn=_recompute_context)

    module.forward = forward


class Backbone(nn.Module):
    """`forward(x) -> list of feature maps`; `feature_info` declares their channels and strides."""

    def __init__(
        self,
        name: str = "resnet50",
        out_indices: tuple[int, ...] = (1, 2, 3, 4),
        cross_task_bn: bool = True,
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        kwargs.update(model_kwargs or {})
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
