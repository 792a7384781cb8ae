"""The shared backbone: a timm model in `features_only` mode with cross-task BN.

Every BatchNorm of the backbone becomes `CrossTaskBatchNorm2d` (statistics over all workers'
batches); heads use GroupNorm or local BN, never cross-task BN, because ranks run different heads
and their collectives would not line up (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gppf.cross_bn import CrossTaskBatchNorm2d, recomputing
from gppf.task import FeatureInfo


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # any timm model that supports features_only
    out_indices: tuple[int, ...] = (1, 2, 3, 4)  # res2..res5 for ResNets: strides 4, 8, 16, 32
    cross_task_bn: bool = True  # False = GPPF Table 1's "local BN" ablation
    grad_checkpointing: bool = False
    drop_path_rate: float = 0.0


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
    ):
        super().__init__()
        kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
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
        return cls(cfg.name, cfg.out_indices, cfg.cross_task_bn, cfg.grad_checkpointing, cfg.drop_path_rate)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)
